"""SPLIT-5 speed protocol (docs/protocols.md P4): retain against a bare PyTorch loop doing the same work, same run.

Split-MNIST (or Split-Fashion-MNIST), 5 tasks x 2 classes in label order, class-IL, MLP 784-400-400-10, Adam 1e-3,
batch 128, 2 epochs per task, all 5 test sets evaluated after each task (batch 1000), 2 threads. Each
(row, implementation, repeat) runs in a fresh subprocess so that its peak resident memory is its own; times are
medians over repeats. Prints train and eval seconds, peak memory, and retain's ratio to the bare loop.

    python benchmarks/speed.py --data-dir ../shared/data/mnist            # all rows
    python benchmarks/speed.py --data-dir ../shared/data/mnist --rows finetune --repeats 5

A row is a pair of functions in ``ROWS``: ``retain`` (runs the library) and ``bare`` (a plain loop over tensors
doing the same work). Both return ``(train_s, eval_s, final accuracy)``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

EPOCHS, BATCH, LR, HIDDEN, EVAL_BATCH, THREADS = 2, 128, 1e-3, (400, 400), 1000, 2
TASKS = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def load(dataset: str, data_dir: str | None):
    from retain.data import load as load_data

    return load_data(dataset, data_dir)


# ------------------------------------------------------------------------------------------------ bare loops

def bare_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, HIDDEN[0]), nn.ReLU(), nn.Linear(HIDDEN[0], HIDDEN[1]),
                         nn.ReLU(), nn.Linear(HIDDEN[1], 10))


def bare_eval(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, test_idx: list[torch.Tensor]) -> list[float]:
    model.eval()
    accs = []
    with torch.no_grad():
        for idx in test_idx:
            correct = 0
            for s in range(0, len(idx), EVAL_BATCH):
                b = idx[s:s + EVAL_BATCH]
                correct += int((model(xs[b]).argmax(1) == ys[b]).sum())
            accs.append(correct / len(idx))
    model.train()
    return accs


def bare_tensors(arrays):
    """What a user's loop starts from: float copies of the images, flattened, and each task's test indices."""
    x_tr = arrays.x_train.float().div(255).view(len(arrays.x_train), -1)
    x_te = arrays.x_test.float().div(255).view(len(arrays.x_test), -1)
    test_idx = [torch.isin(arrays.y_test, torch.tensor(c)).nonzero().flatten() for c in TASKS]
    return x_tr, arrays.y_train, x_te, arrays.y_test, test_idx


def bare_loop(arrays, replay: Callable | None = None) -> tuple[float, float, float]:
    """Fine-tuning as a user would write it: float tensors prepared once, index batches, masked CE."""
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te, test_idx = bare_tensors(arrays)
    model = bare_mlp()
    train_s = eval_s = 0.0
    state = {}
    for t, classes in enumerate(TASKS):
        t0 = time.perf_counter()  # like retain's train_s, the clock covers building the task's optimizer
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        idx = torch.isin(y_tr, torch.tensor(classes)).nonzero().flatten()
        n_seen = 2 * (t + 1)
        for _ in range(EPOCHS):
            perm = idx[torch.randperm(len(idx))]
            for s in range(0, len(perm), BATCH):
                b = perm[s:s + BATCH]
                x, y = x_tr[b], y_tr[b]
                if replay is not None:
                    x, y = replay(state, x, y, t)
                out = model(x)[:, :n_seen]
                loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        train_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        accs = bare_eval(model, x_te, y_te, test_idx)
        eval_s += time.perf_counter() - t0
    return train_s, eval_s, sum(accs) / len(accs)


# ------------------------------------------------------------------------------------------ bare replay loops
# The same work as retain's ER / DER++ / A-GEM rows, written plainly: a tensor reservoir of BUFFER rows (A-GEM:
# BUFFER / 5 rows per task), a REPLAY-row batch from it per step, insertion after each step (Vitter's algorithm R).

BUFFER, REPLAY, DERPP_ALPHA, DERPP_BETA = 500, 128, 0.3, 0.5


def _reservoir_insert(state: dict, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None) -> None:
    if "x" not in state:
        state["x"] = torch.zeros(BUFFER, x.shape[1])
        state["y"] = torch.zeros(BUFFER, dtype=torch.long)
        state["logits"] = torch.zeros(BUFFER, 10)
        state["seen"] = 0
    n, m = state["seen"], len(y)
    pos = torch.arange(n, n + m)
    j = torch.where(pos < BUFFER, pos, (torch.rand(m) * (pos + 1)).long())
    keep = j < BUFFER
    state["x"][j[keep]] = x[keep]
    state["y"][j[keep]] = y[keep]
    if logits is not None:
        state["logits"][j[keep]] = logits[keep]
    state["seen"] = n + m


def _replay_idx(state: dict) -> torch.Tensor:
    size = min(state.get("seen", 0), BUFFER)
    return torch.randperm(size)[:REPLAY]


def bare_er_replay(state: dict, x: torch.Tensor, y: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ER for bare_loop: a replay batch from the reservoir appended to the batch; the batch then inserted."""
    out_x, out_y = x, y
    if state.get("seen", 0):
        i = _replay_idx(state)
        out_x, out_y = torch.cat([x, state["x"][i]]), torch.cat([y, state["y"][i]])
    _reservoir_insert(state, x, y)
    return out_x, out_y


