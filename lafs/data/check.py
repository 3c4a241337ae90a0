"""Read every image of a RecordIO face set once, before a run of several days meets a bad record.

``FaceRecordDataset`` checks the index, the header records and the labels when it opens; a record whose
image does not decode, is not an aligned 112x112 colour crop, or carries another identity's label is only
found when training reads it, possibly hours in.  :func:`check_record_set` reads them all (in DataLoader
workers when asked) exactly as training does and lists every such record by key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .record_dataset import FaceRecordDataset


@dataclass
class CheckReport:
    """What :func:`check_record_set` found: ``problems`` holds (record key, message) pairs in key order."""

    root: str
    layout: str
    images: int
    num_classes: int
    problems: list[tuple[int, str]] = field(default_factory=list)


class _ReadEach(torch.utils.data.Dataset):
    """Item i of a FaceRecordDataset -> (its record key, the error it raises or "")."""

    def __init__(self, dataset: FaceRecordDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, str]:
        try:
            self.dataset[index]
        except Exception as error:  # every failure is a finding to report, not a reason to stop reading
            return int(self.dataset.keys[index]), str(error)  # names the file and the key
        return int(self.dataset.keys[index]), ""


def check_record_set(root, color: str = "rgb", workers: int = 0, progress: bool = True) -> CheckReport:
    """Open the set at ``root`` (raising on what opening checks) and read every image as training would.

    ``workers`` > 0 reads in that many DataLoader worker processes.  Returns a :class:`CheckReport`.
    """
    from tqdm import tqdm

    dataset = FaceRecordDataset(root, color=color)
    loader = torch.utils.data.DataLoader(
        _ReadEach(dataset), batch_size=256, num_workers=workers, collate_fn=list, shuffle=False
    )
    report = CheckReport(str(root), dataset.layout, len(dataset), dataset.num_classes)
    with tqdm(total=len(dataset), unit="img", desc="check", disable=not progress) as bar:
        for batch in loader:
            report.problems.extend((key, message) for key, message in batch if message)
            bar.update(len(batch))
            bar.set_postfix(problems=len(report.problems))
    return report
