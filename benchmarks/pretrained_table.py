"""The small-backbone table of docs/pretrained.md: every pre-trained-model method against fine-tuning of the same
backbone, class-IL, from weights pre-trained here on data disjoint from the stream.

    python benchmarks/pretrain_backbone.py --backbone vit --epochs 3 --out weights/vit_fmnist.safetensors
    python benchmarks/pretrained_table.py --weights weights/vit_fmnist.safetensors --seeds 0,1,2

Split-MNIST class-IL (5 tasks of 2 digits) from the Fashion-MNIST-pre-trained small ViT (timm's vit_tiny shape, 4
blocks, 7-pixel patches; `--model`/`--weights` as a user's real weights), ``--train-per-class`` rows per class, one
epoch per task, batch 32, SGD (lr 0.01, momentum 0.9) for the methods that train the backbone or a head, Adam
(lr 0.001) for the prompt methods as their papers; the methods' own hyper-parameters otherwise (their defaults;
RanPAC's projection ``M`` and the prompt layers of the 4-block ViT given). Each row is one run through
``retain.run``; the table gives ACC and Ā (mean ± std over the seeds), the train time (steps only) and the feature
time (the frozen backbone's features, computed once: the cache), the most parameters an optimizer trained, and
the backbone parameters that were trainable. Prints the exact options of every row.
"""

from __future__ import annotations

import argparse
import statistics
import time

import retain

VIT = "timm:vit_tiny_patch16_224,img_size=28,patch_size=7,in_chans=1,depth=4"
ROWS = {  # label: (method, extra options)
    "finetune (whole backbone)": ("finetune", {}),
    "finetune (head only; frozen)": ("finetune", {"freeze": "all"}),
    "joint (head only; frozen)": ("joint", {"freeze": "all"}),  # the ceiling of a linear head on the frozen features
    "simplecil": ("simplecil", {}),
    "ranpac": ("ranpac", {"params": {"M": 2000}}),
    "aper (adapter)": ("aper", {}),
    # the prompt methods with their papers' Adam; the prefix layers of DualPrompt (2-4) and CODA-Prompt (0-4) cut
    # to the 4 blocks of the small ViT
    "l2p": ("l2p", {"optimizer": "adam", "lr": 1e-3, "momentum": 0.0}),
    "dualprompt": ("dualprompt", {"optimizer": "adam", "lr": 1e-3, "momentum": 0.0, "params": {"e_layers": "2,3"}}),
    "coda_prompt": ("coda_prompt", {"optimizer": "adam", "lr": 1e-3, "momentum": 0.0,
                                    "params": {"layers": "0,1,2,3"}}),
    "slca": ("slca", {"reset_optimizer": True}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--model", default=VIT)
    ap.add_argument("--data-dir", default="../shared/data/mnist")
    ap.add_argument("--benchmark", default="split-mnist")
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--test-per-class", type=int, default=500)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--n-tasks", type=int, default=None, help="tasks (default: the benchmark's, 5 of 2 classes)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row labels or method names")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1, help="passes over each task's data (PILOT's L2P: 5)")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    wanted = [r.strip() for r in a.rows.split(",")]
    rows = {k: v for k, v in ROWS.items() if k in wanted or v[0] in wanted}
    common = dict(benchmark=a.benchmark, data_dir=a.data_dir, mode="class", arch=a.model, weights=a.weights,
                  epochs=a.epochs, optimizer="sgd", lr=0.01, momentum=0.9, batch_size=32, threads=a.threads,
                  train_per_class=a.train_per_class, test_per_class=a.test_per_class, n_tasks=a.n_tasks)
    out = []
    for label, (method, extra) in rows.items():
        recs = []
        for seed in seeds:
            start = time.perf_counter()
            r = retain.run(**{**common, **extra}, method=method, seed=seed).to_dict()
            r["wall_s"] = time.perf_counter() - start
            recs.append(r)
            print(f"  {label} seed {seed}: ACC {100 * r['metrics']['acc']:.2f}, wall {r['wall_s']:.0f} s", flush=True)
        out.append((label, method, extra, recs))
    n_tasks = out[0][3][0]["config"]["n_tasks"]
    print(f"\n{a.benchmark} class-IL ({n_tasks} tasks) from {a.model} --weights {a.weights} (sha256 "
          f"{out[0][3][0]['model']['weights']['sha256'][:12]}), {a.train_per_class} training / {a.test_per_class} "
          f"test rows per class, 1 epoch, seeds {a.seeds}\n")
    print("| method | ACC % | Ā % | train s | features s | trainable params | backbone trained |")
    print("|---|---|---|---|---|---|---|")

    def ms(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"

    for label, _, _, recs in out:
        m = recs[0]["model"]
        acc = [100 * r["metrics"]["acc"] for r in recs]
        aia = [100 * r["metrics"]["avg_incremental_acc"] for r in recs]
        train = statistics.mean(r["timings"]["train_s"] for r in recs)
        feats = statistics.mean(r["timings"].get("features_s", 0.0) for r in recs)
        trained_backbone = m["backbone_parameters"] - m["frozen_parameters"]
        print(f"| {label} | {ms(acc)} | {ms(aia)} | {train:.1f} | {feats:.1f} | {m['trainable']:,} | "
              f"{trained_backbone:,} of {m['backbone_parameters']:,} |")
    print("\noptions of every row: " + ", ".join(f"{k}={v}" for k, v in common.items() if k != "threads"))
    for label, method, extra, _ in out:
        print(f"  {label}: --method {method} " + " ".join(f"{k}={v}" for k, v in extra.items()))


if __name__ == "__main__":
    main()
