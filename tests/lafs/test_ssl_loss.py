"""DINOLoss against a direct float64 computation written out here."""

import math

import pytest
import torch

from lafs.ssl import DINOLoss

from tolerances import assert_close


def direct_dino_loss(student, teacher, center, ncrops, n_teacher, student_temp, teacher_temp):
    """Loops over pairs and images; softmax written from exp / sum."""
    batch = student.shape[0] // ncrops
    total, pairs = 0.0, 0
    for i in range(n_teacher):
        for v in range(ncrops):
            if v == i:
                continue
            pair = 0.0
            for b in range(batch):
                t = (teacher[i * batch + b] - center) / teacher_temp
                q = torch.exp(t - t.max()) / torch.exp(t - t.max()).sum()
                s = student[v * batch + b] / student_temp
                log_p = s - (s.max() + torch.log(torch.exp(s - s.max()).sum()))
                pair += float(-(q * log_p).sum())
            total += pair / batch
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("ncrops,n_teacher", [(4, 2), (3, 1)])
def test_loss_matches_direct_float64(rng, ncrops, n_teacher):
    out_dim, batch = 32, 3
    loss_fn = DINOLoss(out_dim, ncrops, warmup_teacher_temp=0.07, teacher_temp=0.04, warmup_teacher_temp_epochs=5)
    center = torch.randn(1, out_dim, generator=rng, dtype=torch.float64)
    loss_fn.center.copy_(center)
    student = torch.randn(ncrops * batch, out_dim, generator=rng, dtype=torch.float64) * 3
    teacher = torch.randn(n_teacher * batch, out_dim, generator=rng, dtype=torch.float64) * 3
    epoch = 2
    temp = 0.07 + (0.04 - 0.07) * epoch / 4  # linspace(0.07, 0.04, 5)[2]
    expected = direct_dino_loss(student, teacher, center[0].float().double(), ncrops, n_teacher, 0.1, temp)
    actual = loss_fn(student, teacher, epoch)
    assert actual.dtype == torch.float64
    assert_close(actual, torch.tensor(expected, dtype=torch.float64), dtype=torch.float64)


def test_loss_float32_matches_float64(rng):
    out_dim, batch, ncrops = 64, 4, 5
    student = torch.randn(ncrops * batch, out_dim, generator=rng)
    teacher = torch.randn(2 * batch, out_dim, generator=rng)
    expected = direct_dino_loss(
        student.double(), teacher.double(), torch.zeros(out_dim, dtype=torch.float64), ncrops, 2, 0.1, 0.04
    )
    actual = DINOLoss(out_dim, ncrops)(student, teacher, epoch=0)
    assert actual.dtype == torch.float32
    assert_close(actual, torch.tensor(expected), dtype=torch.float32, scale=10)


def test_center_is_ema_of_raw_teacher_batch_mean(rng):
    out_dim, batch = 16, 5
    loss_fn = DINOLoss(out_dim, 4, center_momentum=0.9)
    old = torch.randn(1, out_dim, generator=rng)
    loss_fn.center.copy_(old)
    teacher = torch.randn(2 * batch, out_dim, generator=rng) + 2.0
    loss_fn(torch.randn(4 * batch, out_dim, generator=rng), teacher, epoch=0)
    expected = 0.9 * old.double() + 0.1 * teacher.double().mean(dim=0, keepdim=True)
    assert_close(loss_fn.center, expected, dtype=torch.float32)


def test_centre_changes_the_loss_and_the_teacher_gets_no_gradient(rng):
    out_dim, batch = 16, 2
    student = torch.randn(4 * batch, out_dim, generator=rng, requires_grad=True)
    teacher = torch.randn(2 * batch, out_dim, generator=rng, requires_grad=True)
    plain = DINOLoss(out_dim, 4)
    centred = DINOLoss(out_dim, 4)
    centred.center.copy_(torch.randn(1, out_dim, generator=rng))
    loss = plain(student, teacher, 0)
    assert not math.isclose(loss.item(), centred(student, teacher, 0).item(), rel_tol=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad is not None and student.grad.abs().sum() > 0


def test_temperature_warmup_then_constant():
    loss_fn = DINOLoss(8, 2, warmup_teacher_temp=0.07, teacher_temp=0.04, warmup_teacher_temp_epochs=4, nepochs=10)
    temps = [loss_fn.teacher_temperature(e) for e in range(10)]
    assert temps[:4] == pytest.approx([0.07, 0.06, 0.05, 0.04])
    assert temps[4:] == pytest.approx([0.04] * 6)
    with pytest.raises(ValueError, match="epoch 10"):
        loss_fn.teacher_temperature(10)


def test_bad_shapes_are_named(rng):
    loss_fn = DINOLoss(8, 3)
    with pytest.raises(ValueError, match="multiple of ncrops"):
        loss_fn(torch.randn(7, 8, generator=rng), torch.randn(4, 8, generator=rng), 0)
    with pytest.raises(ValueError, match=r"teacher_output has 5 rows"):
        loss_fn(torch.randn(6, 8, generator=rng), torch.randn(5, 8, generator=rng), 0)
    with pytest.raises(ValueError, match=r"\[rows, 8\]"):
        loss_fn(torch.randn(6, 9, generator=rng), torch.randn(4, 9, generator=rng), 0)
