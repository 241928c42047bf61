"""Shared fixtures: tiny synthetic scenarios and the location of the real MNIST (../shared/data/mnist)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from retain import scenarios
from retain.checkpoint import Checkpointer
from retain.data import make_synthetic

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture(autouse=True)
def _threads(monkeypatch):
    """One torch thread in every test, in-process runs included (retain.config.default_threads reads
    OMP_NUM_THREADS), so exact comparisons with subprocesses do not depend on the machine's load."""
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Each test's ~/.cache/retain (checksum cache, downloads) is its own: nothing written to the real home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def synthetic():
    """4 classes of Gaussian blobs in 8 dimensions, split into 2 tasks."""
    return make_synthetic(n_classes=4, n_train=32, n_test=16, dim=8, seed=0)


@pytest.fixture
def mnist_dir() -> Path:
    if not (MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {MNIST}")
    return MNIST


def tiny_split(mode: str, n_tasks: int = 2, **kw):
    data = make_synthetic(n_classes=2 * n_tasks, n_train=32, n_test=16, dim=8, seed=0)
    return scenarios.split(data, mode, n_tasks=n_tasks, **kw)


class Recording(Checkpointer):
    """Keeps a copy of every checkpoint written, to resume from each of them afterwards."""

    def __init__(self, path, every=None):
        super().__init__(path, every)
        self.copies: list[Path] = []

    def save(self, state):
        super().save(state)
        copy = self.path.with_name(f"copy{len(self.copies)}.ckpt")
        shutil.copy(self.path, copy)
        self.copies.append(copy)
