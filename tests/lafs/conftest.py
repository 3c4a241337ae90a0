"""Until the gather's ``view_affine`` (issue 21, branch ``gather``) is merged, the view builder's fused
path calls the plain-torch stand-in of ``tests/lafs/affine_gather_stand_in.py``; with the real one
installed this does nothing."""
import pytest

import affine_gather_stand_in


@pytest.fixture(autouse=True)
def _affine_gather_until_merged(monkeypatch):
    if not affine_gather_stand_in.real_gather_has_view_affine():
        import lafs.ssl.views

        monkeypatch.setattr(lafs.ssl.views, "landmark_patch_gather", affine_gather_stand_in.affine_gather)
    yield
