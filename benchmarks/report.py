"""Turn saved benchmark JSON into benchmarks/RESULTS.md and PNG charts.

    python benchmarks/report.py                     # all of benchmarks/results/ (newest run per op and environment)
    python benchmarks/report.py run.json --out R.md --charts none --summary

Tables (one per op, one for training throughput): per shape group, our
implementation's median time, each baseline's time and the speed-up over it
(baseline time / ours), the peak added memory and its ratio (ours / baseline).
Ratios come from the same run only. A last section checks the targets of
issues 3, 4 and 8 and says which are met. ``--summary`` prints a short table
(the targets and headline speed-ups) to stdout.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))

OPS = {
    "landmark_patch_gather": ("Landmark patch gather (issue 3)", ["batched-grid_sample", "loop-grid_sample"]),
    "margin_softmax_cross_entropy": ("Margin softmax cross-entropy, CosFace (issue 4)", ["unfused", "unfused-compiled"]),
    "training_step": ("Training step throughput (issue 8)", ["original"]),
}


@dataclass(frozen=True)
class Target:
    """One speed or memory target of an issue, checked on rows matching ``where``."""

    issue: str
    op: str
    device: str
    where: dict
    baseline: Optional[str]
    kind: str  # "speedup" (>= value), "memory_ratio" (<= value), "copy_share" (>= value)
    value: float

    def describe(self) -> str:
        where = " ".join(f"{k}={v}" for k, v in self.where.items())
        if self.kind == "speedup":
            goal = f">= {self.value:g}x vs {self.baseline}"
        elif self.kind == "memory_ratio":
            goal = f"added memory <= {self.value:.3g} x {self.baseline}'s"
        else:
            goal = f">= {self.value:.0%} of copy bandwidth"
        return f"#{self.issue} {self.op} {self.device} {where}: {goal}"


TARGETS = [
    Target("3", "landmark_patch_gather", "cpu", {"B": 64, "K": 196, "dtype": "float32", "mode": "fwd"},
           "batched-grid_sample", "speedup", 3.0),
    Target("3", "landmark_patch_gather", "cpu", {"B": 64, "K": 196, "dtype": "float32", "mode": "fwd"},
           "loop-grid_sample", "speedup", 10.0),
    Target("3", "landmark_patch_gather", "cpu", {"B": 64, "K": 196, "dtype": "float32", "mode": "fwd+bwd"},
           "batched-grid_sample", "speedup", 2.0),
    Target("3", "landmark_patch_gather", "cuda", {"B": 256, "K": 196, "mode": "fwd"}, None, "copy_share", 0.6),
    Target("3", "landmark_patch_gather", "cuda", {"B": 256, "K": 196, "mode": "fwd+bwd"},
           "batched-grid_sample", "speedup", 3.0),
    Target("3", "landmark_patch_gather", "cuda", {"B": 256, "K": 196, "mode": "fwd+bwd"},
           "loop-grid_sample", "speedup", 50.0),
    Target("4", "margin_softmax_cross_entropy", "cpu", {"C": 100_000, "dtype": "float32", "mode": "fwd+bwd"},
           "unfused", "memory_ratio", 1 / 8),
    Target("4", "margin_softmax_cross_entropy", "cpu", {"C": 100_000, "dtype": "float32", "mode": "fwd+bwd"},
           "unfused", "speedup", 1.0),
    *[Target("4", "margin_softmax_cross_entropy", "cuda", {"C": c, "dtype": "bfloat16", "mode": "fwd+bwd"},
             "unfused", kind, value)
      for c in (205_990, 1_000_000) for kind, value in (("memory_ratio", 1 / 10), ("speedup", 1.2))],
    Target("8", "training_step", "cpu", {"mode": "pretrain"}, "original", "speedup", 1.2),
    Target("8", "training_step", "cuda", {"mode": "supervised", "model": "part_fvit_b", "B": 128,
                                         "dtype": "bfloat16"}, "original", "speedup", 1.3),
]


@dataclass
class Result:
    op: str
    impl: str
    ours: bool
    mode: str
    dtype: str
    device: str
    shape: dict
    median_s: float
    added_bytes: Optional[int]
    work: dict = field(default_factory=dict)
    paired: Optional[dict] = None  # _harness.paired_speedup's result, when ours was also timed alternately

    def paired_against(self, baseline: str) -> Optional[dict]:
        return self.paired if self.paired and self.paired.get("baseline") == baseline else None

    @property
    def group(self) -> tuple:
        return (self.op, self.device, self.dtype, self.mode, tuple(sorted(self.shape.items())))

    def matches(self, where: dict) -> bool:
        facts = {"dtype": self.dtype, "mode": self.mode, **self.shape}
        return all(facts.get(k) == v for k, v in where.items())


@dataclass
class Run:
    path: str
    machine: dict
    commit: dict
    when: str
    results: list

    @property
    def device(self) -> str:
        return self.machine.get("lafs", {}).get("bench_device", "cpu")

    @property
    def copy_bytes_per_s(self) -> Optional[float]:
        for r in self.results:
            if r.op == "copy":
                return r.work["bytes"] / r.median_s
        return None


def load_run(path: str) -> Run:
    with open(path) as f:
        data = json.load(f)
    results = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "op" not in info:
            continue
        results.append(Result(
            op=info["op"], impl=info["impl"], ours=info["ours"], mode=info["mode"], dtype=info["dtype"],
            device=info["device"], shape=info["shape"], median_s=bench["stats"]["median"],
            added_bytes=info.get("peak_added_bytes"), work=info.get("work", {}),
            paired=info.get("paired"),
        ))
    return Run(path, data.get("machine_info", {}), data.get("commit_info", {}), data.get("datetime", ""), results)


def environment_of(path: str) -> str:
    """Result files are ``<environment>_<UTC time>.json``."""
    return re.sub(r"_\d{8}T\d{6}Z$", "", os.path.splitext(os.path.basename(path))[0])


def select_runs(paths: list[str]) -> list[Run]:
    """Per environment and op, the results of the newest file holding that op.

    An op's speed-ups therefore always compare numbers of one run, even when a
    later run measured only some of the ops.
    """
    runs = [load_run(p) for p in sorted(paths)]  # within an environment, oldest first
    chosen = {}
    for run in runs:
        for op in {r.op for r in run.results}:
            chosen[(environment_of(run.path), op)] = run
    selected = []
    for run in runs:
        ops = {op for (_, op), holder in chosen.items() if holder is run}
        if ops:
            selected.append(Run(run.path, run.machine, run.commit, run.when,
                                [r for r in run.results if r.op in ops]))
    return selected


# ---------------------------------------------------------------- formatting

def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:.1f} MB"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}x"


def paired_text(paired: dict) -> str:
    """``1.21x (1.18-1.24, 12 pairs)``: median, interquartile range and count of the paired ratios."""
    return (f"{paired['ratio_median']:.2f}x ({paired['ratio_q25']:.2f}-{paired['ratio_q75']:.2f}, "
            f"{paired['pairs']} pairs)")


def shape_text(shape: dict) -> str:
    return " ".join(f"{k}={v:,}" if isinstance(v, int) and v >= 10_000 else f"{k}={v}" for k, v in shape.items())


def env_header(run: Run) -> list[str]:
    lafs = run.machine.get("lafs", {})
    cpu = run.machine.get("cpu", {}).get("brand_raw", run.machine.get("processor", ""))
    commit = run.commit.get("id", "")[:10] + (" (dirty)" if run.commit.get("dirty") else "")
    load = " / ".join(f"{x:.1f}" for x in lafs.get("cpu_load_1_5_15min", ()))
    busy = []
    cores = run.machine.get("cpu", {}).get("count") or os.cpu_count()
    one_minute = (lafs.get("cpu_load_1_5_15min") or [0])[0]
    if one_minute > cores:
        busy = [f"- **Busy machine**: load {one_minute:.1f} on {cores} cores while measuring; absolute times are "
                "inflated and noisy, ratios compare numbers of the same run. Rerun on a quiet machine for final numbers."]
    return busy + [
        f"- **{lafs.get('device_name', run.device)}** ({run.device}); CPU: {cpu}; "
        f"{lafs.get('torch_threads', '?')} torch threads; load average (1/5/15 min) at the end {load}",
        f"- {run.when[:19].replace('T', ' ')} UTC; torch {lafs.get('torch')} (CUDA {lafs.get('torch_cuda')}), "
        f"Triton {lafs.get('triton')}, Python {lafs.get('python')}, commit {commit}",
        f"- file: `{os.path.relpath(run.path, HERE)}`",
    ]


# ---------------------------------------------------------------- tables

def group_results(run: Run, op: str) -> dict:
    groups = defaultdict(list)
    for r in run.results:
        if r.op == op:
            groups[r.group].append(r)
    return groups


def op_rows(run: Run, op: str) -> list[dict]:
    """One row per (shape group, our implementation) with every baseline of the same run, in the run's order."""
    rows = []
    for results in group_results(run, op).values():
        baselines = {r.impl: r for r in results if not r.ours}
        for ours in (r for r in results if r.ours):
            row = {"ours": ours, "baselines": baselines}
            if op == "landmark_patch_gather" and run.copy_bytes_per_s and "bytes" in ours.work:
                row["copy_share"] = ours.work["bytes"] / ours.median_s / run.copy_bytes_per_s
            rows.append(row)
    return rows


