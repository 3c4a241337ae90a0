"""LAFS pretraining by part (issue 21): ``MultiViewBuilder`` and the whole DINO step, ours against the original path.

What it measures, each case built from ``lafs.ssl`` directly (random images in [-1, 1] already on the device):

- the builder (images -> the tokens of all views) by part, from ``torch.profiler`` ranges the builder
  opens (``views.crops``, ``views.landmark_cnn``, ``views.colour``, ``views.blur``, ``views.gather``; the
  rest, random draws and bookkeeping, is ``other``);
- the step by part, its phases run one after another as ``DINOTrainer.train_step`` runs them, each timed
  (views, teacher, student forward, head and loss forward, backward of head and loss, backward of the
  student, clipping and optimizer, EMA);
- the speed-ups, builder and step, ours and the original timed interleaved round by round (``_harness.compare``):
  ours with ``views.landmarks`` per_image and per_view, the original path as the released script runs it;
- on CUDA, per step and per builder call of each path (``torch.profiler``): kernels launched, copies to the
  device, the host's time in CUDA calls that wait for the GPU, and the share of the time the GPU was busy
  (``cuda_timeline``); everywhere, the top-level ATen ops one builder call and one step dispatch (the CPU's
  stand-in for launches).

Cases: "paper layout" (CPU: ``part_fvit_tiny``, 16 images, 2 + 8 views with 36 tokens per local view, the demo
recipe's DINO head (4096 outputs), float32; GPU: ``part_fvit_b``, 64 images, bfloat16 autocast, the WebFace4M
recipe's head (65,536 outputs), and the paper's largest, 100,000, for the head-and-loss share) and, on the CPU,
"default run" (the demo recipe's pretraining stage as it stands: model, batch, views and head).

``pytest benchmarks/bench_pretrain_views.py --benchmark-only`` records everything in ``extra_info``;
``python benchmarks/bench_pretrain_views.py`` prints the tables (``--json FILE`` saves them).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys

import pytest
import torch

import _harness
from _harness import DEVICE, pick

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.benchmark(timer=_harness.synchronized_timer)

# name -> (model preset, model overrides, batch, dtype, DINO out_dim, hidden, bottleneck, local views, local tokens)
CASES = pick(
    cpu={"paper layout": ("part_fvit_tiny", {}, 16, "float32", 4096, 512, 128, 8, 36), "default run": "demo"},
    gpu={"paper layout": ("part_fvit_b", {}, 64, "bfloat16", 65536, 2048, 256, 8, 36)},
    smoke={"paper layout": ("part_fvit_nano", {}, 2, "float32", 64, 32, 16, 8, 36)},
)


def default_run_case() -> tuple:
    """The default run's pretraining settings, read from the demo recipe (lafs/recipes/demo.yaml)."""
    from lafs.train import config as config_mod

    tree = config_mod.demo_stage_tree(config_mod.load_recipe("demo"), "pretrain")
    model, views, dino = tree["model"], tree.get("views", {}), tree["dino"]
    return (
        model["name"],
        model.get("overrides") or {},
        tree["optim"]["batch_size"],
        "float32",
        dino["out_dim"],
        dino["hidden_dim"],
        dino["bottleneck_dim"],
        views.get("local_count", 8),
        views.get("local_tokens", 36),
    )


CASES = {name: default_run_case() if spec == "demo" else spec for name, spec in CASES.items()}
CASE_NAMES = tuple(CASES)
PATHS = ("per_image", "per_view", "original")
VIEW_PARTS = ("crops", "landmark_cnn", "colour", "blur", "gather")
STEP_PARTS = (
    "views",
    "teacher",
    "student forward",
    "head+loss forward",
    "head+loss backward",
    "student backward",
    "clip+optimizer",
    "EMA",
)


