"""Recipes, command-line overrides and validation of the training configuration.

A recipe is a YAML file (``lafs/recipes/<name>.yaml`` or any path). A stage's
configuration is a nested mapping whose every key is declared once, with its
default, its type and a help string (``python -m lafs.train --help`` prints them
all). The ``demo`` recipe holds shared sections (``seed``, ``data``, ``val``,
``model``) and one section per stage, merged as ``defaults <- shared <- stage``.

Overrides are ``dotted.key=value`` pairs applied to the recipe before it is
resolved; values are parsed as YAML (``optim.lr=1e-3``, ``val.bins=[a.bin]``,
``data.root=null``). Every value is checked before any training starts.

One job per module:

* ``schema``       every option of every stage (``SCHEMAS``) and the check of one value
* ``tree``         ``Config`` (attribute access) and dotted paths, flattening, merging of nested mappings
* ``recipes``      recipe files: by name or path, YAML in and out
* ``overrides``    ``dotted.key=value`` pairs
* ``resolve``      defaults <- recipe, every value and relation checked (``resolve_stage``)
* ``demo_layout``  the demo recipe's shared and per-stage sections (``resolve_demo``)
* ``help``         the ``--help`` text
"""

from .demo_layout import SHARED_SECTIONS, demo_stage_tree, is_demo_recipe, resolve_demo
from .errors import ConfigError
from .help import options_help
from .overrides import apply_overrides, parse_overrides
from .recipes import RECIPE_DIR, dump, load_recipe, recipe_path
from .resolve import resolve_stage
from .schema import (
    COMMON,
    FINETUNE,
    FLIP,
    LANDMARK_TRAINING,
    MARGIN,
    PRETRAIN,
    SCHEMAS,
    STAGES,
    SUPERVISED,
    Option,
    check_value,
)
from .tree import Config, flatten, merge, plain, set_path

__all__ = [
    "COMMON",
    "FINETUNE",
    "FLIP",
    "LANDMARK_TRAINING",
    "MARGIN",
    "PRETRAIN",
    "RECIPE_DIR",
    "SCHEMAS",
    "SHARED_SECTIONS",
    "STAGES",
    "SUPERVISED",
    "Config",
    "ConfigError",
    "Option",
    "apply_overrides",
    "check_value",
    "demo_stage_tree",
    "dump",
    "flatten",
    "is_demo_recipe",
    "load_recipe",
    "merge",
    "options_help",
    "parse_overrides",
    "plain",
    "recipe_path",
    "resolve_demo",
    "resolve_stage",
    "set_path",
]
