"""Stage 3: fine-tuning the LAFS-pretrained transformer with the stage-1 landmark CNN.

The supervised loop plus: weights from the pretraining teacher and the
supervised landmark CNN, layer-wise lr decay (0.58 in the paper, in the recipe),
RandAugment + flip on uint8 tensors (torchvision.transforms.v2), and mixup
applied to a batch with probability ``aug.mixup_prob`` through the two-label
soft-target path of the fused margin loss (labels [B, 2], weights [B, 2]).
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2

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
        """RandAugment (on the uint8 form), then the supervised stage's flip."""
        aug = self.cfg.aug
        steps = []
        if aug.randaugment:
            steps.append(UInt8Augment(v2.RandAugment(num_ops=aug.randaugment_ops,
                                                     magnitude=aug.randaugment_magnitude)))
        flip = super().transform()
        if flip is not None:
            steps.append(flip)
        return v2.Compose(steps) if steps else None

    def targets(self, images: torch.Tensor, labels: torch.Tensor, step: int, micro: int):
        """With probability ``aug.mixup_prob`` mix the batch with its reversal: labels [B, 2], weights [B, 2]."""
        aug = self.cfg.aug
        if aug.mixup_prob <= 0:
            return images, labels, None
        # Seeded from (seed, rank, step, micro-batch): the same draws after a resume.
        rng = np.random.default_rng([self.cfg.seed, self.dist.rank, step, micro])
        if rng.random() >= aug.mixup_prob:
            return images, labels, None
        lam = float(rng.beta(aug.mixup_alpha, aug.mixup_alpha)) if aug.mixup_alpha > 0 else 1.0
        mixed = lam * images + (1 - lam) * images.flip(0)
        pair = torch.stack([labels, labels.flip(0)], dim=1)
        weights = torch.tensor([lam, 1 - lam], device=images.device).expand(len(labels), 2).contiguous()
        return mixed, pair, weights


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