def bare_replay_loop(arrays, kind: str) -> tuple[float, float, float]:
    """DER++ or A-GEM as a user would write them over tensors (same data handling as :func:`bare_loop`)."""
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te, test_idx = bare_tensors(arrays)
    model = bare_mlp()
    params = list(model.parameters())
    train_s = eval_s = 0.0
    state: dict = {}
    memory: list[tuple[torch.Tensor, torch.Tensor]] = []  # A-GEM: (x, y) per finished task
    per_task = BUFFER // len(TASKS)
    for t, classes in enumerate(TASKS):
        t0 = time.perf_counter()  # like retain's train_s, the clock covers building the task's optimizer
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        idx = torch.isin(y_tr, torch.tensor(classes)).nonzero().flatten()
        n_seen = 2 * (t + 1)
        mem_x = torch.zeros(per_task, 784)
        mem_y = torch.zeros(per_task, dtype=torch.long)
        mem_seen = 0
        for _ in range(EPOCHS):
            perm = idx[torch.randperm(len(idx))]
            for s in range(0, len(perm), BATCH):
                b = perm[s:s + BATCH]
                x, y = x_tr[b], y_tr[b]
                out = model(x)
                loss = F.cross_entropy(out[:, :n_seen], y)
                if kind == "derpp" and state.get("seen", 0):
                    i1, i2 = _replay_idx(state), _replay_idx(state)
                    buf = model(torch.cat([state["x"][i1], state["x"][i2]]))
                    loss = loss + DERPP_ALPHA * F.mse_loss(buf[:len(i1)], state["logits"][i1])
                    loss = loss + DERPP_BETA * F.cross_entropy(buf[len(i1):, :n_seen], state["y"][i2])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if kind == "agem" and memory:
                    mx, my = torch.cat([m[0] for m in memory]), torch.cat([m[1] for m in memory])
                    i = torch.randperm(len(my))[:REPLAY]
                    g = torch.cat([p.grad.flatten() for p in params])
                    ref = torch.autograd.grad(F.cross_entropy(model(mx[i])[:, :n_seen], my[i]), params)
                    g_ref = torch.cat([r.flatten() for r in ref])
                    dot = g @ g_ref
                    if dot < 0:
                        g = g - dot / (g_ref @ g_ref) * g_ref
                        start = 0
                        for p in params:
                            p.grad.copy_(g[start:start + p.numel()].view_as(p))
                            start += p.numel()
                opt.step()
                if kind == "derpp":
                    _reservoir_insert(state, x, y, out.detach())
                else:  # A-GEM: this task's memory, a reservoir of per_task rows
                    pos = torch.arange(mem_seen, mem_seen + len(y))
                    j = torch.where(pos < per_task, pos, (torch.rand(len(y)) * (pos + 1)).long())
                    keep = j < per_task
                    mem_x[j[keep]], mem_y[j[keep]] = x[keep], y[keep]
                    mem_seen += len(y)
        memory.append((mem_x[:min(mem_seen, per_task)], mem_y[:min(mem_seen, per_task)]))
        train_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        accs = bare_eval(model, x_te, y_te, test_idx)
        eval_s += time.perf_counter() - t0
    return train_s, eval_s, sum(accs) / len(accs)


