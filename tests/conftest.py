"""Shared test conventions.

* ``@pytest.mark.gpu`` tests need a CUDA device and skip cleanly without one.
* Every test gets fresh random inputs: the ``rng`` fixture seeds from the
  test's name and a per-run salt, so failures print the seed that reproduces them.
* ``LAFS_TEST_SEED=<int>`` fixes the salt to replay a run.
* Without a GPU, Triton kernels run on CPU tensors through the interpreter:
  ``TRITON_INTERPRET=1`` is set here, before any kernel is decorated, because
  ``triton.jit`` decides at decoration time whether to interpret.
"""

import os
import random
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from helpers.triton_interpreter import fix_interpreter_scalar_index

    fix_interpreter_scalar_index()

RUN_SALT = int(os.environ.get("LAFS_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"lafs test salt: LAFS_TEST_SEED={RUN_SALT}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The salt again at the end, where ``-q`` (make test, CI) still prints it: a failure can be replayed."""
    terminalreporter.write_line(f"lafs test salt: LAFS_TEST_SEED={RUN_SALT} (set it to replay this run's inputs)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng(request) -> torch.Generator:
    """A torch.Generator seeded freshly per test (seed shown on failure); the global generator (modules'
    initialisation, dropout) gets another seed: with the same one a module's random init repeats the test's
    inputs (``PartialFC``'s centres came out parallel to the embeddings drawn after them)."""
    seed = (zlib.crc32(request.node.nodeid.encode()) ^ RUN_SALT) % (2**31)
    request.node.user_properties.append(("seed", seed))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed ^ 0x5EED)
    return gen
