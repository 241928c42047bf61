"""The training loop and the evaluator that fills the full accuracy matrix.

:class:`Trainer` runs one experiment. Before the first task the freshly initialised model is evaluated once: the
baseline ``b`` that forward transfer needs. Then, for each task: ``begin_task`` -> a fresh optimizer (given the
state the last one had, unless ``reset_optimizer``) -> ``task_data`` -> its batches, one ``observe`` each ->
``end_task`` -> every task's test set is evaluated (unseen ones too): row ``i`` of R. A task-free run feeds one
stream of batches with no boundary calls and fills a row whenever a task's data has fully passed.

Beside the maths, never inside it: a :class:`Clock` times training and evaluation at phase switches; the losses
stay on the device (:class:`Losses`) and are read a block at a time, at progress draws (at most ten a second and
at each task's end), at checkpoints and at evaluations, so no step waits for the device, and a non-finite loss
still stops the run naming its task and step. A :class:`retain.checkpoint.Checkpointer` saves
:meth:`Trainer.state_dict` and hands it back to :meth:`Trainer.load_state_dict` to resume exactly.

The configuration is checked once, before (``config.resolve()``); the trainer checks only what depends on the
machine it runs on: the device, and whether the method's memory fits.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from retain.checkpoint import Checkpointer, CheckpointError
from retain.context import Context, masked
from retain.errors import ConfigError, RetainError
from retain.method import Method
from retain.scenarios import Batch, Scenario, TaskData

__all__ = ["Context", "Progress", "TrainConfig", "Trained", "Trainer", "TrainingError", "evaluate", "masked",
           "resolve_device", "train"]

READ_EVERY = 100  # steps between reads of the losses when nothing else reads them (a read waits for the device)
DRAW_EVERY_S = 0.1  # the shortest time between two progress reports


class TrainingError(RetainError):
    """The run diverged (NaN / Inf loss); carries the task and step. CLI exit code 1."""

    exit_code = 1

    def __init__(self, message: str, task: int, step: int):
        super().__init__(message)
        self.task, self.step = task, step


@dataclass
class TrainConfig:
    """How each task is trained. ``iterations`` (steps per task), when set, replaces ``epochs``. Taken as it is:
    the run's options are checked once, by ``retain.config.resolve()``, before a TrainConfig is made."""

    epochs: int = 1
    iterations: int | None = None
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0  # SGD only
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # Adam only
    eval_batch_size: int = 1000
    seed: int = 0
    device: str = "auto"
    task_free: bool = False  # one stream, no task boundaries given to the method
    blurry: float = 0.0  # task-free only: width of the blurred transitions (see Scenario.stream)
    evaluate_val: bool = False  # also fill the accuracy matrix on the validation split (for model selection)
    # False (van de Ven's and Hsu et al.'s reference code): the optimizer's state — Adam's moments, SGD's
    # momentum — carries over task boundaries; parameters a method adds start fresh. True: a fresh optimizer per task.
    reset_optimizer: bool = False
    # class-IL only. False (van de Ven's and Hsu et al.'s code): the training cross-entropy spans the classes seen so
    # far. True (Mammoth's code, the DER protocol): it spans every output from the first task, so the outputs of
    # classes still to come are pushed down; evaluation is over all classes either way.
    all_outputs: bool = False
    augment: str = "none"  # the training augmentation pipeline (retain.augment.PIPELINES); never at evaluation
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of forward and loss (fp16 with a gradient scaler)
    channels_last: bool = False  # image models and batches in channels-last memory layout
    compile: bool = False  # torch.compile the model
    devices: int = 1  # data-parallel processes (retain.distributed)
    eval_every: int | None = None  # anytime evaluation: every task's test set every N incoming training samples
    count_flops: bool = False  # count the training's FLOPs (torch.utils.flop_counter; slows the run down)


