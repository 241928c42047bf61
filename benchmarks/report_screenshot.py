"""Look at the HTML report in a real browser: build it from a store, take headless-Chromium screenshots of the page
as it opens (heatmaps folded) and with every fold opened, cut them into tiles to read, and print each page's height.

    apt-get install -y chromium                       # Debian; once
    python benchmarks/report_screenshot.py --store r.db --out shots

A store to look at, with real runs (a few minutes on 2 cores):

    retain compare --seeds 2 --epochs 2 --store r.db --workers 2
    retain reproduce p1 --quick --store r.db --workers 2
    retain orders --random-orders 1 --epochs 2 --store r.db

Exit 1 when the page as it opens is longer than ``--max-height`` pixels (folds that do not fold, charts that grow
with the number of runs), 2 when Chromium or the store is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path


def shoot(browser: str, page: Path, png: Path, width: int, height: int) -> int:
    """Screenshot ``page`` in a ``width`` x ``height`` window; return the height its content fills."""
    import numpy as np
    from PIL import Image

    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={png}", f"--window-size={width},{height}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=300)
    grey = np.asarray(Image.open(png).convert("L"))
    used = np.where((grey < 250).any(axis=1))[0]
    return int(used.max()) + 1 if len(used) else 0


def tiles(png: Path, used: int, tile: int = 1500) -> list[Path]:
    from PIL import Image

    image = Image.open(png)
    out = []
    for i in range((used + tile - 1) // tile):
        path = png.with_name(f"{png.stem}-{i}.png")
        image.crop((0, i * tile, image.width, min(used, (i + 1) * tile))).save(path)
        out.append(path)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--out", default="report-shots")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--max-height", type=int, default=20000, help="longest acceptable page as it opens (px)")
    args = ap.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("no Chromium found: apt-get install -y chromium", file=sys.stderr)
        return 2
    if not Path(args.store).exists():
        print(f"no store at {args.store}: make one with the commands in this script's docstring", file=sys.stderr)
        return 2
    from retain import report
    from retain.store import Store

    out = Path(args.out)
    with Store(args.store, create=False) as store:
        _, page = report.write(store, out / "report")
    opened = page.with_name("opened.html")
    opened.write_text(page.read_text().replace("<details>", "<details open>"))
    heights = {}
    for name, html in (("folded", page), ("opened", opened)):
        # a window taller than the page, so one screenshot holds all of it
        heights[name] = shoot(browser, html, out / f"{name}.png", args.width, args.max_height + 40000
                              if name == "opened" else args.max_height + 1000)
        shown = tiles(out / f"{name}.png", heights[name])
        print(f"{name}: page {heights[name]} px high; {len(shown)} tile(s) in {out}/{name}-*.png")
    if heights["folded"] > args.max_height:
        print(f"the page as it opens is {heights['folded']} px high, over --max-height {args.max_height}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
