"""Replay memory as preallocated tensors: reservoir, class-balanced and per-class storage, end-of-task selection.

A :class:`Buffer` holds rows ``(x, y, t)`` (prepared model inputs, targets in output space, task ids), optionally
the model's ``logits`` at insertion time (DER), and a ``key`` per row: the class (or any group) that balancing
counts, ``y`` by default. Three storage policies:

* ``Buffer(capacity)``: **reservoir** (Vitter's algorithm R). The i-th sample ever offered (0-based) is stored
  outright while the buffer has room, otherwise with probability ``capacity / (i + 1)`` over a uniformly chosen
  slot, so after N offers every one of them is in the buffer with probability ``capacity / N``. The index is drawn
  over the number *seen*, not the buffer length (the latter favours recent samples).
* ``Buffer(capacity, balanced=True)``: **class-balanced**. Each key seen so far gets an equal share of the capacity
  (shares differ by at most 1; the earliest keys get the remainder); when a new key arrives, the others shrink to
  their new share by dropping random rows. Within its share a key is a reservoir over its own samples, so the
  stored rows of each key are a uniform sample of that key's stream.
* ``Buffer(per_class=N)``: a **per-key budget** of N rows (van de Ven's protocol counts the budget per class);
  the storage grows as keys arrive.

Insertion is vectorised over the batch (one draw per row, last write wins on a slot, as in the sequential
algorithm); keys are looped over only when a batch holds several (two per batch on split benchmarks).

End-of-task selection (:meth:`Buffer.select`) fills each new key's share from a whole task's data at once, with
``random``, ``herding`` (iCaRL: greedily pick the sample whose addition brings the running mean of the chosen
features closest to the class mean) or ``kcenter`` (greedy k-center coreset: repeatedly pick the sample farthest
from those chosen). Each row keeps a priority; a shrinking share drops the rows chosen last, so a herding or
k-center selection truncated to a smaller share is still the greedy selection of that size (iCaRL's rule).

Sampling a replay batch (:meth:`Buffer.sample`) is without replacement. The buffer pickles with ``torch.save``
(methods keep it in their ``state_dict``) and has its own :meth:`state_dict` / :meth:`load_state_dict`.

>>> buf = Buffer(500)
>>> buf.add(x, y, t, generator=g)                  # after each step: the current rows
>>> rows = buf.sample(128, generator=g)             # rows.x, rows.y, rows.t, rows.logits (or None), rows.idx
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from retain.errors import ConfigError

SELECTIONS = ("random", "herding", "kcenter")


@dataclass
class Rows:
    """Rows read from a buffer: inputs, targets, task ids, stored logits (None if not kept), slot indices."""

    x: Tensor
    y: Tensor
    t: Tensor
    logits: Tensor | None
    idx: Tensor

    def __len__(self) -> int:
        return len(self.y)


class Buffer:
    """A fixed-size replay memory stored as preallocated tensors (see the module docstring for the policies).

    ``capacity``: total rows (reservoir or ``balanced``); ``per_class``: rows per key instead (capacity grows).
    ``device``: where the rows live (default: the device of the first rows added).
    """

    def __init__(self, capacity: int | None = None, per_class: int | None = None, balanced: bool = False,
                 device: str | torch.device | None = None):
        if per_class is not None:
            if capacity is not None:
                raise ConfigError("give a buffer either a total capacity or a per-class budget, not both")
            if per_class < 1:
                raise ConfigError(f"per_class must be at least 1, got {per_class}")
        elif capacity is None or capacity < 1:
            raise ConfigError(f"buffer capacity must be at least 1, got {capacity}")
        self.per_class = per_class
        self.balanced = balanced or per_class is not None
        self.capacity = capacity or 0  # current storage size (grows with per_class)
        self.device = torch.device(device) if device is not None else None
        self.seen = 0  # samples offered so far
        self.seen_per_key: dict[int, int] = {}  # key -> samples of that key offered so far (balanced policies)
        self.keys_order: list[int] = []  # keys in order of arrival (the remainder of a share goes to the first)
        self.x: Tensor | None = None
        self.y = self.t = self.key = self.prio = self.logits = None

    # ------------------------------------------------------------------------------------------------ shape
    def __len__(self) -> int:
        if self.key is None:
            return 0
        return int((self.key >= 0).sum()) if self.balanced else min(self.seen, self.capacity)

    def occupied(self) -> Tensor:
        """Slot indices that hold a row."""
        if self.key is None:
            return torch.zeros(0, dtype=torch.long)
        if self.balanced:
            return (self.key >= 0).nonzero().flatten()
        return torch.arange(min(self.seen, self.capacity), device=self.key.device)

    def tasks(self) -> list[int]:
        """The task ids present in the buffer, sorted."""
        idx = self.occupied()
        return [] if len(idx) == 0 else sorted(torch.unique(self.t[idx]).tolist())

    def counts(self) -> dict[int, int]:
        """Rows stored per key."""
        idx = self.occupied()
        if len(idx) == 0:
            return {}
        keys, n = torch.unique(self.key[idx], return_counts=True)
        return dict(zip(keys.tolist(), n.tolist()))

    def _allocate(self, x: Tensor, logits: Tensor | None) -> None:
        dev = self.device or x.device
        self.device = dev
        n = self.capacity
        self.x = torch.zeros((n, *x.shape[1:]), dtype=torch.float32, device=dev)
        self.y = torch.zeros(n, dtype=torch.long, device=dev)
        self.t = torch.zeros(n, dtype=torch.long, device=dev)
        self.key = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.prio = torch.zeros(n, dtype=torch.float32, device=dev)
        self.logits = None if logits is None else torch.zeros((n, logits.shape[1]), dtype=torch.float32, device=dev)

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        if extra <= 0:
            return
        self.capacity = capacity
        if self.x is None:
            return
        pad = lambda v, fill: torch.cat([v, v.new_full((extra, *v.shape[1:]), fill)])  # noqa: E731
        self.x, self.y, self.t = pad(self.x, 0), pad(self.y, 0), pad(self.t, 0)
        self.key, self.prio = pad(self.key, -1), pad(self.prio, 0)
        if self.logits is not None:
            self.logits = pad(self.logits, 0)

    def _write(self, slots: Tensor, src: Tensor, x: Tensor, y: Tensor, t: Tensor, key: Tensor,
               logits: Tensor | None, prio: Tensor) -> None:
        self.x[slots] = x[src].to(self.x.dtype)
        self.y[slots] = y[src]
        self.t[slots] = t[src]
        self.key[slots] = key[src]
        self.prio[slots] = prio
        if self.logits is not None:
            if logits is None:
                raise ValueError("this buffer stores logits; pass logits= to add()")
            self.logits[slots] = logits[src].to(self.logits.dtype)

    # --------------------------------------------------------------------------------------------- insertion
    @torch.no_grad()
    def add(self, x: Tensor, y: Tensor, t: Tensor, logits: Tensor | None = None, key: Tensor | None = None,
            generator: torch.Generator | None = None) -> None:
        """Offer a batch of rows (in stream order). ``key`` (default ``y``) is what balancing counts."""
        m = len(y)
        if m == 0:
            return
        key = y if key is None else key
        dev = self.device or x.device
        x, y, t, key = x.to(dev), y.to(dev), t.to(dev), key.to(dev)
        logits = None if logits is None else logits.detach().to(dev)
        if self.balanced:
            self._add_balanced(x, y, t, key, logits, generator)
            return
        if self.x is None:
            self._allocate(x, logits)
        n, cap = self.seen, self.capacity
        pos = torch.arange(n, n + m)  # each row's 0-based index in everything seen (CPU: the draws are CPU)
        # Algorithm R: row at position p goes to slot p while p < capacity, else to a slot drawn uniformly over
        # 0..p (inclusive) and is kept when that slot exists. The draw is over p + 1 *seen* samples.
        u = torch.rand(m, generator=generator)
        j = torch.where(pos < cap, pos, (u * (pos + 1).float()).long().clamp_(max=pos))
        keep = j < cap
        self.seen += m
        if not bool(keep.any()):
            return
        slots, src = j[keep], torch.arange(m)[keep]
        slots, src = _last_write(slots, src, cap)
        slots, src = slots.to(dev), src.to(dev)
        self._write(slots, src, x, y, t, key, logits, torch.zeros(len(slots), device=dev))

    def shares(self) -> dict[int, int]:
        """The number of rows each key seen so far may hold."""
        if self.per_class is not None:
            return {k: self.per_class for k in self.keys_order}
        k = len(self.keys_order)
        base, extra = divmod(self.capacity, k) if k else (0, 0)
        return {key: base + (i < extra) for i, key in enumerate(self.keys_order)}

    def _admit(self, new_keys: list[int]) -> dict[int, int]:
        """Register keys met for the first time; shrink the others to their new shares. Returns the shares."""
        fresh = [k for k in new_keys if k not in self.seen_per_key]
        for k in fresh:
            self.seen_per_key[k] = 0
            self.keys_order.append(k)
        if self.per_class is not None:
            self._grow(self.per_class * len(self.keys_order))
        share = self.shares()
        if fresh and self.key is not None:
            for k, n in self.counts().items():
                if n > share.get(k, 0):
                    self._evict(k, n - share[k])
        return share

    def _evict(self, key: int, n: int) -> None:
        """Free the ``n`` rows of ``key`` with the largest priority (random rows, or the last chosen)."""
        slots = (self.key == key).nonzero().flatten()
        drop = slots[torch.topk(self.prio[slots], n).indices]
        self.key[drop] = -1

    def _open(self, x: Tensor, y: Tensor, key: Tensor, logits: Tensor | None) -> tuple[list[int], dict[int, int]]:
        """Allocate storage on first use, admit the batch's keys and count its rows as seen: (keys, shares)."""
        uniq = torch.unique(key).tolist()
        if self.x is None:
            self._admit(uniq)
            self._allocate(x, logits)
        share = self._admit(uniq)
        self.seen += len(y)
        return uniq, share

    def _add_balanced(self, x: Tensor, y: Tensor, t: Tensor, key: Tensor, logits: Tensor | None,
                      generator: torch.Generator | None) -> None:
        uniq, share = self._open(x, y, key, logits)
        keys_cpu = key.cpu()
        for k in uniq:
            rows = (keys_cpu == k).nonzero().flatten()
            n_seen, q = self.seen_per_key[k], share[k]
            self.seen_per_key[k] = n_seen + len(rows)
            pos = torch.arange(n_seen, n_seen + len(rows))
            fill = pos < q
            prio = torch.rand(len(rows), generator=generator)  # random order of eviction when shares shrink
            if bool(fill.any()):
                free = (self.key == -1).nonzero().flatten()[: int(fill.sum())]
                src = rows[fill].to(self.key.device)
                self._write(free, src, x, y, t, key, logits, prio[fill].to(self.prio.device))
            rest = ~fill
            if not bool(rest.any()):
                continue
            # Reservoir within the key's share: kept with probability q / (p + 1), over a uniform slot of the key.
            u = torch.rand(int(rest.sum()), generator=generator)
            p = pos[rest]
            keep = (u * (p + 1).float()).long() < q
            if not bool(keep.any()):
                continue
            mine = (self.key == k).nonzero().flatten()
            victim = torch.randint(len(mine), (int(keep.sum()),), generator=generator)
            src = rows[rest][keep]
            victim, src = _last_write(victim, src, len(mine))
            self._write(mine[victim.to(mine.device)], src.to(self.key.device), x, y, t, key, logits,
                        self.prio[mine[victim.to(mine.device)]])

    # --------------------------------------------------------------------------------------------- selection
    @torch.no_grad()
    def select(self, x: Tensor, y: Tensor, t: Tensor, features: Tensor, how: str = "herding",
               key: Tensor | None = None, logits: Tensor | None = None,
               generator: torch.Generator | None = None) -> None:
        """Fill the share of every key in ``key`` (default ``y``) from these rows (a whole task's data).

        ``features`` [N, D] is the space ``herding`` and ``kcenter`` work in (e.g. the model's penultimate layer);
        ``random`` ignores it. Needs a ``balanced`` or ``per_class`` buffer (a selection is made per key).
        """
        if how not in SELECTIONS:
            raise ConfigError(f"unknown selection {how!r}; choose one of {', '.join(SELECTIONS)}")
        if not self.balanced:
            raise ConfigError("end-of-task selection needs a class-balanced or per-class buffer")
        key = y if key is None else key
        dev = self.device or x.device
        x, y, t, key = x.to(dev), y.to(dev), t.to(dev), key.to(dev)
        logits = None if logits is None else logits.to(dev)
        uniq, share = self._open(x, y, key, logits)
        for k in uniq:
            rows = (key == k).nonzero().flatten()
            self.seen_per_key[k] += len(rows)
            have = (self.key == k).nonzero().flatten()
            if len(have):  # a key seen before: its rows are replaced by the new selection
                self.key[have] = -1
            m = min(share[k], len(rows))
            if how == "herding":
                order = herding(features[rows].to(dev), m)
            elif how == "kcenter":
                order = kcenter(features[rows].to(dev), m)
            else:
                order = torch.randperm(len(rows), generator=generator)[:m].to(dev)
            free = (self.key == -1).nonzero().flatten()[:m]
            self._write(free, rows[order], x, y, t, key, logits, torch.arange(m, dtype=torch.float32, device=dev))

    # -------------------------------------------------------------------------------------------- reading
    def sample(self, n: int, generator: torch.Generator | None = None, tasks: list[int] | None = None) -> Rows:
        """``n`` rows drawn without replacement (all of them, shuffled, if fewer are stored); ``tasks`` keeps
        only rows of those task ids."""
        idx = self.occupied()
        if tasks is not None and len(idx):
            idx = idx[torch.isin(self.t[idx], torch.as_tensor(tasks, device=self.t.device))]
        if len(idx) > n:
            idx = idx[torch.randperm(len(idx), generator=generator)[:n].to(idx.device)]
        elif len(idx) > 1:
            idx = idx[torch.randperm(len(idx), generator=generator).to(idx.device)]
        return self.get(idx)

    def get(self, idx: Tensor) -> Rows:
        """The rows at slot indices ``idx``."""
        if self.x is None:
            raise ValueError("the buffer is empty")
        return Rows(self.x[idx], self.y[idx], self.t[idx], None if self.logits is None else self.logits[idx], idx)

    def rows(self, task: int | None = None) -> Rows:
        """Every stored row (of task ``task`` if given), in slot order."""
        idx = self.occupied()
        if task is not None and len(idx):
            idx = idx[self.t[idx] == task]
        return self.get(idx)

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)

    def to(self, device: str | torch.device) -> Buffer:
        self.device = torch.device(device)
        for name in ("x", "y", "t", "key", "prio", "logits"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, v.to(self.device))
        return self


