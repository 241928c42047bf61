"""OML's behaviour check (docs/online.md): meta-train on some MNIST digits, learn the others online one sample at a
time, against online fine-tuning of the same network, each at the best learning rate of a sweep (as the authors'
evaluation, which sweeps Adam's learning rate for every method).

    python benchmarks/oml_behaviour.py --data-dir ../shared/data/mnist
    python benchmarks/oml_behaviour.py --data-dir ../shared/data/mnist --arch mlp \
        --oml-lrs 0.03,0.01,0.003,0.001,0.0003 --finetune-lrs 0.001,0.0005,0.0003,0.0002,0.0001,0.00005,0.00003 \
        --seeds 0,1,2

Split-MNIST class-IL: digits 5-9 one class per task (``--class-order 5,6,7,8,9 --n-tasks 5``), the first
``--train-per-class`` training rows of each (15, the paper's Omniglot evaluation), one pass, all outputs in the
loss; retain's ``convnet`` (the authors' convolutional layout, cut to 28 x 28) or, with ``--arch mlp``, an MLP
256-256. OML meta-trains on digits 0-4 (each in four quarter-turns, ``rotations=4``), then learns the stream
(``--online``: one pass, batches of 10, boundaries hidden) one sample at a time with Adam; the baseline fine-tunes
the whole network with Adam at batch 1; the ablation row runs OML's online phase on the network's initial
representation (``meta_steps=0``: frozen, not meta-trained). Prints, per row and learning rate, the test accuracy
over the stream's classes (ACC, mean ± std over the seeds), and each row's best learning rate.

Meta-training depends only on the seed and OML's own parameters, not on the online phase's learning rate, so the
sweep meta-trains once per seed and starts each learning rate from that state, random-number generators included
(the same numbers as separate runs of ``retain run``, which redo it: seed 0, MLP, 15 rows per class, Adam 0.01 gives
56.66 both ways).
"""

from __future__ import annotations

import argparse
import statistics

import torch

import retain
from retain.methods.oml import OML, _parts
from retain.models import build_model


class Reused(OML):
    """OML whose meta-training is done once per parameters and reused across the sweep's runs of one seed (the
    sweep clears ``done`` before each seed). It keeps what the run is left with after meta-training: the model's
    weights (the output layer already re-drawn), the global and the method's random-number states, so a reused run
    goes on exactly as a fresh one."""

    done: dict = {}

    def meta_train(self, ctx):
        key = repr(self.params())
        if key in self.done:
            state, curve, global_rng, method_rng, classes = self.done[key]
            ctx.model.load_state_dict(state)
            for p in _parts(ctx.model, self.pln_layers)[0].parameters():
                p.requires_grad_(False)
            torch.set_rng_state(global_rng)
            ctx.rng.set_state(method_rng)
            self.meta_curve, self.meta_classes = list(curve), list(classes)
            return
        super().meta_train(ctx)
        self.done[key] = ({k: v.detach().clone() for k, v in ctx.model.state_dict().items()}, list(self.meta_curve),
                          torch.get_rng_state(), ctx.rng.get_state(), list(self.meta_classes))


class Kept(OML):
    """OML that keeps a handle on its representation after meta-training (for the probe)."""

    def meta_train(self, ctx):
        super().meta_train(ctx)
        self.body = _parts(ctx.model, self.pln_layers)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--arch", default="convnet", choices=("convnet", "mlp"),
                    help="the network of every row: retain's convnet (the authors' layout, cut to 28 x 28) or the "
                         "MLP 256-256")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--train-per-class", type=int, default=15)
    ap.add_argument("--oml-lrs", default="0.03,0.01,0.003,0.001")
    ap.add_argument("--finetune-lrs", default="0.0001,0.00005,0.00003,0.00002,0.00001")
    ap.add_argument("--meta-steps", type=int, default=10000)
    ap.add_argument("--meta-lr", type=float, default=1e-4)
    ap.add_argument("--rotations", type=int, default=4)
    ap.add_argument("--no-frozen-random", action="store_true",
                    help="leave out the ablation row: OML's online phase on the network's initial representation "
                         "(meta_steps=0), at OML's learning rates")
    ap.add_argument("--pretrained", action="store_true",
                    help="add the paper's pre-training baseline: the network trained by plain supervised learning "
                         "(Adam 1e-3, batch 32) on OML's meta-training data (digits 0-4, in --rotations "
                         "quarter-turns), then OML's online phase on its frozen representation")
    ap.add_argument("--pretrain-epochs", type=int, default=2)
    ap.add_argument("--probe", action="store_true",
                    help="instead of the sweep: the representation's quality, a linear head fitted offline (full "
                         "batch, Adam, 500 steps) on the stream's rows over the frozen features, for OML's "
                         "representation without and with rotations and for the same network at random")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    common = dict(benchmark="split-mnist", data_dir=args.data_dir, mode="class", class_order=[5, 6, 7, 8, 9],
                  n_tasks=5, train_per_class=args.train_per_class, all_outputs=True, arch=args.arch,
                  optimizer="adam", epochs=1, threads=1)
    if args.arch == "mlp":
        common["hidden"] = (256, 256)
    oml = dict(meta_steps=args.meta_steps, meta_lr=args.meta_lr, rotations=args.rotations)
    if args.probe:
        return probe(args, seeds, common, oml)
    print(f"# Split-MNIST 5-9 online, {args.train_per_class}/class, {args.arch}, Adam; OML {oml}; seeds {seeds}")
    table: dict[tuple[str, float], list[float]] = {}
    oml_lrs = [float(v) for v in args.oml_lrs.split(",")]
    for seed in seeds:
        Reused.done.clear()
        for lr in oml_lrs:
            r = retain.run(method=Reused(**oml), online=True, seed=seed, lr=lr, **common)
            table.setdefault(("oml", lr), []).append(100 * r.metrics["acc"])
        for lr in [] if args.no_frozen_random else oml_lrs:
            r = retain.run(method=OML(meta_steps=0), online=True, seed=seed, lr=lr, **common)
            table.setdefault(("frozen random (meta_steps=0)", lr), []).append(100 * r.metrics["acc"])
        if args.pretrained:
            body = pretrain(args, seed)
            own = {k: v for k, v in common.items() if k not in ("arch", "hidden")}  # the model is given
            for lr in oml_lrs:
                model = build_model(args.arch, (1, 28, 28), 5, (256, 256))
                model.features.load_state_dict(body.state_dict())
                r = retain.run(model=model, method=OML(meta_steps=0), online=True, seed=seed, lr=lr, **own)
                table.setdefault((f"pretrained ({args.pretrain_epochs} epochs), frozen", lr), []).append(
                    100 * r.metrics["acc"])
        for lr in [float(v) for v in args.finetune_lrs.split(",")]:
            r = retain.run(method="finetune", batch_size=1, seed=seed, lr=lr, **common)
            table.setdefault(("finetune", lr), []).append(100 * r.metrics["acc"])
        print(f"# seed {seed} done", flush=True)

    def fmt(v: list[float]) -> str:
        return f"{statistics.mean(v):6.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:5.2f}"

    print("\n| method | Adam lr | ACC % (mean ± std) | per seed |\n|---|---:|---:|---|")
    for (name, lr), v in table.items():
        print(f"| {name} | {lr:g} | {fmt(v)} | {', '.join(f'{x:.2f}' for x in v)} |")
    best = {}
    for (name, lr), v in table.items():
        if name not in best or statistics.mean(v) > statistics.mean(table[(name, best[name])]):
            best[name] = lr
    print("\n| method | best lr | ACC % |\n|---|---:|---:|")
    for name, lr in best.items():
        print(f"| {name} | {lr:g} | {fmt(table[(name, lr)])} |")
    gap = statistics.mean(table[("oml", best["oml"])]) - statistics.mean(table[("finetune", best["finetune"])])
    print(f"\nOML - fine-tuning at each one's best lr: {gap:+.2f} points")


