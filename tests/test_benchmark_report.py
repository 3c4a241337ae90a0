"""benchmarks/_harness.py (interleaved rounds) and benchmarks/report.py (ratios, busy machines, targets,
the README block).

Timing is simulated with a fake clock (the cases advance it), so these tests are exact and never
depend on how busy the machine is."""

import importlib.util
import json
import math
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
        self.now, self.calls, self.growth, self.order = 0.0, 0, growth, []

    def __call__(self) -> float:
        return self.now

    def case(self, work: float, name: str = ""):
        def run():
            self.now += work * (1.0 + self.growth * self.calls)
            self.calls += 1
            self.order.append(name)

        return run


class FakeBenchmark:
    """What compare uses of pytest-benchmark's fixture."""

    def __init__(self):
        self.extra_info, self.group, self.pedantic_calls = {}, None, 0

    def pedantic(self, target, rounds=1, iterations=1):
        self.pedantic_calls += 1
        return target()


def test_rounds_interleave_every_implementation_in_rotating_order(monkeypatch):
    clock = SlowingClock(growth=0.0)
    monkeypatch.setattr(harness, "synchronized_timer", clock)
    cases = {n: clock.case(w, n) for n, w in (("ours", 0.4), ("a", 0.5), ("b", 0.8))}
    times = harness.interleaved_rounds(cases, 3, {"ours": 1, "a": 1, "b": 2})
    assert clock.order == ["ours", "a", "b", "b", "a", "b", "b", "ours", "b", "b", "ours", "a"]
    assert {k: pytest.approx(v) for k, v in times.items()} == {"ours": [0.4] * 3, "a": [0.5] * 3, "b": [0.8] * 3}


def _case(times: dict, ladder=(), machine=None, work=None) -> "report.Case":
    impls = [report.Impl(name, name == "ours", values) for name, values in times.items()]
    return report.Case(
        op="x",
        title="X",
        mode="fwd",
        dtype="float32",
        device="cpu",
        device_name="CPU",
        shape={},
        work=work or {},
        impls=impls,
        ladder=list(ladder),
        role=None,
        machine=machine or {"other_cpu_cores": 0.0, "load_before": [0.3], "cores": 2},
    )


def test_per_round_ratios_cancel_a_machine_that_slows_down(monkeypatch):
    # 0.2% slower per call: separate runs of rounds (ours first, then the baseline) would see the baseline
    # inflated by the drift of 21 calls; interleaved rounds see one call's drift at most, on either side.
    clock = SlowingClock(growth=0.002)
    monkeypatch.setattr(harness, "synchronized_timer", clock)
    times = harness.interleaved_rounds({"ours": clock.case(0.4), "base": clock.case(0.5)}, 21, {"ours": 1, "base": 1})
    spread = _case(times).speedup("ours", "base")
    assert spread.median == pytest.approx(1.25, abs=0.005) and spread.rounds == 21
    assert spread.low <= spread.median <= spread.high

    clock = SlowingClock(growth=0.002)
    monkeypatch.setattr(harness, "synchronized_timer", clock)
    ours = harness.interleaved_rounds({"ours": clock.case(0.4)}, 21, {"ours": 1})["ours"]
    base = harness.interleaved_rounds({"base": clock.case(0.5)}, 21, {"base": 1})["base"]
    separate = sorted(base)[10] / sorted(ours)[10]
    assert separate > 1.29  # the baseline measured later, on the slower machine: the drift inflates it


def test_compare_records_rounds_times_machine_and_ladder(monkeypatch):
    clock = SlowingClock(growth=0.0)
    monkeypatch.setattr(harness, "synchronized_timer", clock)
    monkeypatch.setattr(harness, "SMOKE", False)
    bench = FakeBenchmark()
    impls = [
        harness.Impl("original", False, lambda: clock.case(0.5)),
        harness.Impl("fused", True, lambda: clock.case(0.4)),
    ]
    harness.compare(
        bench,
        op="training_step",
        title="Training step",
        mode="pretrain",
        dtype="float32",
        shape={"B": 16},
        impls=impls,
        work={"images": 16},
        ladder=["original", "fused"],
    )
    info = bench.extra_info
    assert bench.pedantic_calls == 1 and info["schema"] == report.SCHEMA
    assert info["rounds"] >= harness.MIN_ROUNDS and info["ladder"] == ["original", "fused"]
    assert [i["name"] for i in info["impls"]] == ["original", "fused"]
    assert all(len(i["times_s"]) == info["rounds"] for i in info["impls"])
    assert set(info["machine"]) >= {"load_before", "load_after", "other_cpu_cores", "cores"}
    with pytest.raises(ValueError, match="distinct"):
        harness.compare(bench, op="x", title="X", mode="fwd", dtype="float32", shape={}, impls=impls + impls[:1])


