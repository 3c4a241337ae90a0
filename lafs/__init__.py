"""LAFS / Part fViT training package built on the fused ops of lafs_kernels.

``python -m lafs.train`` trains, ``python -m lafs.eval`` evaluates,
``python -m lafs.data pack`` packs an image folder into RecordIO.
"""
__version__ = "0.1.0"
