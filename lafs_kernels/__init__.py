"""Fused kernels for LAFS / Part fViT face recognition.

Public operations (each dispatches to the best backend for its inputs;
``python -m lafs_kernels.info`` shows which are available here):

* :func:`landmark_patch_gather` -- landmark-centred P x P patches as tokens.
* :func:`margin_softmax_cross_entropy` -- CosFace / ArcFace / combined margin
  softmax cross-entropy without materialising the ``[batch, classes]`` logits.

The view augmentation of LAFS pretraining has kernels beside its PyTorch references:
:mod:`lafs_kernels.ops.gaussian_blur` (one sigma per image; C++) and :mod:`lafs_kernels.ops.dino_colour`
(DINO's colour chain on the pixels of patch tokens; C++ and Triton). :mod:`lafs_kernels.ops.attention` is the
Part fViT blocks' attention over short token sequences (C++ on the CPU).

Modules live in :mod:`lafs_kernels.nn` (``PartialFC``: class centres sharded across ranks, a
drop-in for arcface_torch's ``PartialFC_V2``); functions with the original LAFS and insightface
signatures in :mod:`lafs_kernels.compat`; :mod:`lafs_kernels.reshard` moves Partial FC shards to
another number of ranks (``python -m lafs_kernels.reshard``).
"""

from ._dispatch import BackendUnavailableError
from .ops import attention, dino_colour, gaussian_blur  # noqa: F401 (their backends show in lafs_kernels.info)
from .ops.landmark_patch_gather import landmark_patch_gather
from .ops.margin_softmax import margin_softmax_cross_entropy

__version__ = "0.1.0"
__all__ = ["landmark_patch_gather", "margin_softmax_cross_entropy", "BackendUnavailableError", "__version__"]