def test_plan_rounds_fills_the_budget_within_bounds(monkeypatch):
    monkeypatch.setattr(harness, "SMOKE", False)
    monkeypatch.setenv("LAFS_BENCH_BUDGET_S", "2")
    rounds, iterations = harness.plan_rounds([0.1, 0.001], "cpu")
    assert iterations == [1, 1] and rounds == 2 * math.ceil((4 // 0.101) / 2)  # CPU: one call each per slot
    rounds, iterations = harness.plan_rounds([0.004, 0.0001, 0.05], "cuda")
    assert iterations == [200, 200, 200]  # the same calls for all: as many as the fastest needs for 20 ms
    assert rounds % 3 == 0 and rounds == 3 * math.ceil(harness.MIN_ROUNDS / 3)
    assert harness.plan_rounds([10.0], "cpu")[0] == harness.MIN_ROUNDS
    assert harness.plan_rounds([1e-5], "cpu")[0] == harness.MAX_ROUNDS
    three = harness.plan_rounds([1e-5] * 3, "cpu")[0]
    assert three % 3 == 0 and three <= harness.MAX_ROUNDS  # whole rotations, within the cap


def test_ladder_shows_each_steps_share():
    case = _case(
        {"original": [1.0, 1.0, 1.0], "original+non-kernel": [0.8, 0.8, 0.8], "ours": [0.5, 0.5, 0.5]},
        ladder=["original", "original+non-kernel", "ours"],
    )
    assert report.ladder_text(case) == "original+non-kernel 1.25x (1.25-1.25); ours 1.60x (1.60-1.60)"
    assert case.speedup("ours", "original").median == pytest.approx(2.0)


def test_busy_rule():
    assert _case({"ours": [1.0]}).busy(0.2) is None
    assert "0.90 CPU cores" in _case(
        {"ours": [1.0]}, machine={"other_cpu_cores": 0.9, "load_before": [2.5], "cores": 2}
    ).busy(0.2)
    # without /proc/stat the load average decides
    assert _case({"ours": [1.0]}, machine={"other_cpu_cores": None, "load_before": [0.4], "cores": 2}).busy(0.2) is None
    assert "load average 1.5" in _case(
        {"ours": [1.0]}, machine={"other_cpu_cores": None, "load_before": [1.5], "cores": 2}
    ).busy(0.2)


def _result_file(path: Path, other_cpu: float, op="training_step", title="Training step") -> str:
    info = {
        "schema": report.SCHEMA,
        "op": op,
        "title": title,
        "mode": "pretrain",
        "dtype": "float32",
        "device": "cpu",
        "device_name": "CPU (2 cores)",
        "shape": {"model": "part_fvit_tiny", "B": 16},
        "work": {"images": 16},
        "rounds": 5,
        "ladder": ["original", "original+non-kernel", "fused"],
        "role": None,
        "machine": {"other_cpu_cores": other_cpu, "load_before": [0.4], "cores": 2},
        "impls": [
            {"name": "original", "ours": False, "times_s": [0.60, 0.62, 0.61, 0.60, 0.63], "peak_added_bytes": 2 << 20},
            {"name": "original+non-kernel", "ours": False, "times_s": [0.55, 0.56, 0.55, 0.55, 0.57]},
            {"name": "fused", "ours": True, "times_s": [0.50, 0.50, 0.50, 0.50, 0.50], "peak_added_bytes": 1 << 20},
        ],
    }
    data = {
        "machine_info": {
            "lafs": {"bench_device": "cpu", "cpu_load_at_start_1_5_15min": [0.4, 0.5, 0.5]},
            "cpu": {"brand_raw": "Test CPU 9000"},
        },
        "commit_info": {"id": "0" * 40},
        "datetime": "2026-12-06T00:00:00",
        "benchmarks": [
            {"extra_info": info, "stats": {"median": 9.0}},
            {"extra_info": {"op": "old", "impl": "x"}, "stats": {"median": 1.0}},
        ],
    }
    path.write_text(json.dumps(data))
    return str(path)


SETTINGS = {
    "busy_other_cpu_cores": 0.2,
    "targets": [
        {
            "source": "#8",
            "op": "training_step",
            "device": "cpu",
            "where": {"mode": "pretrain"},
            "baseline": "original",
            "kind": "speedup",
            "value": 1.2,
        }
    ],
    "headlines": [
        {"label": "pretraining step", "op": "training_step", "device": "cpu", "where": {"mode": "pretrain"}},
        {"label": "gpu step", "op": "training_step", "device": "cuda", "where": {}},
    ],
}


def test_targets_are_judged_on_the_median_per_round_ratio_of_an_idle_run(tmp_path):
    runs = report.select_runs([_result_file(tmp_path / "cpu_20261206T000000Z.json", other_cpu=0.05)])
    [(target, label, met, text)] = report.check_targets(runs, SETTINGS)
    assert met is True and text.startswith("1.22x (1.20-1.25)") and label == "fused float32"
    runs = report.select_runs([_result_file(tmp_path / "cpu_20261206T000001Z.json", other_cpu=1.3)])
    [(target, label, met, text)] = report.check_targets(runs, SETTINGS)
    assert met is None and "not judged" in text


def test_the_readme_block_shows_numbers_only_for_idle_runs(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_BEGIN}\nold pasted numbers 7.2x\n{report.README_END}\noutro\n")
    idle = report.select_runs([_result_file(tmp_path / "cpu_20261206T000000Z.json", other_cpu=0.05)])
    report.rewrite_readme(str(readme), report.readme_block(idle, SETTINGS))
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "7.2x" not in text
    assert "Measured on CPU (2 cores) with Test CPU 9000 (" in text  # CPU speed-ups depend on the processor
    assert "| pretraining step | fused 500 ms | original 610 ms / original+non-kernel 550 ms |" in text
    assert "1.22x (1.20-1.25) / 1.10x (1.10-1.13); step by step: original+non-kernel 1.11x" in text
    assert "| gpu step | not measured yet" in text

    busy = report.select_runs([_result_file(tmp_path / "cpu_20261206T000001Z.json", other_cpu=1.3)])
    report.rewrite_readme(str(readme), report.readme_block(busy, SETTINGS))
    text = readme.read_text()
    assert "| pretraining step | not published: other processes used 1.30 CPU cores" in text
    assert "1.22x" not in text and text.count(report.README_BEGIN) == 1

    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="needs exactly one"):
        report.rewrite_readme(str(tmp_path / "plain.md"), "x")


def test_a_new_kind_of_benchmark_needs_no_change_in_the_report(tmp_path):
    path = _result_file(tmp_path / "cpu_20261206T000000Z.json", other_cpu=0.0, op="embedding", title="Embedding")
    runs = report.select_runs([path])
    table = "\n".join(report.op_table(runs[0], "embedding", 0.2))
    assert table.startswith("### Embedding (`embedding`)") and "32 img/s" in table
    assert "original+non-kernel 1.11x" in table


def test_results_md_names_ignored_old_records(tmp_path):
    path = _result_file(tmp_path / "cpu_20261206T000000Z.json", other_cpu=0.0)
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps(SETTINGS))
    out = tmp_path / "R.md"
    report.main([path, "--out", str(out), "--charts", "none", "--targets", str(targets)])
    text = out.read_text()
    assert "1 records of the earlier layout" in text and "## Targets" in text and "| #8 training_step" in text


