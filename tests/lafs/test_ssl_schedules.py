"""Cosine / warmup schedules indexed by global step, and the teacher temperature schedule."""

import math

import numpy as np
import pytest

from lafs.ssl import cosine_schedule, teacher_temp_schedule


def test_cosine_without_warmup_follows_the_formula():
    base, final, epochs, per_epoch = 0.996, 1.0, 3, 7
    schedule = cosine_schedule(base, final, epochs, per_epoch)
    total = epochs * per_epoch
    assert schedule.shape == (total,)
    for step in (0, 1, 10, total - 1):
        expected = final + 0.5 * (base - final) * (1 + math.cos(math.pi * step / total))
        assert schedule[step] == pytest.approx(expected, rel=1e-12)
    assert np.all(np.diff(schedule) > 0)  # rising towards 1


def test_warmup_is_linear_then_cosine_from_base():
    schedule = cosine_schedule(1e-3, 1e-6, epochs=4, iters_per_epoch=5, warmup_epochs=2, start_warmup=0.0)
    assert schedule.shape == (20,)
    np.testing.assert_allclose(schedule[:10], np.arange(10) / 9 * 1e-3, rtol=1e-12)
    assert schedule[10] == pytest.approx(1e-3)
    assert np.all(np.diff(schedule[10:]) < 0)
    assert schedule[-1] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 9 / 10)))


def test_fractional_warmup_and_bad_lengths():
    assert cosine_schedule(1.0, 0.0, 2, 4, warmup_epochs=0.5)[:2].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="does not fit"):
        cosine_schedule(1.0, 0.0, 2, 4, warmup_epochs=3)
    with pytest.raises(ValueError, match="epochs >= 1"):
        cosine_schedule(1.0, 0.0, 0, 4)


def test_teacher_temperature():
    np.testing.assert_allclose(teacher_temp_schedule(0.07, 0.04, 4, 6), [0.07, 0.06, 0.05, 0.04, 0.04, 0.04])
    np.testing.assert_allclose(teacher_temp_schedule(0.04, 0.04, 0, 3), [0.04] * 3)
    np.testing.assert_allclose(teacher_temp_schedule(0.07, 0.04, 4, 2), [0.07, 0.06])  # run shorter than warmup
