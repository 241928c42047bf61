"""Reproduce issue 7's methods beside their published numbers: DGR and DGR + distill (P1, three modes), PNN and
PackNet (task-IL Split-MNIST; Permuted-MNIST in the A-GEM style), MER and MAML + replay (Rotated-MNIST, MER's online
protocol), each with fine-tuning under the same settings, and the time and memory each method costs.

    python benchmarks/reproduce_generative_architecture.py --data-dir ../shared/data/mnist            # full
    python benchmarks/reproduce_generative_architecture.py --group dgr --iterations 500 --seeds 0,1   # reduced

Every run appends one JSON line to ``--out``; ``--summarise FILE`` prints the tables again from such a file.
Reported: mean ± std over seeds of the final average accuracy (ACC, %), BWT (points), train seconds, the
parameters the method trains or stores (classifier, PNN columns, VAE generator, PackNet owner tables in bytes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import retain
from retain.checkpoint import Checkpointer, CheckpointError, check_folder, run_path

# Published final average accuracy (%). P1: van de Ven et al., arXiv 1809.10635 Table 3 (mean ± SEM, 20 seeds).
PUBLISHED = {
    ("p1", "finetune", "task"): "85.15 ± 1.00", ("p1", "finetune", "domain"): "57.33 ± 1.66",
    ("p1", "finetune", "class"): "19.90 ± 0.02",
    ("p1", "dgr", "task"): "99.47 ± 0.03", ("p1", "dgr", "domain"): "95.74 ± 0.23",
    ("p1", "dgr", "class"): "91.24 ± 0.33",
    ("p1", "dgr+distill", "task"): "99.59 ± 0.03", ("p1", "dgr+distill", "domain"): "96.94 ± 0.14",
    ("p1", "dgr+distill", "class"): "91.84 ± 0.27",
    # A-GEM (Chaudhry et al. 2019) Permuted-MNIST, 17 evaluated tasks, MLP 256-256, one pass, batch 10
    ("permuted", "pnn", "task"): "93.5 (forgetting 0)", ("permuted", "pnn-agem-code", "task"): "93.5",
    ("permuted", "finetune", "task"): "47.9 (single head)",
    # Riemer et al. 2019, MNIST Rotations, 20 tasks x 1000 examples, 5120 memories (as recalled, not re-checked)
    ("rotated", "mer", "domain"): "89.56 ± 0.11 (5120 memories)",
}


def groups(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Run specifications per group: (label, benchmark, method, mode, params, run overrides)."""
    it = args.iterations
    p1 = {"benchmark": "split-mnist", "iterations": it}
    out: dict[str, list[dict]] = {"dgr": [], "arch": [], "permuted": [], "rotated": []}
    for mode in ("task", "domain", "class"):
        out["dgr"] += [
            {"protocol": "p1", "label": "finetune", "method": "finetune", "mode": mode, **p1},
            {"protocol": "p1", "label": "dgr", "method": "dgr", "mode": mode, "params": {"distill": False}, **p1},
            {"protocol": "p1", "label": "dgr+distill", "method": "dgr", "mode": mode,
             "params": {"distill": True}, **p1},
        ]
    for label in ("pnn", "packnet"):  # fine-tuning task-IL is in the dgr group
        out["arch"].append({"protocol": "p1", "label": label, "method": label, "mode": "task", **p1})
    # A-GEM-style Permuted-MNIST with task ids (PNN and PackNet need them): MLP 256-256, SGD 0.1, batch 10
    agem = {"benchmark": "permuted-mnist", "mode": "task", "n_tasks": args.permuted_tasks, "hidden": (256, 256),
            "optimizer": "sgd", "lr": 0.1, "batch_size": 10, "iterations": args.permuted_iterations, "pad": 0}
    for label in ("finetune", "pnn", "packnet"):
        extra = {"params": {"retrain_iterations": max(1, args.permuted_iterations // 5)}} if label == "packnet" else {}
        out["permuted"].append({"protocol": "permuted", "label": label, "method": label, **agem, **extra})
    # the PNN of the A-GEM authors' code: linear laterals into every layer (input included), their TF init
    out["permuted"].append({"protocol": "permuted", "label": "pnn-agem-code", "method": "pnn", **agem,
                            "params": {"lateral": "linear", "init": "agem"}})
    # MER's online protocol (Riemer et al. 2019, the authors' mer_examples.sh): MNIST Rotations, 20 tasks x 1000
    # examples seen once, MLP 100-100, plain SGD. MER (Algorithm 1) per incoming example: s batches of the example
    # and 10 memories (k = 11 here, where k counts the current example), one SGD step per example at lr α, β 0.01,
    # γ 1; memory 500: α 0.1, s 10; memory 200: α 0.1, s 5. MER handles a batch one example at a time, so the
    # trainer's batches of 10 change nothing but the loop overhead. Fine-tuning is the authors' "online" baseline
    # (batch 1, lr 0.0003).
    rot = {"benchmark": "rotated-mnist", "mode": "domain", "n_tasks": args.rotated_tasks, "hidden": (100, 100),
           "optimizer": "sgd", "lr": 0.1, "batch_size": 10, "iterations": 100}
    mer = {"beta": 0.01, "gamma": 1.0, "replay_batch": 11, "alpha": 0.1}
    out["rotated"] = [
        {"protocol": "rotated", "label": "finetune", "method": "finetune",
         **{**rot, "lr": 0.0003, "batch_size": 1, "iterations": 1000}},
        {"protocol": "rotated", "label": "mer-500", "method": "mer",
         "params": {**mer, "batches_per_example": 10, "buffer_size": 500}, **rot},
        {"protocol": "rotated", "label": "mer-200", "method": "mer",
         "params": {**mer, "batches_per_example": 5, "buffer_size": 200}, **rot},
        {"protocol": "rotated", "label": "maml_replay", "method": "maml_replay",
         "params": {"inner_steps": 1, "inner_lr": 0.1, "outer_lr": 0.1, "buffer_size": 500}, **rot},
    ]
    return out


def sizes(method: retain.method.Method, model_params: int) -> dict:
    """What the method trains or keeps beyond the data: parameter counts and mask / buffer bytes."""
    got: dict = {"model_params": model_params}
    if method.name == "pnn":  # the columns replace the model
        got["model_params"] = method.param_counts[-1]
        got["param_growth"] = method.param_counts
    if method.name == "dgr":
        got["generator_params"] = method.generator_parameters()
    if method.name == "packnet":
        got["mask_bytes"] = sum(method.mask_sizes().values())
        got["kept_per_task"] = [sum(k.values()) for k in method.kept]
    if method.name in ("mer", "maml_replay"):
        mem = method.buffer  # a retain.buffers.Buffer, or None without memory
        got["buffer_rows"] = 0 if mem is None else len(mem)
        got["buffer_bytes"] = 0 if mem is None or mem.x is None else mem.x.numel() * mem.x.element_size()
    return got


def run_one(spec: dict, seed: int, data_dir: str | None, checkpoint: Path | None = None) -> dict:
    """One run; with ``checkpoint`` it saves its state there every 500 steps and at task boundaries, and resumes
    from the file when it exists (a run stopped with the machine continues when the same command runs again)."""
    spec = dict(spec)
    protocol, label, params = spec.pop("protocol"), spec.pop("label"), spec.pop("params", {})
    name = spec.pop("method")
    method = retain.method.create(name, params, preset=f"{spec['benchmark']}/{spec['mode']}")
    t0 = time.perf_counter()
    ckpt = Checkpointer(checkpoint, every=500, resume=True, fingerprint=checkpoint.stem) if checkpoint else None
    result = retain.run(method=method, seed=seed, data_dir=data_dir, checkpointer=ckpt, **spec)
    wall = time.perf_counter() - t0
    c = result.config
    sc = retain.benchmarks.scenario(c["benchmark"], c["mode"], c["n_tasks"], seed, data_dir, pad=c["pad"])
    model = retain.models.build_model(c["arch"], sc.input_shape, sc.n_outputs, tuple(c["hidden"]))
    info = sizes(method, sum(p.numel() for p in model.parameters()))
    return {"protocol": protocol, "label": label, "mode": spec["mode"], "seed": seed, "params": method.params(),
            "config": {k: v for k, v in c.items() if k in (
                "benchmark", "n_tasks", "hidden", "epochs", "iterations", "batch_size", "optimizer", "lr")},
            "acc": result.metrics["acc"], "bwt": result.metrics["bwt"], "forgetting": result.metrics["forgetting"],
            "R": result.accuracy_matrix, "train_s": result.timings["train_s"], "eval_s": result.timings["eval_s"],
            "wall_s": wall, "peak_rss_mb": result.peak_memory_mb, "warnings": result.warnings, **info}


def summarise(rows: list[dict]) -> str:
    keys: dict[tuple, list[dict]] = {}
    done = set()
    for r in rows:  # the same run listed twice (fine-tuning in two groups) counts once
        key = (r["protocol"], r["label"], r["mode"], r["seed"], json.dumps(r["config"], sort_keys=True))
        if key not in done:
            done.add(key)
            keys.setdefault((r["protocol"], r["label"], r["mode"]), []).append(r)
    lines = ["| protocol | method | mode | seeds | ACC % (mean ± std) | published | BWT | train s | "
             "params / generator / masks |", "|---|---|---|---|---|---|---|---|---|"]
    for (protocol, label, mode), rs in keys.items():
        accs = [100 * r["acc"] for r in rs]
        bwts = [100 * r["bwt"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        mem = f"{rs[0]['model_params']:,}"
        if "generator_params" in rs[0]:
            mem += f" / VAE {rs[0]['generator_params']:,}"
        if "mask_bytes" in rs[0]:
            mem += f" / masks {rs[0]['mask_bytes']:,} B"
        if "param_growth" in rs[0]:
            mem += " (columns: " + ", ".join(f"{n:,}" for n in rs[0]["param_growth"]) + ")"
        if "buffer_rows" in rs[0]:
            mem += f" / buffer {rs[0]['buffer_rows']} rows"
        c = rs[0]["config"]
        what = f"{c['benchmark']} it={c['iterations']} bs={c['batch_size']}"
        lines.append(f"| {protocol} ({what}) | {label} | {mode} | {len(rs)} | {statistics.mean(accs):.2f} ± {sd:.2f} "
                     f"| {PUBLISHED.get((protocol, label, mode), '—')} | {statistics.mean(bwts):+.2f} "
                     f"| {statistics.mean(r['train_s'] for r in rs):.0f} | {mem} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", default="dgr,arch,permuted,rotated", help="comma-separated: dgr, arch, permuted, "
                    "rotated")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iterations", type=int, default=2000, help="P1 iterations per task (published: 2000)")
    ap.add_argument("--permuted-tasks", type=int, default=17, help="A-GEM protocol: 17 trained and evaluated tasks "
                    "(its 3 further tasks only tune hyper-parameters)")
    ap.add_argument("--permuted-iterations", type=int, default=6000, help="batches of 10 per task (6000 = 1 pass)")
    ap.add_argument("--rotated-tasks", type=int, default=20)
    ap.add_argument("--only", default="", help="comma-separated method labels to keep (e.g. dgr,finetune)")
    ap.add_argument("--modes", default="", help="comma-separated modes to keep, run in this order (e.g. class,task)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="reproduce_generative_architecture.jsonl",
                    help="JSON lines, appended; a rerun skips the runs already there (same protocol, method, mode, "
                    "seed, iterations and tasks)")
    ap.add_argument("--summarise", default=None, help="print the tables of an existing JSONL file and exit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoint-dir", default=None, help="checkpoint each run here (every 500 steps) and resume "
                    "it when the same command runs again, e.g. after the machine stopped")
    args = ap.parse_args(argv)
    if args.summarise:
        rows = [json.loads(line) for line in Path(args.summarise).read_text().splitlines() if line.strip()]
        print(summarise(rows))
        return
    if args.checkpoint_dir:
        try:
            check_folder(args.checkpoint_dir)
        except CheckpointError as e:
            ap.error(str(e))
    torch.set_num_threads(args.threads)
    specs = groups(args)
    only = set(filter(None, args.only.split(",")))
    modes = list(filter(None, args.modes.split(",")))
    rows = []
    out = Path(args.out)
    previous = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    for g in args.group.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            chosen = [s for s in specs[g] if not modes or s["mode"] in modes]
            chosen.sort(key=lambda s: modes.index(s["mode"]) if modes else 0)
            for spec in chosen:
                if only and spec["label"] not in only:
                    continue
                done = [r for r in previous if (r["protocol"], r["label"], r["mode"], r["seed"],
                                                r["config"].get("iterations"), r["config"].get("n_tasks")) ==
                        (spec["protocol"], spec["label"], spec["mode"], seed, spec.get("iterations"),
                         spec.get("n_tasks"))]
                if done:
                    rows.append(done[0])
                    continue
                ckpt = None
                if args.checkpoint_dir:
                    ckpt = run_path(args.checkpoint_dir, json.dumps([spec["protocol"], spec["label"], spec["mode"],
                                                                     seed, spec.get("iterations"),
                                                                     spec.get("n_tasks")]))
                row = run_one(spec, seed, args.data_dir, ckpt)
                rows.append(row)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if ckpt is not None:  # recorded: the checkpoint has served
                    ckpt.unlink(missing_ok=True)
                print(f"{row['protocol']:9s} {row['label']:12s} {row['mode']:6s} seed {seed}: ACC "
                      f"{100 * row['acc']:.2f}  BWT {100 * row['bwt']:+.2f}  train {row['train_s']:.0f} s",
                      flush=True)
    print(summarise(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
