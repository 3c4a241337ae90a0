"""python -m lafs.eval verify|ijb end to end with a tiny Part fViT checkpoint."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from lafs.eval.__main__ import build_parser, main
from lafs.eval.verification import load_bin, verify_model
from lafs.models import atomic_save, create_model, load_model, model_to_dict

from helpers.eval_data import direct_tar_at_far, expected_pair_scores, synthetic_pairs, write_bin, write_ijb_folder
from tolerances import assert_close


@pytest.fixture
def checkpoint(tmp_path, rng):
    model = create_model("part_fvit_nano")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=rng))
    path = tmp_path / "nano.pt"
    atomic_save(model_to_dict(model), path)
    return str(path)


def test_verify_command(tmp_path, rng, checkpoint, capsys):
    data = tmp_path / "bins"
    data.mkdir()
    for name in ("lfw", "agedb_30"):
        write_bin(data / f"{name}.bin", *synthetic_pairs(rng, 10))
    out = tmp_path / "report" / "verification.json"
    assert (
        main(
            [
                "verify",
                "--model",
                checkpoint,
                "--data",
                str(data),
                "--targets",
                "lfw,agedb_30",
                "--batch-size",
                "20",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert list(report["sets"]) == ["lfw", "agedb_30"]
    model = load_model(checkpoint)
    for name, result in report["sets"].items():
        expected = verify_model(model, *load_bin(data / f"{name}.bin"), batch_size=20)
        assert result == pytest.approx(expected, rel=1e-5)
        assert f"[{name}] Accuracy-Flip: {result['accuracy'] * 100:.2f} ± {result['std'] * 100:.2f} %" in printed
        assert f"XNorm {result['xnorm']:.4f}" in printed


def test_verify_command_names_a_missing_set(tmp_path, checkpoint, capsys):
    assert (
        main(["verify", "--model", checkpoint, "--data", str(tmp_path), "--targets", "cplfw", "--device", "cpu"]) == 1
    )
    error = capsys.readouterr().err
    assert error.startswith("lafs.eval: verification set(s) not found:") and "cplfw.bin" in error
    assert error.count("\n") == 1


@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")  # inside insightface's norm_crop
def test_ijb_command(tmp_path, rng, checkpoint, capsys):
    folder = write_ijb_folder(
        tmp_path / "IJBB", rng, target="ijbb", num_identities=2, templates_per_identity=2, images_per_template=2
    )
    out = tmp_path / "ijb_out"
    assert (
        main(
            [
                "ijb",
                "--model",
                checkpoint,
                "--root",
                folder.root,
                "--target",
                "ijbb",
                "--out",
                str(out),
                "--batch-size",
                "4",
                "--device",
                "cpu",
                "--num-workers",
                "2",
                "--block-elements",
                "5",
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    scores = np.load(out / "ijbb_scores.npy")
    expected = expected_pair_scores(load_model(checkpoint), folder, dtype=torch.float32)  # float64 is slow on CPU
    assert_close(torch.from_numpy(scores), torch.from_numpy(expected).float(), scale=10)
    table = json.loads((out / "ijbb_tar_at_far.json").read_text())
    labels = [label for _, _, label in folder.pairs]
    expected_tar = direct_tar_at_far(labels, scores, (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1))
    assert table["target"] == "IJBB" and table["num_pairs"] == len(folder.pairs)
    assert table["tar_at_far_percent"] == pytest.approx(
        {f"{far:.0e}": tar * 100 for far, tar in expected_tar.items()}, abs=1e-4
    )
    assert "TAR (%) at FAR" in printed and "1e-04" in printed
    plot = cv2.imread(str(out / "ijbb_roc.png"))
    assert plot is not None and plot.shape == (540, 720, 3)


def test_help_documents_every_option(capsys):
    parser = build_parser()
    for command in ("verify", "ijb"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        subparser = parser._subparsers._group_actions[0].choices[command]
        for action in subparser._actions:
            assert action.help, f"{command} {action.option_strings} has no help"
            for option in action.option_strings:
                assert option in text


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "lafs.eval", "--help"],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "verify" in result.stdout and "ijb" in result.stdout
