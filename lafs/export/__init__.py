"""Export a trained Part fViT for serving.

>>> export_onnx("runs/demo/supervised", "part_fvit.onnx")        # insightface's model zoo runs it as is
>>> program = export_program("runs/demo/supervised")             # torch.export, for AOTInductor

``python -m lafs.export RUN_OR_CHECKPOINT OUT.onnx`` (or ``OUT.pt2``) does the same from the shell.
"""

from .form import PartFViTExportForm, export_form_gather
from .program import export_program
from .to_onnx import DEFAULT_OPSET, MIN_COSINE, ExportCheckError, OnnxExport, export_onnx

__all__ = [
    "DEFAULT_OPSET",
    "MIN_COSINE",
    "ExportCheckError",
    "OnnxExport",
    "PartFViTExportForm",
    "export_form_gather",
    "export_onnx",
    "export_program",
]