def _last_write(slots: Tensor, src: Tensor, n_slots: int) -> tuple[Tensor, Tensor]:
    """Of several rows aimed at one slot keep the last (the sequential algorithm's outcome)."""
    winner = torch.full((n_slots,), -1, dtype=torch.long)
    winner.scatter_reduce_(0, slots.cpu(), src.cpu(), reduce="amax")
    hit = (winner >= 0).nonzero().flatten()
    return hit, winner[hit]


# ------------------------------------------------------------------------------------------------ selection

def herding(features: Tensor, m: int, normalize: bool = True) -> Tensor:
    """iCaRL's herding: indices of ``m`` rows, in order of choice, each minimising the distance between the class
    mean and the mean of the rows chosen so far (features L2-normalised as in iCaRL unless ``normalize`` is False,
    as Mammoth's ``fill_buffer`` by default; no row chosen twice)."""
    f = features.flatten(1).float()
    f = torch.nn.functional.normalize(f, dim=1) if normalize else f
    mu = f.mean(0)
    chosen = torch.empty(m, dtype=torch.long, device=f.device)
    taken = torch.zeros(len(f), dtype=torch.bool, device=f.device)
    running = torch.zeros_like(mu)
    for k in range(m):
        # the candidate mean (running + f_i) / (k + 1) against mu  <=>  distance of f_i to (k + 1) mu - running
        d = (f - ((k + 1) * mu - running)).pow(2).sum(1).masked_fill(taken, float("inf"))
        i = int(d.argmin())
        chosen[k] = i
        taken[i] = True
        running += f[i]
    return chosen


