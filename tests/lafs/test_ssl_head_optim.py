"""DINO head, EMA, per-parameter clipping, last-layer freeze, weight-decay groups."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lafs.ssl import (
    DINOHead,
    WeightNormLinear,
    cancel_last_layer_gradients,
    clip_gradients_per_parameter,
    ema_update,
    param_groups_for_weight_decay,
)

from tolerances import assert_close


def test_head_computes_mlp_normalise_weightnorm_linear(rng):
    head = DINOHead(12, out_dim=40, hidden_dim=24, bottleneck_dim=8)
    with torch.no_grad():
        head.last_layer.weight_v.mul_(torch.rand(40, 1, generator=rng) + 0.5)  # rows of different norms
    x = torch.randn(5, 12, generator=rng, dtype=torch.float64)
    head = head.double()
    m = head.mlp
    h = F.gelu(F.linear(x, m[0].weight, m[0].bias))
    h = F.gelu(F.linear(h, m[2].weight, m[2].bias))
    z = F.linear(h, m[4].weight, m[4].bias)
    z = z / z.norm(dim=1, keepdim=True)
    v = head.last_layer.weight_v
    expected = z @ (v / v.norm(dim=1, keepdim=True)).T
    assert_close(head(x), expected)


@pytest.mark.parametrize("fixed_gain", [True, False])
def test_weight_norm_gradients_match_the_formula(rng, fixed_gain):
    layer = WeightNormLinear(8, 40, fixed_gain=fixed_gain).double()
    with torch.no_grad():
        layer.weight_v.mul_(torch.rand(40, 1, generator=rng, dtype=torch.float64) + 0.5)
        layer.weight_g.copy_(torch.rand(40, 1, generator=rng, dtype=torch.float64) + 0.5)
    x = torch.randn(5, 8, generator=rng, dtype=torch.float64)
    upstream = torch.randn(5, 40, generator=rng, dtype=torch.float64)
    layer(x).backward(upstream)
    v = layer.weight_v.detach().requires_grad_(True)
    g = layer.weight_g.detach().requires_grad_(not fixed_gain)
    F.linear(x, g * v / v.norm(dim=1, keepdim=True)).backward(upstream)
    assert_close(layer.weight_v.grad, v.grad)
    assert (layer.weight_g.grad is None) == fixed_gain
    if not fixed_gain:
        assert_close(layer.weight_g.grad, g.grad)


def test_head_keys_match_the_original_and_gain_is_fixed():
    head = DINOHead(16, out_dim=64, hidden_dim=32, bottleneck_dim=8)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (32, 16),
        "mlp.0.bias": (32,),
        "mlp.2.weight": (32, 32),
        "mlp.2.bias": (32,),
        "mlp.4.weight": (8, 32),
        "mlp.4.bias": (8,),
        "last_layer.weight_g": (64, 1),
        "last_layer.weight_v": (64, 8),
    }
    assert not head.last_layer.weight_g.requires_grad
    assert DINOHead(16, 64, 32, 8, norm_last_layer=False).last_layer.weight_g.requires_grad
    assert isinstance(DINOHead(16, 64, 32, 8, nlayers=1).mlp, nn.Linear)


def test_ema_update(rng):
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters()):
        assert_close(t, 0.9 * t0.double() + 0.1 * s.detach().double(), dtype=torch.float32)
        assert t.grad_fn is None
    with pytest.raises(ValueError, match="parameters"):
        ema_update(nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3)), 0.9)


def test_clipping_is_per_parameter(rng):
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 2))
    grads = [torch.randn(p.shape, generator=rng) * scale for p, scale in zip(model.parameters(), (10, 0.01, 5, 0.02))]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    norms = clip_gradients_per_parameter(model, clip=1.0)
    assert_close(norms, torch.stack([g.norm() for g in grads]))
    for p, g in zip(model.parameters(), grads):
        n = g.double().norm()
        expected = g.double() * (1.0 / (n + 1e-6)) if 1.0 / (n + 1e-6) < 1 else g.double()
        assert_close(p.grad, expected, dtype=torch.float32)
    assert all(p.grad.norm() <= 1.0 + 1e-5 for p in model.parameters())


def test_last_layer_gradients_dropped_only_while_frozen(rng):
    head = DINOHead(4, out_dim=8, hidden_dim=6, bottleneck_dim=3, norm_last_layer=False)
    head(torch.randn(2, 4, generator=rng)).sum().backward()
    cancel_last_layer_gradients(head, epoch=1, freeze_last_layer=1)
    assert head.last_layer.weight_v.grad is not None
    cancel_last_layer_gradients(head, epoch=0, freeze_last_layer=1)
    assert head.last_layer.weight_v.grad is None and head.last_layer.weight_g.grad is None
    assert head.mlp[0].weight.grad is not None


def test_weight_decay_groups():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model.register_parameter("token", nn.Parameter(torch.zeros(1, 1, 4)))
    model.register_parameter("frozen", nn.Parameter(torch.zeros(3, 3), requires_grad=False))
    decay, no_decay = param_groups_for_weight_decay(model)
    assert decay["name"] == "decay" and no_decay["name"] == "no_decay" and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(decay) == {id(model[0].weight), id(model.token)}
    assert ids(no_decay) == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
