"""The margin-softmax head of a recognition stage, and the original-path model for comparisons.

Every head maps ``(embeddings [B, D] float32, labels [B] or [B, T], label_weights None or [B, T])``
to ``(loss scalar, argmax [B] or None)``:

* one process: ``lafs_kernels.nn.CosFace`` / ``ArcFace`` (fused; soft targets for mixup; the
  argmax for training accuracy comes from the same pass);
* several processes: ``lafs_kernels.nn.PartialFC``, class centres sharded across the ranks
  (the argmax over every shard costs one more all-gather of ``[B]``; mixup's two labels and weights
  go through one call, the objective of the fused loss on one process);
* ``train.original_path``: the unfused loss of ``lafs_kernels.baselines`` with its full
  ``[B, C]`` logits (whose argmax is the accuracy), and the per-landmark ``grid_sample``
  loop for the tokens.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lafs_kernels.baselines.margin import margin_logits
from lafs_kernels.nn import ArcFace, CosFace, PartialFC

from .config import Config, ConfigError
from .distributed import Distributed


def margin_parameters(cfg: Config) -> dict:
    """(s, m1, m2, m3) of the configured loss: CosFace ``cos - m``, ArcFace ``cos(theta + m)``."""
    if cfg.loss.type == "cosface":
        return {"s": cfg.loss.s, "m1": 1.0, "m2": 0.0, "m3": cfg.loss.m}
    return {"s": cfg.loss.s, "m1": 1.0, "m2": cfg.loss.m, "m3": 0.0}


class FusedHead(nn.Module):
    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, embeddings, labels, label_weights=None):
        return self.loss(embeddings, labels, label_weights=label_weights, return_argmax=True)


class ShardedHead(nn.Module):
    """Partial FC: this process's class centres; the loss of the global batch, the same on every process."""

    def __init__(self, loss: PartialFC):
        super().__init__()
        self.loss = loss

    def forward(self, embeddings, labels, label_weights=None):
        return self.loss(embeddings, labels, label_weights=label_weights, return_argmax=True)


class OriginalHead(nn.Module):
    """The unfused loss as the original code runs it: the full cosine logits ``[B, C]`` of
    normalised embeddings and class centres (their argmax is the training accuracy, as the
    original code reads it from its logits), the margin on the target logits (one-hot mask
    over the whole matrix), then cross-entropy. Soft targets (mixup: labels [B, T], weights [B, T])
    margin every target logit of a row in the one matrix and weigh the targets' log-probabilities in
    it: the objective of the fused loss and of Partial FC.

    The margin is ``lafs_kernels.baselines.margin.margin_logits``, the formula of the unfused baseline.
    """

    def __init__(self, embedding_dim: int, num_classes: int, margin: dict):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.margin = margin

    def forward(self, embeddings, labels, label_weights=None):
        cos = F.linear(F.normalize(embeddings), F.normalize(self.weight))  # [B, C]
        argmax = cos.detach().argmax(dim=1)
        if labels.dim() == 1:
            return F.cross_entropy(self._margin_logits(cos, labels), labels), argmax
        logits = self._margin_logits(cos, labels[:, 0])
        for t in range(1, labels.shape[1]):
            target = F.one_hot(labels[:, t], cos.shape[1]).to(torch.bool)
            logits = torch.where(target, self._margin_logits(cos, labels[:, t]), logits)
        log_p = F.log_softmax(logits, dim=1).gather(1, labels)  # [B, T]
        return -(log_p * label_weights).sum(dim=1).mean(), argmax

    def _margin_logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return margin_logits(cos, labels, **self.margin)


def build_margin_head(cfg: Config, embedding_dim: int, num_classes: int, dist: Distributed) -> nn.Module:
    """The stage's margin head; its class centres start as :func:`init_class_centres` draws them, so
    the same seed gives the same centres on one process and, split, on N.  The heads skip the label-range
    check of each call: ``build_train_set`` checked the data set's labels once."""
    margin = margin_parameters(cfg)
    if cfg.train.original_path and dist.enabled:
        raise ConfigError("train.original_path (the unfused baseline) runs on one process only")
    with torch.random.fork_rng(devices=[]):  # the global RNG (dropout) is left as it was
        if cfg.train.original_path:
            head = OriginalHead(embedding_dim, num_classes, margin)
        elif dist.enabled:
            head = ShardedHead(
                PartialFC(
                    (margin["m1"], margin["m2"], margin["m3"]),
                    embedding_dim,
                    num_classes,
                    sample_rate=cfg.loss.partial_fc_sample_rate,
                    s=margin["s"],
                    check_labels=False,
                )
            )
        elif cfg.loss.type == "cosface":
            head = FusedHead(CosFace(embedding_dim, num_classes, s=cfg.loss.s, m=cfg.loss.m, check_labels=False))
        else:
            head = FusedHead(ArcFace(embedding_dim, num_classes, s=cfg.loss.s, m=cfg.loss.m, check_labels=False))
    weight = centre_parameter(head)
    start = head.loss.class_start if isinstance(head, ShardedHead) else 0
    with torch.no_grad():
        weight.copy_(init_class_centres(num_classes, embedding_dim, start, weight.shape[0], cfg.seed))
    return head


def centre_parameter(head: nn.Module) -> nn.Parameter:
    """The head's class centres ``[classes held here, D]``."""
    return head.weight if isinstance(head, OriginalHead) else head.loss.weight


CENTRE_BLOCK = 4096


def init_class_centres(num_classes: int, dim: int, start: int, count: int, seed: int) -> torch.Tensor:
    """Rows ``[start, start + count)`` of a Xavier-uniform ``[num_classes, dim]`` centre matrix.

    The matrix is drawn in blocks of ``CENTRE_BLOCK`` classes, each from its own generator
    seeded by (seed, block), so any process can draw its rows alone and the rows do not depend
    on how the classes are split across processes. -> float32 [count, dim] on the CPU.
    """
    bound = float(np.sqrt(6.0 / (num_classes + dim)))
    rows = []
    for block in range(start // CENTRE_BLOCK, (start + count - 1) // CENTRE_BLOCK + 1 if count else 0):
        first = block * CENTRE_BLOCK
        size = min(CENTRE_BLOCK, num_classes - first)
        seed_words = np.random.SeedSequence([seed, block]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator().manual_seed(int(seed_words[0]) << 32 | int(seed_words[1]))
        values = torch.rand(size, dim, generator=generator, dtype=torch.float32).mul_(2 * bound).sub_(bound)
        rows.append(values[max(start - first, 0) : min(start + count - first, size)])
    return torch.cat(rows) if rows else torch.empty(0, dim)


class OriginalPathModel(nn.Module):
    """A PartFViT run through the original per-landmark ``grid_sample`` loop instead of the fused gather,
    with the transformer computing as the released code does (``PartTransformer.compute_as_released``:
    every token through the last block, attention in its explicit form)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        model.transformer.compute_as_released()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from lafs_kernels.baselines.gather import gather_patches_loop

        landmarks = self.model.landmark_cnn(images)
        return self.model.transformer(gather_patches_loop(images, landmarks, self.model.patch_size))
