"""Stage 3: fine-tuning the LAFS-pretrained transformer with the stage-1 landmark CNN.

The supervised loop plus: weights from the pretraining teacher and the
supervised landmark CNN, layer-wise lr decay (0.58 in the paper, in the recipe),
RandAugment (and, as the recipes set them, the released fine-tuning's random resized
crop, colour jitter and random erasing) + flip on uint8 tensors (torchvision.transforms.v2), and mixup
applied to a batch with probability ``aug.mixup_prob`` through the two-label
soft-target path of the margin loss (labels [B, 2], weights [B, 2]; one Partial FC
call under torchrun).
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2

from lafs.models.presets import preset_config

from .supervised import SupervisedStage
from .weights import load_landmark_cnn, load_pretrained_transformer


class FinetuneStage(SupervisedStage):
    name = "finetune"

    def build_model(self):
        model = super().build_model()
        init = self.cfg.init
        if init.landmark:
            load_landmark_cnn(model.landmark_cnn, init.landmark)
        if init.pretrained:
            load_pretrained_transformer(model.transformer, init.pretrained)
        return model

    def transform(self):
        """On the uint8 form, in the released fine-tuning's order: RandAugment, a random resized crop, colour
        jitter, random erasing (each as ``aug`` sets it); then the supervised stage's flip."""
        aug = self.cfg.aug
        pixels = []
        if aug.randaugment:
            pixels.append(v2.RandAugment(num_ops=aug.randaugment_ops, magnitude=aug.randaugment_magnitude))
        if aug.resized_crop_scale is not None:
            size = preset_config(self.cfg.model.name, **self.cfg.model.overrides).get("image_size", 112)
            pixels.append(v2.RandomResizedCrop(size, scale=tuple(aug.resized_crop_scale), antialias=True))
        if aug.colour_jitter > 0:
            strength = aug.colour_jitter
            pixels.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength, hue=strength))
        if aug.erasing_prob > 0:
            pixels.append(v2.RandomErasing(p=aug.erasing_prob, scale=(0.02, 0.1), value=0))
        steps = [UInt8Augment(v2.Compose(pixels))] if pixels else []
        flip = super().transform()
        if flip is not None:
            steps.append(flip)
        return v2.Compose(steps) if steps else None

    def targets(self, images: torch.Tensor, labels: torch.Tensor, step: int, micro: int):
        """With probability ``aug.mixup_prob`` mix each image with a partner (:meth:`mixup_partner`):
        images [b, 3, H, W], labels [b] -> mixed images, labels [b, 2], weights [b, 2] (lambda, 1 - lambda)."""
        aug = self.cfg.aug
        if aug.mixup_prob <= 0:
            return images, labels, None
        # Whether to mix and lambda change the objective and, under Partial FC, the collectives: drawn from
        # (seed, step, micro-batch), so every process decides alike (and a resumed run draws the same).
        rng = np.random.default_rng([self.cfg.seed, step, micro])
        if rng.random() >= aug.mixup_prob:
            return images, labels, None
        lam = float(rng.beta(aug.mixup_alpha, aug.mixup_alpha)) if aug.mixup_alpha > 0 else 1.0
        partner = self.mixup_partner(len(labels)).to(images.device)
        mixed = lam * images + (1 - lam) * images[partner]
        pair = torch.stack([labels, labels[partner]], dim=1)
        weights = torch.tensor([lam, 1 - lam], device=images.device).expand(len(labels), 2).contiguous()
        return mixed, pair, weights

    def mixup_partner(self, batch: int) -> torch.Tensor:
        """Index [batch] of each image's mixing partner within this process's batch: the reversed batch."""
        return torch.arange(batch - 1, -1, -1)


class UInt8Augment:
    """Apply a torchvision v2 transform to a float image in [-1, 1] through its uint8 form.

    RandAugment's operations (posterize, solarize, ...) are defined on uint8 images;
    the dataset's images were uint8 before scaling, so the round trip is exact.
    """

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        pixels = (image * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
        return (self.transform(pixels).to(torch.float32) - 127.5) / 127.5