def pretrain(args, seed: int) -> torch.nn.Module:
    """The representation of the pre-training baseline: the network trained with cross-entropy on every training row
    of digits 0-4, each in ``--rotations`` quarter-turns as its own class (OML's meta-training data), one task."""
    from retain import scenarios
    from retain.data import Arrays, load

    data = load("mnist", args.data_dir)

    def turned(x, y):
        keep = y < 5
        x, y = x[keep], y[keep]
        return (torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(args.rotations)]),
                torch.cat([y * args.rotations + k for k in range(args.rotations)]))

    n = 5 * args.rotations
    arrays = Arrays("mnist-0-4-turned", *turned(data.x_train, data.y_train), *turned(data.x_test, data.y_test), n,
                    data.mean, data.std)
    torch.manual_seed(seed)
    model = build_model(args.arch, (1, 28, 28), n, (256, 256))
    retain.run(scenario=scenarios.split(arrays, "class", n_tasks=1, seed=seed), model=model, method="finetune",
               epochs=args.pretrain_epochs, batch_size=32, optimizer="adam", lr=1e-3, seed=seed, threads=1)
    return model.features


def probe(args, seeds, common, oml) -> None:
    """The test accuracy on digits 5-9 of a linear head fitted offline on the stream's training rows, over the
    representation: a ceiling for the online phase that shows what meta-training did to the features."""
    import torch.nn.functional as F

    from retain.data import load

    data = load("mnist", args.data_dir)
    rows = torch.cat([(data.y_train == c).nonzero().flatten()[:args.train_per_class] for c in range(5, 10)])
    test = data.y_test >= 5
    x_tr, y_tr = data.x_train[rows].float() / 255, data.y_train[rows]
    x_te, y_te = data.x_test[test].float() / 255, data.y_test[test]

    def fit(body) -> float:
        with torch.no_grad():
            f_tr, f_te = body(x_tr).flatten(1), body(x_te).flatten(1)
        g = torch.Generator().manual_seed(0)
        w = torch.nn.Linear(f_tr.shape[1], 10)
        with torch.no_grad():
            w.weight.normal_(0, 0.01, generator=g)
            w.bias.zero_()
        opt = torch.optim.Adam(w.parameters(), 1e-2)
        for _ in range(500):
            opt.zero_grad()
            F.cross_entropy(w(f_tr), y_tr).backward()
            opt.step()
        return 100 * (w(f_te).argmax(1) == y_te).float().mean().item()

    table: dict[str, list[float]] = {}
    for seed in seeds:
        for label, rot in (("OML, no rotations", 1), (f"OML, rotations={args.rotations}", args.rotations)):
            keep = Kept(**{**oml, "rotations": rot})
            retain.run(method=keep, online=True, seed=seed, lr=1e-4, **{**common, "train_per_class": 1})
            table.setdefault(label, []).append(fit(keep.body.eval()))
        torch.manual_seed(seed)
        table.setdefault("random network (no meta-training)", []).append(
            fit(build_model(args.arch, (1, 28, 28), 5, (256, 256)).features.eval()))
        table.setdefault("pixels", []).append(fit(torch.nn.Flatten()))
        print(f"# seed {seed} done", flush=True)
    print(f"\n| representation | linear probe on digits 5-9, {args.train_per_class}/class, % |\n|---|---:|")
    for label, v in table.items():
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"| {label} | {statistics.mean(v):.2f} ± {sd:.2f} |")


if __name__ == "__main__":
    main()
