"""Images per second of one optimizer step: the original code path, the original path with our
non-kernel changes, and ours (fused kernels too), so the kernels' share of the speed-up is visible.

Each step is ``lafs.train``'s own ``Stage.train_step``, built from a recipe:
(a) supervised Part fViT (landmark CNN end to end, CosFace s=64 m=0.4 over
the head of WebFace4M, 205,990 classes, on GPU; of CASIA-WebFace, 10,575
classes, on CPU), and (b) a LAFS pretraining step
(2 global + 8 local views through the frozen landmark CNN, student and
teacher, DINO head and loss, EMA update). ``original`` sets
``train.original_path=true``: the per-landmark ``grid_sample`` loop and the
unfused margin loss of ``lafs_kernels.baselines``, and in pretraining the
frozen landmark CNN run as the released LAFS script runs it (batch norms
unfolded, NCHW, once per global view and once for the local views); model,
batch and dtype are the same. ``original+non-kernel`` is the original path with
the changes our path makes besides the kernels: the landmark CNN's weights and
inputs channels_last (supervised: what ``SupervisedStage`` does with
``train.channels_last``), the transformer's last block run for the cls row only
(``PartTransformer.last_block_cls_only``; the original runs every token through it), and in
pretraining the frozen landmark CNN with its batch norms folded into the convolutions, channels_last
(``lafs.ssl.frozen.frozen_copy(fast=True)``, as ``MultiViewBuilder`` does off
the original path); the per-landmark ``grid_sample`` loop and the unfused
margin loss stay, and so does the original's landmark-CNN call per global view.
``fused`` is our path: the step from the middle rung to it is the fused kernels, the attention kernels included
(both lower rungs compute attention as the released code does, ``PartTransformer.attention_form`` "explicit"; ours
"auto": on the CPU our C++ kernel for sequences longer than 32 keys, on a GPU torch's fused kernel), and, in
pretraining, one landmark-CNN call for both global views instead of one each. CPU: the
``part_fvit_tiny`` preset in float32 with the demo recipe's DINO head sizes and half its pretraining batch; GPU:
``part_fvit_b`` with the WebFace4M recipes' batch sizes (128 supervised, 64 pretraining) under bfloat16 autocast.

Inputs are random images in [-1, 1] already on the device, so the data
loader is not timed. The three steps are timed interleaved, round by round
(``_harness.compare``); report.py shows each rung's speed-up over the one before.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import pytest
import torch

from lafs.models.presets import PRESETS

import _harness
from _harness import DEVICE, pick

pytestmark = pytest.mark.benchmark(timer=_harness.synchronized_timer)

OP = "training_step"
WEBFACE4M_CLASSES, CASIA_WEBFACE_CLASSES = 205_990, 10_575

# (step, model preset, batch, dtype)
STEPS = pick(
    cpu=[("supervised", "part_fvit_tiny", 64, "float32"), ("pretrain", "part_fvit_tiny", 16, "float32")],
    gpu=[("supervised", "part_fvit_b", 128, "bfloat16"), ("pretrain", "part_fvit_b", 64, "bfloat16")],
    smoke=[("supervised", "part_fvit_nano", 2, "float32"), ("pretrain", "part_fvit_nano", 2, "float32")],
)
ORIGINAL, NON_KERNEL, OURS = "original", "original+non-kernel", "fused"
PATHS = [ORIGINAL, NON_KERNEL, OURS]  # the ladder: each rung adds one kind of change


def _overrides(step: str, model: str, batch: int, dtype: str, original: bool, landmark_file: str) -> list[str]:
    amp = "bf16" if dtype == "bfloat16" else "'off'"  # quoted: YAML reads a bare off as false
    classes = pick(cpu=CASIA_WEBFACE_CLASSES, gpu=WEBFACE4M_CLASSES, smoke=50)
    overrides = [
        f"model.name={model}",
        "model.overrides={}",
        f"optim.batch_size={batch}",
        "optim.accum_steps=1",
        f"train.amp={amp}",
        f"train.original_path={str(original).lower()}",
        "train.plots=false",
        "data.source=synthetic",
        "data.num_workers=0",
        # the synthetic set renders lazily: one image per class gives the head its full size for free
        f"data.synthetic.identities={classes if step == 'supervised' else 2 * batch}",
        "data.synthetic.images_per_identity=1",
        "val.synthetic_identities=2",
        "val.synthetic_images_per_identity=2",
        "val.pairs=20",
        "val.bins=[]",
    ]
    if step == "pretrain":
        overrides += [f"init.landmark={landmark_file}", "views.local_count=8", "views.local_tokens=36"]
    return overrides


def _recipe_tree(step: str):
    """The paper's recipe on GPU, the demo recipe's section of the stage on CPU."""
    from lafs.train import config as config_mod

    if DEVICE == "cuda" and not _harness.SMOKE:
        return config_mod.load_recipe(f"webface4m_{step}")
    return config_mod.demo_stage_tree(config_mod.load_recipe("demo"), step)


@functools.lru_cache(maxsize=None)
def _scratch_folder() -> str:
    folder = tempfile.mkdtemp(prefix="lafs_bench_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _landmark_checkpoint(model: str, folder: str) -> str:
    """A model file whose landmark CNN the pretraining stage loads (weights do not change the timing)."""
    from lafs.models import create_model
    from lafs.models.checkpoint import atomic_save, model_to_dict

    path = os.path.join(folder, f"{model}.pt")
    if not os.path.exists(path):
        atomic_save(model_to_dict(create_model(model)), path)
    return path


def build_case(impl: str, step: str, model: str, batch: int, dtype: str, device: str = DEVICE):
    """One ``train_step`` of a freshly built stage on a fixed random batch."""
    from lafs.train import config as config_mod
    from lafs.train.distributed import init_distributed
    from lafs.train.loop import RunFolder, seed_everything
    from lafs.train.runner import stage_class

    folder = tempfile.mkdtemp(dir=_scratch_folder())
    landmark_file = _landmark_checkpoint(model, _scratch_folder()) if step == "pretrain" else ""
    tree = config_mod.apply_overrides(
        _recipe_tree(step),
        config_mod.parse_overrides(_overrides(step, model, batch, dtype, impl != OURS, landmark_file)),
    )
    cfg = config_mod.resolve_stage(step, tree, source="benchmark")
    dist = init_distributed()
    if dist.device.type != device:
        raise RuntimeError(f"lafs.train picked {dist.device} but the benchmark runs on {device}")
    seed_everything(cfg.seed)
    stage = stage_class(step)(cfg, RunFolder(folder, dist), dist)
    stage.build()
    stage.steps_per_epoch, stage.total_steps, stage.warmup_steps = stage.schedule_lengths(micro_per_epoch=100)
    stage.setup_schedules()
    if impl == NON_KERNEL:
        _apply_non_kernel_changes(stage, step)
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, 3, 112, 112, generator=gen) * 2 - 1).to(device)
    labels = torch.randint(0, int(getattr(stage, "num_classes", 2)), (batch,), generator=gen).to(device)
    micro_batches = [(images, labels)]
    position = stage.warmup_steps + 1  # after warm-up, as most of a run

    def one_step():
        stage.train_step(micro_batches, position)

    return one_step


def _apply_non_kernel_changes(stage, step: str) -> None:
    """On a stage built with ``train.original_path``: what our path changes besides the kernels."""
    from lafs.ssl.frozen import frozen_copy

    transformers = (
        [stage.model.transformer]
        if step == "supervised"
        else [stage.trainer.student.backbone, stage.trainer.teacher.backbone]
    )
    for transformer in transformers:
        transformer.last_block_cls_only = True
    if step == "supervised":
        cnn = stage.model.landmark_cnn
        cnn.to(memory_format=torch.channels_last)  # parameters keep their identity: the optimizer still holds them
    else:
        views = stage.trainer.views
        views.landmark_cnn = frozen_copy(stage.landmark_cnn, fast=True)
        cnn = views.landmark_cnn
        if any(isinstance(m, torch.nn.BatchNorm2d) for m in cnn.modules()):
            raise RuntimeError("frozen_copy(fast=True) left batch norms in the landmark CNN: nothing was folded")
    if not cnn.features[0][0].weight.is_contiguous(memory_format=torch.channels_last):
        raise RuntimeError(f"the {step} landmark CNN is not channels_last: the non-kernel changes did not apply")


def count_grid_sample_calls(case) -> int:
    """How many times one call of ``case`` calls ``torch.nn.functional.grid_sample``."""
    functional = torch.nn.functional
    original, calls = functional.grid_sample, []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    functional.grid_sample = counting
    try:
        case()
    finally:
        functional.grid_sample = original
    return len(calls)


@pytest.mark.parametrize("step,model,batch,dtype", STEPS)
def test_training_step(benchmark, step, model, batch, dtype):
    landmarks = PRESETS[model]["num_landmarks"]
    cases, impls, calls = {}, [], {}
    for impl in PATHS:
        kwargs = dict(impl=impl, step=step, model=model, batch=batch, dtype=dtype)
        cases[impl] = build_case(**kwargs)
        calls[impl] = count_grid_sample_calls(cases[impl])  # also the warm-up call
        impls.append(
            _harness.Impl(
                impl,
                impl == OURS,
                functools.partial(cases.__getitem__, impl),
                {"module": os.path.abspath(__file__), "kwargs": kwargs},
            )
        )
    # The comparison is only honest if the original paths really run the per-landmark loop.
    for impl in (ORIGINAL, NON_KERNEL):
        assert calls[impl] >= landmarks, (
            f"the {impl} {step} path made {calls[impl]} grid_sample calls per step, fewer than the {landmarks} "
            f"landmarks: it does not run the per-landmark loop"
        )
    _harness.compare(
        benchmark,
        op=OP,
        title="Training step",
        mode=step,
        dtype=dtype,
        shape={"model": model, "B": batch},
        impls=impls,
        work={"images": batch},
        ladder=PATHS,
        warmed_up=PATHS,
    )
    benchmark.extra_info["grid_sample_calls_per_step"] = calls
