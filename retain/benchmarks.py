"""The named benchmarks: which data, how it is cut into tasks (class order, split), and its protocol's defaults.

Defaults follow the published protocols (docs/protocols.md; retain's numbers: docs/benchmarks.md):
split-MNIST-like benchmarks use van de Ven's P1 settings, permuted-MNIST his P2 settings, ``seq-cifar10`` the DER
protocol (P5, Buzzega et al. 2020, Mammoth's ``seq-cifar10``). A user's flags override any of them.

Class orders (the order classes enter the stream; ``--class-order`` replaces it):

* ``label``: classes in label-id order, as Mammoth cuts ``seq-cifar10``, ``seq-cifar100`` and ``seq-tinyimg``
  (its ``N_CLASSES_PER_TASK`` consecutive labels per task).
* ``rs1993``: ``numpy.random.RandomState(1993).permutation(n_classes)``, the order of iCaRL's CIFAR-100 code as
  LUCIR, PODNet and PyCIL use it (PyCIL's ``DataManager`` with ``shuffle`` and seed 1993; PODNet's
  ``cifar100_order``: 68, 56, 78, 8, 23, ...), and of APER / PILOT for ImageNet-R and CUB (the same
  ``DataManager``, seed 1993, over the sorted folder names).
* ``core50-nc``: CORe50's official NC order, read from ``batches_filelists/NC_inc/run0`` (Lomonaco & Maltoni 2017;
  Avalanche's ``CORe50(scenario="nc")`` reads the same lists): the 10 objects of batch 0, then each batch's 5 new
  objects (ascending within a batch). Without the filelists: label order, recorded as a variant.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retain import data, scenarios
from retain.errors import ConfigError, DataError
from retain.scenarios import Scenario, Task


@dataclass(frozen=True)
class Benchmark:
    name: str
    dataset: str  # key of retain.data.SOURCES
    kind: str  # "split" | "permuted" | "rotated" | "sessions" (one task per acquisition session: CORe50 NI)
    n_tasks: int
    mode: str  # default mode
    defaults: dict[str, Any] = field(default_factory=dict)  # training defaults (RunConfig field -> value)
    about: str = ""
    order: str = "label"  # the standard class order: "label" | "rs1993" | "core50-nc" (module docstring)
    first: int | None = None  # classes in the first task when it is larger (B50-Inc10); the rest split evenly
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # (mean, std) per channel; None: the data's


_P1 = {"arch": "mlp", "hidden": (400, 400), "optimizer": "adam", "lr": 1e-3, "batch_size": 128,
       "iterations": 2000}
# P5 (DER, Mammoth's seq-cifar10): ResNet-18 with 64 filters, SGD, batch 32, 50 epochs, crop + flip, the loss over
# every output (Mammoth's); lr 0.1 is ER's best (methods' presets give their own, e.g. DER 0.03).
_DER = {"arch": "resnet18", "optimizer": "sgd", "lr": 0.1, "batch_size": 32, "epochs": 50, "augment": "crop-flip",
        "all_outputs": True}
_CIFAR10_NORM = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615))  # P5, Mammoth's seq-cifar10
_CIFAR100_NORM = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))  # Mammoth's seq-cifar100
# ImageNet-R / CUB: APER's settings (Zhou et al. 2023, RevisitingCIL exps/*imagenetr*.json: SGD lr 0.05, momentum
# 0.9, batch 24, 20 epochs) with rrc-flip, the ImageNet training transform, on images decoded to 224x224; the
# backbone is a ResNet-18 from scratch (ImageNet stem at 224 px), not their pre-trained ViT, which retain lacks.
_PRETRAINED_STYLE = {"arch": "resnet18", "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "batch_size": 24,
                     "epochs": 20, "augment": "rrc-flip"}

# the pre-trained-model papers' CIFAR-100: timm's ImageNet-21k ViT-B/16 (weights from the user: --weights or timm's
# cache), images resized to 224 by the backbone's encoder, random-resized-crop and flip; each method's preset sets
# its optimizer, learning rate and batch size (PILOT's exps/*.json)
_PRETRAINED_VIT = {"arch": "timm:vit_base_patch16_224.augreg_in21k", "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
                   "batch_size": 48, "epochs": 20, "augment": "rrc-flip"}

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
              {"arch": "resnet18-reduced", "optimizer": "sgd", "lr": 0.05, "batch_size": 32, "epochs": 1},
              "CIFAR-10, 5 tasks x 2 classes, reduced ResNet-18, one epoch"),
    Benchmark("split-cifar100", "cifar100", "split", 20, "task",
              {"arch": "resnet18-reduced", "optimizer": "sgd", "lr": 0.03, "batch_size": 10, "epochs": 1},
              "CIFAR-100, 20 tasks x 5 classes, reduced ResNet-18 (A-GEM protocol)"),
    Benchmark("seq-cifar10", "cifar10", "split", 5, "class", _DER,
              "CIFAR-10, 5 x 2 classes in label order, class-IL; ResNet-18 (64 filters), SGD, batch 32, 50 epochs, "
              "crop-flip (P5: DER, Buzzega et al. 2020; Mammoth's seq-cifar10)", norm=_CIFAR10_NORM),
    Benchmark("seq-cifar100", "cifar100", "split", 10, "class", _DER,
              "CIFAR-100, 10 x 10 classes in label order (--n-tasks 20: 20 x 5); the P5 recipe (Mammoth's "
              "seq-cifar100)", norm=_CIFAR100_NORM),
    Benchmark("seq-cifar100-b50", "cifar100", "split", 6, "class",
              {"arch": "resnet32", "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "batch_size": 128,
               "epochs": 160, "augment": "crop-flip"},
              "CIFAR-100 B50-Inc10: 50 classes, then 5 tasks of 10 (--n-tasks 11: of 5), in iCaRL's seed-1993 "
              "order; ResNet-32, SGD 0.1 momentum 0.9, batch 128, 160 epochs (PODNet, Douillard et al. 2020; LUCIR)",
              order="rs1993", first=50, norm=_CIFAR100_NORM),
    Benchmark("cifar100-b0inc10", "cifar100", "split", 10, "class", _PRETRAINED_VIT,
              "CIFAR-100, 10 x 10 in iCaRL's seed-1993 order: B0 Inc10 of the pre-trained-model papers (L2P, "
              "DualPrompt, CODA-Prompt, SLCA, APER, RanPAC; PILOT's cifar224) at 224x224 on a ViT-B/16: pass "
              "--weights (docs/pretrained.md)", order="rs1993"),
    Benchmark("seq-tinyimagenet", "tinyimagenet", "split", 10, "class", {**_DER, "epochs": 100},
              "Tiny-ImageNet, 200 classes of 64x64, 10 x 20 in label order (sorted wnids); ResNet-18 (CIFAR stem), "
              "SGD, batch 32, 100 epochs, crop-flip (DER; Mammoth's seq-tinyimg)"),
    Benchmark("imagenet-r", "imagenet-r", "split", 10, "class", _PRETRAINED_STYLE,
              "ImageNet-R, 200 classes at 224x224, 10 x 20 in APER's seed-1993 order, APER/PILOT's train/test split "
              "(or CODA-Prompt's split files); ResNet-18 from scratch, SGD, rrc-flip", order="rs1993"),
    Benchmark("cub200", "cub200", "split", 10, "class", _PRETRAINED_STYLE,
              "CUB-200-2011, 200 classes at 224x224, 10 x 20 in APER's seed-1993 order, the official train/test "
              "split; ResNet-18 from scratch, SGD, rrc-flip", order="rs1993"),
    Benchmark("core50", "core50", "sessions", 8, "domain",
              {"arch": "resnet18", "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "batch_size": 128,
               "epochs": 1, "augment": "crop-flip"},
              "CORe50 NI: 50 objects at 128x128, one domain-IL task per training session (s1 s2 s4 s5 s6 s8 s9 "
              "s11), tested on s3 s7 s10 (Lomonaco & Maltoni 2017); ResNet-18 (ImageNet stem), SGD, one pass"),
    Benchmark("core50-nc", "core50", "split", 9, "class",
              {"arch": "resnet18", "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "batch_size": 128,
               "epochs": 1, "augment": "crop-flip"},
              "CORe50 NC: 50 objects, 10 in the first task then 8 tasks of 5, in the official run-0 order "
              "(batches_filelists/NC_inc/run0); test s3 s7 s10", order="core50-nc", first=10),
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


def core50_nc_order(folder: str | os.PathLike, run: int = 0) -> list[int] | None:
    """CORe50's official NC class order for ``run`` (0-9), from ``batches_filelists/NC_inc/run<run>/
    train_batch_NN_filelist.txt`` beside (or inside) the ``core50_128x128`` folder: each batch's new objects in
    ascending order, batch after batch (label id = object - 1). None when the filelists are not there."""
    folder = Path(folder)
    for base in (folder.parent, folder):
        lists = base / "batches_filelists" / "NC_inc" / f"run{run}"
        if not lists.is_dir():
            continue
        order: list[int] = []
        batch = 0
        while (lists / f"train_batch_{batch:02d}_filelist.txt").is_file():
            path = lists / f"train_batch_{batch:02d}_filelist.txt"
            new = set()
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                parts = Path(line.split()[0]).parts  # s<session>/o<object>/<file>.png <label>
                if len(parts) < 3 or not parts[-2].startswith("o") or not parts[-2][1:].isdigit():
                    raise DataError(f"{path}, line {n}: expected 's<N>/o<N>/<file>.png <label>', got {line!r}")
                new.add(int(parts[-2][1:]) - 1)
            order += sorted(new - set(order))
            batch += 1
        if batch == 0:
            raise DataError(f"{lists}: no train_batch_00_filelist.txt; unpack batches_filelists.zip again")
        return order
    return None


def standard_order(b: Benchmark, arrays: data.Arrays) -> tuple[list[int], str]:
    """Benchmark ``b``'s class order over ``arrays`` (see the module docstring) and, when it could not be the
    standard one, the record's note saying so (else "")."""
    n = arrays.n_classes
    if b.order == "rs1993":
        return np.random.RandomState(1993).permutation(n).tolist(), ""
    if b.order == "core50-nc":
        order = core50_nc_order(arrays.source)
        if order is not None:
            if sorted(order) != list(range(n)):
                raise DataError(f"{arrays.source}: the NC filelists name {len(order)} objects, the data has {n}")
            return order, ""
        return list(range(n)), (f"{b.name}: no batches_filelists/NC_inc/run0 beside {arrays.source}, so the objects "
                                "enter in label order, not CORe50's official NC order; put batches_filelists.zip's "
                                "folder there for it")
    return list(range(n)), ""


