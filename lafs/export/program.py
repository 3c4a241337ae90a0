"""``torch.export`` of Part fViT, for serving with AOTInductor or ExecuTorch.

The fused gather stays one node, ``lafs_kernels.landmark_patch_gather``: it is
a ``torch.library`` custom op with a fake (meta) kernel, so ``torch.export``
traces it with a symbolic batch.  The backend the op dispatched to while
tracing (``cpu``, ``cuda``, ``triton``) is an argument of that node: export on
the kind of device you serve on.  Loading the saved program needs
``lafs_kernels`` imported (it registers the op).
"""

from __future__ import annotations

import os
from typing import Union

import torch
from torch import nn

from lafs.eval.embed import evaluation_mode

from .to_onnx import example_images, resolve_model

# The largest batch the program accepts: any real batch, and a bound torch 2.6 needs (without one its export
# fails on a guard that the batch is not 2**63 - 1).
MAX_BATCH = 1 << 20


def export_program(
    model: Union[nn.Module, str, os.PathLike],
    device: Union[str, torch.device] = "cpu",
) -> torch.export.ExportedProgram:
    """The eval-mode model (a PartFViT, or anything ``load_model`` reads) as an ExportedProgram.

    Input images ``[batch, 3, S, S]`` in [-1, 1] with a dynamic batch (1 to ``MAX_BATCH``);
    output embeddings ``[batch, dim]``.
    """
    model = resolve_model(model, device=device)
    device = next(model.parameters()).device
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with evaluation_mode(model), torch.no_grad():
        return torch.export.export(model, (example_images(2, model.image_size, device),), dynamic_shapes=({0: batch},))