def rate_text(op: str, ours: Result, row: dict) -> str:
    if op == "landmark_patch_gather" and "bytes" in ours.work:
        text = f"{ours.work['bytes'] / ours.median_s / 1e9:.1f} GB/s"
        return text + (f" ({row['copy_share']:.0%} of copy)" if "copy_share" in row else "")
    if op == "margin_softmax_cross_entropy" and "flops" in ours.work:
        rate = ours.work["flops"] / ours.median_s
        return f"{rate / 1e12:.2f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"
    if op == "training_step" and "images" in ours.work:
        return f"{ours.work['images'] / ours.median_s:.1f} img/s"
    return ""


def op_table(run: Run, op: str) -> list[str]:
    title, baseline_names = OPS[op]
    rows = op_rows(run, op)
    if not rows:
        return []
    present = [b for b in baseline_names if any(b in row["baselines"] for row in rows)]
    rate_name = {"landmark_patch_gather": "ours: bandwidth", "margin_softmax_cross_entropy": "ours: matmul rate",
                 "training_step": "ours: images/s"}[op]
    head = ["shape", "dtype", "mode", "ours", "time"] + [f"{b}" for b in present] + [rate_name, "memory ours"]
    head += [f"memory {b} (ours/base)" for b in present]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ours = row["ours"]
        cells = [shape_text(ours.shape), ours.dtype, ours.mode, ours.impl, fmt_time(ours.median_s)]
        for name in present:
            base = row["baselines"].get(name)
            paired = ours.paired_against(name)
            cells.append("n/a" if base is None else
                         f"{fmt_time(base.median_s)} (**{fmt_ratio(ratio(base.median_s, ours.median_s))}**"
                         + (f"; paired {paired_text(paired)}" if paired else "") + ")")
        cells += [rate_text(op, ours, row), fmt_bytes(ours.added_bytes)]
        for name in present:
            base = row["baselines"].get(name)
            cells.append("n/a" if base is None else
                         f"{fmt_bytes(base.added_bytes)} ({fmt_ratio(ratio(ours.added_bytes, base.added_bytes), 3)})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Speed-up in bold = baseline time / ours (median of the same run). Memory: peak added "
              "beyond inputs, parameters and the returned output or gradients.", ""]
    if any(row["ours"].paired for row in rows):
        lines += ["Paired: the median of baseline / ours over alternating calls of the two (interquartile range, "
                  "number of pairs). It cancels a machine that drifts during the measurement, but each call then "
                  "starts with the other path's data in the caches; the targets are judged on the medians.", ""]
    return lines


