"""The landmark CNN of Part fViT: a MobileNetV3 trunk that predicts L landmarks.

Module and parameter names follow the original code (``features.<i>.conv.<j>``,
``features.<i>.conv.5.fc.<j>``, ``output_layer.1``), so an official ``stn.*`` /
``output_layer.*`` state dict maps onto :class:`LandmarkCNN` key for key
(see :mod:`lafs.models.official`).  timm's MobileNetV3 blocks name their
layers differently (``conv_pw``, ``se.conv_reduce``, ...), hence the small
modules here.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import nn

# One bottleneck: [kernel, expanded channels, output channels, squeeze-excite, activation ("RE"|"HS"), stride].
BlockSpec = Sequence[Union[int, bool, str]]

MOBILENET_V3_LARGE_BLOCKS: tuple[tuple, ...] = (
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
)

# A narrow five-block trunk for CPU demos (stride 32 like the large one).  Its first block
# already halves the resolution: full-resolution 56x56 stages dominate the CPU time.
TINY_BLOCKS: tuple[tuple, ...] = (
    (3, 32, 16, False, "RE", 2),
    (3, 64, 24, False, "RE", 2),
    (5, 96, 40, True, "RE", 2),
    (3, 160, 48, True, "HS", 1),
    (5, 192, 64, True, "HS", 2),
)

TRUNKS = {"mobilenet_v3_large": MOBILENET_V3_LARGE_BLOCKS, "tiny": TINY_BLOCKS}


def _activation(name: str) -> nn.Module:
    if name == "RE":
        return nn.ReLU(inplace=True)
    if name == "HS":
        return nn.Hardswish(inplace=True)  # x * relu6(x + 3) / 6, as the original Hswish
    raise ValueError(f"unknown activation {name!r} in a landmark CNN block (use 'RE' or 'HS')")


class SqueezeExcite(nn.Module):
    """Channel gate: x * hard_sigmoid(W2 relu(W1 mean_hw(x))), both linears bias-free, reduction 4.

    x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Hardsigmoid(),  # relu6(x + 3) / 6
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc(x.mean(dim=(2, 3)))
        return x * gate[:, :, None, None]


