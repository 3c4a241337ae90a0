"""DINOTrainer: one pretraining step, the teacher EMA, the last-layer freeze, exact resume."""

import copy

import pytest
import torch

from lafs.models import LandmarkCNN, PartTransformer
from lafs.ssl import DINOSettings, DINOTrainer, MultiViewBuilder

from tolerances import assert_close

L, SIZE, P = 16, 32, 4


def make_trainer(cnn, device="cpu", **overrides) -> DINOTrainer:
    def backbone():
        return PartTransformer(
            num_landmarks=L, patch_size=P, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64, drop_path=0.1
        )

    settings = dict(
        epochs=2,
        iters_per_epoch=2,
        batch_size=2,
        out_dim=256,
        hidden_dim=64,
        bottleneck_dim=16,
        warmup_epochs=1,
        warmup_teacher_temp_epochs=1,
        lr=0.05,
    )
    settings.update(overrides)
    views = MultiViewBuilder(cnn, patch_size=P, global_views=2, local_views=2, local_tokens=6, image_size=SIZE)
    return DINOTrainer(backbone(), backbone(), views, DINOSettings(**settings), device=device)


@pytest.fixture
def cnn():
    return LandmarkCNN(num_landmarks=L, image_size=SIZE, blocks="tiny")


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_step_updates_student_and_moves_teacher_by_ema(rng, cnn):
    trainer = make_trainer(cnn)
    images = torch.rand(2, 3, SIZE, SIZE, generator=rng) * 2 - 1
    student_before, teacher_before = params(trainer.student), params(trainer.teacher)
    assert all(torch.equal(s, t) for s, t in zip(student_before, teacher_before))  # teacher starts as the student
    stats = trainer.train_step(images, global_step=1, epoch=0)
    assert set(stats) == {"loss", "lr", "wd", "momentum", "teacher_temp"}
    assert torch.isfinite(torch.tensor(stats["loss"])) and stats["loss"] > 0
    assert stats["lr"] == pytest.approx(trainer.lr_schedule[1]) and stats["lr"] == pytest.approx(0.05 * 2 / 256)
    assert trainer.optimizer.param_groups[0]["weight_decay"] == pytest.approx(trainer.wd_schedule[1])
    assert trainer.optimizer.param_groups[1]["weight_decay"] == 0.0
    student_after, teacher_after = params(trainer.student), params(trainer.teacher)
    names = [n for n, _ in trainer.student.named_parameters()]
    m = stats["momentum"]
    assert 0.996 <= m < 1
    changed = 0
    for name, s0, s1, t0, t1 in zip(names, student_before, student_after, teacher_before, teacher_after):
        assert torch.isfinite(s1).all(), name
        if "last_layer" in name:
            assert torch.equal(s0, s1), f"{name} must stay frozen during epoch 0"
        changed += not torch.equal(s0, s1)
        assert_close(t1, m * t0.double() + (1 - m) * s1.double(), dtype=torch.float32, msg=name)
    assert changed > len(names) // 2
    assert trainer.loss.center.abs().sum() > 0


def test_last_layer_trains_after_the_frozen_epochs(rng, cnn):
    trainer = make_trainer(cnn, norm_last_layer=False)
    before = trainer.student.head.last_layer.weight_v.detach().clone()
    trainer.train_step(torch.rand(2, 3, SIZE, SIZE, generator=rng) * 2 - 1, global_step=2, epoch=1)
    assert not torch.equal(before, trainer.student.head.last_layer.weight_v)


def test_resume_from_state_dict_gives_the_same_next_step_bitwise(rng, cnn):
    images = [torch.rand(2, 3, SIZE, SIZE, generator=rng) * 2 - 1 for _ in range(2)]
    first = make_trainer(copy.deepcopy(cnn))
    first.train_step(images[0], 0, 0)
    state = copy.deepcopy(first.state_dict())
    expected_stats = first.train_step(images[1], 1, 0)

    torch.manual_seed(12345)  # a different initialisation and global random state
    resumed = make_trainer(copy.deepcopy(cnn))
    resumed.load_state_dict(state)
    stats = resumed.train_step(images[1], 1, 0)
    assert stats == expected_stats
    for a, b in zip(first.state_dict()["student"].values(), resumed.state_dict()["student"].values()):
        assert torch.equal(a, b)
    for a, b in zip(first.state_dict()["teacher"].values(), resumed.state_dict()["teacher"].values()):
        assert torch.equal(a, b)
    assert torch.equal(first.loss.center, resumed.loss.center)


def test_non_finite_loss_stops_before_changing_weights(rng, cnn):
    trainer = make_trainer(cnn)
    with torch.no_grad():
        trainer.student.head.mlp[0].weight[0, 0] = float("nan")
    teacher_before = params(trainer.teacher)
    with pytest.raises(FloatingPointError, match="step 0"):
        trainer.train_step(torch.rand(2, 3, SIZE, SIZE, generator=rng) * 2 - 1, 0, 0)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, params(trainer.teacher)))


def test_step_outside_the_schedule_is_refused(rng, cnn):
    trainer = make_trainer(cnn)
    with pytest.raises(ValueError, match="global_step 4"):
        trainer.train_step(torch.rand(2, 3, SIZE, SIZE, generator=rng), 4, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("amp_dtype", ["bfloat16", "float16", None])
def test_cuda_step_with_autocast(rng, cnn, amp_dtype):
    trainer = make_trainer(cnn, device="cuda", amp_dtype=amp_dtype)
    assert trainer.scaler.is_enabled() == (amp_dtype == "float16")
    images = torch.rand(2, 3, SIZE, SIZE, generator=rng) * 2 - 1
    teacher_before = params(trainer.teacher)
    stats = trainer.train_step(images, 1, 0)
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, params(trainer.teacher)))
    state = trainer.state_dict()
    assert ("scale" in state["scaler"]) == (amp_dtype == "float16")


def test_fused_adamw_steps_like_the_released_scripts_adamw(rng, cnn):
    """Our path's fused AdamW and the original path's multi-tensor AdamW: the same weights after three steps,
    up to float32 rounding (lr high enough that every update moves the weights well past that rounding)."""
    images = torch.rand(2, 3, SIZE, SIZE, generator=rng) * 2 - 1
    lr, steps = 5.0, 3
    trainers = {}
    for fused in (True, False):
        torch.manual_seed(0)
        trainers[fused] = make_trainer(cnn, fused_optimizer=fused, epochs=3, lr=lr)
        assert trainers[fused].optimizer.defaults["fused"] is fused
        for step in range(steps):
            trainers[fused].train_step(images, global_step=step + 1, epoch=1)
    moved = 0
    for (name, fused), (_, looped) in zip(
        trainers[True].student.named_parameters(), trainers[False].student.named_parameters()
    ):
        # AdamW moves a weight by up to ~lr per step, so its float32 rounding is that of magnitudes up to
        # steps * lr, not of its final value: a weight that ends near zero differed by 1.3e-5 (one in 2048,
        # LAFS_TEST_SEED=1402003350). A wrong lr, decay or bias correction moves weights by a share of lr.
        assert_close(fused, looped, dtype=torch.float32, scale=steps * lr, msg=name)
        moved += not torch.equal(fused, looped)
    assert moved > 0, "both optimizers gave bitwise the same weights: is the fused one in use?"