# ---------------------------------------------------------------- targets

def check_targets(runs: list[Run]) -> list[tuple[Target, str, Optional[bool], str]]:
    """(target, our implementation, met or None when not measured, measured text) per target and implementation."""
    checks = []
    for target in TARGETS:
        found = False
        for run in runs:
            if run.device != target.device:
                continue
            for row in op_rows(run, target.op):
                ours = row["ours"]
                if not ours.matches(target.where):
                    continue
                label = f"{ours.impl} {ours.dtype}"
                if target.kind == "copy_share":
                    value = row.get("copy_share")
                    met = None if value is None else value >= target.value
                    text = "n/a" if value is None else f"{value:.0%} of copy"
                else:
                    base = row["baselines"].get(target.baseline)
                    if base is None:
                        continue
                    if target.kind == "speedup":
                        # Judged on the medians of separate rounds (steps back to back, as training runs
                        # them); an alternating measurement is shown beside it, not used.
                        value = ratio(base.median_s, ours.median_s)
                        met = value >= target.value
                        text = f"{value:.2f}x ({fmt_time(ours.median_s)} vs {fmt_time(base.median_s)})"
                        paired = ours.paired_against(target.baseline)
                        if paired:
                            text += f"; alternating: {paired_text(paired)}"
                    else:
                        value = ratio(ours.added_bytes, base.added_bytes)
                        met = None if value is None else value <= target.value
                        text = "n/a" if value is None else (
                            f"{value:.3f} ({fmt_bytes(ours.added_bytes)} vs {fmt_bytes(base.added_bytes)})")
                checks.append((target, label, met, text))
                found = True
        if not found:
            checks.append((target, "", None, "not measured in these runs"))
    return checks


def targets_section(runs: list[Run]) -> list[str]:
    lines = ["## Targets", "", "| target | ours | measured | met |", "|---|---|---|---|"]
    for target, label, met, text in check_targets(runs):
        mark = {True: "yes", False: "**NO**", None: "-"}[met]
        lines.append(f"| {target.describe()} | {label} | {text} | {mark} |")
    return lines + [""]