def test_pooling_concatenates_rounds_and_keeps_the_busiest_machine(tmp_path):
    first = report.load_run(_result_file(tmp_path / "cpu_20261206T000000Z.json", other_cpu=0.05))
    second_path = _result_file(tmp_path / "cpu_20261206T000001Z.json", other_cpu=0.15)
    data = json.loads(Path(second_path).read_text())
    data["datetime"] = "2026-12-06T00:00:01"
    data["benchmarks"][0]["extra_info"]["impls"][0]["times_s"] = [0.70] * 5  # the baseline slower in run 2
    Path(second_path).write_text(json.dumps(data))
    pooled = report.pool_runs([report.load_run(second_path), first])
    [case] = pooled.cases
    assert case.impl("original").times_s == [0.60, 0.62, 0.61, 0.60, 0.63] + [0.70] * 5
    assert case.impl("fused").times_s == [0.50] * 10
    assert case.machine["other_cpu_cores"] == 0.15 and pooled.path == second_path
    ratios = sorted([t / 0.5 for t in [0.60, 0.62, 0.61, 0.60, 0.63]] + [1.4] * 5)
    assert case.speedup("fused", "original").median == pytest.approx((ratios[4] + ratios[5]) / 2)
    # run 2's ratio (1.40) lies outside run 1's range (1.20-1.25): the reproduction check says so
    rows = report.reproduction(first, report.load_run(second_path))
    within = {label.split(": ")[1]: ok for label, _, _, ok in rows}
    assert within == {"fused vs original": False, "fused vs original+non-kernel": True}
    other = tmp_path / "gpu_20261206T000002Z.json"
    other.write_text(Path(second_path).read_text())
    with pytest.raises(SystemExit, match="different environments"):
        report.pool_runs([first, report.load_run(str(other))])


