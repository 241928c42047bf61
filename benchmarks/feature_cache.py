"""The frozen-feature cache: the same class-IL run on a frozen pre-trained backbone through the backbone at every
step (``--feature-cache off``), with the cache built (cold) and with it read back (warm), in one process, one
after the other. Prints each row's wall time, train time, accuracy, and its speed-up over the first row.

    python benchmarks/feature_cache.py --weights weights/vit_fmnist.safetensors
    python benchmarks/feature_cache.py --weights weights/vit_fmnist.safetensors --method simplecil --epochs 1

The default run: Split-MNIST class-IL (5 tasks) from the Fashion-MNIST-pre-trained small ViT of
``benchmarks/pretrain_backbone.py``, ``finetune`` of the linear head only (``--freeze all``: a linear probe that
forgets), ``--epochs`` passes per task. The three rows must report the same accuracy matrix (the cache is exact).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import retain
from retain.data import cache_dir

VIT = "timm:vit_tiny_patch16_224,img_size=28,patch_size=7,in_chans=1,depth=4"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--model", default=VIT)
    ap.add_argument("--benchmark", default="split-mnist")
    ap.add_argument("--data-dir", default="../shared/data/mnist")
    ap.add_argument("--method", default="finetune")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-per-class", type=int, default=None, help="fewer training rows per class")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    common = dict(benchmark=a.benchmark, data_dir=a.data_dir, mode="class", arch=a.model, weights=a.weights,
                  method=a.method, epochs=a.epochs, threads=a.threads, train_per_class=a.train_per_class,
                  freeze="all")
    run = retain.resolve(**common)
    # a cold start: this run's cache file removed first (others are left alone); nothing is computed here
    from retain.backbones import feature_cache_path

    if run.method.reads_backbone:
        raise SystemExit(f"no feature cache for {a.method}: it runs the backbone itself")
    sc = run.build_scenario()
    model = run.build_model(sc)
    feature_cache_path(sc, model, model.pretrained["sha256"], run.config.arch)[0].unlink(missing_ok=True)
    rows = []
    for label, cache in (("through the backbone", "off"), ("feature cache, cold", "auto"),
                         ("feature cache, warm", "auto")):
        start = time.perf_counter()
        r = retain.run(**common, feature_cache=cache).to_dict()
        rows.append((label, time.perf_counter() - start, r["timings"]["train_s"], r["metrics"]["acc"],
                     np.array(r["accuracy_matrix"]), r["model"]["feature_cache"]))
    base = rows[0][1]
    print(f"{a.method} on {a.benchmark} class-IL, {a.model}, --freeze all, {a.epochs} epoch(s) per task, "
          f"{a.threads} threads; cache under {cache_dir() / 'features'}")
    print(f"{'row':<22} {'wall s':>8} {'train s':>8} {'ACC %':>7} {'speed-up':>9}  cache")
    for label, wall, train, acc, _, fc in rows:
        what = "off" if not fc["used"] else ("hit" if fc["hit"] else f"built in {fc['seconds']:.1f} s")
        print(f"{label:<22} {wall:8.1f} {train:8.1f} {100 * acc:7.2f} {base / wall:8.2f}x  {what}")
    same = all(np.allclose(rows[0][4], r[4], atol=1e-3) for r in rows[1:])
    print(f"same accuracy matrix in all three rows: {same}")


if __name__ == "__main__":
    main()
