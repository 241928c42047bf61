"""Continual-learning metrics: pure functions of the accuracy matrix ``R``, the baseline ``b`` and the anytime curve.

``R[i, j]`` is the accuracy on task j's test set after training task i (i, j = 0..T-1), every cell filled
(unseen tasks too); ``b[j]`` is the accuracy of the freshly initialised model on task j.

The anytime curve (``--eval-every N``, the record's ``anytime``) is a list of points ``{"samples": n, "task": i,
"acc": [a_0, ..., a_{T-1}], "end": bool}``: every task's test accuracy after the model has been trained on ``n``
incoming samples, while task ``i`` was the one being learnt; ``end`` marks the points taken at a task's end (they
are the rows of R). The metrics of the curve count the tasks "seen" at a point as 0..i.
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


def average_incremental_accuracy(R: ArrayLike) -> float:
    """Ā = (1/T) Σ_i (1/(i+1)) Σ_{j≤i} R[i, j]: the mean, over the task ends, of the accuracy on the tasks seen so far
    (Rebuffi et al. 2017's "average incremental accuracy", as iCaRL, LUCIR, PODNet and PyCIL report it; on a
    class-IL benchmark with equal test sets per task, the accuracy over the classes seen so far)."""
    R = _r(R)
    return float(np.mean([R[i, :i + 1].mean() for i in range(len(R))]))


def all_metrics(R: ArrayLike, b: ArrayLike) -> dict[str, float]:
    """The metrics every result record carries: ``acc``, ``bwt``, ``fwt``, ``forgetting``, ``learning_acc``,
    ``avg_incremental_acc``."""
    return {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, b),
        "forgetting": forgetting(R),
        "learning_acc": learning_accuracy(R),
        "avg_incremental_acc": average_incremental_accuracy(R),
    }


def old_new_accuracy(R: ArrayLike, test_sizes: ArrayLike) -> dict[str, float]:
    """The final model's accuracy on the old tasks' test rows pooled (``old_acc``: tasks 0..T-2, each weighted by its
    number of test rows, i.e. the accuracy over the old classes in class-IL) and on the last task's (``new_acc``)."""
    R = _r(R)
    n = np.asarray(test_sizes, dtype=float)
    if n.shape != (len(R),):
        raise ValueError(f"test_sizes must have one size per task ({len(R)}), got shape {n.shape}")
    old = float(np.dot(R[-1, :-1], n[:-1]) / n[:-1].sum()) if len(R) > 1 and n[:-1].sum() > 0 else float("nan")
    return {"old_acc": old, "new_acc": float(R[-1, -1])}


# ------------------------------------------------------------------------------------------ the anytime curve

def _points(points: list[dict]) -> list[dict]:
    if not points:
        raise ValueError("the anytime curve is empty: run with --eval-every N to record one")
    return points


def average_anytime_accuracy(points: list[dict]) -> float:
    """AAA = (1/K) Σ_k (1/(i_k+1)) Σ_{j≤i_k} a_j(n_k): the mean, over the K evaluation points, of the mean accuracy
    over the tasks seen so far (Caccia et al., ICLR 2022, "average anytime accuracy"). With the task ends as the
    only points it is Ā (:func:`average_incremental_accuracy`)."""
    return float(np.mean([np.mean(p["acc"][:p["task"] + 1]) for p in _points(points)]))


