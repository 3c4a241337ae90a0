"""``runs/<name>/``: where a stage writes its configuration, log, checkpoints, summary and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .config import dump as dump_config
from .distributed import Distributed


def finished_summary(folder) -> Optional[dict]:
    """``folder/summary.json`` of a run that finished its schedule, else None."""
    path = Path(folder) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("finished") else None


class RunFolder:
    """``runs/<name>/``: config.yaml, log.jsonl, checkpoints/, summary.json, plots (written by the main process)."""

    def __init__(self, path, dist: Distributed):
        self.path = Path(path)
        self.dist = dist
        self.checkpoints = self.path / "checkpoints"
        if dist.is_main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    def log(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self.path / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def read_log(self) -> list[dict]:
        path = self.path / "log.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_log(self, step: int) -> None:
        """Drop log lines written after ``step`` (they belong to steps a resumed run will redo)."""
        if self.dist.is_main:
            kept = [r for r in self.read_log() if r.get("step", 0) <= step]
            (self.path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write_config(self, cfg) -> None:
        """config.yaml: the resolved configuration (a ``Config``) the run trains with."""
        if self.dist.is_main:
            dump_config(cfg.to_plain(), self.path / "config.yaml")

    def finished_summary(self) -> Optional[dict]:
        """summary.json of a run that finished its schedule, else None."""
        return finished_summary(self.path)

    def write_json(self, name: str, data: dict) -> None:
        if self.dist.is_main:
            (self.path / name).write_text(json.dumps(data, indent=2) + "\n")
