"""Aligned face crops stored as ``root/<identity>/<image>``."""

from pathlib import Path

import numpy as np
import torch

from .image import apply_transform, read_image_bgr

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_identity_images(root) -> tuple[list[str], list[tuple[Path, int]]]:
    """(identity names, [(image path, class)]) of ``root/<identity>/<image>``.

    Identities are the sub-folders that hold at least one image, sorted by name
    (class = position in that order); images are sorted by file name.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} not found")
    identities, samples = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if images:
            samples.extend((path, len(identities)) for path in images)
            identities.append(folder.name)
    if not samples:
        raise FileNotFoundError(
            f"no images under {root}: expected {root}/<identity>/<image> with extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    return identities, samples


class ImageFolderFaces(torch.utils.data.Dataset):
    """Aligned 112x112 face crops in ``root/<identity>/<image>`` (one folder per identity).

    ``transform`` receives the uint8 ``[H,W,3]`` RGB array as read and must
    return a ``[112,112,3]`` uint8 array (images that are already 112x112 need
    none).  ``dataset[i] -> (image float32 [3,112,112] in [-1, 1], label int)``;
    ``.labels`` (int64), ``.num_classes``, ``.identities`` (folder name of each class),
    ``.paths`` (file of each item).
    """

    def __init__(self, root, transform=None):
        self.root = Path(root)
        self.identities, samples = list_identity_images(self.root)
        self.paths = [path for path, _ in samples]
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.num_classes = len(self.identities)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        image = read_image_bgr(path)[:, :, ::-1]
        return apply_transform(np.ascontiguousarray(image), self.transform, str(path)), int(self.labels[index])
