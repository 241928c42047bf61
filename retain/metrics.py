"""Continual-learning metrics: pure functions of the accuracy matrix ``R`` and the baseline ``b``.

``R[i, j]`` is the accuracy on task j's test set after training task i (i, j = 0..T-1), every cell filled
(unseen tasks too); ``b[j]`` is the accuracy of the freshly initialised model on task j.
"""

from __future__ import annotations

import numpy as np

ArrayLike = np.ndarray | list


def _r(R: ArrayLike) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"the accuracy matrix must be square T x T, got shape {R.shape}")
    if np.isnan(R).any():
        raise ValueError("the accuracy matrix has unfilled (NaN) cells; evaluate every task after every task")
    return R


def average_accuracy(R: ArrayLike) -> float:
    """ACC = (1/T) Σ_j R[T-1, j] — the final average accuracy over all tasks."""
    R = _r(R)
    return float(R[-1].mean())


def backward_transfer(R: ArrayLike) -> float:
    """BWT = 1/(T-1) Σ_{j<T-1} (R[T-1, j] − R[j, j])  (Lopez-Paz & Ranzato 2017, eq. 3). 0 for one task.

    Negative values are forgetting; positive, later tasks improved earlier ones.
    """
    R = _r(R)
    T = len(R)
    if T < 2:
        return 0.0
    return float(np.mean([R[-1, j] - R[j, j] for j in range(T - 1)]))


def forward_transfer(R: ArrayLike, b: ArrayLike) -> float:
    """FWT = 1/(T-1) Σ_{j>0} (R[j-1, j] − b[j])  (Lopez-Paz & Ranzato 2017, eq. 4). 0 for one task.

    How much training on tasks < j helps task j before it is trained, against the random-initialisation accuracy b.
    """
    R = _r(R)
    b = np.asarray(b, dtype=float)
    if b.shape != (len(R),):
        raise ValueError(f"the baseline must have one accuracy per task ({len(R)}), got shape {b.shape}")
    T = len(R)
    if T < 2:
        return 0.0
    return float(np.mean([R[j - 1, j] - b[j] for j in range(1, T)]))


def forgetting(R: ArrayLike) -> float:
    """F = 1/(T-1) Σ_{j<T-1} (max_{j≤l<T-1} R[l, j] − R[T-1, j])  (Chaudhry et al. 2018, eq. 2). 0 for one task.

    The max runs over the rows from the one right after task j was trained up to the one before the last, as
    Mammoth and Avalanche compute it: accuracies from before task j was trained (chance in class-IL, zero-shot in
    task- and domain-IL) are not knowledge the model had, so they cannot be forgotten.
    """
    R = _r(R)
    T = len(R)
    if T < 2:
        return 0.0
    return float(np.mean([R[j: T - 1, j].max() - R[-1, j] for j in range(T - 1)]))


def learning_accuracy(R: ArrayLike) -> float:
    """LA = (1/T) Σ_j R[j, j] — accuracy on each task right after training it (plasticity)."""
    R = _r(R)
    return float(np.diag(R).mean())


def zero_shot_accuracy(R: ArrayLike) -> float:
    """1/(T-1) Σ_{j>0} R[j-1, j]: accuracy on the next task before training it, without subtracting b.

    The quantity some texts call "forward transfer"; reported under its own name to avoid confusion with FWT.
    """
    R = _r(R)
    T = len(R)
    return 0.0 if T < 2 else float(np.mean([R[j - 1, j] for j in range(1, T)]))


def all_metrics(R: ArrayLike, b: ArrayLike) -> dict[str, float]:
    """The metrics every result record carries: ``acc``, ``bwt``, ``fwt``, ``forgetting``, ``learning_acc``."""
    return {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, b),
        "forgetting": forgetting(R),
        "learning_acc": learning_accuracy(R),
    }
