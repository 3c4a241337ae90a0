"""README.md's examples, run: a README that drifts from the code fails here.

Python snippets.  Every ```python block in README.md carries a mark on the line just above its fence
(an HTML comment, invisible on GitHub):

* ``<!-- readme-test: NAME -->`` -- the block is run by ``test_python_snippet[NAME]``: first ``SETUPS[NAME]``
  (defines the placeholder names the snippet uses but does not make: ``tokens``, ``emb``, ``cfg``,
  a ``part_fvit.onnx`` file, ...), then the block exactly as the README prints it, in the same namespace and
  in a temporary working folder; then ``CHECKS[NAME]`` asserts what the snippet's comments say (shapes, unit
  length, ...).  NAME must have an entry in ``SETUPS``, and every entry in ``SETUPS`` must be used.
* ``<!-- readme-test: skip REASON -->`` -- not run (REASON says why: a GPU, a dataset, ...).

A ```python block without a mark fails ``test_every_python_snippet_is_marked``, so a new snippet needs a
decision.  Keep the runnable ones to what a 2-core CPU does in seconds.

Shell commands.  ``test_lafs_train_commands_parse`` takes every ``python -m lafs.train`` and ``torchrun ...
-m lafs.train`` line of the README's ```bash blocks, parses it with the real argument parser and resolves its
recipe and ``key=value`` overrides to the stage configuration, as the command would before training: an
option, recipe or command name that no longer exists fails here.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = re.compile(r"^<!--\s*readme-test:\s*(?P<body>.*?)\s*-->\s*$")


def readme_blocks(text: str, language: str) -> list[tuple[int, str | None, str]]:
    """(line number of the opening fence, the mark above it or None, the block's text) per ```language block."""
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if lines[index].strip() == f"```{language}":
            start = index
            end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "```")
            above = next((lines[i].strip() for i in range(start - 1, -1, -1) if lines[i].strip()), "")
            match = MARK.match(above)
            blocks.append((start + 1, match.group("body") if match else None, "\n".join(lines[start + 1 : end])))
            index = end
        index += 1
    return blocks


def runnable_snippets() -> dict[str, str]:
    snippets = {}
    for _, mark, code in readme_blocks(README.read_text(), "python"):
        if mark and not mark.startswith("skip"):
            assert mark not in snippets, f"two README snippets are marked readme-test: {mark}"
            snippets[mark] = code
    return snippets


# --- what each runnable snippet needs before it runs, and what its comments promise -------------------------

_COLOUR_SETUP = """
import torch
n = 6
generator = torch.Generator().manual_seed(0)
blur_p, solarize_p = torch.full((n,), 0.5), torch.full((n,), 0.2)
tokens = torch.rand(n, 24, 8 * 8 * 3, generator=generator) * 2 - 1   # [N, K, P*P*3] in [-1, 1], channel last
samples = torch.rand(n, 16, 3, generator=generator) * 2 - 1         # samples of each whole view
"""

_PARTIAL_FC_SETUP = """
import types
import torch

class CombinedMarginLoss:  # the constructor of arcface_torch's losses.CombinedMarginLoss (PartialFC reads s, m1..m3)
    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold

cfg = types.SimpleNamespace(
    margin_list=(1.0, 0.0, 0.4), interclass_filtering_threshold=0, embedding_size=64, num_classes=300, sample_rate=0.3
)
local_embeddings = torch.randn(8, cfg.embedding_size, requires_grad=True)
local_labels = torch.randint(0, cfg.num_classes, (8,))
"""

_COSFACE_SETUP = """
import torch
num_classes, B = 50, 8
emb = torch.randn(B, 512, requires_grad=True)
y = torch.randint(0, num_classes, (B,))
lam = torch.rand(B)
"""

_FACES = """
import numpy as np
from lafs.data.synthetic import SyntheticFaces

_faces = SyntheticFaces(2, 2, difficulty=0.2)
_renders = [_faces.render(i) for i in range(4)]
"""

_INSIGHTFACE_SETUP = (
    _FACES
    + """
faces_bgr = [np.ascontiguousarray(r[0][:, :, ::-1]) for r in _renders[:2]]
"""
)

_EMBEDDER_SETUP = (
    _FACES
    + """
aligned_rgb_faces = np.stack([r[0] for r in _renders])
aligned_bgr_faces = np.ascontiguousarray(aligned_rgb_faces[..., ::-1])
photos = [np.pad(r[0], ((10, 10), (20, 20), (0, 0))) for r in _renders]   # the faces inside larger photos
five_points = np.stack([r[2] + np.array([20.0, 10.0], np.float32) for r in _renders])
"""
)

SETUPS = {
    "dino-colour": _COLOUR_SETUP,
    "partial-fc": _PARTIAL_FC_SETUP,
    "cosface": _COSFACE_SETUP,
    "insightface": _INSIGHTFACE_SETUP,
    "face-embedder": _EMBEDDER_SETUP,
}

NEEDS_ONNX = {"insightface", "face-embedder"}  # part_fvit.onnx in the working folder
ONNX_DIM = 64  # the embedding size of that file's model (part_fvit_nano)


def _check_dino_colour(ns):
    pixels, tokens = ns["pixels"], ns["tokens"]
    assert pixels.shape == tokens.shape and pixels.dtype == tokens.dtype
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert ns["p"].factors.shape == (ns["n"], 4)


