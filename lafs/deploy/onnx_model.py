"""An ONNX face model run by onnxruntime, behind the same interface as a PyTorch model.

``OnnxModel(path)(images [B, 3, S, S] float in [-1, 1]) -> embeddings [B, D]``
(float32 CPU tensors), so everything that evaluates an ``nn.Module`` face model
(``lafs.eval.verification.verify_model``, ``lafs.eval.ijb.evaluate_ijb``,
:class:`lafs.deploy.FaceEmbedder`) runs an exported file unchanged.  It has no
parameters: the evaluation code then feeds it float32 CPU tensors.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn


def _providers(device: Union[str, torch.device, None]) -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device is not None and torch.device(device).type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxModel(nn.Module):
    """A recognition model in an ONNX file: one input ``[B, 3, S, S]`` (square S), one output ``[B, D]``.

    ``device``: ``cuda`` uses onnxruntime's CUDA provider when the installed
    onnxruntime has it, else the CPU.  ``threads``: onnxruntime's intra-op
    threads (default: its own choice).  ``spin``: whether those threads spin-wait for work after a
    call (onnxruntime's default, lower latency; ``False`` frees the cores at once for other work in the
    process, as a benchmark that times PyTorch right after needs).  Raises ``ValueError`` for a file that is
    not a readable ONNX model of that shape.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        device: Union[str, torch.device, None] = None,
        threads: Optional[int] = None,
        providers: Optional[Sequence[str]] = None,
        spin: bool = True,
    ):
        super().__init__()
        import onnxruntime

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such ONNX model file: {path}")
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only; warnings about unused initialisers are noise here
        try:
            self.session = onnxruntime.InferenceSession(
                path, sess_options=options, providers=list(providers or _providers(device))
            )
        except Exception as err:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"{path}: not a readable ONNX model ({str(err).strip().splitlines()[0]})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape if len(inputs) == 1 else None
        if shape is None or len(shape) != 4 or shape[1] != 3 or not isinstance(shape[2], int) or shape[2] != shape[3]:
            found = [(i.name, i.shape) for i in inputs]
            raise ValueError(
                f"{path}: a face model has one input [batch, 3, S, S] with a fixed square S; "
                f"this file's inputs are {found}"
            )
        if len(outputs) != 1 or len(outputs[0].shape) != 2:
            raise ValueError(
                f"{path}: a face model has one output [batch, D]; this file's outputs are "
                f"{[(o.name, o.shape) for o in outputs]}"
            )
        self.path = path
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.image_size = shape[2]
        self.input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        self.embedding_dim = outputs[0].shape[1] if isinstance(outputs[0].shape[1], int) else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] float in [-1, 1] -> embeddings float32 [B, D] on the images' device."""
        size = self.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"{self.path} expects images [B, 3, {size}, {size}] in [-1, 1]; got shape {tuple(images.shape)}"
            )
        feed = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=self.input_dtype)
        embeddings = self.session.run([self.output_name], {self.input_name: feed})[0]
        return torch.from_numpy(np.asarray(embeddings, dtype=np.float32)).to(images.device)

    def extra_repr(self) -> str:
        return f"{self.path!r}, providers={self.session.get_providers()}"