def area_under_accuracy(points: list[dict], test_sizes: ArrayLike) -> float:
    """A_AUC = Σ_k f(n_k) (n_k − n_{k−1}) / n_K, n_0 = 0: the area under the accuracy-versus-samples curve per
    sample seen (Koh et al., ICLR 2022, eq. 1 with their Δn spacing, normalised by the stream's length as their
    code reports it), where f(n) is the accuracy on the pooled test rows of the tasks seen so far (each task
    weighted by its number of test rows: the accuracy over the seen classes). The points are taken in order of
    ``samples``; several at one sample count (a periodic point and a task's end) count as the last of them."""
    n = np.asarray(test_sizes, dtype=float)
    by_n: dict[int, float] = {}
    for p in _points(points):
        seen = slice(0, p["task"] + 1)
        by_n[p["samples"]] = float(np.dot(np.asarray(p["acc"])[seen], n[seen]) / n[seen].sum())
    xs = sorted(by_n)
    if xs[-1] <= 0:
        raise ValueError("the anytime curve has no point after any training sample")
    widths = np.diff([0] + xs)
    return float(np.dot([by_n[x] for x in xs], widths) / xs[-1])


def stability_gap(points: list[dict], tolerance: float = 0.01) -> dict:
    """The dip of old tasks' accuracy right after a task switch (De Lange et al., ICLR 2023, "the stability gap").

    For each switch to task i > 0 and each old task j < i: ``before`` = a_j at the last point of task i−1 (its end),
    ``min`` = the lowest a_j at a point while task i is learnt (its end included), ``drop`` = before − min,
    ``min_after`` = samples from the switch to that lowest point, ``recovered_after`` = samples from the switch to
    the first point after the lowest at which a_j is back within ``tolerance`` of ``before`` (None: not within the
    task). Summaries: ``gap`` = the mean drop over all (switch, old task) pairs, ``min_acc`` = De Lange's min-ACC,
    the mean over tasks j < T−1 of the lowest a_j at any point after task j's end, and ``wc_acc`` = their
    worst-case accuracy (1/T) a_{T−1} + (1 − 1/T) min-ACC, with a_{T−1} the last task's accuracy at the end.
    Tasks are those the curve reaches; a switch needs a point at the end of the previous task."""
    pts = sorted(_points(points), key=lambda p: (p["samples"], p.get("end", False)))
    last_task = max(p["task"] for p in pts)
    ends = {p["task"]: p for p in pts if p.get("end")}
    pairs = []
    for i in range(1, last_task + 1):
        if i - 1 not in ends:
            continue
        start = ends[i - 1]["samples"]
        during = [p for p in pts if p["task"] == i and p["samples"] >= start and p is not ends[i - 1]]
        if not during:
            continue
        for j in range(i):
            before = ends[i - 1]["acc"][j]
            k = int(np.argmin([p["acc"][j] for p in during]))
            low = during[k]
            back = next((p for p in during[k:] if p["acc"][j] >= before - tolerance), None)
            pairs.append({"switch": i, "task": j, "before": before, "min": low["acc"][j],
                          "drop": before - low["acc"][j], "min_after": low["samples"] - start,
                          "recovered_after": None if back is None else back["samples"] - start})
    lows = []
    for j in range(last_task):
        if j in ends:
            after = [p["acc"][j] for p in pts if p["samples"] >= ends[j]["samples"] and p is not ends[j]]
            if after:
                lows.append(min(after))
    min_acc = float(np.mean(lows)) if lows else float("nan")
    final = ends.get(last_task)
    T = last_task + 1
    wc = (final["acc"][last_task] / T + (1 - 1 / T) * min_acc) if final is not None and lows else float("nan")
    return {"gap": float(np.mean([q["drop"] for q in pairs])) if pairs else float("nan"), "min_acc": min_acc,
            "wc_acc": float(wc), "pairs": pairs}


def anytime_metrics(points: list[dict], test_sizes: ArrayLike, gap: dict | None = None) -> dict[str, float]:
    """The curve's summaries a record carries: ``aaa``, ``a_auc``, ``stability_gap``, ``min_acc``, ``wc_acc``
    (``gap``: :func:`stability_gap` of ``points``, when the caller has it already)."""
    gap = stability_gap(points) if gap is None else gap
    return {"aaa": average_anytime_accuracy(points), "a_auc": area_under_accuracy(points, test_sizes),
            "stability_gap": gap["gap"], "min_acc": gap["min_acc"], "wc_acc": gap["wc_acc"]}
