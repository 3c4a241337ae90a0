"""Part fViT as a standard ONNX graph that insightface's model zoo runs as a recognition model.

Contract of the file (what ``insightface.model_zoo.get_model(path)`` expects of
an ``ArcFaceONNX``): one input ``input`` float32 ``[batch, 3, 112, 112]`` (batch
dynamic), RGB scaled as ``(pixel - 127.5) / 127.5``, which is what
``get_feat`` feeds after ``blobFromImages(mean 127.5, std 127.5, swapRB=True)``
on aligned BGR faces and what ``lafs.eval.embed.to_model_input`` feeds our
model; one output ``embedding`` float32 ``[batch, dim]`` (raw, not
normalised).  insightface guesses that the normalisation is inside the graph
when one of its first eight nodes is named ``Sub*``/``_minus*`` and another
``Mul*``/``_mul*``; :func:`export_onnx` renames such nodes so it keeps mean and
std 127.5.

The graph is traced with torch's TorchScript-based exporter
(``torch.onnx.export(dynamo=False)``): the torch.export-based one needs the
``onnxscript`` package, which is not in the pinned dependency set.  The traced
graph is the eval-mode :class:`~lafs.export.form.PartFViTExportForm`, whose
Python shape checks are constant for a fixed image size (hence the tracer's
warnings about them are silenced).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import nn

from lafs.eval.embed import evaluation_mode
from lafs.models import PartFViT, load_model

from .form import PartFViTExportForm

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
MIN_OPSET = 16  # GridSample
MAX_OPSET = 20  # torch's TorchScript-based exporter (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
DEFAULT_OPSET = 17
# insightface's ArcFaceONNX: a Sub and a Mul among the first 8 nodes mean "normalisation inside the model".
_INSIGHTFACE_PREFIXES = ("Sub", "_minus", "Mul", "_mul")
_INSIGHTFACE_SCANNED_NODES = 8
# Per-face cosine between the file's embeddings and the PyTorch model's that the export check demands.
MIN_COSINE = {"float32": 0.9999, "float16": 0.999}


class ExportCheckError(RuntimeError):
    """The exported file does not reproduce the PyTorch model's embeddings."""


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote: ``path``, ``precision`` ('float32' / 'float16'), ``opset``, and, when
    checked, the smallest per-face cosine and the largest absolute difference to the PyTorch model."""

    path: Path
    precision: str
    opset: int
    min_cosine: float | None = None
    max_abs_error: float | None = None


def resolve_model(model: Union[nn.Module, str, os.PathLike], device: Union[str, torch.device] = "cpu") -> PartFViT:
    """``model`` itself (a :class:`PartFViT`), or ``lafs.models.load_model(model)`` (in eval mode)."""
    if isinstance(model, nn.Module):
        if not isinstance(model, PartFViT):
            raise TypeError(f"export takes a PartFViT (landmark CNN + transformer), got {type(model).__name__}")
        return model
    return load_model(model, device=device)


def example_images(batch: int, size: int, device: Union[str, torch.device] = "cpu", seed: int = 0) -> torch.Tensor:
    """[batch, 3, size, size] float32 in [-1, 1]: fixed smooth random images (tracing input and export check)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, size // 8, size // 8, generator=gen) * 2 - 1
    fine = torch.rand(batch, 3, size, size, generator=gen) * 0.2 - 0.1
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) + fine
    return images.clamp(-1, 1).to(device)


def export_onnx(
    model: Union[nn.Module, str, os.PathLike],
    path: Union[str, os.PathLike],
    *,
    half: bool = False,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
) -> OnnxExport:
    """Write the eval-mode Part fViT ``model`` (a module, or anything ``load_model`` reads) to ``path`` as ONNX.

    Dynamic batch, float32 input and output; ``half=True`` stores and runs the
    transformer in float16 (landmark CNN, coordinates and gather stay float32).
    With ``check`` the written file is run through onnxruntime on a few fixed
    images and compared with the PyTorch model (our fused gather):
    :class:`ExportCheckError` when a per-face cosine falls below ``MIN_COSINE``.
    The file is written atomically.
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET} (GridSample), got {opset!r}")
    model = resolve_model(model)
    with evaluation_mode(model):  # the caller's training flag comes back afterwards
        return _export(model, Path(path), half, opset, check)


def _export(model: PartFViT, path: Path, half: bool, opset: int, check: bool) -> OnnxExport:
    import onnx

    form = PartFViTExportForm(model, half=half).eval()
    device = next(model.parameters()).device
    size = model.image_size
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        traced = os.path.join(scratch, "traced.onnx")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            warnings.filterwarnings("ignore", message="The feature will be removed")
            torch.onnx.export(
                form,
                (example_images(2, size, device),),
                traced,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
        proto = onnx.load(traced)
        _keep_insightface_normalisation(proto)
        precision = "float16" if half else "float32"
        _describe(proto, model, precision)
        onnx.checker.check_model(proto)
        staged = os.path.join(scratch, "staged.onnx")
        onnx.save(proto, staged)
        result = OnnxExport(path=path, precision=precision, opset=opset)
        if check:
            result = _check(staged, model, result)
        os.replace(staged, path)
    return result


def _keep_insightface_normalisation(proto) -> None:
    """Rename early nodes that insightface would read as in-graph normalisation (names carry no meaning)."""
    for node in proto.graph.node[:_INSIGHTFACE_SCANNED_NODES]:
        if node.name.startswith(_INSIGHTFACE_PREFIXES):
            node.name = f"lafs{node.name}"


def _describe(proto, model: PartFViT, precision: str) -> None:
    proto.producer_name = "lafs"
    proto.doc_string = (
        f"Part fViT face embedding ({precision}). Input {INPUT_NAME}: float32 [batch, 3, "
        f"{model.image_size}, {model.image_size}] RGB aligned face, (pixel - 127.5) / 127.5. "
        f"Output {OUTPUT_NAME}: float32 [batch, {model.embedding_dim}], not normalised."
    )
    metadata = {
        "lafs.arch": json.dumps(model.arch_config()),
        "lafs.precision": precision,
        "lafs.input": "rgb, (pixel - 127.5) / 127.5, nchw",
    }
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _check(file: str, model: PartFViT, result: OnnxExport) -> OnnxExport:
    from lafs.deploy.onnx_model import OnnxModel

    images = example_images(4, model.image_size)
    with torch.no_grad():
        expected = model(images.to(next(model.parameters()).device)).float().cpu()
    if not torch.isfinite(expected).all():
        raise ExportCheckError(
            "the PyTorch model itself gives non-finite embeddings on the check's images (its weights hold NaN or "
            "Inf?): nothing to compare the file with"
        )
    actual = OnnxModel(file)(images)
    if result.precision == "float16" and not torch.isfinite(actual).all():
        raise ExportCheckError(
            "the float16 graph gives non-finite embeddings where the float32 model does not: the transformer "
            "overflows float16; export without --fp16"
        )
    cosine = float(torch.nn.functional.cosine_similarity(actual.double(), expected.double()).min())
    error = float((actual - expected).abs().max())
    limit = MIN_COSINE[result.precision]
    if not (np.isfinite(cosine) and cosine >= limit):
        raise ExportCheckError(
            f"the exported {result.precision} graph does not reproduce the PyTorch model: "
            f"per-face cosine down to {cosine:.6f} (need >= {limit}), "
            f"max abs difference {error:.3g}"
        )
    return OnnxExport(result.path, result.precision, result.opset, cosine, error)
