"""The named benchmarks: which data, how it is cut into tasks, and the training defaults of its protocol.

Defaults follow the published protocols (docs/protocols.md; retain's numbers: docs/benchmarks.md):
split-MNIST-like benchmarks use van de Ven's P1 settings, permuted-MNIST his P2 settings. A user's flags override
any of them.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

from retain import data, scenarios
from retain.errors import ConfigError
from retain.scenarios import Scenario


@dataclass(frozen=True)
class Benchmark:
    name: str
    dataset: str  # key of retain.data.SOURCES
    kind: str  # "split" | "permuted" | "rotated"
    n_tasks: int
    mode: str  # default mode
    defaults: dict[str, Any] = field(default_factory=dict)  # training defaults (RunConfig field -> value)
    about: str = ""


_P1 = {"arch": "mlp", "hidden": (400, 400), "optimizer": "adam", "lr": 1e-3, "batch_size": 128,
       "iterations": 2000}

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("split-digits", "digits", "split", 5, "class",
              {"arch": "mlp", "hidden": (100, 100), "optimizer": "adam", "lr": 1e-3, "batch_size": 32,
               "epochs": 10},
              "scikit-learn's 8x8 digits, 5 tasks x 2 classes; offline, seconds (the default)"),
    Benchmark("split-mnist", "mnist", "split", 5, "class", _P1, "MNIST, 5 tasks x 2 classes (P1, van de Ven)"),
    Benchmark("split-fashion-mnist", "fashion-mnist", "split", 5, "class", _P1, "Fashion-MNIST, 5 x 2 classes"),
    Benchmark("split-kmnist", "kmnist", "split", 5, "class", _P1, "Kuzushiji-MNIST, 5 x 2 classes"),
    Benchmark("permuted-mnist", "mnist", "permuted", 10, "domain",
              {"arch": "mlp", "hidden": (1000, 1000), "optimizer": "adam", "lr": 1e-4, "batch_size": 128,
               "iterations": 5000, "pad": 2},
              "MNIST zero-padded to 32x32 under 10 pixel permutations (P2, van de Ven)"),
    Benchmark("rotated-mnist", "mnist", "rotated", 10, "domain",
              {"arch": "mlp", "hidden": (400, 400), "optimizer": "adam", "lr": 1e-3, "batch_size": 128,
               "epochs": 1},
              "MNIST rotated by 10 angles evenly spaced in [0, 180)"),
    Benchmark("split-cifar10", "cifar10", "split", 5, "class",
              {"arch": "resnet18", "optimizer": "sgd", "lr": 0.05, "batch_size": 32, "epochs": 1},
              "CIFAR-10, 5 tasks x 2 classes, reduced ResNet-18"),
    Benchmark("split-cifar100", "cifar100", "split", 20, "task",
              {"arch": "resnet18", "optimizer": "sgd", "lr": 0.03, "batch_size": 10, "epochs": 1},
              "CIFAR-100, 20 tasks x 5 classes, reduced ResNet-18 (A-GEM protocol)"),
)}


def get(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


@functools.lru_cache(maxsize=4)
def _loaded(dataset: str, data_dir: str | None, download: bool) -> data.Arrays:
    return data.load(dataset, data_dir, download)


@functools.lru_cache(maxsize=4)
def _arrays(dataset: str, data_dir: str | None, download: bool, pad: int) -> data.Arrays:
    return data.pad(_loaded(dataset, data_dir, download), pad)


def load_arrays(dataset: str, data_dir: str | os.PathLike | None = None, download: bool = False,
                pad: int = 0) -> data.Arrays:
    """Load (once per process) a dataset's tensors, zero-padded by ``pad`` pixels per side; they are never
    modified, so sharing them is safe."""
    return _arrays(dataset, str(data_dir) if data_dir else None, download, pad)


def scenario(name: str, mode: str | None = None, n_tasks: int | None = None, seed: int = 0,
             data_dir: str | os.PathLike | None = None, download: bool = False, val_fraction: float = 0.0,
             class_order: list[int] | None = None, task_order: list[int] | None = None,
             device: str = "cpu", pad: int | None = None) -> Scenario:
    """Build benchmark ``name``'s scenario (data located as retain.data describes). ``pad``: zero pixels added
    on each side of every image before the tasks' transforms (None: the benchmark's protocol, see BENCHMARKS)."""
    b = get(name)
    mode = mode or b.mode
    n_tasks = b.n_tasks if n_tasks is None else n_tasks
    arrays = load_arrays(b.dataset, data_dir, download, b.defaults.get("pad", 0) if pad is None else pad)
    common = {"val_fraction": val_fraction, "seed": seed, "device": device, "task_order": task_order}
    if b.kind == "split":
        sc = scenarios.split(arrays, mode, n_tasks=n_tasks, class_order=class_order, **common)
    elif b.kind == "permuted":
        sc = scenarios.permuted(arrays, mode, n_tasks=n_tasks, **common)
    else:
        sc = scenarios.rotated(arrays, mode, n_tasks=n_tasks, **common)
    sc.name = name
    return sc


def where(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """Where benchmark ``name``'s data was found, or 'not found' (for `retain benchmarks`)."""
    b = get(name)
    try:
        folder = data.locate(b.dataset, data_dir)
    except data.DataError as e:
        return f"problem: {e}"
    return str(folder) if folder else "not found (use --data-dir, RETAIN_DATA or --download)"
