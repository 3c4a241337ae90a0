"""python -m lafs.eval reports a user's mistake in one line (no traceback), and verifies an exported ONNX model."""

import json
import os
import pickle
import subprocess
import sys

import pytest

from lafs.eval.__main__ import main
from lafs.export import export_onnx
from lafs.models import atomic_save, create_model, model_to_dict

from helpers.eval_data import synthetic_pairs, write_bin

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_cli")
    model = create_model("part_fvit_nano").eval()
    atomic_save(model_to_dict(model), folder / "nano.pt")
    export_onnx(model, folder / "nano.onnx")
    return folder


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("lafs.eval: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    return captured.err


def test_mistakes_are_reported_in_one_line(tmp_path, rng, model_files, capsys):
    data = tmp_path / "bins"
    data.mkdir()
    write_bin(data / "lfw.bin", *synthetic_pairs(rng, 10))
    (data / "garbage.bin").write_bytes(b"this is no pickle")
    with open(data / "evil.bin", "wb") as file:
        pickle.dump(os.system, file)  # a pickle naming a global: refused, never called
    (data / "folder.bin").mkdir()
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(b"\x08\x01garbage")
    checkpoint = str(model_files / "nano.pt")

    def verify(model, targets):
        return [
            "verify",
            "--model",
            model,
            "--data",
            str(data),
            "--targets",
            targets,
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "v.json"),
        ]

    cases = [
        (verify(checkpoint, "lfw,cplfw"), "verification set(s) not found"),
        (verify(checkpoint, "garbage"), "garbage.bin: not a readable verification .bin"),
        (verify(checkpoint, "evil"), "refusing to load"),
        (verify(checkpoint, "folder"), "folder.bin"),
        (verify(str(tmp_path / "missing.pt"), "lfw"), "no such checkpoint file or run folder"),
        (verify(str(not_a_model), "lfw"), "cannot read"),
        (verify(str(tmp_path), "lfw"), "has no checkpoints/best.pt"),
        (verify(str(bad_onnx), "lfw"), "not a readable ONNX model"),
        (verify(str(tmp_path / "missing.onnx"), "lfw"), "no such ONNX model file"),
        (
            ["ijb", "--model", checkpoint, "--root", str(tmp_path / "IJBC"), "--target", "IJBC", "--no-progress"],
            "no such folder",
        ),
        (
            [
                "ijb",
                "--model",
                checkpoint,
                "--root",
                str(tmp_path),
                "--target",
                "IJBC",
                "--no-progress",
                "--num-workers",
                "0",
            ],
            "IJB meta file missing",
        ),
    ]
    for argv, message in cases:
        error = _one_line_error(capsys, argv)
        assert message in error, (argv, error)
    assert not (tmp_path / "v.json").exists()


def test_command_line_process_prints_no_traceback(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lafs.eval",
            "verify",
            "--model",
            str(tmp_path / "none.pt"),
            "--data",
            str(tmp_path),
            "--targets",
            "lfw",
            "--device",
            "cpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"lafs.eval: verification set(s) not found: {tmp_path / 'lfw.bin'}"]


def test_verify_an_onnx_model_gives_the_pytorch_result(tmp_path, rng, model_files, capsys):
    data = tmp_path / "bins"
    data.mkdir()
    write_bin(data / "lfw.bin", *synthetic_pairs(rng, 10))
    reports = {}
    for name in ("nano.pt", "nano.onnx"):
        out = tmp_path / f"{name}.json"
        assert (
            main(
                [
                    "verify",
                    "--model",
                    str(model_files / name),
                    "--data",
                    str(data),
                    "--targets",
                    "lfw",
                    "--batch-size",
                    "8",
                    "--device",
                    "cpu",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        reports[name] = json.loads(out.read_text())["sets"]["lfw"]
    assert "[lfw] Accuracy-Flip" in capsys.readouterr().out
    torch_result, onnx_result = reports["nano.pt"], reports["nano.onnx"]
    assert onnx_result["accuracy"] == pytest.approx(torch_result["accuracy"])
    assert onnx_result["xnorm"] == pytest.approx(torch_result["xnorm"], rel=1e-5)
