"""``python -m lafs.data pack SRC OUT [--align LANDMARKS_FILE] [--layout header|flat]`` and
``python -m lafs.data check ROOT [--color rgb|bgr] [--workers N]``."""

import argparse
import sys

from .check import check_record_set
from .pack import LAYOUTS, pack_folder
from .record_dataset import COLORS
from .recordio import RecordIOError

# What `check` prints of a long list of bad records; the count is always whole.
SHOWN_PROBLEMS = 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lafs.data", description="Face data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    pack = commands.add_parser(
        "pack",
        help="pack SRC/<identity>/<image> into OUT/train.rec, train.idx, property",
        description="Pack a folder of face images (one sub-folder per identity) into an insightface "
        "RecordIO data set that FaceRecordDataset and insightface's trainer read.",
    )
    pack.add_argument("src", metavar="SRC", help="folder with one sub-folder of images per identity")
    pack.add_argument("out", metavar="OUT", help="output folder (created if missing)")
    pack.add_argument(
        "--align",
        metavar="LANDMARKS_FILE",
        help="align every face to 112x112 with insightface's norm_crop from five points; file lines: "
        "'relative/path x1 y1 ... x5 y5' (left eye, right eye, nose, left/right mouth corner). "
        "Without it every image must already be an aligned 112x112 crop",
    )
    pack.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="header",
        help="header: insightface face2rec layout with identity ranges (default); flat: scalar labels at keys 0..N-1",
    )
    pack.add_argument(
        "--quality", type=int, help="JPEG quality 0-100 (default 95), or PNG compression level 0-9 (default 3)"
    )
    pack.add_argument(
        "--format",
        dest="img_fmt",
        choices=(".jpg", ".png"),
        default=".jpg",
        help="image encoding inside the records: every image is decoded and re-encoded; .jpg "
        "(default, as insightface's face2rec) is lossy, .png keeps the pixels exactly",
    )
    pack.add_argument("--quiet", action="store_true", help="no progress bar")
    check = commands.add_parser(
        "check",
        help="read every image of a RecordIO set as training would and list the bad records",
        description="Open an insightface RecordIO set (train.rec, train.idx, optional property) and read every "
        "image as training does: the records that do not decode, are not aligned 112x112 colour crops, or "
        "carry another identity's label are listed by key. Exit status 0: no problem; 1: bad records; 2: the "
        "set does not open (its index, header records or labels).",
    )
    check.add_argument("root", metavar="ROOT", help="the data set folder")
    check.add_argument("--color", choices=COLORS, default="rgb", help="channel order it was packed in (default rgb)")
    check.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return _check(args)
    try:
        counts = pack_folder(
            args.src,
            args.out,
            landmarks_file=args.align,
            layout=args.layout,
            quality=args.quality,
            img_fmt=args.img_fmt,
            progress=not args.quiet,
        )
    except (OSError, ValueError, RecordIOError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"packed {counts['images']} images of {counts['identities']} identities into {args.out}")
    return 0


def _check(args) -> int:
    if args.workers < 0:
        print(f"error: --workers must be 0 or more, got {args.workers}", file=sys.stderr)
        return 2
    try:
        report = check_record_set(args.root, color=args.color, workers=args.workers, progress=not args.quiet)
    except (OSError, ValueError, RecordIOError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    what = f"{report.images} images of {report.num_classes} classes ({report.layout} layout) in {report.root}"
    if not report.problems:
        print(f"checked {what}: no problems")
        return 0
    print(f"checked {what}: {len(report.problems)} bad records")
    for _, message in report.problems[:SHOWN_PROBLEMS]:
        print(f"  {message}")
    if len(report.problems) > SHOWN_PROBLEMS:
        print(f"  ... and {len(report.problems) - SHOWN_PROBLEMS} more")
    return 1


if __name__ == "__main__":
    sys.exit(main())
