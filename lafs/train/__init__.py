"""``python -m lafs.train``: the three LAFS stages and the default three-stage demo.

* ``config``      recipes (YAML), dotted overrides, validation, ``--help`` text (a package, one job per module)
* ``stage``       ``Stage``: what every stage provides to the loop (abstract interface)
* ``loop``        ``run_stage``: the shared loop in named phases (prepare, resume, step, log, validate, checkpoint)
* ``checkpoints`` last.pt / best.pt and ``--resume``; ``sampling``, ``run_folder``, ``randomness``, ``precision``
* ``supervised``  stage 1: Part fViT + margin softmax (CosFace / ArcFace / Partial FC)
* ``pretrain``    stage 2: LAFS self-distillation through ``lafs.ssl``
* ``finetune``    stage 3: pretrained transformer + landmark CNN, layer decay, mixup, RandAugment
* ``stage_run``   one stage into one run folder (``run_single_stage``)
* ``demo``        the default run and its comparison table
* ``runner``      command + recipe + overrides -> run folder (``run_command``)
"""

from .config import ConfigError
from .loop import NonFiniteLossError, ResumeError
from .runner import run_command

__all__ = ["run_command", "ConfigError", "NonFiniteLossError", "ResumeError"]
