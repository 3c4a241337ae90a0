"""Pack ``SRC/<identity>/<image>`` into an insightface RecordIO folder (``train.rec``, ``train.idx``, ``property``)."""

import numbers
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .folder import list_identity_images
from .image import IMAGE_SIZE, read_image_bgr
from .recordio import IRHeader, MXIndexedRecordIO, pack, pack_img

LAYOUTS = ("header", "flat")
OUTPUT_FILES = ("train.rec", "train.idx", "property")


def read_landmarks(path) -> dict:
    """Five-point landmarks per image: lines ``relative/path x1 y1 ... x5 y5`` (whitespace separated;
    paths relative to the source folder; ``#`` comments and blank lines skipped).
    Points: left eye, right eye, nose tip, left and right mouth corner, in pixels.
    Returns {relative path: float32 [5,2]}."""
    landmarks = {}
    with open(path) as lines:
        for number, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 11:
                raise ValueError(
                    f"{path} line {number}: expected an image path and 10 numbers (5 x,y points), "
                    f"got {len(fields) - 1} values"
                )
            try:
                points = np.array([float(v) for v in fields[1:]], dtype=np.float32).reshape(5, 2)
            except ValueError:
                raise ValueError(f"{path} line {number}: landmark values must be numbers: {line.strip()!r}") from None
            if not np.isfinite(points).all():
                raise ValueError(f"{path} line {number}: non-finite landmark value")
            landmarks[Path(fields[0]).as_posix()] = points
    return landmarks


def pack_folder(
    src, out, landmarks_file=None, layout: str = "header", quality=None, img_fmt: str = ".jpg", progress: bool = True
) -> dict:
    """Write ``out/train.rec``, ``train.idx`` and ``property`` from the face folder ``src``.

    Without ``landmarks_file`` every image must already be an aligned 112x112
    crop; with it, each face is aligned with insightface's ``norm_crop`` from
    its five points (see :func:`read_landmarks`).  ``layout="header"`` writes the
    insightface face2rec layout (record 0 ``[N+1, N+1+num_ids]``, images with
    ``[class, 1]`` labels at keys 1..N, identity ranges after them);
    ``"flat"`` writes scalar labels at keys 0..N-1.  Classes follow the sorted
    identity folder names.  Files appear only when everything was written.
    Every image is decoded and re-encoded as ``img_fmt``: ``".jpg"`` (the default, as insightface's
    face2rec writes) is lossy even for PNG sources; ``".png"`` keeps the pixels exactly.
    ``quality``: JPEG quality 0-100 (default 95) or PNG compression level 0-9 (default 3).
    Returns {"images": N, "identities": num_ids}.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    src, out = Path(src), Path(out)
    if quality is None:
        quality = 3 if img_fmt.lower() == ".png" else 95
    _check_quality(quality, img_fmt)
    identities, samples = list_identity_images(src)
    landmarks = read_landmarks(landmarks_file) if landmarks_file is not None else None
    if landmarks is not None:
        missing = [path for path, _ in samples if path.relative_to(src).as_posix() not in landmarks]
        if missing:
            raise ValueError(
                f"{landmarks_file} has no landmarks for {len(missing)} image(s), "
                f"e.g. {missing[0].relative_to(src).as_posix()}"
            )
        from insightface.utils.face_align import norm_crop

    out.mkdir(parents=True, exist_ok=True)
    temporary = {name: out / f".{name}.partial" for name in OUTPUT_FILES}
    try:
        record = MXIndexedRecordIO(temporary["train.idx"], temporary["train.rec"], "w")
        with record:
            num_images, num_ids = len(samples), len(identities)
            first_key = 1 if layout == "header" else 0
            if layout == "header":
                record.write_idx(0, pack(IRHeader(0, [num_images + 1, num_images + 1 + num_ids], 0, 0), b""))
            ranges = [[None, None] for _ in identities]
            for offset, (path, label) in enumerate(
                tqdm(samples, desc=f"packing {src}", unit="img", disable=not progress)
            ):
                key = first_key + offset
                image = read_image_bgr(path)
                if landmarks is not None:
                    image = norm_crop(image, landmarks[path.relative_to(src).as_posix()], image_size=IMAGE_SIZE)
                elif image.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
                    raise ValueError(
                        f"{path} is {image.shape[1]}x{image.shape[0]}, not an aligned "
                        f"{IMAGE_SIZE}x{IMAGE_SIZE} crop: pass --align LANDMARKS_FILE to align it"
                    )
                record_label = [float(label), 1.0] if layout == "header" else float(label)
                record.write_idx(key, pack_img(IRHeader(0, record_label, key, 0), image, quality, img_fmt))
                ranges[label][0] = key if ranges[label][0] is None else ranges[label][0]
                ranges[label][1] = key + 1
            if layout == "header":
                for label, (start, end) in enumerate(ranges):
                    key = num_images + 1 + label
                    record.write_idx(key, pack(IRHeader(0, [start, end], key, 0), b""))
        temporary["property"].write_text(f"{num_ids},{IMAGE_SIZE},{IMAGE_SIZE}\n")
        for name, path in temporary.items():
            os.replace(path, out / name)
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)
    return {"images": len(samples), "identities": len(identities)}


def _check_quality(quality, img_fmt: str):
    """Refuse a format other than .jpg/.png and a quality outside its range (JPEG quality 0-100, PNG
    compression level 0-9) before any image is read: cv2 would only warn and clamp it for every image."""
    fmt = img_fmt.lower()
    if fmt in (".jpg", ".jpeg"):
        name, top = "JPEG quality", 100
    elif fmt == ".png":
        name, top = "PNG compression level", 9
    else:
        raise ValueError(f"unsupported image format {img_fmt!r}: use '.jpg' or '.png'")
    if isinstance(quality, bool) or not isinstance(quality, numbers.Integral) or not 0 <= quality <= top:
        raise ValueError(f"quality {quality!r} is not a valid {name} for {fmt}: use a whole number from 0 to {top}")