class InvertedResidual(nn.Module):
    """MobileNetV3 bottleneck: 1x1 expand, BN, act, depthwise kxk, BN, SE (or identity), act, 1x1 project, BN.

    ``conv`` keeps the original's nine-slot layout (SE at index 5) so parameter names match.
    Residual connection when stride is 1 and input and output widths agree.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expanded: int,
        squeeze_excite: bool,
        activation: str,
    ):
        super().__init__()
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, expanded, 1, 1, 0, bias=False),
            nn.BatchNorm2d(expanded),
            _activation(activation),
            nn.Conv2d(expanded, expanded, kernel, stride, (kernel - 1) // 2, groups=expanded, bias=False),
            nn.BatchNorm2d(expanded),
            SqueezeExcite(expanded) if squeeze_excite else nn.Identity(),
            _activation(activation),
            nn.Conv2d(expanded, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


def _resolve_blocks(blocks: Union[str, Sequence[BlockSpec]]) -> list[list]:
    if isinstance(blocks, str):
        if blocks not in TRUNKS:
            raise ValueError(
                f"unknown landmark CNN trunk {blocks!r}; known: {sorted(TRUNKS)} or a list of "
                "[kernel, expanded, out, se, act, stride] blocks"
            )
        blocks = TRUNKS[blocks]
    resolved = []
    for i, spec in enumerate(blocks):
        if len(spec) != 6:
            raise ValueError(f"landmark CNN block {i} is {spec!r}; expected [kernel, expanded, out, se, act, stride]")
        kernel, expanded, out, se, act, stride = spec
        resolved.append([int(kernel), int(expanded), int(out), bool(se), str(act), int(stride)])
    if not resolved:
        raise ValueError("a landmark CNN needs at least one block")
    return resolved


def initial_landmark_grid(num_landmarks: int, image_size: int) -> torch.Tensor:
    """[L, 2] (x, y) pixel centres of a near-square grid over the image, row by row."""
    columns = math.ceil(math.sqrt(num_landmarks))
    rows = math.ceil(num_landmarks / columns)
    xs = (torch.arange(columns) + 0.5) * image_size / columns
    ys = (torch.arange(rows) + 0.5) * image_size / rows
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
    return grid[:num_landmarks]


class LandmarkCNN(nn.Module):
    """Predicts ``num_landmarks`` (x, y) pixel coordinates from a face image.

    images [B, 3, H, W] in [-1, 1] -> landmarks [B, L, 2] with x along W, y along H.

    Stem conv 3x3 stride 2 (``stem_channels``) + BN + h-swish, the bottleneck
    ``blocks`` (default: the MobileNetV3-large trunk of the original, ending at
    160 channels), then ``output_layer`` = Dropout(0.5), Linear(C_last, 2L) on
    the global average (the original), or with ``readout_grid`` G > 1 Linear(C_last * G * G, 2L) on the
    features average-pooled to G x G cells, flattened channel-major: a head that sees where a feature
    lies, which the global average hides (docs/EXPERIMENTS.md, issue 20).  The 2L outputs of one image
    are min-max scaled together to [0, image_size - 1] and read as L consecutive (x, y) pairs, exactly as the
    original; so every image has one landmark coordinate at 0 and one at
    image_size - 1.
    """

    def __init__(
        self,
        num_landmarks: int = 196,
        image_size: int = 112,
        blocks: Union[str, Sequence[BlockSpec]] = "mobilenet_v3_large",
        stem_channels: int = 16,
        readout_grid: int = 1,
    ):
        super().__init__()
        if int(readout_grid) != readout_grid or readout_grid < 1:
            raise ValueError(f"readout_grid must be a positive integer (1: the global average); got {readout_grid!r}")
        self.num_landmarks = num_landmarks
        self.readout_grid = int(readout_grid)
        self.image_size = image_size
        self.stem_channels = stem_channels
        self.block_specs = _resolve_blocks(blocks)

        stem = nn.Sequential(
            nn.Conv2d(3, stem_channels, 3, 2, 1, bias=False),
            nn.BatchNorm2d(stem_channels),
            nn.Hardswish(inplace=True),
        )
        layers: list[nn.Module] = [stem]
        channels = stem_channels
        for kernel, expanded, out, se, act, stride in self.block_specs:
            layers.append(InvertedResidual(channels, out, kernel, stride, expanded, se, act))
            channels = out
        self.features = nn.Sequential(*layers)
        self.output_layer = nn.Sequential(
            nn.Dropout(p=0.5), nn.Linear(channels * self.readout_grid**2, 2 * num_landmarks)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Start the head as a fixed grid of landmarks (zero weights, bias = grid), as spatial transformer
        # networks do: with a random head, Dropout(0.5) moves every landmark by ~20 px between passes and
        # the tokens are too unstable for the transformer to learn from (the supervised demo collapsed).
        head = self.output_layer[1]
        nn.init.zeros_(head.weight)
        with torch.no_grad():
            head.bias.copy_(initial_landmark_grid(self.num_landmarks, self.image_size).reshape(-1))

    def arch_config(self) -> dict:
        """Constructor arguments that rebuild this module (blocks spelled out, so a renamed trunk cannot change it)."""
        return {
            "num_landmarks": self.num_landmarks,
            "image_size": self.image_size,
            "blocks": [list(b) for b in self.block_specs],
            "stem_channels": self.stem_channels,
            "readout_grid": self.readout_grid,
        }

    def raw_outputs(self, images: torch.Tensor) -> torch.Tensor:
        """The 2L unscaled head outputs: images [B, 3, H, W] -> [B, 2L]."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"LandmarkCNN expects images [B, 3, H, W]; got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"LandmarkCNN expects floating-point images in [-1, 1]; got {images.dtype}")
        if self.features[0][0].weight.is_contiguous(memory_format=torch.channels_last):
            # Weights stored NHWC (``.to(memory_format=torch.channels_last)``): feed NHWC images too, or
            # every convolution would convert its input.
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.features(images)
        if self.readout_grid == 1:
            return self.output_layer(features.mean(dim=(2, 3)))
        cells = nn.functional.adaptive_avg_pool2d(features, self.readout_grid)
        return self.output_layer(cells.flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Scale in float32 even under autocast: bfloat16 would round coordinates near 111 to 0.5 px.
        raw = self.raw_outputs(images)
        raw = raw.to(torch.promote_types(raw.dtype, torch.float32))
        low = raw.amin(dim=1, keepdim=True)
        span = raw.amax(dim=1, keepdim=True) - low
        # The original divides by the span as is; the floor only keeps a constant output from becoming NaN.
        scaled = (raw - low) / span.clamp_min(torch.finfo(raw.dtype).tiny) * (self.image_size - 1)
        return scaled.view(raw.shape[0], self.num_landmarks, 2)
