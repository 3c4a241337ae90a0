"""Face data: MXNet RecordIO, insightface ``.rec`` sets, image folders, few-shot subsets, synthetic faces.

Every data set returns ``(image float32 [3,112,112] in [-1, 1], label int)`` and
exposes ``.labels`` (int64, one per item) and ``.num_classes``; an optional
``transform`` maps a uint8 ``[112,112,3]`` RGB array to another.
"""

from . import recordio
from .few_shot import FewShotSubset, few_shot_subset
from .folder import ImageFolderFaces
from .pack import pack_folder
from .record_dataset import FaceRecordDataset
from .synthetic import SyntheticFaces, verification_pair_index, verification_pairs

__all__ = [
    "recordio",
    "FaceRecordDataset",
    "ImageFolderFaces",
    "FewShotSubset",
    "few_shot_subset",
    "pack_folder",
    "SyntheticFaces",
    "verification_pair_index",
    "verification_pairs",
]
