"""The Part fViT transformer: landmark patch tokens -> face embedding.

Parameter names follow the original code (``patch_to_embedding``,
``cls_token``, ``pos_embedding``, ``layers.<i>.0.fn.norm``,
``layers.<i>.0.fn.fn.to_qkv``, ``layers.<i>.1.fn.fn.net.<j>``,
``mlp_head.0``).  timm's ``Attention`` / ``Mlp`` / ``Block`` use other names
and scale scores by ``dim_head ** -0.5``, so only timm's ``DropPath`` and
``trunc_normal_`` are reused.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from lafs_kernels.ops import attention as kernel_attention

# Attention forms (``PartTransformer.attention_form``); every form gives the same result up to float rounding:
#   "explicit": softmax(q k^T * scale) v as separate matmul / softmax / matmul ops, the computation of the
#               released Part fViT code (its einsum over "bhid,bhjd->bhij", times the scale, softmax, einsum);
#   "sdpa":     torch's fused ``scaled_dot_product_attention``;
#   "kernel":   ``lafs_kernels.ops.attention`` (on the CPU its C++ kernel where it can run);
#   "auto":     on a GPU "sdpa"; on the CPU "explicit" for at most EXPLICIT_MAX_KEYS keys or EXPLICIT_MAX_QUERIES
#               queries (the last block's cls row), else "kernel" where the C++ kernel can run, else "sdpa".
ATTENTION_FORMS = ("auto", "sdpa", "explicit", "kernel")
# benchmarks/bench_attention.py, forward + backward as a block runs it, three idle runs pooled on a 2-core AMD EPYC:
# ours against the separate ops 0.93x at 25 keys (the default run's local views), 1.10x at 37 (LAFS local views)
# and at 50 (the default run's global views), 1.30x at 64, 1.46x at 100 and 1.95x at 197 (a global view of 196
# landmarks); against torch's fused kernel 1.07-1.61x.  On a 2-core Intel Xeon (AVX-512, no AMX) its lead is smaller:
# 0.94x at 25 keys, 0.99x at 37, 1.02x at 50, 1.32x at 197, and torch's fused kernel is 6% ahead at 197
# (docs/EXPERIMENTS.md, 2026-12-08): the threshold suits the EPYC and costs a few percent there.
EXPLICIT_MAX_KEYS = 32
EXPLICIT_MAX_QUERIES = 8


def auto_attention_form(q: torch.Tensor, k: torch.Tensor) -> str:
    """The form "auto" takes for q [B, H, Tq, d] and k [B, H, T, d]."""
    if q.device.type != "cpu" or torch.onnx.is_in_onnx_export():  # exporters know torch's fused op
        return "sdpa"
    if k.shape[-2] <= EXPLICIT_MAX_KEYS or q.shape[-2] <= EXPLICIT_MAX_QUERIES:
        return "explicit"
    return "kernel" if kernel_attention.select_backend(q) == "cpu" else "sdpa"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, form: str) -> torch.Tensor:
    """softmax(q k^T * scale) v: q [B, H, Nq, d], k and v [B, H, N, d] -> [B, H, Nq, d], in ``form``."""
    if form == "auto":
        form = auto_attention_form(q, k)
    if form == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if form == "kernel":
        return kernel_attention.attention(q, k, v, scale)
    if form == "explicit":
        return kernel_attention.reference_attention(q, k, v, scale)
    raise ValueError(f"attention form must be one of {ATTENTION_FORMS}; got {form!r}")


def attend_packed(qkv: torch.Tensor, scale: float, form: str) -> torch.Tensor:
    """:func:`attend` on the q, k, v of a block's packed projection ``qkv [B, N, 3, H, d]`` -> [B, H, N, d]; the
    kernel form takes it packed and writes its gradient in one piece."""
    q, k, v = kernel_attention.unpack_qkv(qkv)
    if form == "auto":
        form = auto_attention_form(q, k)
    if form == "kernel":
        return kernel_attention.attention_qkv(qkv, scale)
    return attend(q, k, v, scale, form)


class Attention(nn.Module):
    """Multi-head self-attention with ``heads * dim_head`` inner width.

    Scores are scaled by ``dim ** -0.5`` (the model width, not the head width),
    as in the original Part fViT; with dim 768 and 11 heads of 64 this is
    sqrt(64/768) times the usual scale.  x: [B, N, dim] -> [B, N, dim].
    ``form`` (ATTENTION_FORMS) says how the scores are computed; every form gives the same result up to
    float rounding.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim**-0.5
        self.form = "auto"
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head)
        out = attend_packed(qkv, self.scale, self.form)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))

    def forward_first_query(self, x: torch.Tensor) -> torch.Tensor:
        """The output of token 0 alone, attending to every token: x [B, N, dim] -> [B, 1, dim]
        (equal to ``forward(x)[:, :1]``; the query is projected for token 0 only)."""
        b, n, _ = x.shape
        inner = self.heads * self.dim_head
        weight = self.to_qkv.weight  # [3 * inner, dim]: the q, k and v rows
        q = F.linear(x[:, :1], weight[:inner]).view(b, 1, self.heads, self.dim_head).transpose(1, 2)
        k, v = F.linear(x, weight[inner:]).view(b, n, 2, self.heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        out = attend(q, k, v, self.scale, self.form)
        return self.to_out(out.transpose(1, 2).reshape(b, 1, self.heads * self.dim_head))


class FeedForward(nn.Module):
    """Linear-GELU-Dropout-Linear-Dropout.  x: [B, N, dim] -> [B, N, dim]."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PreNorm(nn.Module):
    """fn(LayerNorm(x))."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class ResidualDropPath(nn.Module):
    """x + drop_path(fn(x))."""

    def __init__(self, fn: nn.Module, drop_path: float):
        super().__init__()
        self.fn = fn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.fn(x))


