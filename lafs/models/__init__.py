"""Part fViT models: the landmark CNN, the part transformer, presets, official weights, our checkpoint format.

>>> model = create_model("part_fvit_tiny")                    # or "part_fvit_b", the paper's architecture
>>> embeddings = model(images)                                # images [B, 3, 112, 112] in [-1, 1] -> [B, dim]
>>> model = load_model("runs/demo")                           # run folder, our file, or an official state dict
>>> state = load_checkpoint("part_fvit_b.pth")                # any checkpoint file, without running code
"""

from .checkpoint import FORMAT, atomic_save, is_model_dict, load_model, model_from_dict, model_to_dict
from .landmark_cnn import LandmarkCNN
from .official import IncompatibleCheckpointError, OfficialLoadResult, load_official_state_dict
from .part_fvit import PartFViT
from .presets import (
    PRESETS,
    build_landmark_cnn,
    build_model,
    build_transformer,
    create_landmark_cnn,
    create_model,
    create_transformer,
    preset_config,
)
from .safe_load import UnsafeCheckpointError, allow_unsafe_pickle, load_checkpoint
from .transformer import PartTransformer

__all__ = [
    "FORMAT",
    "PRESETS",
    "IncompatibleCheckpointError",
    "LandmarkCNN",
    "OfficialLoadResult",
    "PartFViT",
    "PartTransformer",
    "UnsafeCheckpointError",
    "allow_unsafe_pickle",
    "atomic_save",
    "build_landmark_cnn",
    "build_model",
    "build_transformer",
    "create_landmark_cnn",
    "create_model",
    "create_transformer",
    "is_model_dict",
    "load_checkpoint",
    "load_model",
    "load_official_state_dict",
    "model_from_dict",
    "model_to_dict",
    "preset_config",
]
