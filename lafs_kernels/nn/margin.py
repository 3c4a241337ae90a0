"""Classification heads with a margin: each owns the class centres and returns the loss.

``forward(embeddings [B, D], labels [B] or [B, T], label_weights=None [B, T],
return_argmax=False) -> loss`` (or ``(loss, argmax [B])``), computed by
:func:`lafs_kernels.margin_softmax_cross_entropy` without the ``[B, C]`` logits.
"""

import torch
from torch import nn

from ..ops.margin_softmax import margin_softmax_cross_entropy


class CombinedMarginSoftmax(nn.Module):
    """Softmax cross-entropy with target logit ``s * (cos(m1*theta + m2) - m3)``.

    The margins default to none (``m1=1, m2=0, m3=0``), so giving one never adds another; CosFace
    and ArcFace carry their papers' defaults.

    weight: ``[out_features, in_features]`` class centres (Xavier-uniform init).
    Embeddings of another dtype (autocast) are cast to the weight's dtype.
    ``check_labels=False`` skips the per-call label-range check (a host sync on GPUs) for labels
    already checked, as :func:`lafs_kernels.margin_softmax_cross_entropy`'s argument does.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.0,
        *,
        easy_margin: bool = False,
        margin_grad: str = "exact",
        label_smoothing: float = 0.0,
        check_labels: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.easy_margin, self.margin_grad, self.label_smoothing = easy_margin, margin_grad, label_smoothing
        self.check_labels = check_labels
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, embeddings, labels, label_weights=None, return_argmax=False):
        return margin_softmax_cross_entropy(
            embeddings.to(self.weight.dtype),
            self.weight,
            labels,
            s=self.s,
            m1=self.m1,
            m2=self.m2,
            m3=self.m3,
            label_weights=label_weights,
            label_smoothing=self.label_smoothing,
            margin_grad=self.margin_grad,
            return_argmax=return_argmax,
            easy_margin=self.easy_margin,
            check_labels=self.check_labels,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, s={self.s}, "
            f"m1={self.m1}, m2={self.m2}, m3={self.m3}, easy_margin={self.easy_margin}, "
            f"margin_grad={self.margin_grad!r}"
        )


class CosFace(CombinedMarginSoftmax):
    """CosFace (large margin cosine loss): target logit ``s * (cos - m)``."""

    def __init__(self, in_features: int, out_features: int, s: float = 64.0, m: float = 0.4, **kwargs):
        super().__init__(in_features, out_features, s, 1.0, 0.0, m, **kwargs)


class ArcFace(CombinedMarginSoftmax):
    """ArcFace (additive angular margin): target logit ``s * cos(theta + m)``, with the
    usual fallback when ``theta + m > pi`` (or, with ``easy_margin``, no margin where cos <= 0)."""

    def __init__(
        self, in_features: int, out_features: int, s: float = 64.0, m: float = 0.5, easy_margin: bool = False, **kwargs
    ):
        super().__init__(in_features, out_features, s, 1.0, m, 0.0, easy_margin=easy_margin, **kwargs)