# ------------------------------------------------------------------------------------------------- retain

def retain_run(arrays, method: str, params: dict | None = None) -> tuple[float, float, float]:
    from retain import api, scenarios

    sc = scenarios.split(arrays, "class", n_tasks=5)
    sc.name = "speed"
    r = api.run(scenario=sc, method=method, params=params or {}, hidden=HIDDEN, epochs=EPOCHS, batch_size=BATCH,
                lr=LR, optimizer="adam", seed=0, device="cpu")
    return r.timings["train_s"], r.timings["eval_s"], r.metrics["acc"]


ROWS: dict[str, dict[str, Callable]] = {
    "finetune": {"retain": lambda a: retain_run(a, "finetune"), "bare": lambda a: bare_loop(a)},
    "er": {"retain": lambda a: retain_run(a, "er", {"buffer_size": BUFFER, "replay_batch": REPLAY}),
           "bare": lambda a: bare_loop(a, bare_er_replay)},
    "derpp": {"retain": lambda a: retain_run(a, "derpp", {"buffer_size": BUFFER, "replay_batch": REPLAY,
                                                          "alpha": DERPP_ALPHA, "beta": DERPP_BETA}),
              "bare": lambda a: bare_replay_loop(a, "derpp")},
    "agem": {"retain": lambda a: retain_run(a, "agem", {"memory_per_task": BUFFER // 5, "sample_size": REPLAY}),
             "bare": lambda a: bare_replay_loop(a, "agem")},
}


# ------------------------------------------------------------------------------------------------- driver

def worker(row: str, impl: str, dataset: str, data_dir: str | None) -> None:
    torch.set_num_threads(THREADS)
    arrays = load(dataset, data_dir)
    train_s, eval_s, acc = ROWS[row][impl](arrays)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"train_s": train_s, "eval_s": eval_s, "acc": acc, "peak_mb": peak_mb}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    ap.add_argument("--data-dir")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", nargs=2, metavar=("ROW", "IMPL"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(*a.worker, a.dataset, a.data_dir)
        return
    rows = [r for r in a.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    print(f"SPLIT-5 on {a.dataset}: 5x2 classes, class-IL, MLP 784-400-400-10, Adam {LR}, batch {BATCH}, "
          f"{EPOCHS} epochs/task, eval every task after each task, {THREADS} threads, median of {a.repeats}")
    header = (f"{'row':<10} {'impl':<7} {'train s':>8} {'eval s':>7} {'eval/train':>10} {'peak MB':>8} "
              f"{'ACC':>6} {'train x':>8} {'mem x':>6}")
    print(header)
    print("-" * len(header))
    for row in rows:
        res = {}
        for impl in ("bare", "retain"):
            runs = []
            for _ in range(a.repeats):
                cmd = [sys.executable, __file__, "--worker", row, impl, "--dataset", a.dataset]
                if a.data_dir:
                    cmd += ["--data-dir", a.data_dir]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            res[impl] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for impl in ("bare", "retain"):
            r = res[impl]
            ratio = r["train_s"] / res["bare"]["train_s"]
            mem = r["peak_mb"] / res["bare"]["peak_mb"]
            print(f"{row:<10} {impl:<7} {r['train_s']:8.2f} {r['eval_s']:7.2f} {r['eval_s'] / r['train_s']:10.1%} "
                  f"{r['peak_mb']:8.0f} {r['acc']:6.3f} {ratio:8.2f} {mem:6.2f}")
    print("train x / mem x: retain over the bare loop in the same run (targets: finetune <= 1.3 train, "
          "<= 1.5 memory; eval <= 10% of train; er, derpp <= 1.6 train)")


if __name__ == "__main__":
    main()