def _run_with_original_times(tmp_path: Path, second: int, original: list) -> str:
    """A result file of run ``second`` (its time of day) whose baseline 'original' took ``original``."""
    path = _result_file(tmp_path / f"cpu_20261206T0000{second:02d}Z.json", other_cpu=0.05)
    data = json.loads(Path(path).read_text())
    data["datetime"] = f"2026-12-06T00:00:{second:02d}"
    data["benchmarks"][0]["extra_info"]["impls"][0]["times_s"] = original
    Path(path).write_text(json.dumps(data))
    return path


def test_run_to_run_leaves_each_run_out_against_the_others_pooled(tmp_path):
    """Three runs; the third's baseline is slower (ratio 1.50 against 1.20-1.26): left out, it lies outside the
    range the first two print; each of the first two lies inside the range of the other two (which the slow
    run widens). The README sentence counts the same over the speed-ups its table shows."""
    paths = [
        _run_with_original_times(tmp_path, 0, [0.60, 0.62, 0.61, 0.60, 0.63]),
        _run_with_original_times(tmp_path, 1, [0.61, 0.60, 0.62, 0.63, 0.60]),
        _run_with_original_times(tmp_path, 2, [0.75] * 5),
    ]
    pooled = report.pool_runs([report.load_run(p) for p in paths])
    rows = {r.label.split(": ")[1]: r for r in report.run_to_run(pooled)}
    original = rows["fused vs original"]
    assert original.medians == pytest.approx([1.22, 1.22, 1.50])
    assert original.inside == [True, True, False]
    assert rows["fused vs original+non-kernel"].inside == [True, True, True]
    assert report.run_to_run_counts(list(rows.values())) == (1, 2, 5, 6)
    section = "\n".join(report.run_to_run_section(pooled))
    assert "**1 of 2** ratios have every run inside; 5 of 6 run-ratio pairs" in section
    assert "| 2 of 3 (outside: 00:00) |" in section
    sentence = report.headline_run_to_run([pooled], SETTINGS)
    assert "for 1 of 2 speed-ups in this table every run's median lies inside" in sentence
    # two runs: nothing to leave out
    assert report.run_to_run(report.pool_runs([report.load_run(p) for p in paths[:2]])) == []


