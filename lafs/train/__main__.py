"""``python -m lafs.train [demo|supervised|pretrain|finetune] [--config RECIPE] [--out DIR] [--resume] [key=value]``.

``--unsafe-pickle`` loads checkpoints that name globals outside the allow-list (unsafe: see lafs.models.safe_load).

Several processes or machines: ``torchrun --nproc_per_node=N -m lafs.train supervised --config ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import config as config_mod

COMMANDS = ("demo", "supervised", "pretrain", "finetune")

DESCRIPTION = """\
Train Part fViT / LAFS face recognition.

commands:
  demo        (default) supervised -> LAFS pretraining on the same synthetic images without labels ->
              few-shot fine-tuning from the pretrained weights, and the same few-shot training from
              scratch, for fewshot.repeats seeds (3 in the demo recipe; finetune-seed1, scratch-seed1, ...);
              prints a table comparing them and writes runs/demo/summary.json.
  supervised  stage 1: Part fViT with a margin softmax (CosFace s=64 m=0.4) trained end to end.
  pretrain    stage 2: LAFS self-distillation (DINO) on landmark-centred patch views, frozen landmark CNN.
  finetune    stage 3: the pretrained transformer + the stage-1 landmark CNN, layer-wise lr decay, mixup.

Recipes (--config): built-in names ({recipes}) or a YAML file. Without --config a command runs its
stage of the demo recipe on the built-in synthetic faces (pretrain and finetune then need init.* paths).
The paper's settings: webface4m_supervised, webface4m_pretrain, webface4m_finetune, ms1mv3_supervised,
ms1mv3_pretrain, ms1mv3_finetune (set data.root to the insightface .rec folder).
"""

EPILOG = """\
examples:
  python -m lafs.train
  python -m lafs.train supervised optim.epochs=2 --out runs/quick
  python -m lafs.train supervised --config webface4m_supervised data.root=/data/webface4m
  torchrun --nproc_per_node=8 -m lafs.train supervised --config ms1mv3_supervised data.root=/data/ms1mv3
  python -m lafs.train finetune --config webface4m_finetune init.pretrained=runs/pre init.landmark=runs/sup
  python -m lafs.train supervised --out runs/quick --resume       # continue runs/quick from last.pt

In the demo recipe, options of one stage are prefixed with its name (supervised.optim.lr=2e-3,
fewshot.images_per_identity=3, fewshot.repeats=1); seed, data, val, model and train apply to every stage.

options (key=value; values are YAML; [stages] where an option exists only there):
{options}
"""


def build_parser() -> argparse.ArgumentParser:
    recipes = ", ".join(sorted(p.stem for p in config_mod.RECIPE_DIR.glob("*.yaml")))
    parser = argparse.ArgumentParser(
        prog="python -m lafs.train",
        description=DESCRIPTION.format(recipes=recipes),
        epilog=EPILOG.format(options=config_mod.options_help()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", default="demo", choices=COMMANDS, help="what to run (default: demo)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="change any recipe value, e.g. optim.lr=5e-4 data.root=/data/ms1mv3",
    )
    parser.add_argument("--config", metavar="RECIPE", help="recipe name or YAML file (default: demo)")
    parser.add_argument("--out", metavar="DIR", help="run folder (default: runs/<command>)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from checkpoints/last.pt, with the same result as an "
        "uninterrupted run; the recipe must be the one saved in its config.yaml",
    )
    parser.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="UNSAFE: load checkpoints (init.landmark, init.pretrained, --resume) with full pickle "
        "even when they name globals outside the allow-list (lafs.models.safe_load); such a "
        "file can run any code on this machine. Only for files you trust",
    )
    parser.add_argument(
        "--original-path",
        action="store_true",
        help="use the original code paths (per-landmark grid_sample loop, unfused margin loss "
        "from lafs_kernels.baselines, the pretraining landmark CNN as the released script "
        "runs it, the DINO loss's per-pair loop, every token through the transformer's last block) "
        "for comparisons, in every stage the command runs; "
        "same as train.original_path=true",
    )
    return parser


def parse_command_line(argv) -> tuple[argparse.Namespace, list[str]]:
    """(the parsed arguments, the key=value overrides) of a command line; overrides may come before or after
    the flags.  Exits as argparse does on ``--help`` or a bad argument."""
    parser = build_parser()
    argv = list(argv)
    positionals = [a for a in argv if not a.startswith("-")]
    if not ({"-h", "--help"} & set(argv)) and not set(positionals) & set(COMMANDS):
        argv.insert(0, "demo")
    args, extra = parser.parse_known_args(argv)
    overrides = list(args.overrides) + [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    if args.original_path:  # in the demo, the shared train section: every stage
        overrides.append("train.original_path=true")
    return args, overrides


def main(argv=None) -> int:
    args, overrides = parse_command_line(sys.argv[1:] if argv is None else argv)
    out = Path(args.out or f"runs/{args.command}")
    from lafs.models.safe_load import UnsafeCheckpointError, allow_unsafe_pickle

    from .distributed import shutdown
    from .loop import NonFiniteLossError, ResumeError
    from .runner import run_command

    finished = False
    try:
        with allow_unsafe_pickle(args.unsafe_pickle):
            run_command(args.command, recipe=args.config or "demo", overrides=overrides, out=out, resume=args.resume)
        finished = True
    except UnsafeCheckpointError as exc:
        print(f"lafs.train: {exc}", file=sys.stderr)
        return 1
    except config_mod.ConfigError as exc:
        print(f"lafs.train: configuration error: {exc}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, ResumeError) as exc:
        print(f"lafs.train: {exc}", file=sys.stderr)
        return 1
    finally:
        shutdown(finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
