"""Scenarios: a dataset cut into a sequence of tasks, and the one place where the mode (task / domain / class) acts.

The mode changes exactly two things (GMvandeVen's formulation):

* the **target** a sample is trained and scored on, ``label_map[task, original_label]``:
  class-IL -> the class's position in the global class order; task-IL -> the task's head offset + position within
  the task; domain-IL -> position within the task;
* the **logit mask**: task-IL -> that task's head (per row, in training and evaluation); class-IL -> the classes
  seen so far in training, all classes in evaluation; domain-IL -> every output.

The same :meth:`Scenario.mask` serves the loss and the evaluator, so "task-IL" is really multi-head.

Data stays as tensors on the device: uint8 images are scaled and normalised per batch, and a domain transform
(pixel permutation, rotation) is stored once per task and applied per batch, never materialised per task.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from retain.data import Arrays
from retain.errors import ConfigError

MODES = ("task", "domain", "class")


@dataclass
class Batch:
    """Rows for one step: inputs ready for the model, targets in output space, task id per row.

    ``new`` marks the rows of the current stream (False for replayed / generated rows); ``task`` is the single task
    of every row when known (a fast path for homogeneous batches), else None.
    """

    x: Tensor
    y: Tensor
    t: Tensor
    new: Tensor | None = None
    task: int | None = None
    soft: Tensor | None = None  # optional soft targets (distillation / generated replay), same width as outputs

    def __len__(self) -> int:
        return len(self.y)

    def is_new(self) -> Tensor:
        return self.new if self.new is not None else torch.ones(len(self.y), dtype=torch.bool, device=self.y.device)

    def cat(self, other: Batch) -> Batch:
        """Append ``other``'s rows (e.g. a replay batch) to this batch."""
        task = self.task if self.task == other.task else None
        if self.soft is not None or other.soft is not None:
            raise ValueError("Batch.cat cannot join batches carrying soft targets; concatenate them yourself")
        return Batch(
            torch.cat([self.x, other.x]),
            torch.cat([self.y, other.y]),
            torch.cat([self.t, other.t]),
            torch.cat([self.is_new(), other.is_new()]),
            task,
        )


@dataclass
class TaskData:
    """What a task trains on: indices into the scenario's training tensors and the task of each index."""

    idx: Tensor
    t: Tensor

    def __len__(self) -> int:
        return len(self.idx)

    def cat(self, other: TaskData) -> TaskData:
        return TaskData(torch.cat([self.idx, other.idx]), torch.cat([self.t, other.t]))


@dataclass
class Task:
    classes: list[int]  # original labels of this task, in order (position = within-task label)
    train_idx: Tensor
    test_idx: Tensor
    val_idx: Tensor


