"""``python -m lafs.train``: the three LAFS stages and the default three-stage demo.

* ``config``      recipes (YAML), dotted overrides, validation, ``--help`` text
* ``loop``        what every stage shares: data order, schedule position, logging, checkpoints, resume
* ``supervised``  stage 1: Part fViT + margin softmax (CosFace / ArcFace / Partial FC)
* ``pretrain``    stage 2: LAFS self-distillation through ``lafs.ssl``
* ``finetune``    stage 3: pretrained transformer + landmark CNN, layer decay, mixup, RandAugment
* ``demo``        the default run and its comparison table
* ``runner``      command + recipe + overrides -> run folder (``run_command``)
"""
from .config import ConfigError
from .loop import NonFiniteLossError, ResumeError
from .runner import run_command

__all__ = ["run_command", "ConfigError", "NonFiniteLossError", "ResumeError"]
