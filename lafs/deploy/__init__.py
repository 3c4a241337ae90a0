"""Serving a trained Part fViT: :class:`FaceEmbedder` (PyTorch or onnxruntime), :class:`OnnxModel`.

Export with ``python -m lafs.export`` (:mod:`lafs.export`).
"""

from .embedder import FaceEmbedder, is_onnx_path, load_face_model
from .onnx_model import OnnxModel

__all__ = ["FaceEmbedder", "OnnxModel", "is_onnx_path", "load_face_model"]
