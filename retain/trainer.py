"""The training loop, the context methods see, and the evaluator that fills the full accuracy matrix.

For each task: ``begin_task`` -> (re)build the optimizer -> ``task_data`` -> batches -> ``observe`` ->
``end_task`` -> evaluate every task's test set (unseen ones too). Before the first task the freshly initialised
model is evaluated once: the baseline ``b`` that forward transfer needs. A task-free run feeds one stream of
batches with no boundary calls and evaluates whenever a task's data has fully passed.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.checkpoint import Checkpointer, rng_state, set_rng_state
from retain.errors import ConfigError, RetainError
from retain.method import Method
from retain.scenarios import Batch, Scenario, TaskData

OPTIMIZERS = ("adam", "sgd")


class TrainingError(RetainError):
    """The run diverged (NaN / Inf loss); carries the task and step. CLI exit code 1."""

    exit_code = 1

    def __init__(self, message: str, task: int, step: int):
        super().__init__(message)
        self.task, self.step = task, step


@dataclass
class TrainConfig:
    """How each task is trained. ``iterations`` (steps per task), when set, replaces ``epochs``."""

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

    def validate(self) -> None:
        if self.epochs < 1 and self.iterations is None:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.iterations is not None and self.iterations < 1:
            raise ConfigError(f"iterations must be at least 1, got {self.iterations}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval batch size must be at least 1, got {self.eval_batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"learning rate must be a positive number, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not (self.momentum >= 0 and self.weight_decay >= 0 and math.isfinite(self.momentum + self.weight_decay)):
            raise ConfigError(f"momentum and weight decay must be finite numbers >= 0, got {self.momentum} and "
                              f"{self.weight_decay}")
        if not 0.0 <= self.blurry < 1.0:
            raise ConfigError(f"blurry must be in [0, 1), got {self.blurry}")


def resolve_device(name: str) -> torch.device:
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


def masked(out: Tensor, mask: Tensor | None) -> Tensor:
    """Logits with inactive outputs at -inf (so they get no probability and no gradient)."""
    return out if mask is None else out.masked_fill(~mask, float("-inf"))


@dataclass
class Context:
    """What a method sees: the model, the optimizer, the training view of the scenario, the current task."""

    model: nn.Module
    scenario: Scenario  # training view: no test set
    config: TrainConfig
    method: Method
    device: torch.device
    rng: torch.Generator  # the methods' own randomness (buffer sampling, Fisher labels...), CPU
    seen: Tensor  # bool [n_outputs]: outputs of the classes trained so far (class-IL training mask)
    task: int = 0
    step: int = 0  # global step count
    optimizer: torch.optim.Optimizer | None = None
    warnings: list[str] = field(default_factory=list)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """The method's forward (PNN and PackNet route by task); the one interface for training and evaluation."""
        return self.method.forward(self, x, t)

    def mask(self, t: Tensor | int) -> Tensor | None:
        """The training mask for rows of task(s) ``t`` (class-IL with ``all_outputs``: none, every output)."""
        return self.scenario.mask(t, None if self.config.all_outputs else self.seen)

    def loss(self, out: Tensor, batch: Batch, reduction: str = "mean") -> Tensor:
        """Mode-aware cross-entropy: logits masked as the scenario says (the same mask evaluation uses)."""
        logits = masked(out, self.mask(batch.t if batch.task is None else batch.task))
        return F.cross_entropy(logits, batch.y, reduction=reduction)

    def make_optimizer(self, params: list[nn.Parameter] | None = None, lr: float | None = None
                       ) -> torch.optim.Optimizer:
        c = self.config
        params = self.method.parameters(self.model) if params is None else params
        lr = c.lr if lr is None else lr
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay)
        return torch.optim.Adam(params, lr=lr, betas=c.betas, weight_decay=c.weight_decay)

    def batches(self, data: TaskData, epochs: int | None = None, iterations: int | None = None,
                batch_size: int | None = None, seed: int | None = None, start: int = 0) -> Iterator[Batch]:
        """Shuffled batches of ``data``: ``epochs`` passes, or exactly ``iterations`` steps (cycling passes).

        The order of pass ``e`` comes from a generator seeded with ``(seed, e)``, so it can be regenerated;
        ``start`` skips the first steps without building them (resuming a run mid-task).
        """
        bs = batch_size or self.config.batch_size
        n = len(data)
        if n == 0:
            return
        if iterations is None and epochs is None:
            epochs, iterations = self.config.epochs, self.config.iterations
        single = int(data.t[0]) if bool((data.t == data.t[0]).all()) else None
        base = self.config.seed * 1_000_003 + self.task * 7919 if seed is None else seed
        steps, epoch, skip = 0, 0, start
        while True:
            if iterations is None and epoch >= epochs:
                return
            g = torch.Generator().manual_seed(base + epoch)
            perm = torch.randperm(n, generator=g).to(data.idx.device)
            for begin in range(0, n, bs):
                if iterations is not None and steps >= iterations:
                    return
                if steps >= skip:
                    sel = perm[begin:begin + bs]
                    yield self.scenario.batch(data.idx[sel], single if single is not None else data.t[sel])
                steps += 1
            epoch += 1

    def fit(self, data: TaskData, epochs: int | None = None, optimizer: torch.optim.Optimizer | None = None,
            iterations: int | None = None) -> None:
        """Extra training on ``data`` with the method's own step (PackNet's retraining after pruning): ``epochs``
        passes or exactly ``iterations`` steps, in an order of its own (seeded by the run's seed and the task)."""
        if (epochs is None) == (iterations is None):
            raise ValueError("Context.fit needs epochs or iterations, not both")
        if optimizer is not None:
            self.optimizer = optimizer
        for batch in self.batches(data, epochs=epochs, iterations=iterations,
                                  seed=self.config.seed * 31 + self.task + 10_000):
            self.method.observe(self, batch)

    def warn(self, message: str) -> None:
        """A warning shown once and stored in the result."""
        if message not in self.warnings:
            self.warnings.append(message)


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


