"""Why does (or doesn't) the landmark CNN learn?  A supervised stage of the demo recipe, instrumented.

    python benchmarks/landmark_diagnostics.py [key=value ...] [--every 80] [--steps N] [--faces 200]

Trains the supervised stage of ``lafs/recipes/demo.yaml`` (with the overrides, as
``python -m lafs.train supervised`` would; no run folder, no checkpoints) and every
``--every`` steps prints one JSON line with

* gradient norms per parameter group, before clipping (landmark trunk, landmark head weight and bias,
  transformer, margin head), averaged over the window, and the global norm;
* ``dlandmarks``: RMS gradient of the loss with respect to the landmark coordinates (per coordinate,
  in pixels) and ``draw``, the same for the 2L raw head outputs before the min-max scaling;
* how far each group's weights moved in the window (relative to their norm);
* the landmark tracking score and spread at difficulty 1.0 (``--faces`` held-out faces) and the
  spread of the raw head outputs.

Gradients are recorded inside the real ``train_step`` (the optimizer's step is wrapped), so the
numbers are those of the training run itself.  One thread (``train.cpu_threads`` of the recipe).

    python benchmarks/landmark_diagnostics.py --probe [overrides] [--steps N]

asks what the landmark CNN's architecture can learn at all in the recipe's budget: its trunk and a
linear head on the pooled features (as the landmark head) trained directly on the true five points
(mean squared error, AdamW at the recipe's lr and schedule, the recipe's batch size, training images
at the recipe's difficulty and pose) and scored like the tracking score on the 400 held-out faces.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lafs.eval import landmark_tracking
from lafs.train import config as config_mod
from lafs.train.distributed import init_distributed
from lafs.train.randomness import seed_everything
from lafs.train.run_folder import RunFolder
from lafs.train.sampling import micro_batches
from lafs.train.supervised import SupervisedStage


def _groups(model, head) -> dict[str, list[torch.nn.Parameter]]:
    cnn = model.landmark_cnn
    linear = cnn.output_layer[1]
    return {
        "landmark_trunk": list(cnn.features.parameters()),
        "landmark_head_w": [linear.weight],
        "landmark_head_b": [linear.bias],
        "transformer": list(model.transformer.parameters()),
        "margin_head": list(head.parameters()),
    }


def _norm(tensors) -> float:
    return float(torch.sqrt(sum((t.detach().float() ** 2).sum() for t in tensors if t is not None)))


def _modify(stage, args) -> None:
    """Apply the experiment flags to a built stage."""
    cnn = stage.model.landmark_cnn
    linear = cnn.output_layer[1]
    if args.head_dropout is not None:
        cnn.output_layer[0].p = args.head_dropout
    if args.head_init == "random":
        linear.reset_parameters()
    elif args.head_init == "grid_random":
        torch.nn.init.normal_(linear.weight, std=args.head_init_std)


def probe(cfg, steps: int | None, every: int) -> None:
    """Train the landmark trunk + a linear head directly on the five points (see the module docstring)."""
    from lafs.data import SyntheticFaces
    from lafs.eval.embed import to_model_input
    from lafs.models import create_landmark_cnn
    from lafs.train.optim import warmup_cosine

    synthetic = cfg.data.synthetic
    cnn = create_landmark_cnn(cfg.model.name, **cfg.model.overrides)
    trunk = cnn.features
    head = torch.nn.Linear(cnn.output_layer[1].in_features, 10)
    faces = SyntheticFaces(
        synthetic.identities,
        synthetic.images_per_identity,
        seed=cfg.seed,
        difficulty=synthetic.difficulty,
        colours=synthetic.colours,
        pose_difficulty=synthetic.pose_difficulty,
        cache=True,
    )
    params = list(trunk.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.landmark_weight_decay)
    per_epoch = len(faces) // cfg.optim.batch_size
    total = int(round(cfg.optim.epochs * per_epoch))
    schedule = warmup_cosine(cfg.optim.lr, cfg.optim.min_lr, total, int(round(cfg.optim.warmup_epochs * per_epoch)))
    end = total if steps is None else min(steps, total)
    test_images, test_points = landmark_tracking.tracking_faces(1.0, synthetic.colours)
    generator = np.random.default_rng(cfg.seed)
    mean = torch.tensor([[56.0, 62.0]]).repeat(5, 1).reshape(-1)
    started = time.perf_counter()

    def score():
        trunk.eval()
        with torch.no_grad():
            feats = torch.cat(
                [
                    trunk(to_model_input(test_images[i : i + 100], torch.device("cpu"))).mean(dim=(2, 3))
                    for i in range(0, len(test_images), 100)
                ]
            )
            predicted = (head(feats) + mean).reshape(-1, 5, 2).numpy()
        trunk.train()
        from sklearn.metrics import r2_score

        direct = r2_score(
            test_points.reshape(len(test_points), -1),
            predicted.reshape(len(predicted), -1),
            multioutput="variance_weighted",
        )
        return {
            "direct_r2_d1": round(float(direct), 4),
            "tracking_score_d1": round(
                landmark_tracking.tracking_score(feats.numpy()[:, :, None].repeat(2, 2), test_points), 4
            ),
        }

    order = generator.permutation(len(faces))
    for step in range(end):
        for group in optimizer.param_groups:
            group["lr"] = float(schedule[step])
        batch = order[(step * cfg.optim.batch_size) % (per_epoch * cfg.optim.batch_size) :][: cfg.optim.batch_size]
        rendered = [faces.render(int(i)) for i in batch]
        images = to_model_input(np.stack([r[0] for r in rendered]), torch.device("cpu"))
        target = torch.from_numpy(np.stack([r[2] for r in rendered]).reshape(len(batch), -1)) - mean
        loss = torch.nn.functional.mse_loss(head(trunk(images).mean(dim=(2, 3))), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % per_epoch == 0:
            order = generator.permutation(len(faces))
        if (step + 1) % every == 0 or step + 1 == end:
            print(
                json.dumps(
                    {
                        "step": step + 1,
                        "loss": round(float(loss), 3),
                        **score(),
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                ),
                flush=True,
            )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--every", type=int, default=80)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (schedule unchanged)")
    parser.add_argument("--faces", type=int, default=200)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--probe", action="store_true", help="train the landmark CNN on the five points directly")
    parser.add_argument("--save", type=Path, default=None, help="write the trained model (lafs/v1 dict) here")
    # Experiments on the landmark CNN before they become recipe options:
    parser.add_argument("--head-dropout", type=float, default=None, help="p of the Dropout before the landmark head")
    parser.add_argument(
        "--head-init",
        choices=("grid", "random", "grid_random"),
        default="grid",
        help="grid: zero weight, bias = grid (ours); random: torch's default Linear init (the "
        "original's); grid_random: bias = grid, weight random with std --head-init-std",
    )
    parser.add_argument("--head-init-std", type=float, default=0.01)
    args = parser.parse_args(argv)
    tree = config_mod.load_recipe(args.config)
    if config_mod.is_demo_recipe(tree):
        tree = config_mod.demo_stage_tree(tree, "supervised")
    tree = config_mod.apply_overrides(tree, config_mod.parse_overrides(args.overrides))
    cfg = config_mod.resolve_stage("supervised", tree, source="diagnostics")
    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    if args.probe:
        torch.manual_seed(cfg.seed)
        probe(cfg, args.steps, args.every)
        return
    dist = init_distributed()
    seed_everything(cfg.seed, 0)
    run = RunFolder(Path(tempfile.mkdtemp(prefix="lafs_diag_")), dist)
    stage = SupervisedStage(cfg, run, dist)
    stage.build()
    loader, batch_sampler = stage.make_loader()
    micro_per_epoch = len(batch_sampler)
    stage.steps_per_epoch, stage.total_steps, stage.warmup_steps = stage.schedule_lengths(micro_per_epoch)
    stage.setup_schedules()
    model, head = stage.model, stage.head
    _modify(stage, args)
    groups = _groups(model, head)
    faces = landmark_tracking.tracking_faces(1.0, cfg.data.synthetic.colours, args.faces)

    window: dict[str, list[float]] = {}

    def keep_grad(name):
        def hook(grad):
            window.setdefault(name, []).append(float(grad.float().pow(2).mean().sqrt()))

        return hook

    def on_head(module, inputs, output):
        if output.requires_grad:
            output.register_hook(keep_grad("draw"))

    def on_cnn(module, inputs, output):
        if output.requires_grad:
            output.register_hook(keep_grad("dlandmarks"))

    model.landmark_cnn.output_layer.register_forward_hook(on_head)
    model.landmark_cnn.register_forward_hook(on_cnn)
    optimizer_step = stage.optimizer.step

    def step_with_record(*a, **k):
        for name, params in groups.items():
            window.setdefault(f"grad_{name}", []).append(_norm([p.grad for p in params]))
        return optimizer_step(*a, **k)

    stage.optimizer.step = step_with_record

    def snapshot():
        return {name: [p.detach().clone() for p in params] for name, params in groups.items()}

    def report(step, before, seconds, loss):
        record = {"step": step, "seconds": round(seconds, 1), "loss": round(loss, 3)}
        for key, values in window.items():
            record[key] = float(np.mean(values))
        for name, params in groups.items():
            moved = _norm([p - q for p, q in zip(params, before[name])])
            record[f"moved_{name}"] = moved / max(_norm(params), 1e-12)
        images, points = faces
        landmarks = landmark_tracking.predict_landmarks(model.landmark_cnn, images)
        record["score_d1"] = landmark_tracking.tracking_score(landmarks, points)
        record["spread_px"] = landmark_tracking.spread(landmarks)
        with torch.no_grad():
            model.landmark_cnn.eval()
            from lafs.eval.embed import to_model_input

            raw = model.landmark_cnn.raw_outputs(to_model_input(images[:100], stage.device))
            model.landmark_cnn.train()
        record["raw_spread"] = float(raw.std(dim=0).mean())
        record["raw_range"] = float((raw.amax(1) - raw.amin(1)).mean())
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in record.items()}), flush=True)
        window.clear()

    end = stage.total_steps if args.steps is None else min(args.steps, stage.total_steps)
    batches = micro_batches(loader, batch_sampler, micro_per_epoch, 0)
    before, started, losses = snapshot(), time.perf_counter(), []
    report(0, before, 0.0, math.nan)
    for step in range(end):
        metrics = stage.train_step([next(batches)], step)
        losses.append(metrics["loss"])
        if (step + 1) % args.every == 0 or step + 1 == end:
            report(step + 1, before, time.perf_counter() - started, float(np.mean(losses)))
            before, losses = snapshot(), []
    accuracy = stage.validate()
    if args.save is not None:
        from lafs.models.checkpoint import atomic_save, model_to_dict

        atomic_save({"model": model_to_dict(model), "head": head.state_dict()}, args.save)
    results = landmark_tracking.measure(
        model.landmark_cnn, [cfg.data.synthetic.difficulty, 1.0], cfg.data.synthetic.colours
    )
    print(
        json.dumps(
            {
                "final_step": end,
                "verification": accuracy.get("accuracy"),
                **{k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in results.items()},
                "seconds": round(time.perf_counter() - started, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