class PartTransformer(nn.Module):
    """Pre-norm ViT over landmark patch tokens; the output is the cls token through LayerNorm.

    Every block uses the same ``drop_path`` rate (the original applies one rate,
    0.1, to all residual branches: the ``part_fvit_b`` preset sets it; the
    constructor's default is 0, no stochastic depth unless asked for).  Linears keep PyTorch's default
    initialisation, as in the original; ``cls_token`` and ``pos_embedding`` start
    from a truncated normal with std 0.02 (the original draws them from N(0, 1)).
    """

    def __init__(
        self,
        num_landmarks: int = 196,
        patch_size: int = 8,
        channels: int = 3,
        dim: int = 768,
        depth: int = 12,
        heads: int = 11,
        dim_head: int = 64,
        mlp_dim: int = 2048,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.num_landmarks = num_landmarks
        self.patch_size = patch_size
        self.channels = channels
        self.dim = dim
        self.depth = depth
        self.heads = heads
        self.dim_head = dim_head
        self.mlp_dim = mlp_dim
        self.dropout_rate = dropout
        self.emb_dropout_rate = emb_dropout
        self.drop_path_rate = drop_path

        self.patch_to_embedding = nn.Linear(patch_size * patch_size * channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, num_landmarks + 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    ResidualDropPath(PreNorm(dim, Attention(dim, heads, dim_head, dropout)), drop_path),
                    ResidualDropPath(PreNorm(dim, FeedForward(dim, mlp_dim, dropout)), drop_path),
                ]
            )
            for _ in range(depth)
        )
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim))
        # The output is the cls token alone, so the last block needs every token's keys and values but
        # only the cls row's query, attention, projection and MLP: about 4/5 of that block's work is skipped
        # (for the same output up to float rounding). False runs every token, as the original code does.
        self.last_block_cls_only = True
        self.attention_form = "auto"
        self._init_weights()

    @property
    def attention_form(self) -> str:
        """How every block computes attention (ATTENTION_FORMS); "auto" unless set, "explicit" on the
        original path (the released code's form)."""
        return self._attention_form

    @attention_form.setter
    def attention_form(self, form: str) -> None:
        if form not in ATTENTION_FORMS:
            raise ValueError(f"attention form must be one of {ATTENTION_FORMS}; got {form!r}")
        self._attention_form = form
        for residual_attention, _ in self.layers:
            residual_attention.fn.fn.form = form

    def compute_as_released(self) -> "PartTransformer":
        """Compute as the released code does (the original path): every token through the last block and
        attention in its explicit form.  Returns self."""
        self.last_block_cls_only = False
        self.attention_form = "explicit"
        return self

    def _init_weights(self) -> None:
        # Linears are left at PyTorch's default (uniform, std ~ 0.58 / sqrt(fan_in)), as in the original.
        # The ViT habit of std 0.02 makes a narrow model's blocks nearly silent at the start: the cls
        # output is then nearly the same for every image (mean pairwise cosine ~0.999 at width 64
        # against ~0.6 here) and training starts slower.  N(0, 1) tokens, as in the original, drown
        # the patches the same way, hence std 0.02 for them.
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embedding, std=0.02)

    @property
    def token_dim(self) -> int:
        """Features per token: P * P * C."""
        return self.patch_size * self.patch_size * self.channels

    def arch_config(self) -> dict:
        """Constructor arguments that rebuild this module."""
        return {
            "num_landmarks": self.num_landmarks,
            "patch_size": self.patch_size,
            "channels": self.channels,
            "dim": self.dim,
            "depth": self.depth,
            "heads": self.heads,
            "dim_head": self.dim_head,
            "mlp_dim": self.mlp_dim,
            "dropout": self.dropout_rate,
            "emb_dropout": self.emb_dropout_rate,
            "drop_path": self.drop_path_rate,
        }

    def positional_embedding(self, batch: int, num_tokens: int, index: Optional[torch.Tensor]) -> torch.Tensor:
        """Positions for [cls, tokens]: [1 or B, 1 + K, dim].

        Without ``index`` the first K + 1 positions are used, as the original
        does (K = L gives each landmark its own position).  With ``index``
        [B, K] (the landmark each token was cut around, e.g. 36 of 196 drawn for
        a LAFS local view), token k of image b gets ``pos_embedding[1 + index[b, k]]``,
        so a subsampled token keeps the position of its landmark.  The original
        LAFS code instead gives a K-token view the first K + 1 positions, which
        ties positions to token order rather than to landmarks.
        """
        if index is None:
            if num_tokens > self.num_landmarks:
                raise ValueError(
                    f"{num_tokens} tokens but only {self.num_landmarks} positions; pass index "
                    "to say which landmark each token belongs to"
                )
            return self.pos_embedding[:, : num_tokens + 1]
        if index.shape != (batch, num_tokens):
            raise ValueError(
                f"index must be [B, K] = [{batch}, {num_tokens}] like the tokens; got {tuple(index.shape)}"
            )
        if index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"index must be int64 (or int32); got {index.dtype}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_landmarks):
            raise ValueError(
                f"index values must lie in [0, {self.num_landmarks}); got range "
                f"[{int(index.min())}, {int(index.max())}]"
            )
        table = self.pos_embedding[0]
        cls_pos = table[:1].expand(batch, 1, self.dim)
        # index_select: its backward (index_add) is ~6x quicker on CPU than advanced indexing's index_put.
        token_pos = table.index_select(0, index.reshape(-1) + 1).view(batch, num_tokens, self.dim)
        return torch.cat([cls_pos, token_pos], dim=1)

    def forward(self, tokens: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, K, P*P*C] (from ``landmark_patch_gather``), index [B, K] or None -> embeddings [B, dim]."""
        if tokens.dim() != 3 or tokens.shape[2] != self.token_dim:
            raise ValueError(
                f"PartTransformer expects tokens [B, K, {self.token_dim}] (P={self.patch_size}, "
                f"C={self.channels}); got shape {tuple(tokens.shape)}"
            )
        b, k, _ = tokens.shape
        x = self.patch_to_embedding(tokens)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = self.dropout(x + self.positional_embedding(b, k, index))
        last = len(self.layers) - 1 if self.last_block_cls_only and len(self.layers) else len(self.layers)
        for attention, feed_forward in self.layers[:last]:
            x = feed_forward(attention(x))
        if last < len(self.layers):
            x = cls_row_of_block(self.layers[last], x)
        return self.mlp_head(x[:, 0])

    # Layer-wise learning-rate decay (BEiT / LAFS fine-tuning): group 0 holds the
    # embeddings, group i + 1 block i, group depth + 1 the final norm.
    @property
    def num_layer_groups(self) -> int:
        return self.depth + 2

    def layer_id(self, param_name: str) -> int:
        """Layer group of a parameter named relative to this module (``layers.3.0.fn.norm.weight`` -> 4)."""
        if param_name in ("cls_token", "pos_embedding") or param_name.startswith("patch_to_embedding."):
            return 0
        if param_name.startswith("layers."):
            return int(param_name.split(".")[1]) + 1
        if param_name.startswith("mlp_head."):
            return self.depth + 1
        raise KeyError(f"{param_name!r} is not a parameter name of PartTransformer")

    def layer_lr_scales(self, decay: float) -> dict[str, float]:
        """Learning-rate multiplier per parameter name: ``decay ** (num_layer_groups - 1 - layer_id)``."""
        top = self.num_layer_groups - 1
        return {name: decay ** (top - self.layer_id(name)) for name, _ in self.named_parameters()}


def cls_row_of_block(block: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """One ``[attention, feed_forward]`` block evaluated for token 0 only: x [B, N, dim] -> [B, 1, dim],
    equal to the block's output ``[:, :1]`` (stochastic depth draws one value per image either way)."""
    attention, feed_forward = block
    pre_norm = attention.fn
    cls = x[:, :1] + attention.drop_path(pre_norm.fn.forward_first_query(pre_norm.norm(x)))
    return feed_forward(cls)
