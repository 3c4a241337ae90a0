"""python -m lafs.eval reports a user's mistake in one line (no traceback), and verifies an exported ONNX model."""

import json
import os
import pickle
import re
import subprocess
import sys

import pytest

from lafs.eval.__main__ import main
from lafs.export import export_onnx
from lafs.models import atomic_save, create_model, model_to_dict

from helpers.eval_data import encode_png, synthetic_pairs, write_bin, write_ijb_folder

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


def test_bad_bin_content_is_reported_in_one_line(tmp_path, rng, model_files, capsys):
    """Flags that are not booleans (once read as "all same": 100 %), an empty image, and content of the
    wrong type or size (once a TypeError, ZeroDivisionError or fold-count error with a traceback)."""
    images, issame = synthetic_pairs(rng, 10)
    bins = [encode_png(image) for image in images]
    data = tmp_path / "bins"
    data.mkdir()
    cases = {
        "strings": ((bins, [str(flag) for flag in issame]), r"strings\.bin: issame\[0\] is '(True|False)'"),
        "nones": ((bins, [None] * 10), r"nones\.bin: issame\[0\] is None"),
        "empty_image": (([b""] + bins[1:], issame), r"empty_image\.bin: image 0 is empty"),
        "issame_int": ((bins, 5), r"issame_int\.bin: the pair labels \(issame\) is a int"),
        "bins_none": ((None, issame), r"bins_none\.bin: the image list \(bins\) is a NoneType"),
        "zero_pairs": (([], []), r"zero_pairs\.bin: 0 pairs; the 10-fold protocol needs at least 10"),
        "few_pairs": ((bins[:8], issame[:4]), r"few_pairs\.bin: 4 pairs; the 10-fold protocol needs at least 10"),
    }
    for name, (content, message) in cases.items():
        (data / f"{name}.bin").write_bytes(pickle.dumps(content))
        argv = ["verify", "--model", str(model_files / "nano.pt"), "--data", str(data), "--targets", name]
        error = _one_line_error(capsys, [*argv, "--device", "cpu", "--out", str(tmp_path / "v.json")])
        assert re.search(message, error), (name, error)
    assert not (tmp_path / "v.json").exists()


@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")  # inside insightface's norm_crop
def test_bad_ijb_input_is_reported_in_one_line(tmp_path, rng, model_files, capsys):
    """NaN landmarks and scores name path:line; a pair list of one label, an empty image list, and an image
    error inside a DataLoader worker (the default --num-workers 4) give one line, not a traceback."""
    folder = write_ijb_folder(tmp_path / "IJBC", rng, num_identities=2, templates_per_identity=2, images_per_template=1)
    meta = os.path.join(folder.root, "meta")
    points_file = os.path.join(meta, "ijbc_name_5pts_score.txt")
    pair_file = os.path.join(meta, "ijbc_template_pair_label.txt")
    with open(points_file) as file:
        points = file.readlines()
    with open(pair_file) as file:
        pairs = file.readlines()

    def nan_at(column):
        fields = points[1].split()
        fields[column] = "nan"
        return points[:1] + [" ".join(fields) + "\n"] + points[2:]

    argv = ["ijb", "--model", str(model_files / "nano.pt"), "--root", folder.root, "--target", "IJBC"]
    argv += ["--device", "cpu", "--batch-size", "2", "--no-progress", "--out", str(tmp_path / "out")]
    cases = [
        (points_file, nan_at(1), r"ijbc_name_5pts_score\.txt:2: landmark x1 is nan"),
        (points_file, nan_at(11), r"ijbc_name_5pts_score\.txt:2: faceness score is nan"),
        (pair_file, [line.rsplit(" ", 1)[0] + " 1\n" for line in pairs], r"no pair has label 0"),
        (pair_file, [line.rsplit(" ", 1)[0] + " 0\n" for line in pairs], r"no pair has label 1"),
    ]
    for path, lines, message in cases:
        with open(path, "w") as file:
            file.writelines(lines)
        error = _one_line_error(capsys, argv)
        assert re.search(message, error), (message, error)
        with open(path, "w") as file:
            file.writelines(points if path == points_file else pairs)
    image = os.path.join(folder.root, "loose_crop", "2.jpg")
    os.replace(image, image + ".moved")
    error = _one_line_error(capsys, argv)  # the default --num-workers: the image is read in a worker
    message = r"lafs.eval: .*loose_crop/2\.jpg: no such image file \(image of .*5pts_score\.txt line 2\)\n"
    assert re.fullmatch(message, error), error
    for name in ("ijbc_face_tid_mid.txt", "ijbc_name_5pts_score.txt"):
        open(os.path.join(meta, name), "w").close()
    assert "list no images" in _one_line_error(capsys, argv)
    assert not (tmp_path / "out").exists()


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