def kcenter(features: Tensor, m: int) -> Tensor:
    """Greedy k-center coreset: indices of ``m`` rows, in order of choice; the first is the row nearest the mean,
    each next one the row farthest from every row chosen so far (Sener & Savarese's greedy 2-approximation)."""
    f = features.flatten(1).float()
    chosen = torch.empty(m, dtype=torch.long, device=f.device)
    i = int((f - f.mean(0)).pow(2).sum(1).argmin())
    dist = torch.full((len(f),), float("inf"), device=f.device)
    for k in range(m):
        chosen[k] = i
        dist = torch.minimum(dist, (f - f[i]).pow(2).sum(1))
        i = int(dist.argmax())
    return chosen


# ------------------------------------------------------------------------------ exemplars kept as indices

EMBED_CHUNK = 1000  # rows per forward when embedding training rows outside training


@torch.no_grad()
def embed(model: torch.nn.Module, scenario: Any, idx: Tensor, task: int, flip: bool = False) -> Tensor:
    """φ of the training rows ``idx`` (of ``task``): ``model.features`` in evaluation mode (the flattened inputs
    for a model without one), read from the scenario a chunk at a time, ``flip``: of the mirrored images."""
    body = getattr(model, "features", None)
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(idx), EMBED_CHUNK):
        x = scenario.batch(idx[i:i + EMBED_CHUNK], task).x
        x = x.flip(-1) if flip else x
        out.append((body(x) if body is not None else x).flatten(1).float())
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, 0)


