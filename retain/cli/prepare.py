"""``retain prepare PATH``: decode an image folder (or a tar of one) into the cache ahead of the first run.

A run on an image folder decodes it on first use anyway (:func:`retain.images.image_folder`); this step does it
up front and says where the array file is, its shape and its checksum. A second call with unchanged files finds
the cache and decodes nothing.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from retain.cli.options import add_common_options
from retain.errors import ConfigError


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"32,32"`` or ``"32x32"`` or ``"32"`` -> (H, W)."""
    if text is None:
        return None
    parts = text.replace("x", ",").split(",")
    try:
        hw = [int(p) for p in parts]
    except ValueError:
        hw = []
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or min(hw) < 1:
        raise ConfigError(f"--size expects H,W in pixels (e.g. --size 32,32), got {text!r}")
    return hw[0], hw[1]


def cmd_prepare(args: argparse.Namespace) -> int:
    from retain import images

    size = parse_size(args.size)
    chosen = args.split or images.splits(args.path)
    if not chosen:
        raise ConfigError(f"{args.path}: no split folders with class folders in it; expected "
                          f"{args.path}/<split>/<class>/*.jpg")
    for split in chosen:
        began = time.perf_counter()
        x, y, classes = images.image_folder(args.path, split, size=size, workers=args.workers)
        print(f"{split}: {x.path}  shape {list(x.shape)} uint8 ({x.nbytes / 2**20:.1f} MiB), {len(classes)} "
              f"classes, {x.checksum}  ({time.perf_counter() - began:.1f} s)")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("prepare", help="decode an image folder or a .tar/.tar.gz of one into the cache, ahead of "
                       "the first run")
    p.add_argument("path", metavar="PATH", help="root/<split>/<class>/*.{jpg,jpeg,png}, or a tar holding it")
    p.add_argument("--size", metavar="H,W", help="resize every image to H x W pixels (needed when sizes differ)")
    p.add_argument("--split", action="append", metavar="NAME",
                   help="the split folder to decode (repeat for several; default: every split in PATH)")
    p.add_argument("--workers", type=int, metavar="N", help="decoding processes (default: min(4, CPUs))")
    add_common_options(p)
    p.set_defaults(func=cmd_prepare, _parser=p)
