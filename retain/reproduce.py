"""Published protocols and their numbers, for ``retain reproduce NAME``.

Each :class:`Protocol` records the settings a paper used (as run-configuration fields), its rows (a method,
hyper-parameters, per-row training overrides) and the numbers it reports per scenario mode: final average
accuracy in %, with the spread as published (SEM or std). Sources: docs/protocols.md (P1, P2, P3).
A row whose method is not registered, or whose hyper-parameters the method does not take, is skipped with a
note; ``--quick`` runs a reduced version (fewer seeds and steps) and says so beside the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from retain.errors import ConfigError


@dataclass
class Row:
    label: str  # the paper's row name
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    published: dict[str, tuple[float, float | None] | None] = field(default_factory=dict)  # mode -> (mean, ±)
    train: dict[str, Any] = field(default_factory=dict)  # run-field overrides for this row (optimizer...)


@dataclass
class Protocol:
    name: str
    title: str
    source: str
    benchmark: str
    modes: tuple[str, ...]
    settings: dict[str, Any]  # RunConfig fields
    seeds: int
    rows: list[Row]
    quick: dict[str, Any]  # reduced settings (RunConfig fields), plus "seeds"
    spread: str = "SEM"
    metric_tasks: int = 0  # metrics over tasks [metric_tasks:] only (A-GEM leaves the first 3 for tuning)
    note: str = ""


def _p(*vals: tuple[float, float | None] | None, modes: tuple[str, ...] = ("task", "domain", "class")
       ) -> dict[str, tuple[float, float | None] | None]:
    return dict(zip(modes, vals))


P1 = Protocol(
    "p1", "Split-MNIST, three scenarios (van de Ven et al.)",
    "van de Ven, Siegelmann & Tolias, arXiv 1809.10635, Table 3 (mean ± SEM, 20 seeds)",
    "split-mnist", ("task", "domain", "class"),
    {"hidden": (400, 400), "optimizer": "adam", "lr": 1e-3, "batch_size": 128, "iterations": 2000},
    20,
    [
        Row("None (fine-tune)", "finetune", {}, _p((85.15, 1.00), (57.33, 1.66), (19.90, 0.02))),
        Row("EWC", "ewc", {}, _p((85.48, 1.20), (57.80, 1.61), (19.90, 0.02))),
        Row("Online EWC", "online_ewc", {}, _p((85.22, 1.06), (57.60, 1.66), (19.90, 0.02))),
        Row("SI", "si", {}, _p((99.14, 0.11), (63.77, 1.18), (20.04, 0.08))),
        Row("LwF", "lwf", {}, _p((99.60, 0.03), (71.02, 1.26), (24.17, 0.51))),
        Row("DGR", "dgr", {}, _p((99.47, 0.03), (95.74, 0.23), (91.24, 0.33))),
        Row("DGR + distill", "dgr", {"distill": True}, _p((99.59, 0.03), (96.94, 0.14), (91.84, 0.27))),
        Row("Joint (offline)", "joint", {}, _p((99.64, 0.03), (98.41, 0.06), (97.93, 0.04))),
    ],
    {"iterations": 200, "seeds": 1},
    note="The paper's EWC row used a weak λ; with a tuned λ the later version reports EWC 98.64 / 63.95 / 20.01.",
)

P1_HSU = Protocol(
    "p1-hsu", "Split-MNIST, three scenarios (Hsu et al. 2018)",
    "Hsu et al. 2018, Re-evaluating continual learning scenarios, Table 2 (mean ± std, 10 runs)",
    "split-mnist", ("task", "domain", "class"),
    {"hidden": (400, 400), "optimizer": "adam", "lr": 1e-3, "batch_size": 128, "epochs": 4, "iterations": None,
     "normalize": (0.1000, 0.2752)},  # their loader's normalisation (dataloaders/base.py)
    10,
    [
        Row("Adam (fine-tune)", "finetune", {}, _p((93.46, 2.01), (55.16, 1.38), (19.71, 0.08))),
        Row("SGD (fine-tune)", "finetune", {}, _p((97.98, 0.09), (63.20, 0.35), (19.46, 0.04)),
            {"optimizer": "sgd", "lr": 0.01}),
        Row("EWC", "ewc", {}, _p((97.70, 0.81), (58.85, 2.59), (19.80, 0.05))),
        Row("Online EWC", "online_ewc", {}, _p((98.04, 1.10), (57.33, 1.44), (19.77, 0.04))),
        Row("SI", "si", {}, _p((98.56, 0.49), (64.76, 3.09), (19.67, 0.09))),
        Row("MAS", "mas", {}, _p((99.22, 0.21), (68.57, 6.85), (19.52, 0.29))),
        Row("Naive rehearsal (1,100)", "er", {"buffer_size": 1100}, _p((99.40, 0.08), (95.16, 0.49), (90.78, 0.85))),
        Row("GEM (1,100)", "gem", {"memory_size": 1100}, _p((98.42, 0.10), (96.16, 0.35), (92.20, 0.12)),
            {"optimizer": "sgd", "lr": 0.01}),
        Row("Offline (joint)", "joint", {}, _p((99.52, 0.16), (98.59, 0.15), (97.53, 0.30))),
    ],
    {"epochs": 1, "seeds": 1},
    spread="std",
)

P2 = Protocol(
    "p2", "Permuted-MNIST (van de Ven et al.)",
    "van de Ven, Siegelmann & Tolias, arXiv 1809.10635, Table 4 (means)",
    "permuted-mnist", ("domain", "class"),
    {"hidden": (1000, 1000), "optimizer": "adam", "lr": 1e-4, "batch_size": 128, "iterations": 5000, "n_tasks": 10,
     "pad": 2},  # their loader pads MNIST to 32x32 before permuting
    5,
    [
        Row("None", "finetune", {}, _p((78.51, None), (17.26, None), modes=("domain", "class"))),
        Row("EWC", "ewc", {}, _p((94.31, None), None, modes=("domain", "class"))),
        Row("Online EWC", "online_ewc", {}, _p((94.42, None), (33.88, None), modes=("domain", "class"))),
        Row("SI", "si", {}, _p((95.33, None), (29.31, None), modes=("domain", "class"))),
        Row("LwF", "lwf", {}, _p((72.64, None), None, modes=("domain", "class"))),
        Row("DGR", "dgr", {}, _p((95.09, None), None, modes=("domain", "class"))),
        Row("DGR + distill", "dgr", {"distill": True}, _p(None, (96.38, None), modes=("domain", "class"))),
        Row("Joint", "joint", {}, _p((97.59, None), (97.59, None), modes=("domain", "class"))),
    ],
    {"iterations": 300, "seeds": 1, "n_tasks": 4},
    spread="—",
)

P2_AGEM = Protocol(
    "p2-agem", "Permuted-MNIST, single epoch (Chaudhry et al. 2019, A-GEM)",
    "Chaudhry et al. 2019, Efficient Lifelong Learning with A-GEM, Appendix Table 4 (5 seeds); metrics over the "
    "17 tasks after the 3 used for tuning",
    "permuted-mnist", ("domain", "task"),
    {"hidden": (256, 256), "optimizer": "sgd", "lr": 0.1, "batch_size": 10, "epochs": 1, "iterations": None,
     "n_tasks": 20, "pad": 0},  # 784 inputs (TensorFlow's MNIST, unpadded)
    5,
    [  # learning rates and λ: the authors' replicate_results_iclr19.sh
        Row("Fine-tune", "finetune", {}, {"domain": (47.9, None)}, {"lr": 0.03}),
        Row("EWC", "ewc", {"lambda": 10.0}, {"domain": (68.3, None)}, {"lr": 0.03}),
        Row("MAS", "mas", {"lambda": 0.1}, {"domain": (69.6, None)}),
        # the paper's PNN is given the task descriptor (one column per task), i.e. task-IL; retain's PNN runs only
        # there, so this row runs with --mode task and every other row with domain (a single shared head)
        Row("PNN (task-IL: task ids)", "pnn", {}, {"task": (93.5, None)}),
        Row("GEM", "gem", {"memory_per_task": 250}, {"domain": (89.5, None)}),
        Row("A-GEM", "agem", {"memory_per_task": 250}, {"domain": (89.1, None)}),
        Row("Multi-task", "joint", {}, {"domain": (95.3, None)}),
    ],
    {"iterations": 200, "seeds": 1, "n_tasks": 6},
    spread="—",
    metric_tasks=3,
    note="Episodic memory: 250 samples per task. The PNN row runs in task-IL (its column chosen by the task id, "
         "as the paper's PNN uses task descriptors); every other row is domain-IL with one shared head.",
)

P3 = Protocol(
    "p3", "Sequential MNIST with DER (Buzzega et al. 2020)",
    "Buzzega et al. 2020 (NeurIPS), best arguments from Mammoth utils/best_args.py; published accuracies not "
    "recorded here (check the paper's appendix table before quoting them)",
    "split-mnist", ("class", "task"),
    {"hidden": (100, 100), "optimizer": "sgd", "batch_size": 10, "epochs": 1, "iterations": None},
    10,
    [
        Row("ER (200)", "er", {"buffer_size": 200, "replay_batch": 10}, {}, {"lr": 0.01}),
        Row("ER (500)", "er", {"buffer_size": 500, "replay_batch": 10}, {}, {"lr": 0.1}),
        Row("ER (5120)", "er", {"buffer_size": 5120, "replay_batch": 10}, {}, {"lr": 0.1}),
        Row("DER (200)", "der", {"buffer_size": 200, "alpha": 0.2}, {}, {"lr": 0.03}),
        Row("DER (500)", "der", {"buffer_size": 500, "alpha": 1.0}, {}, {"lr": 0.03}),
        Row("DER (5120)", "der", {"buffer_size": 5120, "alpha": 0.5}, {}, {"lr": 0.1}),
        Row("DER++ (200)", "derpp", {"buffer_size": 200, "alpha": 0.2, "beta": 1.0}, {}, {"lr": 0.03}),
        Row("DER++ (500)", "derpp", {"buffer_size": 500, "alpha": 1.0, "beta": 0.5}, {}, {"lr": 0.03}),
        Row("DER++ (5120)", "derpp", {"buffer_size": 5120, "alpha": 0.2, "beta": 0.5}, {}, {"lr": 0.1}),
    ],
    {"iterations": 300, "seeds": 1},
    spread="—",
)

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (P1, P1_HSU, P2, P2_AGEM, P3)}
ALIASES = {"split-mnist": "p1", "van-de-ven": "p1", "hsu": "p1-hsu", "permuted-mnist": "p2", "agem": "p2-agem",
           "der": "p3"}


def get(name: str) -> Protocol:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[key]


# ------------------------------------------------------------------------------------ retain beside the paper

def _same(a: Any, b: Any) -> bool:
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (records hold JSON lists)
    return norm(a) == norm(b)


def row_of(proto: Protocol, config: dict[str, Any]) -> Row | None:
    """The protocol row a run's recorded configuration belongs to: its method, with the row's hyper-parameters
    and training overrides; the most specific row wins (``DGR + distill`` over ``DGR``)."""
    params = config.get("params") or {}
    best, best_n = None, -1
    for row in proto.rows:
        if row.method != config.get("method"):
            continue
        if all(_same(params.get(k), v) for k, v in row.params.items()) and \
                all(_same(config.get(k), v) for k, v in row.train.items()):
            n = len(row.params) + len(row.train)
            if n > best_n:
                best, best_n = row, n
    return best


def final_acc(proto: Protocol, record: dict[str, Any]) -> float:
    """A finished run's final average accuracy as the paper counts it (over tasks ``[metric_tasks:]``)."""
    import numpy as np

    R = np.asarray(record["accuracy_matrix"], dtype=float)[proto.metric_tasks:, proto.metric_tasks:]
    return float(np.nanmean(R[-1]))