def _check_partial_fc(ns):
    import torch

    loss, module = ns["loss"], ns["module_partial_fc"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert module.weight.shape == (ns["cfg"].num_classes, ns["cfg"].embedding_size)  # one process: every class
    loss.backward()
    assert ns["local_embeddings"].grad is not None


def _check_cosface(ns):
    import torch

    head, loss, pred = ns["head"], ns["loss"], ns["pred"]
    assert head.weight.shape == (ns["num_classes"], 512)  # "weight [num_classes, 512]"
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert pred.shape == (ns["B"],) and pred.dtype == torch.int64


def _check_insightface(ns):
    features = ns["features"]
    assert type(ns["model"]).__name__ == "ArcFaceONNX"
    assert features.shape == (2, ONNX_DIM)  # [N, dim]
    assert (abs((features**2).sum(axis=1) - 1.0) > 1e-3).all()  # "raw": not normalised


def _check_face_embedder(ns):
    import numpy as np

    features = ns["features"]
    assert features.shape == (4, ONNX_DIM) and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)  # "unit length"
    assert -1.0 - 1e-5 <= float(ns["score"]) <= 1.0 + 1e-5


CHECKS = {
    "dino-colour": _check_dino_colour,
    "partial-fc": _check_partial_fc,
    "cosface": _check_cosface,
    "insightface": _check_insightface,
    "face-embedder": _check_face_embedder,
}


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    """part_fvit.onnx: a random-weight part_fvit_nano, exported without the onnxruntime check (seconds)."""
    pytest.importorskip("onnxruntime")
    import torch

    from lafs.export import export_onnx
    from lafs.models import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("readme_onnx") / "part_fvit.onnx"
    export_onnx(create_model("part_fvit_nano"), path, check=False)
    return path


def test_every_python_snippet_is_marked():
    blocks = readme_blocks(README.read_text(), "python")
    assert blocks, "README.md has no ```python blocks: has the file moved?"
    unmarked = [line for line, mark, _ in blocks if mark is None]
    assert not unmarked, f"README.md ```python blocks at lines {unmarked} have no <!-- readme-test: ... --> mark above"
    skipped_without_reason = [line for line, mark, _ in blocks if mark.strip() == "skip"]
    assert not skipped_without_reason, f"README.md lines {skipped_without_reason}: say why a snippet is skipped"
    names = set(runnable_snippets())
    assert names <= set(SETUPS), f"README snippets without a setup here: {sorted(names - set(SETUPS))}"
    assert set(SETUPS) <= names, f"setups whose README snippet is gone or unmarked: {sorted(set(SETUPS) - names)}"


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_python_snippet(name, tmp_path, monkeypatch, request):
    snippets = runnable_snippets()
    if name not in snippets:
        pytest.fail(f"README.md has no snippet marked <!-- readme-test: {name} -->")
    if name in NEEDS_ONNX:
        os.symlink(request.getfixturevalue("onnx_file"), tmp_path / "part_fvit.onnx")
    if name in ("insightface",):
        pytest.importorskip("insightface")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"readme_{name.replace('-', '_')}"}
    exec(compile(SETUPS[name], f"<setup of {name}>", "exec"), namespace)
    exec(compile(snippets[name], f"<README.md snippet {name}>", "exec"), namespace)
    CHECKS[name](namespace)


# --- the training commands -----------------------------------------------------------------------------------


def lafs_train_commands(text: str) -> list[list[str]]:
    """The argument lists (after ``-m lafs.train``) of every lafs.train command in the README's bash blocks."""
    commands = []
    for _, _, block in readme_blocks(text, "bash"):
        joined = re.sub(r"\\\n\s*", " ", block)  # continuation lines
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if "lafs.train" not in words or words[0] not in ("python", "torchrun"):
                continue
            commands.append(words[words.index("lafs.train") + 1 :])
    return commands


# Options whose README values are paths on the user's machine: a folder of this test stands in for them.
PATH_OPTIONS = ("data.root", "init.landmark", "init.pretrained")


def test_lafs_train_commands_parse(tmp_path):
    from lafs.train import config as config_mod
    from lafs.train.__main__ import parse_command_line
    from lafs.train.runner import stage_config

    for name in ("train.rec", "train.idx"):  # what data.root must hold; the data set is not read here
        (tmp_path / name).touch()
    commands = lafs_train_commands(README.read_text())
    assert len(commands) >= 8, f"found only {len(commands)} lafs.train commands in README.md"
    for argv in commands:
        if "--help" in argv:  # prints and exits; test_lafs_train_help covers it
            continue
        args, overrides = parse_command_line(argv)
        if args.command == "demo" or args.resume:  # the demo resolves per stage at run time; --resume reads a run
            continue
        overrides = [f"{o.split('=', 1)[0]}={tmp_path}" if o.split("=", 1)[0] in PATH_OPTIONS else o for o in overrides]
        tree = config_mod.load_recipe(args.config or "demo")
        stage_config(args.command, tree, config_mod.parse_overrides(overrides), source=f"README: {' '.join(argv)}")


def test_lafs_train_help(capsys):
    """``python -m lafs.train --help`` ("every option, with what it does") lists the options the README names."""
    from lafs.train.__main__ import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    named = set(re.findall(r"`((?:data|optim|train|val|model|loss|views|init)\.[a-z_.]+)=", README.read_text()))
    assert named, "README.md names no key=value options"
    named = {key for key in named if not key.startswith("model.overrides.")}  # preset fields, not options
    missing = sorted(key for key in named if f"  {key}=" not in text)
    assert not missing, f"options the README names that --help does not list: {missing}"
