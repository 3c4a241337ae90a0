"""Modules wrapping the fused ops."""

from .gather import LandmarkPatchGather
from .margin import ArcFace, CombinedMarginSoftmax, CosFace
from .partial_fc import PartialFC

__all__ = ["LandmarkPatchGather", "CosFace", "ArcFace", "CombinedMarginSoftmax", "PartialFC"]