def resolve_device(name: str) -> torch.device:
    """The torch device a ``--device`` name means here (auto: CUDA when present); a ConfigError if unusable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r} cannot train; use auto, cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for but no CUDA device is available; use --device cpu")
    return dev


@torch.no_grad()
def evaluate(ctx: Context, scenario: Scenario, split: str = "test", within_task: list[float] | None = None,
             top5: list[float] | None = None) -> list[float]:
    """Accuracy on every task's ``split`` set (evaluation mask: task-IL its head, class-IL all classes).

    ``within_task`` (a list to fill; class-IL): the same model's accuracy when each task's rows are scored among
    that task's own classes only, from the same forward pass; what Mammoth reports as "Task-IL" for a class-IL run
    (the DER table's second number), as opposed to a task-IL run, which also trains per task. ``top5`` (a list to
    fill): the share of each task's rows whose class is among the five highest scores (of the evaluation mask's)."""
    modes = [(m, m.training) for m in ctx.model.modules()]  # restored per module: a method may keep some in eval
    ctx.model.eval()
    accs = []
    bs = ctx.config.eval_batch_size
    for j in range(scenario.n_tasks):
        idx = getattr(scenario.tasks[j], f"{split}_idx")
        if len(idx) == 0:
            accs.append(float("nan"))
            for extra in (within_task, top5):
                if extra is not None:
                    extra.append(float("nan"))
            continue
        correct = torch.zeros((), dtype=torch.long, device=ctx.device)
        among = torch.zeros((), dtype=torch.long, device=ctx.device)
        in_top5 = torch.zeros((), dtype=torch.long, device=ctx.device)
        for start in range(0, len(idx), bs):
            b = scenario.batch(idx[start:start + bs], j, split)
            out = ctx.forward(b.x, b.t)
            scores = masked(out, scenario.mask(j))
            correct += (scores.argmax(1) == b.y).sum()
            if within_task is not None:
                among += (masked(out, scenario.task_out[j]).argmax(1) == b.y).sum()
            if top5 is not None:
                k = min(5, scores.shape[1])
                in_top5 += (scores.topk(k, dim=1).indices == b.y[:, None]).any(1).sum()
        accs.append(int(correct) / len(idx))
        if within_task is not None:
            within_task.append(int(among) / len(idx))
        if top5 is not None:
            top5.append(int(in_top5) / len(idx))
    for m, training in modes:
        m.training = training
    return accs


@dataclass
class Trained:
    """What :func:`train` returns: the matrices, the timings and the warnings (the record adds config/versions)."""

    accuracy_matrix: list[list[float]]
    baseline: list[float]
    timings: dict[str, float]
    warnings: list[str]
    val_matrix: list[list[float]] | None = None
    task_il_matrix: list[list[float]] | None = None  # class-IL: R with each task scored among its own classes
    top5: list[float] | None = None  # class-IL: the final model's top-5 accuracy on each task
    anytime: dict[str, Any] | None = None  # --eval-every: {"every", "test_sizes", "points", "eval_s"}
    compute: dict[str, Any] | None = None  # --count-flops: the counted FLOPs of the steps and the task boundaries
    trainable: int = 0  # the most parameters (elements) any task's optimizer trained


Progress = Callable[[int, int, int, float], None]  # (task, step within task, steps in task, loss)


def optimizer_states(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, dict]:
    """The optimizer's per-parameter state keyed by parameter name (survives a method replacing the optimizer
    or adding parameters, and a checkpoint)."""
    if optimizer is None:
        return {}
    return {n: dict(optimizer.state[p]) for n, p in model.named_parameters() if p in optimizer.state}


def carry_states(model: nn.Module, optimizer: torch.optim.Optimizer, states: dict[str, dict]) -> None:
    """Give ``optimizer`` the saved state of each of its parameters that has one of matching shape."""
    mine = {p for g in optimizer.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        s = states.get(n)
        if p in mine and s and all(v.shape == p.shape for v in s.values() if torch.is_tensor(v) and v.dim() > 0):
            optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in s.items()}


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: MemAvailable of /proc/meminfo (else the free pages) on the
    CPU, the free device memory on CUDA; None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def check_memory(method: Method, scenario: Scenario, device: torch.device) -> None:
    """Refuse, before any training, a method whose memory (``Method.memory``) cannot fit on ``device``."""
    memory = method.memory(scenario)
    if memory.bytes <= 0:
        return
    free = available_memory(device)
    if free is not None and memory.bytes > free:
        raise ConfigError(f"{method.name} would need about {_size(memory.bytes)} for its memory ({memory.rows} "
                          f"stored rows) but only {_size(free)} is available on {device.type}; lower its memory "
                          "size (see `retain methods`)")


# ------------------------------------------------------------------------------------------ beside the maths

class Clock:
    """Seconds per phase (``train_s``, ``eval_s``): a phase runs from one :meth:`switch` to the next. On CUDA a
    switch waits for the queued kernels, so their time lands in the phase that queued them; nothing else waits."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {"train_s": 0.0, "eval_s": 0.0}
        self.phase: str | None = None
        self.since = 0.0

    def switch(self, phase: str | None) -> str | None:
        """End the current phase, start ``phase`` (None: no clock runs); return the phase that ended."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self.phase is not None:
            self.seconds[self.phase] += now - self.since
        previous, self.phase, self.since = self.phase, phase, now
        return previous

    @contextlib.contextmanager
    def __call__(self, phase: str | None) -> Iterator[None]:
        """``with clock("eval_s"):`` time the block as ``phase``, then go back to the phase that was running."""
        previous = self.switch(phase)
        try:
            yield
        finally:
            self.switch(previous)


FLOP_COUNTER = ("torch.utils.flop_counter: matrix products, convolutions and attention, forward and backward, 2 "
                "FLOPs per multiply-add; elementwise operations and the optimizer's update are not counted")


class Flops:
    """The training's floating-point operations, counted around each step and each task boundary (``begin_task``
    with ``task_data``, ``end_task``: herding, retraining, finetuning ...); evaluation is not counted.

    Each operation is counted by the formula torch's FLOP counter has for it (``torch.utils.flop_counter.
    flop_registry``: the counts of ``FlopCounterMode``), from a dispatch mode that keeps only the total (FlopCounterMode
    also tracks modules, which made a small MLP's step 12 times slower; this 3.5 times). A counted run is still slower:
    its ``train_s`` says nothing about speed."""

    def __init__(self) -> None:
        self.steps, self.step_flops, self.boundary_flops = 0, 0, 0

    @contextlib.contextmanager
    def count(self, step: bool) -> Iterator[None]:
        counter = _FlopCounter()
        with counter:
            yield
        if step:
            self.steps, self.step_flops = self.steps + 1, self.step_flops + counter.total
        else:
            self.boundary_flops += counter.total

    def record(self) -> dict[str, Any]:
        return {"train_flops": self.step_flops + self.boundary_flops, "steps": self.steps,
                "flops_per_step": self.step_flops / self.steps if self.steps else 0.0,
                "step_flops": self.step_flops, "boundary_flops": self.boundary_flops, "counter": FLOP_COUNTER}


class _FlopCounter(TorchDispatchMode):
    """The total of torch's FLOP formulas (``flop_registry``) over the operations run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


class Losses:
    """The step losses, kept on the device that computed them and read back a block at a time (one sync per
    block, none per step). A read raises :class:`TrainingError` at the block's first non-finite loss, naming its
    task and step exactly."""

    def __init__(self, device: torch.device, size: int = READ_EVERY):
        self.values = torch.zeros(size, device=device)
        self.slots = self.values.unbind()  # one view per step, made once
        self.where: list[tuple[int, int, int]] = []  # (task, step within the task, global step) of each value
        self.last = math.nan  # the latest loss read
        self.on_read: Callable[[list[float], list[tuple[int, int, int]]], None] | None = None  # the loggers

    def add(self, loss: Tensor | float, where: tuple[int, int, int]) -> bool:
        """Keep ``loss`` (no read); True when the block is full and should be read."""
        loss = loss.detach() if isinstance(loss, Tensor) else torch.tensor(float(loss))
        self.slots[len(self.where)].copy_(loss.reshape(()) if loss.dim() else loss)
        self.where.append(where)
        return len(self.where) == len(self.slots)

    def read(self) -> float:
        """Check the losses kept since the last read; return the latest one."""
        if self.where:
            values = self.values[:len(self.where)].tolist()
            for value, (task, step, global_step) in zip(values, self.where):
                if not math.isfinite(value):
                    raise TrainingError(f"loss became {value} at task {task}, step {step} (global step "
                                        f"{global_step}); lower --lr or the method's strength", task, global_step)
            self.last = values[-1]
            if self.on_read is not None:
                self.on_read(values, list(self.where))
            self.where.clear()
        return self.last


def _rng_state(ctx_rng: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "ctx": ctx_rng.get_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(ctx_rng: torch.Generator, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    ctx_rng.set_state(state["ctx"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------- the loop

class Trainer:
    """One run of ``method`` on ``scenario``: the task loop or the stream loop, one step, the rows of R.

    Its position is ``(task, task_step)``: the next step to take (of the stream when task-free). ``data`` is what
    the current task iterates once it has begun (None at a boundary); ``carry`` the optimizer's state by
    parameter name when a run resumes at a boundary. :meth:`state_dict` holds everything a resume needs.
    """

    FORMAT = 2  # of state_dict(); bump it when the layout changes (older checkpoints are then refused)

    def __init__(self, scenario: Scenario, method: Method, model: nn.Module, config: TrainConfig,
                 progress: Progress | None = None, checkpointer: Checkpointer | None = None, loggers: Any = None):
        self.device = resolve_device(config.device)
        check_memory(method, scenario, self.device)  # the free memory is known only now, on this machine
        self.scenario = scenario.to(self.device)
        self.view = self.scenario.train_view()
        self.method, self.config, self.progress, self.checkpointer = method, config, progress, checkpointer
        model = model.to(self.device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if config.compile:
            model.compile()  # in place: parameter names, .features and the pickled checkpoint stay the module's
        self.ctx = Context(model, self.view, config, method, self.device,
                           torch.Generator().manual_seed(config.seed + 17),
                           torch.zeros(scenario.n_outputs, dtype=torch.bool, device=self.device))
        if config.augment != "none":
            from retain import augment

            if scenario.transform == "permute":
                raise ConfigError(f"--augment {config.augment} would crop and flip permuted pixels, which are no "
                                  "longer an image; use --augment none on a permuted scenario")

            self.ctx.augment = augment.build(config.augment, scenario.mean, scenario.std, scenario.input_shape)
        if config.precision == "fp16":
            self.ctx.scaler = torch.amp.GradScaler(self.device.type)
        from retain import distributed

        self.ctx.world = distributed.current()  # data-parallel when this process is one of several (api.execute)
        T = scenario.n_tasks
        self.R = [[math.nan] * T for _ in range(T)]
        self.V = [[math.nan] * T for _ in range(T)] if config.evaluate_val else None
        # class-IL: each row also scored within each task's own classes (Mammoth's "Task-IL" of the same model)
        self.R_task = [[math.nan] * T for _ in range(T)] if scenario.mode == "class" else None
        self.baseline: list[float] = []
        self.task, self.task_step = 0, 0
        self.data: TaskData | None = None
        self.carry: dict[str, dict] | None = None
        self.top5: list[float] | None = [] if scenario.mode == "class" else None  # of the latest row
        # anytime evaluation (--eval-every): the samples the method has been given, the curve, its next point
        self.samples, self.next_eval, self.anytime_s = 0, config.eval_every, 0.0
        self.curve: list[dict[str, Any]] | None = [] if config.eval_every else None
        self.flops = Flops() if config.count_flops else None
        self.trainable = 0
        self.clock, self.losses, self.drawn = Clock(self.device), Losses(self.device), 0.0
        self.loggers = loggers  # retain.loggers.Loggers, or None
        if loggers is not None:
            self.losses.on_read = loggers.losses

    def run(self) -> Trained:
        """Resume from the checkpoint if there is one (else evaluate the untrained model: b), then train."""
        saved = self.checkpointer.load(self.device) if self.checkpointer is not None else None
        if saved is not None:
            self.load_state_dict(saved)
            self.checkpointer.resumed_from = self.position()
        else:
            with self.clock("eval_s"):
                self.baseline = self.evaluate()
        guard = self.checkpointer.guard() if self.checkpointer is not None else contextlib.nullcontext()
        try:
            with guard:
                self.train_stream() if self.config.task_free else self.train_tasks()
        except Exception as e:
            if not isinstance(e, TrainingError):
                self.losses.read()  # a loss that went non-finite before the failure is its cause
            raise
        anytime = None
        if self.curve is not None:
            sizes = [len(task.test_idx) for task in self.scenario.tasks]
            anytime = {"every": self.config.eval_every, "test_sizes": sizes, "points": self.curve,
                       "eval_s": self.anytime_s}
        return Trained(self.R, self.baseline, dict(self.clock.seconds), list(self.ctx.warnings), self.V, self.R_task,
                       self.top5, anytime, self.flops.record() if self.flops is not None else None, self.trainable)

    def counted(self, step: bool) -> Any:
        """Count the FLOPs of the block (``--count-flops``), as a step or as boundary work; else nothing."""
        return self.flops.count(step) if self.flops is not None else contextlib.nullcontext()

    def train_tasks(self) -> None:
        """Each task in turn: begin it (unless resumed inside it), its steps, ``end_task``, a row of R, and a
        checkpoint at the boundary."""
        ctx, c, T = self.ctx, self.config, self.scenario.n_tasks
        for task in range(self.task, T):
            self.task = ctx.task = task
            if self.scenario.mode == "class":
                ctx.seen |= self.scenario.task_out[task]
            with self.clock("train_s"):
                if self.data is None:
                    with self.counted(step=False):
                        self.begin_task(task)
                n_steps = c.iterations or c.epochs * math.ceil(len(self.data) / c.batch_size)
                for batch in ctx.batches(self.data, start=self.task_step):
                    self.step(batch, n_steps)
                    self.maybe_evaluate(ends_task=self.task_step >= n_steps)
                    self.maybe_checkpoint()
                self.report(n_steps, final=True)
                with self.counted(step=False):
                    self.method.end_task(ctx)
            self.evaluate_row(task)
            self.check_learned(task)
            self.task, self.task_step, self.data = task + 1, 0, None
            if task + 1 < T and self.checkpointer is not None:
                self.checkpoint()

    def train_stream(self) -> None:
        """Task-free: one stream of batches and no boundary calls; a row of R once a task's data has all passed."""
        ctx, c = self.ctx, self.config
        if ctx.optimizer is None:
            ctx.optimizer = ctx.make_optimizer()
            self.count_trainable()
        stream = list(self.view.stream(c.batch_size, torch.Generator().manual_seed(c.seed), c.blurry, c.epochs))
        last_task = torch.stack([t[-1] for _, t, _ in stream]).tolist()  # read once, not once per step
        rows = sum(not math.isnan(row[0]) for row in self.R)  # rows filled (before a resume)
        from retain.images import DiskArray, prefetch

        batches = (self.view.batch(idx, t) for idx, t, _ in stream[self.task_step:])
        if isinstance(self.view.x_train, DiskArray):  # the next batches' rows read while this step runs
            batches = prefetch(batches, depth=2)
        with self.clock("train_s"):
            for i, batch in zip(range(self.task_step, len(stream)), batches):
                _, t, done = stream[i]
                self.task = ctx.task = last_task[i]
                if self.scenario.mode == "class":
                    ctx.seen |= self.scenario.task_out[t].any(0)
                self.step(batch, len(stream))
                self.maybe_evaluate(ends_task=rows < done)
                while rows < done:
                    self.evaluate_row(rows)
                    rows += 1
                self.maybe_checkpoint()
            self.report(len(stream), final=True)

    def begin_task(self, task: int) -> None:
        """``begin_task``, then a fresh optimizer over what the method trains now, given the state its parameters
        had in the last one (unless ``reset_optimizer``), then the task's data (``task_data``)."""
        ctx = self.ctx
        carry = None if self.config.reset_optimizer else self.carried()
        self.method.begin_task(ctx)
        ctx.optimizer = ctx.make_optimizer()
        self.count_trainable()
        if carry:
            carry_states(ctx.model, ctx.optimizer, carry)
        self.carry, self.task_step = None, 0
        self.data = self.method.task_data(ctx, self.view.task_data(task))

    def count_trainable(self) -> None:
        """Keep the largest number of parameters an optimizer of this run trains (the record's ``trainable``: APER
        trains its adapter on the first task only, the prompt methods grow their pools)."""
        n = sum(p.numel() for g in self.ctx.optimizer.param_groups for p in g["params"] if p.requires_grad)
        self.trainable = max(self.trainable, n)

    def carried(self) -> dict[str, dict]:
        """The optimizer's state by parameter name: what the next task's optimizer starts from."""
        if self.ctx.optimizer is None:
            return self.carry or {}
        return optimizer_states(self.ctx.model, self.ctx.optimizer)

    def step(self, batch: Batch, n_steps: int) -> None:
        """One step of the method; its loss stays on the device until a read (a full block, a progress draw)."""
        with self.counted(step=True):
            loss = self.method.observe(self.ctx, batch)
        self.ctx.step += 1
        self.samples += len(batch)
        if self.losses.add(loss, (self.ctx.task, self.task_step, self.ctx.step)):
            self.losses.read()
        self.task_step += 1
        if self.progress is not None and self.task_step < n_steps:  # the task's end draws anyway
            self.report(n_steps)

    def report(self, n_steps: int, final: bool = False) -> None:
        """Read the losses and draw progress: at most every ``DRAW_EVERY_S`` seconds, and at the task's end."""
        now = time.monotonic()
        if final or now - self.drawn >= DRAW_EVERY_S:
            loss = self.losses.read()
            if self.progress is not None:
                self.progress(self.ctx.task, self.task_step, n_steps, loss)
            self.drawn = now

    def evaluate_row(self, i: int) -> None:
        """Row ``i`` of R (and of the validation matrix): every task's accuracy now that task ``i`` is trained; with
        anytime evaluation the row is also the curve's point at the task's end."""
        self.losses.read()
        with self.clock("eval_s"):
            self.R[i] = self.evaluate(within_task=self.R_task[i] if self.R_task is not None else None,
                                      top5=self.top5)
            if self.V is not None:
                self.V[i] = self.evaluate("val")
        if self.curve is not None:
            self.curve.append({"samples": self.samples, "task": i, "acc": list(self.R[i]), "end": True})
        if self.loggers is not None:
            self.loggers.row(i, self.R[i])
            if self.curve is not None:
                self.loggers.point(self.curve[-1])

    def maybe_evaluate(self, ends_task: bool) -> None:
        """Anytime evaluation: a point of the curve each time another ``eval_every`` samples have been trained on
        (none at a task's last step: the task's end, right after, gives that point as a row of R)."""
        every = self.config.eval_every
        if self.curve is None or self.samples < self.next_eval:
            return
        while self.next_eval <= self.samples:
            self.next_eval += every
        if ends_task:
            return
        before = self.clock.seconds["eval_s"]
        with self.clock("eval_s"):
            acc = self.evaluate()
        self.anytime_s += self.clock.seconds["eval_s"] - before  # the clock's own seconds: part of eval_s
        self.curve.append({"samples": self.samples, "task": self.task, "acc": acc, "end": False})
        if self.loggers is not None:
            self.loggers.point(self.curve[-1])

    def evaluate(self, split: str = "test", within_task: list[float] | None = None,
                 top5: list[float] | None = None) -> list[float]:
        """Every task's accuracy on ``split``; data-parallel, with rank 0's BatchNorm statistics everywhere."""
        if self.ctx.world is not None:
            from retain import distributed

            distributed.broadcast_buffers(self.ctx.model, self.ctx.world)
        for extra in (within_task, top5):
            if extra is not None:
                extra.clear()
        return evaluate(self.ctx, self.scenario, split, within_task, top5)

    def check_learned(self, task: int) -> None:
        """Warn when the task just trained is no better than a constant guess: a run can collapse (dead units,
        a step too large) while its loss stays finite, and nothing else would say so."""
        sc, acc = self.scenario, self.R[task][task]
        idx = sc.tasks[task].test_idx
        if (sc.y_test is None or len(idx) == 0 or math.isnan(acc)
                or any("was not learned" in w for w in self.ctx.warnings)):  # the first such task says it
            return
        constant = float(torch.bincount(sc.y_test[idx]).max()) / len(idx)
        if self.R_task is not None and self.R_task[task][task] > constant + 0.01:
            return  # class-IL: learned within its own classes, and losing to other tasks' classes (forgetting-like)
        if acc <= constant + 0.01:
            self.ctx.warn(f"task {task} was not learned: {acc:.1%} test accuracy right after training on it, "
                          f"no better than always answering its most frequent class ({constant:.1%}): the "
                          "training collapsed (try a lower learning rate) or was too short")

    # ------------------------------------------------------------------------------------------ checkpoints
    def maybe_checkpoint(self) -> None:
        """Checkpoint when due or when Ctrl-C asked to stop (then stop, with nothing lost)."""
        ck = self.checkpointer
        if ck is not None and (ck.due(self.ctx.step) or ck.interrupted):
            self.checkpoint()
            if ck.interrupted:
                raise KeyboardInterrupt

    def checkpoint(self) -> None:
        """Save :meth:`state_dict` (after checking the losses: a diverged run is not saved); not timed."""
        self.losses.read()
        with self.clock(None):
            self.checkpointer.save(self.state_dict())

    def position(self) -> dict[str, int]:
        return {"task": self.task, "task_step": self.task_step, "step": self.ctx.step}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs. The whole model object (structure a method grew comes back too) and the
        method's state go into one pickle, so references a method keeps to the parameters come back shared.
        Inside a task (or a stream) the optimizer's own state; at a boundary, where ``begin_task`` may change
        the parameters, only its state by parameter name, for the next task's optimizer to carry."""
        ctx, inside = self.ctx, self.config.task_free or self.data is not None
        return {"format": self.FORMAT, "position": self.position(), "model": ctx.model,
                "method": self.method.state_dict(),
                "optimizer": ctx.optimizer.state_dict() if inside and ctx.optimizer is not None else None,
                "optimizer_carry": None if inside or self.config.reset_optimizer else self.carried(),
                "seen": ctx.seen, "data": self.data, "rng": _rng_state(ctx.rng), "R": self.R, "V": self.V,
                "R_task": self.R_task, "top5": self.top5,
                "anytime": {"samples": self.samples, "next": self.next_eval, "curve": self.curve, "s": self.anytime_s},
                "flops": self.flops, "trainable": self.trainable,
                "baseline": self.baseline, "timings": dict(self.clock.seconds), "warnings": list(ctx.warnings)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the optimizer is rebuilt over the restored model's parameters and
        given its state; the RNGs are set last, after anything that draws."""
        if state.get("format") != self.FORMAT:
            raise CheckpointError(f"this checkpoint holds a trainer state of format {state.get('format')}, but "
                                  f"this version reads format {self.FORMAT}; delete it to start the run afresh")
        ctx = self.ctx
        ctx.model = state["model"].to(self.device)
        self.method.load_state_dict(state["method"])
        ctx.seen = state["seen"].to(self.device)
        self.task, self.task_step, ctx.step = (state["position"][k] for k in ("task", "task_step", "step"))
        ctx.task, ctx.warnings = self.task, list(state["warnings"])
        self.R, self.baseline, self.clock.seconds = state["R"], state["baseline"], dict(state["timings"])
        if self.V is not None and state["V"] is not None:
            self.V = state["V"]
        if self.R_task is not None and state.get("R_task") is not None:
            self.R_task = state["R_task"]
        if self.top5 is not None and state.get("top5") is not None:
            self.top5 = state["top5"]
        if self.flops is not None and state.get("flops") is not None:
            self.flops = state["flops"]
        self.trainable = state.get("trainable", 0)
        anytime = state.get("anytime") or {}
        self.samples = anytime.get("samples", 0)
        if self.curve is not None and anytime.get("curve") is not None:  # a run that recorded its curve before
            self.curve, self.next_eval, self.anytime_s = anytime["curve"], anytime["next"], anytime["s"]
        self.data, self.carry, ctx.optimizer = state["data"], state["optimizer_carry"], None
        if state["optimizer"] is not None:
            ctx.optimizer = ctx.make_optimizer()
            ctx.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(ctx.rng, state["rng"])


def train(scenario: Scenario, method: Method, model: nn.Module, config: TrainConfig,
          progress: Progress | None = None, checkpointer: Checkpointer | None = None, loggers: Any = None) -> Trained:
    """Train ``model`` with ``method`` on every task of ``scenario`` in turn; fill R and b.

    The configuration is trusted: ``config.resolve()`` has checked it, and the method's pairing with the
    scenario, once before. The model should be created after seeding (``torch.manual_seed(config.seed)``) for a
    reproducible run; :func:`retain.api.run` does that. With a ``checkpointer`` the full state is saved at every
    task boundary (and every ``checkpointer.every`` steps), and a run with a checkpoint to resume from continues
    where it stopped: the same batches, the same random draws, the same final matrix as an uninterrupted run.
    """
    _warm_up_optimizers()
    return Trainer(scenario, method, model, config, progress, checkpointer, loggers).run()


_warmed_up = False


def _warm_up_optimizers() -> None:
    """Take torch.optim's one-time cost before any clock starts: the first optimizer step of a process imports
    machinery (about 3 s on this machine with torch 2.13), which would otherwise be charged to the first run's
    ``train_s`` alone (fine-tuning then looked ten times slower than EWC in a compare table). A scalar, no RNG."""
    global _warmed_up
    if _warmed_up:
        return
    p = torch.zeros(1, requires_grad=True)
    (2 * p).sum().backward()
    for opt in (torch.optim.Adam([p]), torch.optim.SGD([p], lr=0.1, momentum=0.9)):
        opt.step()
    _warmed_up = True
