"""LAFS / Part fViT training package built on the fused ops of lafs_kernels.

``python -m lafs.train`` trains, ``python -m lafs.eval`` evaluates,
``python -m lafs.data pack`` packs an image folder into RecordIO,
``python -m lafs.export`` writes a trained model as ONNX (insightface runs it) or a torch.export program.
``lafs.FaceEmbedder`` embeds faces with any of them.
"""

__version__ = "0.1.0"

_LAZY = {"FaceEmbedder": ("lafs.deploy", "FaceEmbedder"), "export_onnx": ("lafs.export", "export_onnx")}


def __getattr__(name):
    # ``import lafs`` stays light (no torch); the serving API loads on first use.
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'lafs' has no attribute {name!r}")