@torch.no_grad()
def evaluate(ctx: Context, scenario: Scenario, split: str = "test") -> list[float]:
    """Accuracy on every task's ``split`` set (evaluation mask: task-IL its head, class-IL all classes)."""
    modes = [(m, m.training) for m in ctx.model.modules()]  # restored per module: a method may keep some in eval
    ctx.model.eval()
    accs = []
    bs = ctx.config.eval_batch_size
    for j in range(scenario.n_tasks):
        idx = getattr(scenario.tasks[j], f"{split}_idx")
        if len(idx) == 0:
            accs.append(float("nan"))
            continue
        correct = torch.zeros((), dtype=torch.long, device=ctx.device)
        for start in range(0, len(idx), bs):
            b = scenario.batch(idx[start:start + bs], j, split)
            out = ctx.forward(b.x, b.t)
            correct += (masked(out, scenario.mask(j)).argmax(1) == b.y).sum()
        accs.append(int(correct) / len(idx))
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


Progress = Callable[[int, int, int, float], None]  # (task, step within task, steps in task, loss)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_method(method: Method, mode: str, task_free: bool) -> None:
    """Refuse a method in a mode it does not support, or on a task-free stream when it needs boundaries."""
    if mode not in method.modes:
        raise ConfigError(f"{method.name} does not support {mode}-IL; it supports "
                          f"{', '.join(method.modes)} (use --mode {method.modes[0]})")
    if task_free and method.needs_boundaries:
        raise ConfigError(f"{method.name} needs task boundaries and cannot run on a task-free stream; "
                          "drop --task-free or pick a method that works without boundaries")


def check_pairing(method: Method, scenario: Scenario, config: TrainConfig) -> None:
    """Refuse, before any training, a method in a mode it does not support or a task-free run it cannot do."""
    check_method(method, scenario.mode, config.task_free)
    check_all_outputs(config.all_outputs, scenario.mode)


def check_all_outputs(all_outputs: bool, mode: str) -> None:
    """``all_outputs`` changes only the class-IL training mask; elsewhere it would be silently ignored."""
    if all_outputs and mode != "class":
        raise ConfigError(f"all_outputs (--all-outputs) is for class-IL: in {mode}-IL the training outputs are "
                          f"fixed by the mode; drop it or use --mode class")


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
    """Refuse, before any training, a method whose memory (``Method.memory_estimate``) cannot fit on ``device``."""
    need = method.memory_estimate(scenario)
    if need <= 0:
        return
    free = available_memory(device)
    if free is not None and need > free:
        memory = ", ".join(f"{k}={v}" for k, v in method.params().items()
                           if any(h in k for h in ("buffer", "memory", "per_class"))) or "its memory size"
        raise ConfigError(f"{method.name} would need about {_size(need)} for its memory ({memory}) but only "
                          f"{_size(free)} is available on {device.type}; lower it")