def comparison(proto: Protocol, cells: list[tuple[Row, str, list[dict[str, Any]]]]
               ) -> tuple[list[str], list[list[str]]]:
    """The table of retain beside the paper: per (row, mode, its runs) the seeds that finished, retain's ACC %
    (± std over seeds), the published number (± as published) and the difference in percent points."""
    from retain.experiments import aggregate

    body = []
    most = 0
    for row, mode, records in cells:
        mean, sd, n = aggregate([final_acc(proto, r) for r in records if r["status"] == "done"])
        most = max(most, n)
        pub = (row.published or {}).get(mode)
        ours = f"{100 * mean:.2f}" + (f" ± {100 * sd:.2f}" if n > 1 else "") if n else "failed"
        paper = (f"{pub[0]:.2f}" + (f" ± {pub[1]:.2f}" if pub[1] is not None else "")) if pub else "—"
        diff = f"{100 * mean - pub[0]:+.2f}" if pub and n else "—"
        body.append([row.label, mode, str(n), ours, paper, diff])
    spread = "std" if most > 1 else "one seed"
    return ["method", "mode", "seeds", f"retain ACC % ({spread})", f"paper ({proto.spread})", "difference"], body


def cells_of(proto: Protocol, records: list[dict[str, Any]]) -> list[tuple[Row, str, list[dict[str, Any]]]]:
    """Runs from a store grouped by the protocol row and mode they ran, in the protocol's order."""
    found: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for rec in records:
        row = row_of(proto, rec["config"])
        mode = rec["config"].get("mode")
        if row is not None and mode in proto.modes:
            found.setdefault((proto.rows.index(row), mode), []).append(rec)
    return [(proto.rows[i], mode, found[(i, mode)]) for i in range(len(proto.rows)) for mode in proto.modes
            if (i, mode) in found]
