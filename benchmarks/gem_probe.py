"""Probe a GEM checkpoint of the A-GEM protocol: how far does one SGD step on the current task move the memories?

GEM's constraints are first order: a memory whose loss is near zero has a gradient near zero, and the QP then
leaves the step alone. Whether that step is safe depends on how sharp the network has become. This script takes a
checkpoint written by ``reproduce_replay.py --checkpoint-dir`` (GEM, ``--protocols agem``) and prints, for the
network in it:

* the position, ‖θ‖, and the loss on each earlier task's memory (mean and max over tasks);
* for each learning rate and each of a few random batches of the current task, the memory losses after one plain
  SGD step from that state (the step GEM takes when no constraint is violated).

    python benchmarks/gem_probe.py --data-dir ../shared/data/mnist --seed 1 --checkpoint runs/ckpt/<key>.ckpt

docs/replay.md (P2) quotes its numbers for GEM seed 1 at the start of tasks 2 and 7.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


def _replay_script():
    spec = importlib.util.spec_from_file_location("reproduce_replay", HERE / "reproduce_replay.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a GEM checkpoint of reproduce_replay.py --protocols agem")
    ap.add_argument("--seed", type=int, required=True, help="the run's seed (it chose the permutations)")
    ap.add_argument("--data-dir", default=os.environ.get("RETAIN_DATA"))
    ap.add_argument("--train-per-task", type=int, help="as the run was given, if it was")
    ap.add_argument("--lrs", default="0.1,0.03,0.01", help="learning rates of the probe step")
    ap.add_argument("--batches", type=int, default=5, help="random batches of 10 rows of the current task")
    a = ap.parse_args()
    try:
        lrs = [float(x) for x in a.lrs.split(",")]
    except ValueError:
        ap.error(f"--lrs must be comma-separated numbers, got {a.lrs!r}; e.g. --lrs 0.1,0.03")
    if not all(lr > 0 and math.isfinite(lr) for lr in lrs) or a.batches < 1:
        ap.error(f"--lrs must be positive numbers and --batches at least 1, got {a.lrs!r} and {a.batches}")
    if not Path(a.checkpoint).is_file():
        ap.error(f"--checkpoint {a.checkpoint}: no such file; reproduce_replay.py --checkpoint-dir writes them")

    from retain import checkpoint
    from retain.method import create

    torch.set_num_threads(1)
    rr = _replay_script()
    spec = argparse.Namespace(protocols="agem", only="gem", epochs=None, train_per_task=a.train_per_task,
                              tasks=None, init="torch", lr=None)
    (c,) = rr.configs(spec)
    state = checkpoint.load(a.checkpoint)
    state = state.get("state", state)  # a trainer checkpoint: {"format", "fingerprint", "state"}
    if "buffer" not in state["method"]:
        ap.error(f"--checkpoint {a.checkpoint} is not a GEM run (its method state has no memory)")
    gem = create("gem", c["params"])
    gem.load_state_dict(state["method"])
    model = state["model"]
    task = state["position"]["task"]
    old = [k for k in gem.buffer.tasks() if k < task]
    if not old:
        ap.error(f"--checkpoint {a.checkpoint} is at task {task}: there is no earlier memory to probe")
    sc = rr.build_scenario(c, a.seed, a.data_dir, a.train_per_task)

    memories = [gem.buffer.rows(k) for k in old]

    @torch.no_grad()
    def memory_losses(m: torch.nn.Module) -> list[float]:
        return [float(F.cross_entropy(m(rows.x), rows.y)) for rows in memories]

    theta = float(torch.sqrt(sum((p.detach() ** 2).sum() for p in model.parameters())))
    before = memory_losses(model)
    print(f"position {state['position']}; ‖θ‖ {theta:.1f}; memory loss of tasks 0–{old[-1]}: "
          f"mean {sum(before) / len(before):.3g}, max {max(before):.3g}")
    print("\n| batch | batch loss | ‖g‖ | " + " | ".join(f"lr {lr:g}: mean / max memory loss" for lr in lrs) + " |")
    print("|---|---|---|" + "---|" * len(lrs))
    g = torch.Generator().manual_seed(0)
    idx = sc.tasks[task].train_idx
    for b in range(a.batches):
        batch = sc.batch(idx[torch.randperm(len(idx), generator=g)[:10]], task)
        loss = F.cross_entropy(model(batch.x), batch.y)  # one gradient, applied at each rate to a copy
        grads = torch.autograd.grad(loss, list(model.parameters()))
        cells = []
        for lr in lrs:
            m = copy.deepcopy(model)
            with torch.no_grad():
                for p, gr in zip(m.parameters(), grads):
                    p -= lr * gr
            after = memory_losses(m)
            cells.append(f"{sum(after) / len(after):.3g} / {max(after):.3g}")
        norm = float(torch.sqrt(sum((gr ** 2).sum() for gr in grads)))
        print(f"| {b} | {float(loss.detach()):.2f} | {norm:.1f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
