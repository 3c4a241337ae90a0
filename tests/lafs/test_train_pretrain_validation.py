"""Pretraining validation verifies the teacher and the student, matches the probe views, and leaves the student
training."""

import json

from lafs.train.pretrain import PretrainStage
from lafs.train.runner import run_command


def test_student_is_verified_and_keeps_training_mode(tmp_path, monkeypatch):
    supervised = tmp_path / "sup"
    run_command("supervised", recipe="tiny", overrides=["optim.epochs=1"], out=supervised)
    modes = []
    original = PretrainStage.train_step

    def recording(self, micro_batches, step):
        modes.append(self.trainer.student.backbone.training)
        return original(self, micro_batches, step)

    monkeypatch.setattr(PretrainStage, "train_step", recording)
    out = tmp_path / "pre"
    run_command("pretrain", recipe="tiny", overrides=[f"init.landmark={supervised}", "val.every_steps=1"], out=out)
    assert len(modes) == 4 and all(modes), f"student training mode before each step: {modes}"
    vals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "val_accuracy" in r]
    assert [r["step"] for r in vals] == [1, 2, 3, 4]
    for record in vals:
        assert 0.0 <= record["val_student_accuracy"] <= 1.0
        assert record["val_student_acc_synthetic_held_out"] == record["val_student_accuracy"]
        assert 0.0 <= record["val_view_retrieval"] <= 1.0 and 0.0 <= record["val_student_view_retrieval"] <= 1.0

    run_command(
        "pretrain",
        recipe="tiny",
        overrides=[f"init.landmark={supervised}", "val.student=false", "val.view_probe=0"],
        out=tmp_path / "teacher_only",
    )
    logged = (tmp_path / "teacher_only" / "log.jsonl").read_text()
    assert "val_accuracy" in logged and "val_student" not in logged and "view_retrieval" not in logged