def _increments(b: Benchmark, n_tasks: int, n_classes: int) -> list[int]:
    """Classes per task with a larger first task: ``b.first``, then the rest in ``n_tasks - 1`` equal tasks."""
    rest = n_classes - b.first
    if n_tasks < 2 or rest % (n_tasks - 1):
        raise ConfigError(f"{b.name}: {b.first} classes first, then {rest} in {n_tasks - 1} equal tasks is not "
                          f"possible; choose --n-tasks N with {rest} divisible by N - 1 (default {b.n_tasks})")
    return [b.first] + [rest // (n_tasks - 1)] * (n_tasks - 1)


def sessions(arrays: data.Arrays, mode: str = "domain", task_order: list[int] | None = None,
             val_fraction: float = 0.0, seed: int = 0, device: str = "cpu") -> Scenario:
    """One domain-IL task per acquisition session (``arrays.group_train``; CORe50 NI): every task holds the same
    classes, and every task's test set is the whole test set (CORe50's sessions 3, 7 and 10)."""
    if mode != "domain":
        raise ConfigError(f"CORe50 NI is domain-incremental (the same 50 objects in every session); use --mode "
                          f"domain, or core50-nc for new classes, not --mode {mode}")
    if arrays.group_train is None:
        raise ConfigError(f"{arrays.name} has no acquisition sessions to make tasks of")
    n = int(arrays.group_train.max()) + 1
    order = list(task_order) if task_order is not None else list(range(n))
    if sorted(order) != list(range(n)):
        raise ConfigError(f"task_order must be a permutation of 0..{n - 1}, got {order}")
    classes = list(range(arrays.n_classes))
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for s in order:
        train, val = scenarios._val_split((arrays.group_train == s).nonzero().flatten(), val_fraction, g)
        tasks.append(Task(classes, train, torch.arange(len(arrays.y_test)), val))
    label_map, task_out = scenarios._tables("domain", [classes] * n, arrays.n_classes, shared_labels=True)
    sc = Scenario(f"sessions-{arrays.name}", mode, tasks, arrays.x_train, arrays.y_train, arrays.x_test,
                  arrays.y_test, label_map, task_out, mean=arrays.mean, std=arrays.std,
                  info={"task_order": order, "sessions": [data.CORE50_TRAIN_SESSIONS[s] for s in order]
                        if n == len(data.CORE50_TRAIN_SESSIONS) else order, "source": arrays.source,
                        "unverified": arrays.variant or None})
    return sc.to(device)


def scenario(name: str, mode: str | None = None, n_tasks: int | None = None, seed: int = 0,
             data_dir: str | os.PathLike | None = None, download: bool = False, val_fraction: float = 0.0,
             class_order: list[int] | None = None, task_order: list[int] | None = None,
             device: str = "cpu", pad: int | None = None) -> Scenario:
    """Build benchmark ``name``'s scenario (data located as retain.data describes), in its standard class order
    unless ``class_order`` is given. ``pad``: zero pixels added on each side of every image before the tasks'
    transforms (None: the benchmark's protocol, see BENCHMARKS)."""
    b = get(name)
    mode = mode or b.mode
    n_tasks = b.n_tasks if n_tasks is None else n_tasks
    arrays = load_arrays(b.dataset, data_dir, download, b.defaults.get("pad", 0) if pad is None else pad)
    common = {"val_fraction": val_fraction, "seed": seed, "device": device, "task_order": task_order}
    if b.kind == "split":
        order, note = standard_order(b, arrays)
        if note:  # a new Arrays: the cached one is shared
            arrays = replace(arrays, variant="; ".join(v for v in (arrays.variant, note) if v))
        order = order if class_order is None else list(class_order)
        if b.first is not None:
            sc = scenarios.split(arrays, mode, class_order=order, increments=_increments(b, n_tasks, len(order)),
                                 **common)
        else:
            sc = scenarios.split(arrays, mode, n_tasks=n_tasks, class_order=order, **common)
    elif b.kind == "sessions":
        if n_tasks != b.n_tasks:
            raise ConfigError(f"{name} has {b.n_tasks} training sessions, one task each; drop --n-tasks")
        sc = sessions(arrays, mode, **common)
    elif b.kind == "permuted":
        sc = scenarios.permuted(arrays, mode, n_tasks=n_tasks, **common)
    else:
        sc = scenarios.rotated(arrays, mode, n_tasks=n_tasks, **common)
    if b.norm is not None:
        sc.mean, sc.std = b.norm
    sc.name = name
    return sc


def where(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """Where benchmark ``name``'s data was found, and which copy it is, or 'not found' (for `retain benchmarks`);
    nothing is decoded."""
    b = get(name)
    try:
        folder = data.locate(b.dataset, data_dir)
    except data.DataError as e:
        return f"problem: {e}"
    if not folder:
        return "not found (use --data-dir, RETAIN_DATA or --download)"
    if b.dataset == "cifar10" and not (folder / "data_batch_1").is_file():
        return f"{data.cifar10_jpeg(folder)} (JPEG re-encoding: results are labelled CIFAR-10 (JPEG q75))"
    if b.dataset == "imagenet-r" and not data._wnid_dirs(folder / "train") and not (
            folder / "imagenet-r_train.yaml").is_file():
        return f"{folder} (no train/test split there: retain's seeded 80/20 split, labelled in the record)"
    if b.order == "core50-nc" and core50_nc_order(folder) is None:
        return f"{folder} (no batches_filelists/NC_inc: label order, not the official NC order)"
    return str(folder)