class Exemplars:
    """An exemplar memory of ``size`` rows in total, split over the classes seen (iCaRL, BiC, WA, LUCIR, PODNet).

    The rows are kept as indices into the scenario's training tensors, with their task, per class (output) in order
    of choice: a later task's training set is its new data plus these rows (``data``), read in place like the new
    rows, so a method's ``task_data`` hook returns ``data.cat(exemplars.data())``. Their cost is reported as stored
    copies (``memory``). At the end of a task :meth:`select` chooses the new classes' rows from the task's whole
    training set, ``herding`` in the model's feature space (iCaRL's Alg. 4) or ``random`` (with ``ctx.rng``), and
    shrinks every class to its share keeping its first-chosen rows (iCaRL's Alg. 5).

    ``remainder``: False gives each class ``size // classes seen`` (iCaRL's m = K / t, LUCIR, PODNet); True hands
    the rest of the division to the earliest classes, so the memory is full (BiC; WA, where PyCIL drops the rest).
    """

    def __init__(self, size: int, remainder: bool = False):
        self.size = size
        self.remainder = remainder
        self.idx: dict[int, Tensor] = {}  # output (class) -> training-set indices, in order of choice
        self.task: dict[int, int] = {}  # output -> the task it was learnt in

    def __len__(self) -> int:
        return sum(len(v) for v in self.idx.values())

    def shares(self, classes: list[int]) -> dict[int, int]:
        """Each of ``classes`` (in order of arrival) with its number of rows."""
        base, extra = divmod(self.size, len(classes))
        return {c: base + (self.remainder and i < extra) for i, c in enumerate(classes)}

    @torch.no_grad()
    def select(self, ctx: Any, how: str = "herding", normalize: bool = True) -> None:
        """Choose the current task's classes' rows and shrink every class to its share (``normalize``: herding on
        L2-normalised features, iCaRL's; False: on the features as they are)."""
        if how not in ("herding", "random"):
            raise ConfigError(f"exemplar selection must be herding or random, got {how!r}")
        sc = ctx.scenario
        data = sc.task_data(ctx.task)
        y = sc.targets(sc.y_train[data.idx], ctx.task)
        new = torch.unique(y).tolist()
        share = self.shares([c for c in self.idx if c not in new] + new)
        feats = embed(ctx.model, sc, data.idx, ctx.task) if how == "herding" else None
        for c in new:
            rows = (y == c).nonzero().flatten()
            m = min(share[c], len(rows))
            if feats is not None:
                order = herding(feats[rows], m, normalize)
            else:
                order = torch.randperm(len(rows), generator=ctx.rng)[:m]
            self.idx[c] = data.idx[rows[order.to(rows.device)]]
            self.task[c] = ctx.task
        for c in self.idx:
            self.idx[c] = self.idx[c][:share[c]]

    def data(self, leave_out: Tensor | None = None) -> Any:
        """The rows as a :class:`retain.scenarios.TaskData` (classes in order of arrival), without ``leave_out``."""
        from retain.scenarios import TaskData

        if not self.idx:
            return TaskData(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        idx = torch.cat(list(self.idx.values()))
        t = torch.cat([torch.full((len(v),), self.task[c], dtype=torch.long, device=v.device)
                       for c, v in self.idx.items()])
        if leave_out is not None and len(leave_out):
            keep = ~torch.isin(idx, leave_out.to(idx.device))
            idx, t = idx[keep], t[keep]
        return TaskData(idx, t)

    def memory(self, scenario: Any) -> Any:
        """What the memory costs as stored copies: ``size`` rows, or every training row when there are fewer."""
        from retain.method import Memory

        return Memory.of(min(self.size, sum(len(task.train_idx) for task in scenario.tasks)), scenario)