def train(scenario: Scenario, method: Method, model: nn.Module, config: TrainConfig,
          progress: Progress | None = None, checkpointer: Checkpointer | None = None) -> Trained:
    """Train ``model`` with ``method`` on every task of ``scenario`` in turn; fill R and b.

    The model should be created after seeding (``torch.manual_seed(config.seed)``) for a reproducible run;
    :func:`retain.api.run` does that. With a ``checkpointer`` the full state is saved at every task boundary
    (and every ``checkpointer.every`` steps), and a run with a checkpoint to resume from continues where it
    stopped: the same batches, the same random draws, the same final matrix as an uninterrupted run.
    """
    config.validate()
    check_pairing(method, scenario, config)
    device = resolve_device(config.device)
    check_memory(method, scenario, device)
    scenario = scenario.to(device)
    model.to(device)
    view = scenario.train_view()
    ctx = Context(model, view, config, method, device, torch.Generator().manual_seed(config.seed + 17),
                  torch.zeros(scenario.n_outputs, dtype=torch.bool, device=device))
    T = scenario.n_tasks
    R = [[math.nan] * T for _ in range(T)]
    V = [[math.nan] * T for _ in range(T)] if config.evaluate_val else None
    clock = {"train_s": 0.0, "eval_s": 0.0}
    saved = checkpointer.load(device) if checkpointer is not None else None

    mark = time.perf_counter()  # when the training time not yet in clock["train_s"] started

    def lap() -> None:
        """Add the training time since the mark to the clock and move the mark to now."""
        nonlocal mark
        _sync(device)
        now = time.perf_counter()
        clock["train_s"] += now - mark
        mark = now

    def evaluate_row(i: int) -> None:
        _sync(device)
        t0 = time.perf_counter()
        R[i] = evaluate(ctx, scenario)
        if V is not None:
            V[i] = evaluate(ctx, scenario, "val")
        _sync(device)
        clock["eval_s"] += time.perf_counter() - t0

    def check_learned(task: int) -> None:
        """Warn when the task just trained is no better than a constant guess: a run can collapse (dead units,
        a step too large) while its loss stays finite, and nothing else would say so."""
        idx = scenario.tasks[task].test_idx
        if (scenario.y_test is None or len(idx) == 0 or math.isnan(R[task][task])
                or any("was not learned" in w for w in ctx.warnings)):  # the first such task says it
            return
        constant = float(torch.bincount(scenario.y_test[idx]).max()) / len(idx)
        if R[task][task] <= constant + 0.01:
            ctx.warn(f"task {task} was not learned: {R[task][task]:.1%} test accuracy right after training on it, "
                     f"no better than always answering its most frequent class ({constant:.1%}): the training "
                     "collapsed (try a lower learning rate) or was too short")

    def checkpoint(task: int, task_step: int, data: TaskData | None, boundary: bool = False) -> None:
        """Position ``(task, task_step)``: the next step to take; ``data`` is what the task iterates. At a task
        boundary the optimizer is rebuilt anyway (``begin_task`` may change the parameters), so only its state
        by parameter name is kept, for the next task to carry."""
        if checkpointer is None:
            return
        if not boundary:  # mid-task: the task's training time so far goes into the checkpoint too
            lap()
        checkpointer.save({
            "position": {"task": task, "task_step": task_step, "step": ctx.step},
            "model": ctx.model, "method": method.state_dict(),
            "optimizer": None if boundary or ctx.optimizer is None else ctx.optimizer.state_dict(),
            "optimizer_carry": optimizer_states(ctx.model, ctx.optimizer)
            if boundary and not config.reset_optimizer else None,
            "seen": ctx.seen, "data": data, "rng": rng_state(ctx), "R": R, "V": V, "baseline": baseline,
            "timings": dict(clock), "warnings": list(ctx.warnings)})

    def step(batch: Batch, task_step: int, n_steps: int) -> None:
        loss = method.observe(ctx, batch)
        ctx.step += 1
        value = float(loss)
        if not math.isfinite(value):
            raise TrainingError(f"loss became {value} at task {ctx.task}, step {task_step} "
                                f"(global step {ctx.step}); lower --lr or the method's strength",
                                ctx.task, ctx.step)
        if progress is not None:
            progress(ctx.task, task_step + 1, n_steps, value)

    def after_step(task_step: int, data: TaskData | None) -> None:
        """Checkpoint when due or when Ctrl-C asked to stop (then stop, with nothing lost)."""
        if checkpointer is None:
            return
        if checkpointer.due(ctx.step) or checkpointer.interrupted:
            checkpoint(ctx.task, task_step, data)
        if checkpointer.interrupted:
            raise KeyboardInterrupt

    start_task, start_step, data, carry = 0, 0, None, None
    if saved is None:
        t0 = time.perf_counter()
        baseline = evaluate(ctx, scenario)
        clock["eval_s"] += time.perf_counter() - t0
    else:
        # The whole model object comes back (structure a method added included); the optimizer is rebuilt
        # over its parameters and given its saved state; the RNGs are set last, after anything that draws.
        ctx.model = model = saved["model"].to(device)
        method.load_state_dict(saved["method"])
        ctx.seen = saved["seen"].to(device)
        ctx.step = saved["position"]["step"]
        ctx.warnings = list(saved["warnings"])
        R[:], baseline, clock = saved["R"], saved["baseline"], dict(saved["timings"])
        if V is not None and saved["V"] is not None:
            V[:] = saved["V"]
        start_task, start_step, data = saved["position"]["task"], saved["position"]["task_step"], saved["data"]
        carry = saved.get("optimizer_carry")
        if saved["optimizer"] is not None:
            ctx.task = start_task
            ctx.optimizer = ctx.make_optimizer()
            ctx.optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(ctx, saved["rng"])

    guard = checkpointer.guard() if checkpointer is not None else contextlib.nullcontext()
    with guard:
        if config.task_free:
            if saved is None:
                ctx.optimizer = ctx.make_optimizer()
            g = torch.Generator().manual_seed(config.seed)
            n_steps = math.ceil(sum(len(t.train_idx) for t in scenario.tasks) / config.batch_size)
            done_rows = sum(1 for row in R if not math.isnan(row[0])) if saved is not None else 0
            mark = time.perf_counter()
            for i, (idx, t, done) in enumerate(view.stream(config.batch_size, g, config.blurry)):
                if i < start_step:  # resuming: these steps were taken before the checkpoint
                    continue
                ctx.task = int(t[-1])
                if scenario.mode == "class":
                    ctx.seen |= scenario.task_out[t].any(0)
                step(view.batch(idx, t), i, n_steps)
                while done_rows < done:
                    lap()
                    evaluate_row(done_rows)
                    done_rows += 1
                    mark = time.perf_counter()
                after_step(i + 1, None)
            lap()
        else:
            for task in range(start_task, T):
                ctx.task = task
                if scenario.mode == "class":
                    ctx.seen |= scenario.task_out[task]
                _sync(device)
                mark = time.perf_counter()
                mid_task = data is not None and task == start_task
                if not mid_task:
                    if ctx.optimizer is not None and not config.reset_optimizer:
                        carry = optimizer_states(ctx.model, ctx.optimizer)
                    method.begin_task(ctx)
                    ctx.optimizer = ctx.make_optimizer()
                    if carry and not config.reset_optimizer:
                        carry_states(ctx.model, ctx.optimizer, carry)
                    carry = None
                    data = method.task_data(ctx, view.task_data(task))
                first = start_step if mid_task else 0
                n_steps = config.iterations or config.epochs * math.ceil(len(data) / config.batch_size)
                for i, batch in enumerate(ctx.batches(data, start=first), start=first):
                    step(batch, i, n_steps)
                    after_step(i + 1, data)
                method.end_task(ctx)
                lap()
                evaluate_row(task)
                check_learned(task)
                data = None
                if task + 1 < T:
                    checkpoint(task + 1, 0, None, boundary=True)
    return Trained(R, baseline, dict(clock), list(ctx.warnings), V)
