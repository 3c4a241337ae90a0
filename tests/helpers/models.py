"""Model helpers: the original repository's key names, synthetic photos, random weights that move the landmarks."""

import numpy as np
import torch
from torch import nn

from lafs.data import SyntheticFaces
from lafs.eval.embed import to_model_input
from lafs.models.part_fvit import PartFViT


def official_key(ours: str) -> str:
    """Our PartFViT key -> the original's, written out from the original class layout."""
    if ours.startswith("landmark_cnn.features."):
        return "stn." + ours[len("landmark_cnn.") :]
    if ours.startswith("landmark_cnn.output_layer."):
        return ours[len("landmark_cnn.") :]
    rest = ours[len("transformer.") :]
    return "transformer." + rest if rest.startswith("layers.") else rest


def official_state_of(model: PartFViT) -> dict:
    return {official_key(k): v.clone() for k, v in model.state_dict().items()}


def synthetic_photos(count: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """(RGB uint8 [112, 112, 3] images, their five points [count, 5, 2]) rendered by SyntheticFaces."""
    faces = SyntheticFaces(num_identities=count, images_per_identity=1, seed=seed)
    rendered = [faces.render(i) for i in range(count)]
    return [r[0] for r in rendered], np.stack([r[2] for r in rendered])


def randomize_(model: PartFViT, head_std: float, seed: int = 0) -> PartFViT:
    """Random weights whose landmarks depend on the image: batch-norm statistics estimated on synthetic faces
    (at initialisation every block shrinks the activations ~10x in eval mode, so all images get the same
    landmarks) and a random landmark head (it starts at zero: a fixed grid)."""
    gen = torch.Generator().manual_seed(seed)
    images = to_model_input(np.stack(synthetic_photos(8, seed=seed + 100)[0]), "cpu")
    with torch.no_grad():
        for module in model.landmark_cnn.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average over the calibration batch
        model.landmark_cnn.train()
        model.landmark_cnn.features(images)
        head = model.landmark_cnn.output_layer[1]
        head.weight.copy_(head_std * torch.randn(head.weight.shape, generator=gen))
    return model.eval()