def test_profile_section_shows_each_parts_median_over_the_pooled_runs(tmp_path):
    paths = []
    for second, colour in ((1, 0.010), (2, 0.030), (3, 0.020)):
        path = _run_with_original_times(tmp_path, second, [0.6] * 5)
        data = json.loads(Path(path).read_text())
        data["benchmarks"][0]["extra_info"]["profile"] = {
            "fused": {"colour": colour, "blur": 0.005, "total": colour + 0.005},
            "original": {"colour": 0.050, "blur": 0.010, "total": 0.060},
        }
        Path(path).write_text(json.dumps(data))
        paths.append(path)
    pooled = report.pool_runs([report.load_run(p) for p in paths])
    [case] = pooled.cases
    assert report.median_profile(case)["fused"] == pytest.approx({"colour": 0.020, "blur": 0.005, "total": 0.025})
    text = "\n".join(report.profile_section(pooled))
    assert "| part | fused | original |" in text
    assert "| colour | 20 ms (80%) | 50 ms (83%) |" in text
    assert "| total | 25 ms | 60 ms |" in text
    # a run without profiles adds no section
    assert (
        report.profile_section(report.load_run(_result_file(tmp_path / "cpu_20261206T000009Z.json", other_cpu=0.05)))
        == []
    )


def test_pooling_keeps_only_implementations_every_run_timed(tmp_path, capsys):
    first = report.load_run(_result_file(tmp_path / "cpu_20261206T000000Z.json", other_cpu=0.05))
    second_path = _run_with_original_times(tmp_path, 1, [0.6] * 5)
    data = json.loads(Path(second_path).read_text())
    del data["benchmarks"][0]["extra_info"]["impls"][1]  # run 2 without original+non-kernel
    Path(second_path).write_text(json.dumps(data))
    [case] = report.pool_runs([first, report.load_run(second_path)]).cases
    assert [i.name for i in case.impls] == ["original", "fused"] and len(case.impl("fused").times_s) == 10
    assert "original+non-kernel left out (not timed in every run" in capsys.readouterr().err


def test_reproduce_gives_a_verdict_and_an_exit_status(tmp_path, capsys):
    first = _result_file(tmp_path / "cpu_20261206T000000Z.json", other_cpu=0.05)
    same = _run_with_original_times(tmp_path, 1, [0.60, 0.62, 0.61, 0.60, 0.63])
    slower = _run_with_original_times(tmp_path, 2, [0.70] * 5)
    with pytest.raises(SystemExit) as done:
        report.main(["--reproduce", first, same])
    assert done.value.code == 0 and "verdict: consistent" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        report.main(["--reproduce", first, slower])
    assert done.value.code == 1 and "verdict: NOT consistent" in capsys.readouterr().out
    smoke = json.loads(Path(same).read_text())
    smoke["machine_info"]["lafs"]["smoke"] = True
    Path(same).write_text(json.dumps(smoke))
    with pytest.raises(SystemExit) as done:
        report.main(["--reproduce", first, same])
    assert done.value.code == 1 and "NOT COMPARABLE: a smoke run" in capsys.readouterr().out


def test_readme_refuses_smoke_and_uncommitted_runs(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.README_BEGIN}\n{report.README_END}\n")
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps(SETTINGS))
    path = _result_file(tmp_path / "cpu_20261206T000000Z.json", other_cpu=0.05)
    args = [path, "--out", str(tmp_path / "R.md"), "--charts", "none", "--targets", str(targets)]
    data = json.loads(Path(path).read_text())
    data["commit_info"]["dirty"] = True
    Path(path).write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="uncommitted changes"):
        report.main(args + ["--readme", str(readme)])
    report.main(args + ["--readme", str(readme), "--allow-dirty"])
    assert "Commit 0000000000 (dirty)" in readme.read_text()
    data["machine_info"]["lafs"]["smoke"] = True
    Path(path).write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="is a smoke run"):
        report.main(args + ["--readme", str(readme), "--allow-dirty"])
    assert "not judged: a smoke run" in (tmp_path / "R.md").read_text()


def test_an_unreadable_result_file_is_named(tmp_path):
    broken = tmp_path / "cpu_20261206T000000Z.json"
    broken.write_text("{not json")
    with pytest.raises(SystemExit, match="cpu_20261206T000000Z.json: not a readable benchmark result"):
        report.load_run(str(broken))
