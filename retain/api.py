"""The Python API: one call from a configuration (or the user's own scenario and model) to a result record.

>>> import retain
>>> result = retain.run(benchmark="split-digits", method="joint", mode="class", quiet=True)
>>> result.metrics["acc"] > 0.8
True

Configuration resolves in one order: the benchmark's protocol defaults < the method's preset for that
benchmark and mode < the user's values (config file, then command-line flags).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import resource
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import retain
from retain import benchmarks
from retain.checkpoint import Checkpointer
from retain.data import check_pad
from retain.errors import ConfigError
from retain.method import Method, create
from retain.metrics import all_metrics
from retain.models import build_model, parse_hidden
from retain.scenarios import MODES, Scenario
from retain.trainer import Progress, TrainConfig, check_all_outputs, check_method, train


@dataclass
class RunConfig:
    """Everything that defines a run. ``None`` means "the benchmark's default"."""

    benchmark: str = "split-digits"
    method: str = "finetune"
    mode: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # method hyper-parameters (over the preset)
    n_tasks: int | None = None
    arch: str | None = None
    hidden: tuple[int, ...] | None = None
    epochs: int | None = None
    iterations: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    reset_optimizer: bool = False  # a fresh optimizer per task (the default carries its state, as the papers' code)
    all_outputs: bool = False  # class-IL: train over every output from the first task (Mammoth), not the seen ones
    normalize: tuple[float, float] | None = None  # inputs (x - mean) / std on [0, 1] pixels (Hsu's MNIST: 0.1, 0.2752)
    pad: int | None = None  # zero pixels added around each image before permuting (van de Ven's P2 loader: 2)
    seed: int = 0
    device: str = "auto"
    val_fraction: float = 0.0
    task_free: bool = False
    blurry: float = 0.0
    class_order: list[int] | None = None
    task_order: list[int] | None = None
    data_dir: str | None = None
    download: bool = False

    def resolved(self) -> RunConfig:
        """A copy with every default filled in from the benchmark, and the method's preset merged in."""
        b = benchmarks.get(self.benchmark)
        c = dataclasses.replace(self, params=dict(self.params))
        c.mode = c.mode or b.mode
        if c.mode not in MODES:
            raise ConfigError(f"unknown mode {c.mode!r}; choose one of {', '.join(MODES)}")
        c.n_tasks = b.n_tasks if c.n_tasks is None else c.n_tasks
        _fill_training(c, b.defaults)
        method = create(c.method, c.params, preset=f"{c.benchmark}/{c.mode}")
        c.params = method.params()
        # Everything that can be checked without the data is checked here, in the first second of a run.
        check_method(method, c.mode, c.task_free)
        check_all_outputs(c.all_outputs, c.mode)
        c.train_config().validate()
        _check_shape(c, b)
        return c

    def scenario(self) -> Scenario:
        """The benchmark scenario of this (resolved) configuration."""
        return benchmarks.scenario(self.benchmark, self.mode, self.n_tasks, self.seed, self.data_dir, self.download,
                                   self.val_fraction, self.class_order, self.task_order, pad=self.pad)

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, iterations=self.iterations, batch_size=self.batch_size,
                           optimizer=self.optimizer, lr=self.lr, momentum=self.momentum, seed=self.seed,
                           reset_optimizer=self.reset_optimizer, all_outputs=self.all_outputs,
                           device=self.device, task_free=self.task_free, blurry=self.blurry,
                           evaluate_val=self.val_fraction > 0)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(d["hidden"]) if d["hidden"] is not None else None
        return d


@dataclass
class Result:
    """One run's record: config, the accuracy matrix R, the baseline b, metrics, timings, versions, warnings."""

    config: dict[str, Any]
    accuracy_matrix: list[list[float]]
    baseline: list[float]
    metrics: dict[str, float]
    timings: dict[str, float]
    versions: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    val_matrix: list[list[float]] | None = None
    peak_memory_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    @property
    def val_metrics(self) -> dict[str, float] | None:
        """Metrics of the validation-split matrix (for choosing hyper-parameters without touching test)."""
        if self.val_matrix is None:
            return None
        return all_metrics(self.val_matrix, [0.0] * len(self.val_matrix))

    def table(self) -> str:
        """The accuracy matrix (rows: after training task i; columns: task j) and the metrics, as text."""
        R = np.asarray(self.accuracy_matrix) * 100
        T = len(R)
        head = "after task | " + " ".join(f"{'T' + str(j):>6}" for j in range(T)) + " |   mean"
        lines = [head, "-" * len(head)]
        lines.append(f"{'init (b)':>10} | " + " ".join(f"{100 * v:6.2f}" for v in self.baseline)
                     + f" | {100 * np.mean(self.baseline):6.2f}")
        for i in range(T):
            lines.append(f"{i:>10} | " + " ".join(f"{v:6.2f}" for v in R[i]) + f" | {R[i].mean():6.2f}")
        m = self.metrics
        lines.append("")
        lines.append(f"ACC {100 * m['acc']:.2f}%   BWT {100 * m['bwt']:+.2f}   FWT {100 * m['fwt']:+.2f}   "
                     f"forgetting {100 * m['forgetting']:.2f}   learning acc {100 * m['learning_acc']:.2f}%")
        lines.append(f"train {self.timings['train_s']:.2f} s   eval {self.timings['eval_s']:.2f} s"
                     + (f"   peak memory {self.peak_memory_mb:.0f} MB" if self.peak_memory_mb else ""))
        return "\n".join(lines)


