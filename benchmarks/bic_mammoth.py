"""Diagnostic: retain's ``bic`` with Mammoth's memory and validation split in place of the paper's.

Not a method for experiments (it is not registered): it exists to explain the difference between retain's ``bic``
and Mammoth's ``models/bic.py`` (commit ``e75a491c``) on Split-MNIST and Split-Fashion-MNIST, by running retain's
BiC (its loss, with ``weighting=mammoth``, and its bias layer) on the rows Mammoth's code would train and validate
on. Read with docs/class-incremental.md, "Checked against the reference code". What it simulates, as read in
Mammoth's files:

- The memory (``Bic.build_buffer``, at each task's end, after the bias layer is trained): a reservoir buffer of
  ``buffer_size`` slots; ``buffer_size // t`` rows a task at the end of task t (0-based; the whole buffer at t = 0
  and again at t = 1); from t = 2 on it is first shrunk, keeping of each task label the first rows in slot order
  and restarting the reservoir count; then the first rows of the task's shuffled training loader are added with
  reservoir sampling. That loader already holds the memory rows merged into it (``icarl_replay``), so a stored row
  can be stored again. Rows are kept by their index in the training set.
- The validation split (``utils.buffer.icarl_replay`` with ``valset_split`` 0.1, at each task's start from the
  second on): each memory row held out with probability 0.1, and as many rows of the new task's data drawn at
  random; the rest of both is the task's training set. retain's ``bic`` holds out an equal number per class
  (the paper's and PyCIL's balanced split).

Everything else is retain's ``bic``. Run as a plugin (from the repository root), with Mammoth's settings::

    PYTHONPATH=benchmarks retain run --benchmark split-mnist --data-dir ../shared/data/mnist --mode class \
        --hidden 100,100 --epochs 1 --batch-size 10 --optimizer sgd --lr 0.03 --init xavier \
        --method bic_mammoth:MammothBiC --param buffer_size=500 --param weighting=mammoth --seed 0

The random draws are retain's (``ctx.rng``), not Mammoth's, so the rows differ run by run as two seeds would; the
comparison is of distributions over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from retain.method import Memory
from retain.methods.bic import BiC
from retain.scenarios import TaskData


@dataclass
class MammothBiC(BiC):
    """retain's BiC on Mammoth's task-wise reservoir memory and its unbalanced validation split."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mem_idx = torch.zeros(0, dtype=torch.long)  # training-set index of each slot, in slot order
        self.mem_t = torch.zeros(0, dtype=torch.long)  # the task each stored row belongs to (for its targets)
        self.mem_label = torch.zeros(0, dtype=torch.long)  # Mammoth's task label of the slot (what shrinks)
        self.seen_rows = 0  # the reservoir's num_seen_examples
        self.train_part: TaskData | None = None

    def memory(self, scenario: Any) -> Memory:
        return Memory.of(self.buffer_size, scenario)

    def task_data(self, ctx: Any, data: TaskData) -> TaskData:
        self.train_part = data
        if ctx.task == 0 or len(self.mem_idx) == 0:
            return data
        held = torch.rand(len(self.mem_idx), generator=ctx.rng) < self.val_fraction
        pick = torch.randperm(len(data), generator=ctx.rng)
        new_val, new_train = pick[:int(held.sum())], pick[int(held.sum()):]
        dev = data.idx.device
        self.val = TaskData(torch.cat([data.idx[new_val], self.mem_idx[held].to(dev)]),
                            torch.cat([data.t[new_val], self.mem_t[held].to(dev)]))
        self.train_part = TaskData(torch.cat([data.idx[new_train], self.mem_idx[~held].to(dev)]),
                                   torch.cat([data.t[new_train], self.mem_t[~held].to(dev)]))
        return self.train_part

    def end_task(self, ctx: Any) -> None:
        if ctx.task > 0 and self.val is not None and len(self.val):
            self.correction = self.train_bias(ctx)
        self.build_buffer(ctx)

    def build_buffer(self, ctx: Any) -> None:
        t, size = ctx.task, self.buffer_size
        per_task = size // t if t > 0 else size
        if t > 1:  # shrink: the first rows of each task label, in slot order; the reservoir count restarts
            keep = torch.cat([(self.mem_label == lab).nonzero().flatten()[:per_task]
                              for lab in torch.unique(self.mem_label)])
            self.mem_idx, self.mem_t, self.mem_label = self.mem_idx[keep], self.mem_t[keep], self.mem_label[keep]
            self.seen_rows = len(self.mem_idx)
        loader = self.train_part if self.train_part is not None else ctx.scenario.task_data(t)
        order = torch.randperm(len(loader), generator=ctx.rng)[:per_task]
        idx, tasks = self.mem_idx.tolist(), self.mem_t.tolist()
        labels = self.mem_label.tolist()
        for i in order.tolist():
            slot = self.seen_rows if self.seen_rows < size else int(torch.randint(0, self.seen_rows + 1, (1,),
                                                                                 generator=ctx.rng))
            self.seen_rows += 1
            row = (int(loader.idx[i]), int(loader.t[i]), t - 1)
            if slot >= size:  # not sampled
                continue
            if slot == len(idx):
                idx.append(row[0]), tasks.append(row[1]), labels.append(row[2])
            else:
                idx[slot], tasks[slot], labels[slot] = row
        self.mem_idx = torch.tensor(idx, dtype=torch.long)
        self.mem_t = torch.tensor(tasks, dtype=torch.long)
        self.mem_label = torch.tensor(labels, dtype=torch.long)