@dataclass
class Scenario:
    """A sequence of tasks over one dataset, with a mode. Build one with :func:`split`, :func:`permuted`,
    :func:`rotated`, :func:`from_tensors` or :func:`from_dataset`; or :func:`retain.benchmarks.scenario`."""

    name: str
    mode: str
    tasks: list[Task]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor | None
    y_test: Tensor | None
    label_map: Tensor  # [T, n_classes] -> target index in output space (-1 where the class is not in the task)
    task_out: Tensor  # [T, n_outputs] bool: the outputs that belong to task t
    transform: str | None = None  # None | "permute" | "rotate"
    transform_params: Tensor | None = None  # [T, D] permutations or [T, 2, 3] affine matrices
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:  # a summary, not 23,000 characters of tensors
        sizes = [len(t.train_idx) for t in self.tasks]
        classes = " ".join("{" + ",".join(map(str, t.classes)) + "}" for t in self.tasks)
        source = self.info.get("source", "")
        return (f"Scenario({self.name!r}, {self.mode}-IL, {self.n_tasks} tasks {classes}, "
                f"{sum(sizes)} training rows ({min(sizes)}-{max(sizes)} per task), "
                f"{'no' if self.y_test is None else self._test_rows()} test rows, inputs "
                f"{list(self.input_shape)}, {self.n_outputs} outputs"
                + (f", transform {self.transform}" if self.transform else "")
                + (f", reduced to {self.info['reduced']}" if self.info.get("reduced") else "")
                + (f", from {source}" if source else "") + ")")

    def _test_rows(self) -> int:
        """Distinct test rows over the tasks (CORe50 NI's tasks share one test set)."""
        return len(torch.unique(torch.cat([t.test_idx for t in self.tasks])))

    def arrays(self) -> Arrays:
        """The data under this scenario (its train and test tensors), to build another scenario on, e.g.
        ``permuted(sc)``; a scenario made without a test set cannot give one."""
        if self.x_test is None or self.y_test is None:
            raise ConfigError(f"scenario {self.name!r} has no test set (a training view?); build it from the data")
        n_classes = int(max(self.y_train.max(), self.y_test.max())) + 1
        return Arrays(self.name, self.x_train, self.y_train, self.x_test, self.y_test, n_classes, self.mean,
                      self.std, source=self.info.get("source", ""))

    # ------------------------------------------------------------------------------------------------- shape
    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def n_outputs(self) -> int:
        return self.task_out.shape[1]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.y_train.device  # images on disk (retain.images.DiskArray) stay on the host

    def to(self, device: str | torch.device) -> Scenario:
        """The scenario on ``device``; inputs held on disk (a :class:`retain.images.DiskArray`, not a Tensor) stay
        on the host, and :meth:`batch` sends each batch's rows to the device."""
        mv = lambda v: v.to(device) if isinstance(v, Tensor) else v  # noqa: E731
        tasks = [Task(t.classes, mv(t.train_idx), mv(t.test_idx), mv(t.val_idx)) for t in self.tasks]
        return replace(
            self, tasks=tasks, **{k: mv(getattr(self, k)) for k in
                                  ("x_train", "y_train", "x_test", "y_test", "label_map", "task_out",
                                   "transform_params")}
        )

    def train_view(self) -> Scenario:
        """The scenario without its test set: what a method gets to see."""
        return replace(self, x_test=None, y_test=None)

    # ------------------------------------------------------------------------------------------------ the mode
    def mask(self, t: Tensor | int, seen: Tensor | None = None) -> Tensor | None:
        """Active outputs: ``[B, n_outputs]`` (task-IL), ``[n_outputs]`` (class-IL in training) or None (all).

        ``seen`` (bool ``[n_outputs]``, the classes trained so far) is given in training and omitted in evaluation.
        """
        if self.mode == "task":
            return self.task_out[t]
        if self.mode == "class" and seen is not None:
            return seen
        return None

    def targets(self, y: Tensor, t: Tensor | int) -> Tensor:
        return self.label_map[t, y]

    # ---------------------------------------------------------------------------------------------- the data
    def task_data(self, tasks: int | Sequence[int], split: str = "train") -> TaskData:
        """Indices (and task ids) of one task or several, for ``split`` in train / val / test."""
        ids = [tasks] if isinstance(tasks, int) else list(tasks)
        parts = [getattr(self.tasks[i], f"{split}_idx") for i in ids]
        t = torch.cat([torch.full((len(p),), i, dtype=torch.long, device=p.device) for i, p in zip(ids, parts)])
        return TaskData(torch.cat(parts), t)

    def batch(self, idx: Tensor, t: Tensor | int, split: str = "train") -> Batch:
        """Gather rows ``idx`` of ``split`` for task(s) ``t``: scale, normalise, transform, map labels."""
        from retain.images import DiskArray

        xs, ys = (self.x_test, self.y_test) if split == "test" else (self.x_train, self.y_train)
        # rows on disk are read on the host and sent to where the labels are (pinned, asynchronous on CUDA)
        x = xs.gather(idx, ys.device) if isinstance(xs, DiskArray) else xs[idx]
        y = ys[idx]
        task = t if isinstance(t, int) else None
        t_vec = torch.full((len(idx),), t, dtype=torch.long, device=idx.device) if task is not None else t
        return Batch(self.prepare(x, t if task is not None else t_vec), self.targets(y, t), t_vec, None, task)

    def prepare(self, x: Tensor, t: Tensor | int) -> Tensor:
        """Raw stored rows -> model inputs: uint8 scaled to [0, 1], normalised, then the task's transform."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
            if self.mean != (0.0,) or self.std != (1.0,):
                shape = (1, -1) + (1,) * (x.dim() - 2)
                mean = torch.tensor(self.mean, device=x.device).view(shape)
                std = torch.tensor(self.std, device=x.device).view(shape)
                x = (x - mean) / std
        if self.transform == "permute":
            flat = x.reshape(len(x), -1)
            if isinstance(t, int):
                flat = flat[:, self.transform_params[t]]
            else:
                flat = flat.gather(1, self.transform_params[t])
            x = flat.view_as(x)
        elif self.transform == "rotate":
            theta = self.transform_params[t]
            if theta.dim() == 2:
                theta = theta.expand(len(x), 2, 3)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
        return x

    def stream(self, batch_size: int, generator: torch.Generator, blurry: float = 0.0, passes: int = 1
               ) -> Iterator[tuple[Tensor, Tensor, int]]:
        """A task-free stream: every task's training data ``passes`` times, as one sequence of batches with no
        boundaries.

        Yields ``(idx, t, task_done)`` where ``task_done`` is the number of tasks whose data has fully passed (the
        trainer evaluates there; the method is never told). ``blurry`` in [0, 1) blurs the transitions: each
        sample's position is its task index plus a uniform draw over ``[-blurry, 1 + blurry)``, so neighbouring
        tasks overlap over a band of width ``2 * blurry`` (0 = sharp boundaries, shuffled within each task). With
        ``passes`` > 1 the task's band holds its data that many times, pass after pass (each pass in its own
        order), so every sample is seen ``passes`` times while its task streams by (``--epochs`` on a task-free
        run); the stream of one pass is the same as without the argument.
        """
        data = self.task_data(range(self.n_tasks))
        n = len(data)
        u = torch.rand(n * passes, generator=generator).to(data.idx.device)
        within = (torch.arange(passes, device=u.device).repeat_interleave(n) + u) / passes  # pass p: [p, p+1)/passes
        key = data.t.repeat(passes).float() + within * (1 + 2 * blurry) - blurry
        order = torch.argsort(key)
        idx, t = data.idx.repeat(passes)[order], data.t.repeat(passes)[order]
        ends = torch.cumsum(torch.tensor([passes * len(task.train_idx) for task in self.tasks]), 0).tolist()
        done = 0
        for start in range(0, len(idx), batch_size):
            stop = min(start + batch_size, len(idx))
            while done < len(ends) and stop >= ends[done]:
                done += 1
            yield idx[start:stop], t[start:stop], done


# ------------------------------------------------------------------------------------------------ construction

def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


def _val_split(idx: Tensor, fraction: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {fraction}")
    n_val = int(round(len(idx) * fraction))
    perm = idx[torch.randperm(len(idx), generator=g)]
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _tables(mode: str, task_classes: list[list[int]], n_classes: int, shared_labels: bool) -> tuple[Tensor, Tensor]:
    """label_map [T, n_classes] and task_out [T, n_outputs] for a mode.

    ``shared_labels``: every task reuses the same original labels (permuted / rotated), so class-IL gives each
    task its own block of outputs; for a class split each class has one global output.
    """
    T = len(task_classes)
    sizes = [len(c) for c in task_classes]
    offsets = [sum(sizes[:i]) for i in range(T)]
    n_out = max(sizes) if mode == "domain" else sum(sizes)
    label_map = torch.full((T, n_classes), -1, dtype=torch.long)
    task_out = torch.zeros(T, n_out, dtype=torch.bool)
    global_pos = {c: i for i, c in enumerate(c for cs in task_classes for c in cs)}
    for i, classes in enumerate(task_classes):
        for j, c in enumerate(classes):
            if mode == "domain":
                out = j
            elif mode == "task" or shared_labels:
                out = offsets[i] + j
            else:
                out = global_pos[c]
            label_map[i, c] = out
            task_out[i, out] = True
    if mode == "domain":
        task_out[:] = True
    return label_map, task_out


def split(
    data: Arrays,
    mode: str = "class",
    n_tasks: int | None = None,
    classes_per_task: int | None = None,
    class_order: Sequence[int] | None = None,
    task_order: Sequence[int] | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    increments: Sequence[int] | None = None,
) -> Scenario:
    """Split a dataset by classes: consecutive groups of ``classes_per_task`` classes of ``class_order``.

    ``increments`` gives each task's number of classes instead (e.g. ``[50] + [10] * 5``: the B50-Inc10 start of
    PODNet / LUCIR, a large first task); ``n_tasks``, if given too, must be its length. ``task_order`` permutes the
    resulting tasks (task-order sensitivity). In class-IL a class's output is its position in the order the classes
    are met, so the seen classes are always a prefix of the outputs.
    """
    _check_mode(mode)
    order = list(class_order) if class_order is not None else list(range(data.n_classes))
    if sorted(set(order)) != sorted(order) or any(not 0 <= c < data.n_classes for c in order):
        raise ConfigError(f"class_order must list distinct classes in 0..{data.n_classes - 1}, got {order}")
    if increments is not None:
        increments = [int(k) for k in increments]
        if not increments or min(increments) < 1 or sum(increments) > len(order):
            raise ConfigError(f"increments must be task sizes >= 1 summing to at most {len(order)} classes, "
                              f"got {increments}")
        if classes_per_task is not None or n_tasks not in (None, len(increments)):
            raise ConfigError(f"increments {increments} fix {len(increments)} tasks; drop n_tasks / "
                              "classes_per_task")
    else:
        if n_tasks is None and classes_per_task is None:
            classes_per_task = 2
        if n_tasks is not None and n_tasks < 1:
            raise ConfigError(f"n_tasks must be at least 1, got {n_tasks}")
        if classes_per_task is None:
            if n_tasks > len(order):
                raise ConfigError(f"{n_tasks} tasks but only {len(order)} classes; use --n-tasks {len(order)} or "
                                  "fewer")
            classes_per_task = len(order) // n_tasks
        if classes_per_task < 1:
            raise ConfigError(f"classes_per_task must be at least 1, got {classes_per_task}")
        if n_tasks is None:
            n_tasks = len(order) // classes_per_task
        if n_tasks * classes_per_task > len(order):
            raise ConfigError(
                f"{n_tasks} tasks x {classes_per_task} classes needs {n_tasks * classes_per_task} classes, "
                f"{data.name} has {len(order)}; lower --n-tasks"
            )
        increments = [classes_per_task] * n_tasks
    n_tasks = len(increments)
    starts = [sum(increments[:i]) for i in range(n_tasks)]
    groups = [order[s:s + k] for s, k in zip(starts, increments)]
    if task_order is not None:
        if sorted(task_order) != list(range(n_tasks)):
            raise ConfigError(f"task_order must be a permutation of 0..{n_tasks - 1}, got {list(task_order)}")
        groups = [groups[i] for i in task_order]
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for classes in groups:
        tr = torch.isin(data.y_train, torch.tensor(classes)).nonzero().flatten()
        te = torch.isin(data.y_test, torch.tensor(classes)).nonzero().flatten()
        tr, va = _val_split(tr, val_fraction, g)
        tasks.append(Task(classes, tr, te, va))
    label_map, task_out = _tables(mode, groups, data.n_classes, shared_labels=False)
    # the record's warnings: files matching no published checksum, and a copy that differs from the reference
    # data (retain.data.Arrays.variant, e.g. CIFAR-10 re-encoded as JPEG)
    warning = "; ".join(w for w in (_unverified(data), getattr(data, "variant", "")) if w) or None
    sc = Scenario(f"split-{data.name}", mode, tasks, data.x_train, data.y_train, data.x_test, data.y_test,
                  label_map, task_out, mean=data.mean, std=data.std,
                  info={"class_order": order, "task_order": list(task_order or range(n_tasks)),
                        "source": data.source, "unverified": warning})
    return sc.to(device)


def _unverified(data: Arrays) -> str | None:
    """The record's warning when some of the data's files match no published checksum (see retain.data)."""
    from retain.data import unverified_warning

    return unverified_warning(data) if getattr(data, "unverified", ()) else None


def _same_classes(data: Arrays, mode: str, n_tasks: int, val_fraction: float, seed: int,
                  g: torch.Generator) -> tuple[list[Task], Tensor, Tensor]:
    _check_mode(mode)
    if n_tasks < 1:
        raise ConfigError(f"n_tasks must be at least 1, got {n_tasks}")
    classes = list(range(data.n_classes))
    tasks = []
    for _ in range(n_tasks):
        tr, va = _val_split(torch.arange(len(data.y_train)), val_fraction, g)
        tasks.append(Task(classes, tr, torch.arange(len(data.y_test)), va))
    label_map, task_out = _tables(mode, [classes] * n_tasks, data.n_classes, shared_labels=True)
    return tasks, label_map, task_out


def permuted(data: Arrays | Scenario, mode: str = "domain", n_tasks: int = 10,
             task_order: Sequence[int] | None = None, first_identity: bool = True, val_fraction: float = 0.0,
             seed: int = 0, device: str | torch.device = "cpu") -> Scenario:
    """Permuted tasks: one fixed random pixel permutation per task (task 0 unpermuted when ``first_identity``,
    as in van de Ven's code). In class-IL each task gets its own block of outputs (10 x T classes). ``data``: the
    dataset's arrays, or a scenario whose data to use (e.g. one made with :func:`from_tensors`)."""
    data = data.arrays() if isinstance(data, Scenario) else data
    g = torch.Generator().manual_seed(seed)
    tasks, label_map, task_out = _same_classes(data, mode, n_tasks, val_fraction, seed, g)
    d = int(torch.tensor(data.x_train.shape[1:]).prod())
    perms = torch.stack([torch.arange(d) if (i == 0 and first_identity) else torch.randperm(d, generator=g)
                         for i in range(n_tasks)])
    if task_order is not None:
        perms = perms[list(task_order)]
    sc = Scenario(f"permuted-{data.name}", mode, tasks, data.x_train, data.y_train, data.x_test, data.y_test,
                  label_map, task_out, "permute", perms, data.mean, data.std,
                  {"source": data.source, "unverified": _unverified(data)})
    return sc.to(device)


def rotated(data: Arrays | Scenario, mode: str = "domain", n_tasks: int = 10, angles: Sequence[float] | None = None,
            task_order: Sequence[int] | None = None, val_fraction: float = 0.0, seed: int = 0,
            device: str | torch.device = "cpu") -> Scenario:
    """Rotated tasks: task t rotates every image by ``angles[t]`` degrees (default: evenly over [0, 180)).
    ``data``: the dataset's arrays, or a scenario whose data to use."""
    data = data.arrays() if isinstance(data, Scenario) else data
    if data.x_train.dim() != 4:
        raise ConfigError("rotated scenarios need image data [N, C, H, W]")
    angles = list(angles) if angles is not None else [180.0 * i / n_tasks for i in range(n_tasks)]
    if len(angles) != n_tasks:
        raise ConfigError(f"{len(angles)} angles given for {n_tasks} tasks")
    if task_order is not None:
        angles = [angles[i] for i in task_order]
    g = torch.Generator().manual_seed(seed)
    tasks, label_map, task_out = _same_classes(data, mode, n_tasks, val_fraction, seed, g)
    rad = torch.tensor(angles, dtype=torch.float32) * math.pi / 180
    c, s = torch.cos(rad), torch.sin(rad)
    z = torch.zeros_like(c)
    theta = torch.stack([torch.stack([c, -s, z], 1), torch.stack([s, c, z], 1)], 1)  # [T, 2, 3]
    sc = Scenario(f"rotated-{data.name}", mode, tasks, data.x_train, data.y_train, data.x_test, data.y_test,
                  label_map, task_out, "rotate", theta, data.mean, data.std,
                  {"angles": angles, "source": data.source, "unverified": _unverified(data)})
    return sc.to(device)


def from_tensors(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, mode: str = "class",
                 name: str = "tensors", **split_kwargs) -> Scenario:
    """A class-split scenario from the user's own tensors (images uint8 in [0, 255] or float features)."""
    for nm, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise ConfigError(f"{nm}: {len(x)} inputs but {len(y)} labels")
    y_train, y_test = y_train.long(), y_test.long()
    if len(y_train) == 0 or int(y_train.min()) < 0 or (len(y_test) and int(y_test.min()) < 0):
        raise ConfigError("labels must be non-negative integers and the training set non-empty")
    n_classes = int(torch.cat([y_train, y_test]).max()) + 1
    return split(Arrays(name, x_train, y_train, x_test, y_test, n_classes, source="user tensors"), mode,
                 **split_kwargs)


def _materialise(ds: torch.utils.data.Dataset, stream: bool | None = None, name: str = "dataset",
                 num_workers: int | None = None) -> tuple[Tensor, Tensor]:
    """A data set's inputs and labels: stacked in memory, or (``stream``; by default when the inputs would take
    more than :data:`retain.images.STREAM_BYTES`) written once to an array file on disk, read by rows later."""
    from retain import images

    if stream or (stream is None and images.estimated_bytes(ds) > images.STREAM_BYTES):
        return images.stream_dataset(ds, name, num_workers)
    loader = torch.utils.data.DataLoader(ds, batch_size=1024, shuffle=False)
    xs, ys = [], []
    for x, y in loader:
        xs.append(torch.as_tensor(x))
        ys.append(torch.as_tensor(y))
    return torch.cat(xs), torch.cat(ys)


def from_dataset(train: torch.utils.data.Dataset, test: torch.utils.data.Dataset, mode: str = "class",
                 name: str = "dataset", stream: bool | None = None, num_workers: int | None = None,
                 **split_kwargs) -> Scenario:
    """A class-split scenario from any map-style ``(x, y)`` datasets, read once.

    Into tensors in memory; or, with ``stream`` (by default when a set's inputs, estimated from its first item,
    exceed 2 GiB), through a DataLoader with ``num_workers`` background workers (default min(4, CPUs)) into an
    array file under ``retain.data.cache_dir() / "datasets"``, whose rows each batch then reads from disk. Either
    way the runs see the same batches in the same order (the batch indices do not depend on where the rows are).
    """
    x_train, y_train = _materialise(train, stream, f"{name}-train", num_workers)
    x_test, y_test = _materialise(test, stream, f"{name}-test", num_workers)
    return from_tensors(x_train, y_train, x_test, y_test, mode=mode, name=name, **split_kwargs)


def si_blurry(sc: Scenario, disjoint: int = 50, blurred: int = 10, seed: int = 0) -> Scenario:
    """Si-Blurry (Moon et al., ICCV 2023): ``sc``'s classes and training rows re-dealt into its number of tasks as a
    stochastic incremental blurry stream, as the authors' ``OnlineSampler`` with ``rnd_NM`` draws it.

    ``disjoint`` % of the classes (chosen at random) are *disjoint*: their rows appear in one task only; the others
    are *blurry*. Each group is cut into the tasks at random points, so the number of classes per task varies.
    ``blurred`` % of all blurry-class rows leave their class's task: a random number of them from each task (random
    cut points over the total), pooled, shuffled and dealt back in the same numbers, so a task holds rows of
    classes that belong to other tasks, and classes are imbalanced within and across tasks. Each task's test set is
    its own classes' test rows; in class-IL every class keeps one output, in the order the tasks introduce them.

    Deviations, each for a reason: a draw that leaves a task without any class of its own is drawn again (its test
    column in R would be empty); every class is kept (the authors round the class counts down to multiples of the
    number of tasks, which drops classes); the rows that leave a task are a random draw (the authors take the first
    in the dataset's order, random on their shuffled datasets, sorted by class on others).
    """
    if sc.mode != "class":
        raise ConfigError(f"Si-Blurry is a class-incremental stream; use --mode class (got {sc.mode}-IL)")
    if sc.transform is not None:
        raise ConfigError("Si-Blurry re-deals classes; a permuted or rotated benchmark has the same classes in "
                          "every task: use a split benchmark")
    if not (0 <= disjoint <= 100 and 0 <= blurred <= 100):
        raise ConfigError(f"--si-blurry N,M takes two percentages in 0..100, got {disjoint},{blurred}")
    T = sc.n_tasks
    classes = [c for t in sc.tasks for c in t.classes]
    if len(classes) < T:
        raise ConfigError(f"Si-Blurry needs at least one class per task: {len(classes)} classes, {T} tasks")
    g = torch.Generator().manual_seed(seed)
    order = [classes[i] for i in torch.randperm(len(classes), generator=g).tolist()]
    n_dis = len(classes) * disjoint // 100
    dis, blur = order[:n_dis], order[n_dis:]

    def cut(items: list[int]) -> list[list[int]]:
        if not items:
            return [[] for _ in range(T)]
        at = [0] + sorted(torch.randint(0, len(items), (T - 1,), generator=g).tolist()) + [len(items)]
        return [items[a:b] for a, b in zip(at, at[1:])]

    for _ in range(1000):
        dis_t, blur_t = cut(dis), cut(blur)
        if all(d or b for d, b in zip(dis_t, blur_t)):
            break
    else:
        raise ConfigError(f"Si-Blurry could not give each of the {T} tasks a class of its own from {len(classes)} "
                          "classes; use fewer tasks")
    train_all = torch.cat([t.train_idx for t in sc.tasks])
    test_all = torch.cat([t.test_idx for t in sc.tasks]) if sc.y_test is not None else None
    y_all = sc.y_train[train_all.to(sc.y_train.device)].to(train_all.device)

    def rows(cs: list[int]) -> Tensor:
        r = train_all[torch.isin(y_all, torch.tensor(cs, dtype=y_all.dtype, device=y_all.device))]
        return r[torch.randperm(len(r), generator=g).to(r.device)]

    dis_rows = [rows(cs) for cs in dis_t]
    blur_rows = [rows(cs) for cs in blur_t]
    total = sum(len(r) for r in blur_rows) * blurred // 100
    moved = [0] * T
    if total > 0:
        at = [0] + sorted(torch.randint(0, total, (T - 1,), generator=g).tolist()) + [total]
        moved = [b - a for a, b in zip(at, at[1:])]
    pool = []
    for i in range(T):
        pool.append(blur_rows[i][:moved[i]])
        blur_rows[i] = blur_rows[i][moved[i]:]
    pool_t = torch.cat(pool) if pool else train_all[:0]
    pool_t = pool_t[torch.randperm(len(pool_t), generator=g).to(pool_t.device)]
    start = 0
    for i in range(T):
        blur_rows[i] = torch.cat([blur_rows[i], pool_t[start:start + moved[i]]])
        start += moved[i]
    new_order = [c for i in range(T) for c in dis_t[i] + blur_t[i]]
    n_classes = int(sc.label_map.shape[1])
    label_map = torch.full((T, n_classes), -1, dtype=torch.long)
    label_map[:, torch.tensor(new_order)] = torch.arange(len(new_order))
    task_out = torch.zeros(T, len(new_order), dtype=torch.bool)
    tasks = []
    for i in range(T):
        own = dis_t[i] + blur_t[i]
        tr = torch.cat([dis_rows[i], blur_rows[i]]).sort().values
        present = torch.unique(sc.y_train[tr.to(sc.y_train.device)]).cpu()
        task_out[i, label_map[i, present]] = True
        te = (test_all[torch.isin(sc.y_test[test_all.to(sc.y_test.device)].cpu(), torch.tensor(own))
                       .to(test_all.device)].sort().values if test_all is not None else train_all[:0])
        tasks.append(Task(own, tr, te, train_all[:0]))
    info = {**sc.info, "class_order": new_order,
            "si_blurry": {"disjoint": disjoint, "blurred": blurred, "seed": seed, "disjoint_classes": dis_t,
                          "blurry_classes": blur_t, "blurred_rows": total}}
    return replace(sc, name=f"si-blurry-{sc.name}", tasks=tasks, label_map=label_map.to(sc.label_map.device),
                   task_out=task_out.to(sc.task_out.device), info=info)


def per_class(sc: Scenario, train: int | None = None, test: int | None = None) -> Scenario:
    """``sc`` keeping only the first ``train`` training rows and ``test`` test rows of each class in each task (in
    the data's own order, e.g. sorted file names; validation rows are kept as split): a reduced protocol that
    another library can be given exactly. The scenario's ``info["reduced"]`` says what was kept."""

    def first(idx: Tensor, labels: Tensor, n: int | None) -> Tensor:
        if n is None or len(idx) == 0:
            return idx
        idx = idx.sort().values  # the data's order, whatever order the split stored
        y = labels[idx.to(labels.device)].to(idx.device)
        order = torch.argsort(y, stable=True)
        ys = y[order]
        starts = torch.searchsorted(ys, ys, right=False)  # first position of each row's class
        rank = torch.arange(len(ys), device=ys.device) - starts
        return idx[order[rank < n]].sort().values

    tasks = [Task(t.classes, first(t.train_idx, sc.y_train, train),
                  first(t.test_idx, sc.y_test, test) if sc.y_test is not None else t.test_idx, t.val_idx)
             for t in sc.tasks]
    kept = ", ".join(f"the first {n} {part} images per class" for n, part in ((train, "training"), (test, "test"))
                     if n)
    return replace(sc, tasks=tasks, info={**sc.info, "reduced": kept})