def summary(runs: list[Run]) -> str:
    """Short plain-text table for a terminal: targets, then every speed-up."""
    out = ["TARGETS"]
    for target, label, met, text in check_targets(runs):
        if text == "not measured in these runs":
            continue
        mark = {True: "met   ", False: "MISSED", None: "n/a   "}[met]
        out.append(f"  {mark} {target.describe()} [{label}]: {text}")
    out.append("SPEED-UPS (baseline time / ours; memory ours/baseline)")
    for run in runs:
        for op in OPS:
            for row in op_rows(run, op):
                ours = row["ours"]
                parts = [f"{name} {fmt_ratio(ratio(b.median_s, ours.median_s))}"
                         f" mem {fmt_ratio(ratio(ours.added_bytes, b.added_bytes), 3)}"
                         for name, b in row["baselines"].items()]
                out.append(f"  {op[:22]:<22} {shape_text(ours.shape):<34} {ours.dtype:<8} {ours.mode:<10} "
                           f"{ours.impl:<13} {fmt_time(ours.median_s):>9}  " + "; ".join(parts))
    return "\n".join(out)


# ---------------------------------------------------------------- charts

def write_charts(runs: list[Run], folder: str) -> list[str]:
    """One PNG per op and device: speed-up over each baseline per shape group (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    written = []
    for run in runs:
        for op, (title, baseline_names) in OPS.items():
            rows = op_rows(run, op)
            if not rows:
                continue
            varying = [k for k in rows[0]["ours"].shape
                       if k == "B" or len({str(r["ours"].shape.get(k)) for r in rows}) > 1]
            labels = [f"{shape_text({k: r['ours'].shape[k] for k in varying})}\n"
                      f"{r['ours'].dtype} {r['ours'].mode}\n{r['ours'].impl}" for r in rows]
            present = [b for b in baseline_names if any(b in r["baselines"] for r in rows)]
            fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.5))
            width = 0.8 / max(1, len(present))
            highest = 1.0
            for i, name in enumerate(present):
                values = [ratio(r["baselines"][name].median_s, r["ours"].median_s) if name in r["baselines"] else 0
                          for r in rows]
                bars = ax.bar([x + i * width for x in range(len(rows))], values, width, label=f"vs {name}")
                ax.bar_label(bars, labels=[f"{v:.2f}x" if v else "" for v in values], fontsize=7)
                highest = max([highest, *values])
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_ylim(0.5, max(2.0, highest * 1.6))
            ax.set_ylabel("speed-up (baseline time / ours)")
            ax.set_xticks([x + width * (len(present) - 1) / 2 for x in range(len(rows))], labels, fontsize=7)
            device = run.machine.get("lafs", {}).get("device_name", run.device)
            ax.set_title(f"{title}\n{device}", fontsize=10)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = os.path.join(folder, f"{op}_{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-')}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


# ---------------------------------------------------------------- main

def render(runs: list[Run], charts: list[str], out_path: str) -> str:
    lines = ["# Benchmark results", "",
             "Generated by `python benchmarks/report.py` from the JSON of `pytest benchmarks --benchmark-only` "
             f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC). Times are medians.", ""]
    environments = defaultdict(list)
    for run in runs:
        environments[run.machine.get("lafs", {}).get("device_name", run.device)].append(run)
    for device, device_runs in environments.items():
        lines += [f"## {device}", ""]
        for run in device_runs:
            ops = ", ".join(op for op in OPS if any(r.op == op for r in run.results))
            lines += [f"Run of {ops}:", "", *env_header(run), ""]
            if run.copy_bytes_per_s:
                lines += [f"Copy bandwidth measured in the same run: {run.copy_bytes_per_s / 1e9:.1f} GB/s "
                          "(bytes read + written).", ""]
            for op in OPS:
                lines += op_table(run, op)
    lines += targets_section(runs)
    if charts:
        lines += ["## Charts", ""]
        lines += [f"![{os.path.basename(c)}]({os.path.relpath(c, os.path.dirname(os.path.abspath(out_path)))})"
                  for c in charts]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="*", help="result files (default: newest per environment in benchmarks/results)")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"), help="markdown file to write")
    parser.add_argument("--charts", default=os.path.join(HERE, "charts"),
                        help="folder for PNG charts, or 'none'")
    parser.add_argument("--preamble", default=None, help="markdown file whose text goes under the title")
    parser.add_argument("--summary", action="store_true", help="print the short table to stdout")
    args = parser.parse_args(argv)

    paths = args.json or glob.glob(os.path.join(HERE, "results", "*.json"))
    if not paths:
        parser.error("no result files: run `pytest benchmarks --benchmark-only` first")
    runs = select_runs(paths)
    charts = [] if args.charts == "none" else write_charts(runs, args.charts)
    text = render(runs, charts, args.out)
    if args.preamble:
        with open(args.preamble) as f:
            head, rest = text.split("\n", 1)
            text = f"{head}\n\n{f.read().strip()}\n{rest}"
    with open(args.out, "w") as f:
        f.write(text)
    if args.summary:
        print(summary(runs))


if __name__ == "__main__":
    main()