def build_trainer(path: str, case: str = "paper layout", out_dim=None):
    """(DINOTrainer, images [B, 3, 112, 112]) of ``case`` (CASES) for ``path`` in PATHS, on DEVICE."""
    from lafs.models import create_model
    from lafs.ssl import DINOSettings, DINOTrainer, MultiViewBuilder

    model, overrides, batch, dtype, dim, hidden, bottleneck, local_views, local_tokens = CASES[case]
    torch.manual_seed(0)
    template = create_model(model, **overrides)
    original = path == "original"
    views = MultiViewBuilder(
        template.landmark_cnn,
        patch_size=template.transformer.patch_size,
        local_views=local_views,
        local_tokens=local_tokens,
        original_path=original,
        landmarks="per_view" if original else path,
    )
    settings = DINOSettings(
        epochs=2,
        iters_per_epoch=10,
        batch_size=batch,
        out_dim=out_dim or dim,
        hidden_dim=hidden,
        bottleneck_dim=bottleneck,
        warmup_epochs=0.5,
        amp_dtype=None if dtype == "float32" else dtype,
        fused_loss=not original,
        fused_optimizer=not original,
    )
    student, teacher = template.transformer, create_model(model, **overrides).transformer
    if original:
        student.compute_as_released()
        teacher.compute_as_released()
    trainer = DINOTrainer(
        student.to(DEVICE),
        teacher.to(DEVICE),
        views,
        settings,
        device=torch.device(DEVICE),
    )
    images = (torch.rand(batch, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(DEVICE)
    return trainer, images


def builder_case(trainer, images):
    views = trainer.views.train()
    return lambda: views(images)


def step_case(trainer, images):
    position = [trainer.total_steps // 2]
    return lambda: trainer.train_step(images, position[0], 1)


# --------------------------------------------------------------------------- profiles


PROFILE_ROUNDS = 1 if _harness.SMOKE else 3


def interleaved_profiles(profile, trainers: dict, rounds: int = PROFILE_ROUNDS) -> dict:
    """``profile`` (:func:`builder_profile` or :func:`step_profile`) of every path of ``trainers`` (path ->
    (trainer, images) of :func:`build_trainer`), one round at a time, the paths' order reversed each round, so
    that a drift of the machine falls on every path alike (measured one path after another, every phase of the
    last path measured looked 3-6% slower): mean per part."""
    for trainer_and_images in trainers.values():
        profile(*trainer_and_images, rounds=1, warmup=False)  # warm-up, discarded
    totals = {path: collections.defaultdict(float) for path in trainers}
    for round_ in range(rounds):
        order = list(trainers) if round_ % 2 == 0 else list(trainers)[::-1]
        for path in order:
            for part, seconds in profile(*trainers[path], rounds=1, warmup=False).items():
                totals[path][part] += seconds / rounds
    return {path: dict(parts) for path, parts in totals.items()}


def builder_profile(trainer, images, rounds: int = PROFILE_ROUNDS, warmup: bool = True) -> dict:
    """Seconds per call of each ``views.*`` range of the builder (``other``: the rest), and the total."""
    from torch.profiler import ProfilerActivity, profile

    case = builder_case(trainer, images)
    if warmup:
        case()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    start = _harness.synchronized_timer()
    with profile(activities=activities) as prof:
        for _ in range(rounds):
            case()
        _harness.synchronized_timer()
    total = (_harness.synchronized_timer() - start) / rounds
    parts = collections.defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("views."):
            name = event.key.split(".", 1)[1]
            cpu = event.cpu_time_total / 1e6 / rounds
            device = getattr(event, "device_time_total", 0.0) / 1e6 / rounds
            parts[name] += max(cpu, device) if DEVICE == "cuda" else cpu
    profiled_total = sum(parts.values())
    result = {name: parts.get(name, 0.0) for name in VIEW_PARTS}
    result["other"] = max(0.0, total - profiled_total)
    result["total"] = total
    return result


@contextlib.contextmanager
def _timed(times: dict, name: str):
    start = _harness.synchronized_timer()
    yield
    times[name] += _harness.synchronized_timer() - start


def step_profile(trainer, images, rounds: int = PROFILE_ROUNDS, warmup: bool = True) -> dict:
    """Seconds per step of each phase of ``DINOTrainer.train_step``, run one after another as it runs them."""
    from lafs.ssl.ema import ema_update
    from lafs.ssl.optim import cancel_last_layer_gradients, clip_gradients_per_parameter

    s = trainer.settings
    times = collections.defaultdict(float)
    autocast = dict(device_type=trainer.device.type, dtype=trainer.amp_dtype, enabled=trainer.amp_dtype is not None)
    step = trainer.total_steps // 2
    for round_ in range(rounds + int(warmup)):
        if warmup and round_ == 1:
            times.clear()  # the first round warms up
        trainer.student.train()
        with _timed(times, "views"):
            groups = trainer.views.train()(images)
        with torch.autocast(**autocast):
            with _timed(times, "teacher"), torch.no_grad():
                teacher_out = trainer.teacher(groups[:1])
            with _timed(times, "student forward"):
                features = torch.cat([trainer.student.backbone(t, i) for t, i in groups])
            with _timed(times, "head+loss forward"):
                detached = features.detach().requires_grad_(True)
                loss = trainer.loss(trainer.student.head(detached), teacher_out, 1)
        trainer.optimizer.zero_grad(set_to_none=True)
        with _timed(times, "head+loss backward"):
            loss.backward()
        with _timed(times, "student backward"):
            features.backward(detached.grad)
        with _timed(times, "clip+optimizer"):
            if s.clip_grad:
                clip_gradients_per_parameter(trainer.student, s.clip_grad)
            cancel_last_layer_gradients(trainer.student.head, 1, s.freeze_last_layer)
            trainer.optimizer.step()
        with _timed(times, "EMA"):
            ema_update(trainer.teacher, trainer.student, float(trainer.momentum_schedule[step]))
    result = {name: times[name] / rounds for name in STEP_PARTS}
    result["total"] = sum(result.values())
    return result


def _profile_second_call(case, activities):
    """torch.profiler events (of ``activities``) of the second call of ``case`` (the first warms up), synchronised
    on CUDA."""
    from torch.profiler import profile

    case()
    _harness.synchronized_timer()
    with profile(activities=activities) as prof:
        case()
        _harness.synchronized_timer()
    return prof.events()


# CUDA runtime calls in which the host can wait for the GPU: a copy from pageable host memory first waits for the
# stream to drain, a copy to the host and the synchronisations wait for it to finish.
HOST_WAITS = ("cudaMemcpy", "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def cuda_timeline(events) -> dict:
    """What one call's ``torch.profiler`` events (CPU and CUDA activities) say about launches and waiting:

    - ``kernels``: kernels run on the GPU (copies and memsets not counted);
    - ``copies_to_device``: host-to-device copies;
    - ``host_waits``: per runtime call of HOST_WAITS, ``[calls, milliseconds the host spent in them]``;
    - ``gpu_busy``: the share of the call's span (first to last event, host or GPU) in which the GPU ran a kernel
      or a copy; what is left is time the GPU waited for the host.
    """
    kernels = copies = 0
    waits: dict = {}
    busy = []
    first, last = float("inf"), float("-inf")
    for e in events:
        start, end = e.time_range.start, e.time_range.end
        first, last = min(first, start), max(last, end)
        if e.device_type == torch.autograd.DeviceType.CUDA:
            busy.append((start, end))
            if e.name.startswith("Memcpy"):
                copies += "HtoD" in e.name
            elif not e.name.startswith("Memset"):
                kernels += 1
        elif e.name in HOST_WAITS:
            calls, ms = waits.get(e.name, (0, 0.0))
            waits[e.name] = [calls + 1, ms + (end - start) / 1e3]
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(busy):  # the union of the GPU's intervals
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    span = last - first
    return {
        "kernels": kernels,
        "copies_to_device": copies,
        "host_waits": waits,
        "gpu_busy": covered / span if span > 0 else 0.0,
    }


def timeline(case) -> dict:
    """:func:`cuda_timeline` of the second call of ``case`` (the first warms up); {} off CUDA. It has not yet run on a
    GPU: a failure is returned as ``{"error": ...}`` and printed, so that it cannot cost a lent GPU's run the
    timings measured after it."""
    if DEVICE != "cuda":
        return {}
    from torch.profiler import ProfilerActivity

    try:
        return cuda_timeline(_profile_second_call(case, [ProfilerActivity.CPU, ProfilerActivity.CUDA]))
    except Exception as exc:  # reported in the output and the JSON, not swallowed
        return {"error": f"{type(exc).__name__}: {exc}"}


def aten_ops(case) -> int:
    """Top-level ATen ops one call of ``case`` dispatches (CPU events whose parent is no ATen op): the CPU's
    stand-in for kernel launches (on a GPU each op on a CUDA tensor launches at least one kernel; the random
    draws on the CPU generator launch none)."""
    from torch.profiler import ProfilerActivity

    events = _profile_second_call(case, [ProfilerActivity.CPU])
    return sum(
        1
        for e in events
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def head_and_loss_share(out_dim: int, case: str = "paper layout", rounds: int = 5) -> dict:
    """Seconds of the DINO head + loss, forward and backward, at ``out_dim`` (the fused-loss question), with
    the fused DINO loss and with the released script's per-pair loop, interleaved; medians of ``rounds``."""
    trainer, images = build_trainer("per_image", case, out_dim=out_dim)
    groups = trainer.views(images)
    with torch.no_grad():
        features = torch.cat([trainer.student.backbone(t, i) for t, i in groups])
        teacher_out = trainer.teacher(groups[:1])
    autocast = dict(device_type=trainer.device.type, dtype=trainer.amp_dtype, enabled=trainer.amp_dtype is not None)

    def case(fused: bool):
        trainer.loss.fused = fused
        detached = features.detach().requires_grad_(True)
        with torch.autocast(**autocast):
            loss = trainer.loss(trainer.student.head(detached), teacher_out, 1)
        loss.backward()

    cases = {"fused": lambda: case(True), "per_pair": lambda: case(False)}
    for warm_up in cases.values():
        warm_up()
    times = _harness.interleaved_rounds(cases, rounds, dict.fromkeys(cases, 1))
    median = {name: sorted(seconds)[len(seconds) // 2] for name, seconds in times.items()}
    return {"out_dim": out_dim, "seconds": median["fused"], "seconds_per_pair_loss": median["per_pair"]}


@torch.no_grad()
def landmark_mapping_distance(run: str, count: int = 64, seed: int = 0) -> dict:
    """Per-image landmarks mapped into views against the landmark CNN run on each view's crop (the two
    ``views.landmarks`` options), for the landmark CNN of ``run`` (a run folder or checkpoint) on ``count``
    images of the default run's synthetic training set, global-view crops (scale 0.4-1, flips): the distance
    in view pixels (mean, median, 90th percentile), beside how far the crop moves the landmarks (the
    distance between the CNN's landmarks on the crop and at the same positions of the uncropped image)."""
    from lafs.models import load_model
    from lafs.ssl.augment import random_crop_parameters, resized_crops
    from lafs.ssl.frozen import frozen_copy
    from lafs.ssl.geometry import landmarks_into_views
    from lafs.train import config as config_mod
    from lafs.train.data import build_train_set
    from lafs_kernels.ops.landmark_patch_gather import crop_affine

    cfg = config_mod.resolve_stage(
        "supervised", config_mod.demo_stage_tree(config_mod.load_recipe("demo"), "supervised"), source="demo"
    )
    train_set = build_train_set(cfg)
    picks = torch.linspace(0, len(train_set) - 1, count).round().long()
    images = torch.stack([train_set[int(i)][0] for i in picks])
    cnn = frozen_copy(load_model(run).landmark_cnn)
    size = cnn.image_size
    boxes, flips = random_crop_parameters(
        count, images.shape[2], images.shape[3], (0.4, 1.0), torch.Generator().manual_seed(seed)
    )
    on_crops = cnn(resized_crops(images, boxes, flips, size))
    source = cnn(images)
    mapped = landmarks_into_views(source, crop_affine(boxes, size, flips))
    distance = (on_crops - mapped).norm(dim=-1).flatten()
    moved = (on_crops - source).norm(dim=-1).flatten()
    q = torch.tensor([0.5, 0.9])
    return {
        "run": run,
        "images": count,
        "mean_px": distance.mean().item(),
        "median_px": distance.quantile(q)[0].item(),
        "p90_px": distance.quantile(q)[1].item(),
        "unmapped_mean_px": moved.mean().item(),
        "cnn_spread_px": source.std(dim=0).norm(dim=-1).mean().item(),
    }


# --------------------------------------------------------------------------- pytest


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("what", ["builder", "step"])
def test_pretrain_views(benchmark, what, case):
    model, _, batch, dtype, _, _, _, local_views, local_tokens = CASES[case]
    trainers = {path: build_trainer(path, case) for path in PATHS}
    make = builder_case if what == "builder" else step_case
    cases = {path: make(*trainers[path]) for path in PATHS}
    for run in cases.values():
        run()  # warm-up
    profile = builder_profile if what == "builder" else step_profile
    benchmark.extra_info["profile"] = interleaved_profiles(profile, trainers)
    benchmark.extra_info["timeline"] = {path: timeline(cases[path]) for path in PATHS}
    title = (
        "LAFS pretraining: view builder (images -> tokens of every view), ours vs the original path"
        if what == "builder"
        else "LAFS pretraining: whole DINO step, ours vs the original path"
    )
    _harness.compare(
        benchmark,
        op=f"pretrain_{what}",
        title=title,
        mode=what,
        dtype=dtype,
        shape={"case": case, "model": model, "B": batch, "views": f"2+{local_views}", "local_tokens": local_tokens},
        impls=[_harness.Impl(path, path != "original", (lambda p=path: cases[p])) for path in PATHS],
        work={"images": batch},
        warmed_up=PATHS,
    )


# --------------------------------------------------------------------------- command line


def _table(title: str, profiles: dict, parts: tuple) -> str:
    lines = [f"{title}", "| part | " + " | ".join(profiles) + " |", "|---|" + "---|" * len(profiles)]
    for part in (*parts, "total"):
        cells = []
        for p in profiles.values():
            share = p[part] / p["total"] if p["total"] else 0.0
            cells.append(f"{1e3 * p[part]:.1f} ms" + ("" if part == "total" else f" ({100 * share:.0f}%)"))
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio_summary(baseline: list, ours: list) -> dict:
    """Median and 10%-90% range of the per-round ratios baseline time / ours (the spread ``report.py`` prints)."""
    ratios = torch.tensor([b / o for b, o in zip(baseline, ours)], dtype=torch.float64)
    p10, median, p90 = ratios.quantile(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"ratio_median": median, "ratio_p10": p10, "ratio_p90": p90, "rounds": len(ratios)}


def measure_case(case: str, pairs: int, launches_only: bool = False) -> dict:
    """Everything for one case of CASES: launches, profiles, speed-ups, the head + loss at two out_dims."""
    report = {"case": case, "settings": CASES[case], "load_start": os.getloadavg()}
    trainers = {path: build_trainer(path, case) for path in PATHS}
    steps = {path: step_case(*trainers[path]) for path in PATHS}
    builders = {path: builder_case(*trainers[path]) for path in PATHS}
    report["timeline_per_step"] = {path: timeline(steps[path]) for path in PATHS}
    report["timeline_per_builder_call"] = {path: timeline(builders[path]) for path in PATHS}
    report["aten_ops_per_builder_call"] = {path: aten_ops(builders[path]) for path in PATHS}
    report["aten_ops_per_step"] = {path: aten_ops(steps[path]) for path in PATHS}
    if launches_only:
        return report
    report["builder_profile"] = interleaved_profiles(builder_profile, trainers)
    report["step_profile"] = interleaved_profiles(step_profile, trainers)
    for what, cases in (("builder", builders), ("step", steps)):
        times = _harness.interleaved_rounds(cases, pairs, dict.fromkeys(cases, 1))
        report[f"{what}_speedup"] = {
            path: _ratio_summary(times["original"], times[path]) for path in ("per_image", "per_view")
        }
    del trainers, steps, builders
    out_dims = pick(cpu=(CASES[case][4], 65536, 100000), gpu=(65536, 100000), smoke=(64,))
    report["head_and_loss"] = [head_and_loss_share(d, case) for d in out_dims]
    report["load_end"] = os.getloadavg()
    return report


def print_case(report: dict) -> None:
    model, _, batch, dtype, out_dim, _, _, local_views, local_tokens = report["settings"]
    print(
        f"\n## {report['case']}: {model}, batch {batch}, 2 + {local_views} views ({local_tokens} tokens per local "
        f"view), {dtype}, DINO out_dim {out_dim}; load {report['load_start'][0]:.1f} -> "
        f"{report.get('load_end', report['load_start'])[0]:.1f}"
    )
    if DEVICE == "cuda":
        launches = {
            unit: {path: t.get("kernels", -1) for path, t in report[f"timeline_per_{unit}"].items()}
            for unit in ("step", "builder_call")
        }
        print(f"kernel launches per step: {launches['step']}; per builder call: {launches['builder_call']}")
        for unit in ("step", "builder_call"):
            for path, t in report[f"timeline_per_{unit}"].items():
                if "error" in t:
                    print(f"{path} per {unit.replace('_', ' ')}: the timeline failed: {t['error']}")
                    continue
                waits = ", ".join(f"{name} {calls}x {ms:.1f} ms" for name, (calls, ms) in t["host_waits"].items())
                print(
                    f"{path} per {unit.replace('_', ' ')}: {t['copies_to_device']} copies to the device; host "
                    f"waits: {waits or 'none'}; GPU busy {100 * t['gpu_busy']:.0f}% of the span"
                )
    print(
        f"top-level ATen ops per builder call: {report['aten_ops_per_builder_call']}; per step: "
        f"{report['aten_ops_per_step']}"
    )
    if "builder_profile" not in report:
        return
    print(_table("MultiViewBuilder by part (ms per call, share)", report["builder_profile"], VIEW_PARTS + ("other",)))
    print(_table("Pretraining step by part (ms per step, share)", report["step_profile"], STEP_PARTS))
    for what in ("builder", "step"):
        for path, r in report[f"{what}_speedup"].items():
            print(
                f"{what} {path} vs original: {r['ratio_median']:.2f}x (10%-90% {r['ratio_p10']:.2f}-"
                f"{r['ratio_p90']:.2f}, {r['rounds']} interleaved rounds)"
            )
    for r in report["head_and_loss"]:
        print(
            f"DINO head + loss forward and backward at out_dim {r['out_dim']}: {1e3 * r['seconds']:.1f} ms with the "
            f"fused loss, {1e3 * r['seconds_per_pair_loss']:.1f} ms with the per-pair loop"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the numbers to this file")
    parser.add_argument("--pairs", type=int, default=12, help="interleaved rounds per speed-up")
    parser.add_argument("--case", choices=CASE_NAMES, action="append", help="only these cases (default: all)")
    parser.add_argument("--launches-only", action="store_true", help="CUDA: kernel launches per step only")
    parser.add_argument(
        "--landmarks-from",
        metavar="RUN",
        help="only measure per-image landmarks mapped into views "
        "against the CNN on crops, for the landmark CNN of this run folder or checkpoint",
    )
    args = parser.parse_args(argv)
    if args.landmarks_from:
        result = landmark_mapping_distance(args.landmarks_from)
        print(json.dumps(result, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    print(_harness.device_name())
    reports = []
    for case in args.case or CASE_NAMES:
        reports.append(measure_case(case, args.pairs, args.launches_only))
        print_case(reports[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": _harness.device_name(), "cases": reports}, f, indent=1)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("LAFS_BENCH_THREADS", torch.get_num_threads())))
    sys.exit(main())