# Classes per dataset, to refuse an impossible split before loading the data (the split checks again).
DATASET_CLASSES = {"mnist": 10, "fashion-mnist": 10, "kmnist": 10, "cifar10": 10, "cifar100": 100, "digits": 10}


def _check_shape(c: RunConfig, b: benchmarks.Benchmark) -> None:
    """The scenario-shape checks that need no data: tasks, class and task orders, seed, validation share."""
    if not 0 <= c.seed < 2**32:
        raise ConfigError(f"seed must be in 0..{2**32 - 1}, got {c.seed}")
    if not 0.0 <= c.val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {c.val_fraction}")
    _check_normalize(c)
    if c.n_tasks < 1:
        raise ConfigError(f"n_tasks must be at least 1, got {c.n_tasks}")
    n_classes = DATASET_CLASSES.get(b.dataset)
    if b.kind == "split" and n_classes is not None:
        order = c.class_order if c.class_order is not None else list(range(n_classes))
        if len(set(order)) != len(order) or any(not 0 <= k < n_classes for k in order):
            raise ConfigError(f"class_order must list distinct classes in 0..{n_classes - 1}, got {order}")
        if c.n_tasks > len(order):
            raise ConfigError(f"{c.n_tasks} tasks but only {len(order)} classes; use --n-tasks {len(order)} "
                              "or fewer")
    elif c.class_order is not None and b.kind != "split":
        raise ConfigError(f"--class-order is for split benchmarks; {b.name} is {b.kind}")
    if c.task_order is not None and sorted(c.task_order) != list(range(c.n_tasks)):
        raise ConfigError(f"task_order must be a permutation of 0..{c.n_tasks - 1}, got {list(c.task_order)}")


def versions() -> dict[str, str]:
    return {"retain": retain.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "platform": platform.platform()}


def peak_memory_mb() -> float:
    """Peak resident memory of this process (MB); on CUDA, the peak allocated device memory is reported too."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def run(config: RunConfig | None = None, *, scenario: Scenario | None = None, model: nn.Module | None = None,
        method: Method | str | None = None, progress: Progress | None = None, quiet: bool = True,
        checkpointer: Checkpointer | None = None, **overrides: Any) -> Result:
    """Run one continual-learning experiment and return its :class:`Result`.

    Either a :class:`RunConfig` (or its fields as keyword arguments: ``run(benchmark="split-mnist",
    method="ewc", mode="task", params={"lambda": 1e4})``), or the user's own ``scenario`` (and optionally
    ``model``; an MLP of ``hidden`` sizes otherwise) with the training fields as keywords. A
    :class:`retain.checkpoint.Checkpointer` makes the run checkpoint (and resume from its file if asked).
    """
    config = dataclasses.replace(config, **overrides) if config else RunConfig(**overrides)
    if isinstance(method, str):
        config.method, method = method, None
    if isinstance(method, Method):
        config.method = method.name
    if scenario is None:
        config = config.resolved()
        scenario = config.scenario()
    else:
        config.benchmark, config.mode, config.n_tasks = scenario.name, scenario.mode, scenario.n_tasks
        config = _resolve_custom(config)
    if config.normalize is not None:
        scenario.mean, scenario.std = (config.normalize[0],), (config.normalize[1],)
    if method is None:
        method = create(config.method, config.params, preset=f"{config.benchmark}/{config.mode}")
    torch.manual_seed(config.seed)
    if model is None:
        model = build_model(config.arch, scenario.input_shape, scenario.n_outputs, config.hidden)
    trained = train(scenario, method, model, config.train_config(), progress, checkpointer)
    return Result(
        config=config.to_dict(),
        accuracy_matrix=trained.accuracy_matrix,
        baseline=trained.baseline,
        metrics=all_metrics(trained.accuracy_matrix, trained.baseline),
        timings=trained.timings,
        versions=versions(),
        warnings=trained.warnings,
        val_matrix=trained.val_matrix,
        peak_memory_mb=peak_memory_mb(),
    )


def _fill_training(c: RunConfig, d: dict[str, Any]) -> None:
    """Fill ``c``'s unset model and training fields from ``d`` (a benchmark's protocol defaults, or none)."""
    c.arch = c.arch or d.get("arch", "mlp")
    c.hidden = parse_hidden(c.hidden) if c.hidden is not None else tuple(d.get("hidden", (400, 400)))
    if c.epochs is None and c.iterations is None:
        c.epochs, c.iterations = d.get("epochs", 1), d.get("iterations")
    elif c.epochs is None:
        c.epochs = 1
    for k, default in (("batch_size", 128), ("optimizer", "adam"), ("lr", 1e-3), ("momentum", 0.0), ("pad", 0)):
        if getattr(c, k) is None:
            setattr(c, k, d.get(k, default))
    check_pad(c.pad)


def _resolve_custom(c: RunConfig) -> RunConfig:
    """Defaults for a user-built scenario (no benchmark table to draw from)."""
    c = dataclasses.replace(c, params=dict(c.params))
    _fill_training(c, {})
    if c.pad:
        raise ConfigError(f"pad={c.pad} applies to the named benchmarks; pad your own images before building the "
                          "scenario (retain.data.pad)")
    _check_normalize(c)
    return c


def _check_normalize(c: RunConfig) -> None:
    if c.normalize is None:
        return
    ok = (isinstance(c.normalize, (list, tuple)) and len(c.normalize) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in c.normalize)
          and c.normalize[1] > 0)
    if not ok:
        raise ConfigError(f"normalize must be two numbers MEAN,STD with STD > 0, got {c.normalize!r}")
    c.normalize = (float(c.normalize[0]), float(c.normalize[1]))
