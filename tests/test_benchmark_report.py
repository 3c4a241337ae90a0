"""benchmarks/_harness.paired_speedup and benchmarks/report.py's speed-up targets.

Timing is simulated with a fake clock (the cases advance it), so these tests are
exact and never depend on how busy the machine is."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # _harness imports _memory as a sibling
    spec = importlib.util.spec_from_file_location(f"lafs_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


harness = _load("_harness")
report = _load("report")


class SlowingClock:
    """A clock on which every call of a case costs ``work`` seconds times a slowdown that grows with
    each call (a machine getting busier while it is measured)."""

    def __init__(self, growth: float):
        self.now, self.calls, self.growth = 0.0, 0, growth

    def __call__(self) -> float:
        return self.now

    def case(self, work: float):
        def run():
            self.now += work * (1.0 + self.growth * self.calls)
            self.calls += 1
        return run


def test_paired_speedup_is_exact_on_a_steady_machine(monkeypatch):
    clock = SlowingClock(growth=0.0)
    monkeypatch.setattr(harness, "synchronized_timer", clock)
    paired = harness.paired_speedup(clock.case(0.4), clock.case(0.5), "original", budget_s=0.0, min_pairs=6)
    assert paired["baseline"] == "original" and paired["pairs"] == 6
    assert paired["ratio_median"] == pytest.approx(1.25)
    assert paired["ratio_q25"] == pytest.approx(1.25) and paired["ratio_q75"] == pytest.approx(1.25)


def test_paired_speedup_cancels_a_machine_that_slows_down(monkeypatch):
    # 2% slower per call: separate runs of rounds (ours first, then the baseline) would see the baseline
    # inflated by the drift; alternating ABBA pairs see it on both sides.
    clock = SlowingClock(growth=0.02)
    monkeypatch.setattr(harness, "synchronized_timer", clock)
    ours, baseline = clock.case(0.4), clock.case(0.5)
    paired = harness.paired_speedup(ours, baseline, "original", budget_s=0.0, min_pairs=20)
    assert paired["ratio_median"] == pytest.approx(1.25, abs=0.01)

    clock = SlowingClock(growth=0.02)
    monkeypatch.setattr(harness, "synchronized_timer", clock)
    ours, baseline = clock.case(0.4), clock.case(0.5)

    def median_of_rounds(case, rounds=20):
        times = []
        for _ in range(rounds):
            start = clock()
            case()
            times.append(clock() - start)
        return sorted(times)[rounds // 2]

    separate = median_of_rounds(baseline) / median_of_rounds(ours)
    assert separate < 1.2  # ours measured later, on the slower machine: the drift hides most of the speed-up


def test_paired_speedup_fills_its_budget_within_bounds(monkeypatch):
    clock = SlowingClock(growth=0.0)
    monkeypatch.setattr(harness, "synchronized_timer", clock)
    # each pair costs 1 s: a 10 s budget gives 10 pairs, bounded by max_pairs
    assert harness.paired_speedup(clock.case(0.5), clock.case(0.5), "x", budget_s=10.0, min_pairs=2)["pairs"] == 10
    assert harness.paired_speedup(clock.case(0.5), clock.case(0.5), "x", budget_s=10.0, min_pairs=2,
                                  max_pairs=4)["pairs"] == 4


def _benchmark_json(path: Path, ours_s: float, original_s: float, paired=None) -> str:
    def entry(impl, median, ours, extra=None):
        info = {"op": "training_step", "impl": impl, "ours": ours, "mode": "pretrain", "dtype": "float32",
                "device": "cpu", "shape": {"model": "part_fvit_tiny", "B": 16}, "work": {"images": 16},
                "peak_added_bytes": 1 << 20}
        info.update(extra or {})
        return {"extra_info": info, "stats": {"median": median}}

    data = {
        "machine_info": {"lafs": {"bench_device": "cpu", "cpu_load_1_5_15min": [0.5, 0.5, 0.5]}},
        "commit_info": {"id": "0" * 40}, "datetime": "2026-11-28T00:00:00",
        "benchmarks": [entry("fused", ours_s, True, {"paired": paired} if paired else None),
                       entry("original", original_s, False)],
    }
    path.write_text(json.dumps(data))
    return str(path)


def _pretrain_target(runs):
    [check] = [c for c in report.check_targets(runs) if c[0].op == "training_step" and c[0].device == "cpu"]
    return check


def test_report_judges_the_target_on_the_medians_and_shows_the_paired_ratio(tmp_path):
    paired = {"baseline": "original", "pairs": 12, "ratio_median": 1.23, "ratio_q25": 1.21, "ratio_q75": 1.25}
    runs = report.select_runs([_benchmark_json(tmp_path / "cpu_a.json", 0.50, 0.575, paired)])
    target, label, met, text = _pretrain_target(runs)
    assert met is False  # the medians give 1.15x, below the 1.2x target, whatever the paired ratio says
    assert text.startswith("1.15x") and "alternating: 1.23x (1.21-1.25, 12 pairs)" in text
    table = "\n".join(report.op_table(runs[0], "training_step"))
    assert "paired 1.23x (1.21-1.25, 12 pairs)" in table and "Paired: the median" in table

    below = dict(paired, ratio_median=1.12, ratio_q25=1.10, ratio_q75=1.14)
    runs = report.select_runs([_benchmark_json(tmp_path / "cpu_b.json", 0.50, 0.65, below)])
    assert _pretrain_target(runs)[2] is True  # 1.30x on the medians


def test_report_without_paired_timing_uses_the_medians(tmp_path):
    runs = report.select_runs([_benchmark_json(tmp_path / "cpu_c.json", 0.50, 0.625)])
    target, label, met, text = _pretrain_target(runs)
    assert met is True and text.startswith("1.25x")
    assert "paired" not in "\n".join(report.op_table(runs[0], "training_step"))
