"""Reports from the results store: one Markdown file (with its PNGs beside it) and one self-contained HTML file
(the same content, every image embedded as base64, so it opens offline and can be mailed as one file).

Sections: an overview of the store; per experiment a table (mean ± std over seeds per variant), ACC per variant
with error bars, forgetting per variant, accuracy versus training time and versus memory, and the accuracy of
each task over the sequence; then one accuracy-matrix heatmap per run; then the failed runs with their reasons.
A *variant* is a method with the configuration fields that vary inside the experiment (hyper-parameters, task
order, mode), so sweeps and order studies get one bar per configuration, not one per method.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from retain.experiments import markdown, record_values

Block = tuple  # ("h", level, text) | ("p", text) | ("table", head, body) | ("img", name, png, alt)
#               | ("figs", [(name, png, alt, caption)]) | ("details", summary, open, [Block]) | ("row", [Block])


def _plt():
    try:
        import matplotlib
    except ImportError:
        from retain.errors import ConfigError

        raise ConfigError("retain report draws its plots with matplotlib: pip install matplotlib") from None

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- variants

_IGNORED = ("seed", "data_dir", "download", "device")
_MODE_ORDER = {"task": 0, "domain": 1, "class": 2}


def human(v: Any) -> str:
    """A number as people write it: ``1e9`` not ``1000000000.0``, ``100`` not ``100.0``, ``0.001``, ``2.5e-5``;
    lists joined with ``-`` (task orders, layer widths)."""
    if isinstance(v, (list, tuple)):
        return "-".join(human(x) for x in v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if v == 0 or not math.isfinite(v):
        return str(v) if not math.isfinite(v) else "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        mant, exp = f"{v:.3g}".split("e") if "e" in f"{v:.3g}" else (f"{v:.3g}", "0")
        return f"{mant}e{int(exp)}"
    if float(v).is_integer():
        return str(int(v))
    return f"{v:.4g}"


def _varying(records: list[dict[str, Any]]) -> list[str]:
    """Config fields (``params.x`` for hyper-parameters) that take more than one value across these runs."""
    keys: dict[str, set] = {}
    for r in records:
        c = r["config"]
        for k, v in c.items():
            if k in _IGNORED or k in ("method", "params"):
                continue
            keys.setdefault(k, set()).add(repr(v))
        for k, v in (c.get("params") or {}).items():
            keys.setdefault(f"params.{k}", set()).add(repr(v))
    return sorted(k for k, vals in keys.items() if len(vals) > 1)


def variant(rec: dict[str, Any], varying: list[str]) -> str:
    c = rec["config"]
    parts = []
    for k in varying:
        v = (c.get("params") or {}).get(k[7:]) if k.startswith("params.") else c.get(k)
        if v is None:
            continue
        name = k[7:] if k.startswith("params.") else {"task_order": "order"}.get(k, k)
        parts.append(f"{name}={human(v)}")
    return c.get("method", "?") + (f" ({', '.join(parts)})" if parts else "")


def _group(records: list[dict[str, Any]], labels: dict[str, str] | None = None, order: list[str] | None = None
           ) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Runs by (mode, variant), modes in task/domain/class order, then variants by name. The mode
    is its own key (charts get one panel per mode), so it is left out of the variant's name; ``labels`` names a
    run's variant outright (a protocol's row label), and ``order`` ranks those labels (the protocol's rows)."""
    labels = labels or {}
    varying = [k for k in _varying(records) if k != "mode"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        key = (str(r["config"].get("mode")), labels.get(r["hash"]) or variant(r, varying))
        groups.setdefault(key, []).append(r)
    rank = {v: i for i, v in enumerate(order or [])}
    return dict(sorted(groups.items(), key=lambda kv: (_MODE_ORDER.get(kv[0][0], 9), rank.get(kv[0][1], -1),
                                                       kv[0][1])))


def _stats(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


# ----------------------------------------------------------------------------------------------------- plots

_PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974",
            "#64b5cd")
_MARKERS = "osD^vPX*<>"


def _colours(methods: list[str]) -> dict[str, str]:
    return {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(dict.fromkeys(methods))}


Bar = tuple  # (label, method, mean, err, paper value or None)


def bars_by_mode(panels: dict[str, list[Bar]], xlabel: str, title: str) -> bytes:
    """One horizontal bar panel per mode, stacked (labels on the y axis never collide), bars coloured by method,
    the value written at each bar's end and the paper's number, where given, as a black tick."""
    plt = _plt()
    sizes = [max(1, len(b)) for b in panels.values()]
    colours = _colours([b[1] for bars in panels.values() for b in bars])
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 0.8 + sum(0.3 * n + 0.7 for n in sizes)), squeeze=False,
                             gridspec_kw={"height_ratios": sizes}, layout="constrained")
    top = max([b[2] + (b[3] if math.isfinite(b[3]) else 0) for bars in panels.values() for b in bars
               if math.isfinite(b[2])] + [b[4] for bars in panels.values() for b in bars if b[4] is not None] + [1])
    any_paper = False
    for ax, (mode, bars) in zip(axes[:, 0], panels.items()):
        y = list(range(len(bars)))[::-1]
        means = [b[2] if math.isfinite(b[2]) else 0 for b in bars]
        errs = [b[3] if math.isfinite(b[3]) else 0 for b in bars]
        ax.barh(y, means, xerr=errs, capsize=3, color=[colours[b[1]] for b in bars], height=0.7)
        for yi, b in zip(y, bars):
            ax.text((b[2] if math.isfinite(b[2]) else 0) + top * 0.01, yi + 0.18, "—" if not math.isfinite(b[2])
                    else f"{b[2]:.1f}", va="center", fontsize=7)
            if b[4] is not None:
                any_paper = True
                ax.plot([b[4], b[4]], [yi - 0.42, yi + 0.42], color="black", lw=2)
        ax.set_yticks(y)
        ax.set_yticklabels([b[0] for b in bars], fontsize=8)
        ax.set_xlim(0, top * 1.12)
        ax.set_title(f"{mode}-IL", fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    axes[-1, 0].set_xlabel(xlabel, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    names = list(colours)
    if any_paper:
        handles.append(plt.Line2D([0], [0], color="black", lw=2))
        names.append("paper")
    fig.legend(handles, names, loc="outside right upper", fontsize=8, title="method", title_fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


Point = tuple  # (label, method, x, x err, y, y err)


def scatter_by_mode(panels: dict[str, list[Point]], xlabel: str, title: str) -> bytes:
    """Accuracy against a cost, one panel per mode side by side; a point per variant coloured by its method."""
    plt = _plt()
    colours = _colours([p[1] for pts in panels.values() for p in pts])
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 4.2), squeeze=False, layout="constrained")
    for ax, (mode, pts) in zip(axes[0], panels.items()):
        seen: dict[str, int] = {}
        for label, method, x, xe, y, ye in pts:
            k = seen[method] = seen.get(method, -1) + 1
            ax.errorbar([x], [y], xerr=[0 if not math.isfinite(xe) else xe], yerr=[0 if not math.isfinite(ye)
                        else ye], fmt=_MARKERS[k % len(_MARKERS)], color=colours[method], capsize=3, label=label)
        ax.set_title(f"{mode}-IL", fontsize=9, loc="left")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("ACC %", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(pts) <= 12:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def _task_curves(groups: dict[tuple[str, str], list[dict[str, Any]]]) -> bytes:
    """Accuracy of each task (one line per task) after training each task, mean over the variant's runs."""
    plt = _plt()
    keys = list(groups)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.4), squeeze=False,
                             layout="constrained")
    handles, labels = [], []
    for ax, key in zip(axes.flat, keys):
        mats = [np.asarray(r["accuracy_matrix"], dtype=float) for r in groups[key] if r.get("accuracy_matrix")]
        if not mats or len({m.shape for m in mats}) > 1:
            ax.set_visible(False)
            continue
        R = np.nanmean(np.stack(mats), 0) * 100
        T = R.shape[0]
        for j in range(R.shape[1]):
            ax.plot(range(T), R[:, j], marker="o", ms=3, label=f"task {j}")
        ax.set_title(textwrap.fill(f"{key[0]}-IL · {key[1]}", 44), fontsize=8, loc="left")
        ax.set_xlabel("after training task", fontsize=7)
        ax.set_ylabel("accuracy %", fontsize=7)
        ax.set_ylim(-2, 102)
        ax.set_xticks(range(T))
        ax.tick_params(labelsize=7)
        if len(ax.get_legend_handles_labels()[1]) > len(labels):
            handles, labels = ax.get_legend_handles_labels()
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(10, len(labels)), fontsize=7)
    return _png(fig)


def _anytime_curves(groups: dict[tuple[str, str], list[dict[str, Any]]]) -> bytes:
    """The anytime curve of each variant (one panel per mode): the mean accuracy over the tasks seen so far against
    the training samples, mean over the variant's runs where they share their evaluation points; the task ends
    (the rows of R) marked, the switches drawn as dotted lines."""
    plt = _plt()
    modes = sorted({k[0] for k in groups})
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 3.4), squeeze=False, layout="constrained")
    colours = _colours([str(groups[k][0]["config"].get("method")) for k in groups])
    for ax, mode in zip(axes.flat, modes):
        for key in [k for k in groups if k[0] == mode]:
            runs = [r["anytime"]["points"] for r in groups[key] if (r.get("anytime") or {}).get("points")]
            if not runs:
                continue
            grid = [[(p["samples"], p["end"]) for p in pts] for pts in runs]
            runs = runs if all(g == grid[0] for g in grid) else runs[:1]
            xs = [p["samples"] for p in runs[0]]
            ys = np.mean([[100 * np.mean(p["acc"][:p["task"] + 1]) for p in pts] for pts in runs], 0)
            colour = colours[str(groups[key][0]["config"].get("method"))]
            ax.plot(xs, ys, lw=1.2, color=colour, label=textwrap.shorten(key[1], 40))
            ends = [i for i, p in enumerate(runs[0]) if p["end"]]
            ax.plot([xs[i] for i in ends], [ys[i] for i in ends], "o", ms=3, color=colour)
            for i in ends[:-1]:
                ax.axvline(xs[i], color="grey", lw=0.5, ls=":")
        ax.set_title(f"{mode}-IL", fontsize=8, loc="left")
        ax.set_xlabel("training samples", fontsize=7)
        ax.set_ylabel("accuracy on the tasks seen so far %", fontsize=7)
        ax.set_ylim(-2, 102)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle("Anytime accuracy (dots: task ends)", fontsize=10)
    return _png(fig)


def heatmap(R: list[list[float]], title: str) -> bytes:
    plt = _plt()
    A = np.asarray(R, dtype=float) * 100
    T = A.shape[0]
    fig, ax = plt.subplots(figsize=(1.4 + 0.45 * A.shape[1], 1.0 + 0.4 * T))
    im = ax.imshow(A, vmin=0, vmax=100, cmap="viridis")
    if A.shape[1] <= 12:
        for i in range(T):
            for j in range(A.shape[1]):
                if math.isfinite(A[i, j]):
                    ax.text(j, i, f"{A[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if A[i, j] < 60 else "black")
    ax.set_xlabel("evaluated on task", fontsize=8)
    ax.set_ylabel("after training task", fontsize=8)
    ax.set_xticks(range(A.shape[1]))
    ax.set_yticks(range(T))
    ax.tick_params(labelsize=7)
    ax.set_title(textwrap.fill(title, 30), fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


# ---------------------------------------------------------------------------------------------- the document

def _describe_run(r: dict[str, Any]) -> str:
    c = r["config"]
    params = ", ".join(f"{k}={human(v)}" for k, v in (c.get("params") or {}).items())
    extra = f", order {human(c['task_order'])}" if c.get("task_order") else ""
    extra += f", task {c['alone']} alone" if c.get("alone") is not None else ""
    return (f"{c.get('method')} on {c.get('benchmark')} ({c.get('mode')}-IL), seed {c.get('seed')}"
            f"{extra}{'; ' + params if params else ''}")


def memory_axis(groups: dict[Any, list[dict[str, Any]]]) -> tuple[str, dict[Any, tuple[float, float]]]:
    """The x axis of the accuracy-versus-memory plot: the rows each variant stores in total, as its records
    report them (``record["memory"]["rows"]``, from ``Method.memory``: ER's buffer, A-GEM's memory over all
    tasks, ...), or, when any record predates that report (older stores have no ``memory`` key), the peak
    resident memory in MB, labelled so."""
    if all(isinstance(r.get("memory"), dict) and "rows" in r["memory"] for g in groups.values() for r in g):
        return ("stored samples: rows kept in total (0 = none)",
                {n: _stats([float(r["memory"]["rows"]) for r in g]) for n, g in groups.items()})
    return ("peak resident memory (MB; these records predate the stored-samples report)",
            {n: _stats([record_values(r).get("peak_mb", math.nan) for r in g]) for n, g in groups.items()})


def protocol_of(experiment: str) -> tuple[Any, bool]:
    """The published protocol an experiment named ``reproduce NAME`` (or ``reproduce NAME quick``) ran, and
    whether it was the reduced ``--quick`` version; (None, False) for any other experiment."""
    from retain import reproduce
    from retain.errors import ConfigError

    words = experiment.split()
    if len(words) not in (2, 3) or words[0] != "reproduce" or (len(words) == 3 and words[2] != "quick"):
        return None, False
    try:
        return reproduce.get(words[1]), len(words) == 3
    except ConfigError:
        return None, False


def _reproduce_blocks(proto: Any, quick: bool, records: list[dict[str, Any]]) -> list[Block]:
    from retain import reproduce

    head, body = reproduce.comparison(proto, reproduce.cells_of(proto, records))
    blocks: list[Block] = [("h", 3, f"retain beside the paper: {proto.title}"), ("p", f"Source: {proto.source}.")]
    if quick:
        blocks.append(("p", "QUICK run (" + ", ".join(f"{k}={human(v)}" for k, v in proto.quick.items()) +
                            "): fewer seeds and steps than the paper; the difference is not a reproduction result."))
    blocks.append(("table", head, body))
    tail = "Difference = retain − paper, in percent points."
    if proto.metric_tasks:
        tail += f" Accuracy over the tasks after the first {proto.metric_tasks}, as the paper reports."
    if proto.note:
        tail += f" Note: {proto.note}"
    blocks.append(("p", tail))
    return blocks


def _difficulty_blocks(alone: list[dict[str, Any]]) -> list[Block]:
    """``retain orders``' difficulty runs (each task trained alone): a table of their own, not a bar per run."""
    by_task: dict[int, list[float]] = {}
    for r in alone:
        by_task.setdefault(int(r["config"]["alone"]), []).append(r["accuracy_matrix"][0][0])
    tasks = sorted(by_task)
    return [("h", 3, "Task difficulty"),
            ("p", f"Each task trained alone (fine-tuning, the same budget; {len(alone)} run(s)): its accuracy is its "
                  "ease, which sets the easy-to-hard and hard-to-easy orders. These runs are not in the charts "
                  "below."),
            ("table", ["task", *map(str, tasks)],
             [["accuracy alone %", *(f"{100 * float(np.mean(by_task[j])):.2f}" for j in tasks)]])]


def _experiment_blocks(name: str, records: list[dict[str, Any]], slug: str) -> list[Block]:
    from retain import reproduce

    proto, quick = protocol_of(name)
    done = [r for r in records if r["status"] == "done"]
    blocks: list[Block] = [("h", 2, name),
                           ("p", f"{len(records)} run(s): {len(done)} done, "
                                 f"{sum(r['status'] == 'failed' for r in records)} failed, "
                                 f"{sum(r['status'] == 'running' for r in records)} unfinished.")]
    labels, paper = {}, {}
    if proto is not None:
        blocks += _reproduce_blocks(proto, quick, records)
        for r in records:
            row = reproduce.row_of(proto, r["config"])
            if row is not None:
                labels[r["hash"]] = row.label
                pub = (row.published or {}).get(r["config"].get("mode"))
                paper[(str(r["config"].get("mode")), row.label)] = pub[0] if pub else None
    alone = [r for r in done if r["config"].get("alone") is not None]
    if alone:
        blocks += _difficulty_blocks(alone)
        done = [r for r in done if r["config"].get("alone") is None]
    if not done:
        return blocks
    groups = _group(done, labels, [row.label for row in proto.rows] if proto else None)
    keys = list(groups)
    vals = {k: [record_values(r) for r in groups[k]] for k in keys}
    body = []
    stats: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
    for k in keys:
        stats[k] = {m: _stats([v.get(m, math.nan) for v in vals[k]])
                    for m in ("acc", "bwt", "fwt", "forgetting", "train_s", "peak_mb")}
        s = stats[k]
        many = len(groups[k]) > 1
        pct = lambda t, many=many: (f"{100 * t[0]:.2f}" + (f" ± {100 * t[1]:.2f}" if many else "")  # noqa: E731
                                    if math.isfinite(t[0]) else "—")
        body.append([k[0], k[1], str(len(groups[k])), pct(s["acc"]), pct(s["bwt"]), pct(s["fwt"]),
                     pct(s["forgetting"]), f"{s['train_s'][0]:.2f}",
                     f"{s['peak_mb'][0]:.0f}" if math.isfinite(s["peak_mb"][0]) else "—"])
    blocks.append(("table", ["mode", "variant", "runs", "ACC %", "BWT", "FWT", "forgetting", "train s", "peak MB"],
                   body))
    method = {k: str(groups[k][0]["config"].get("method")) for k in keys}
    label = {k: k[1] if len(k[1]) <= 40 else k[1][:38] + "…" for k in keys}

    def panels(item: Any) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for k in keys:
            out.setdefault(k[0], []).append(item(k))
        return out

    bars = [("img", f"{slug}-acc.png", bars_by_mode(
        panels(lambda k: (label[k], method[k], 100 * stats[k]["acc"][0], 100 * stats[k]["acc"][1], paper.get(k))),
        "ACC %", "Final average accuracy (± std over seeds)" + (" and the paper's (black tick)" if paper else "")),
        f"ACC per variant and mode, {name}"),
            ("img", f"{slug}-forgetting.png", bars_by_mode(
        panels(lambda k: (label[k], method[k], 100 * stats[k]["forgetting"][0], 100 * stats[k]["forgetting"][1],
                          None)),
        "forgetting %", "Forgetting (± std over seeds; lower is better)"), f"forgetting per variant, {name}")]
    blocks.append(("row", bars))
    costs = [("img", f"{slug}-acc-time.png", scatter_by_mode(
        panels(lambda k: (label[k], method[k], stats[k]["train_s"][0], stats[k]["train_s"][1],
                          100 * stats[k]["acc"][0], 100 * stats[k]["acc"][1])),
        "training time (s)", "Accuracy vs training time"), f"accuracy vs training time, {name}")]
    counted = {k: _stats([record_values(r).get("gflops", math.nan) for r in groups[k]]) for k in keys}
    if any(math.isfinite(v[0]) for v in counted.values()):  # --count-flops runs
        costs.append(("img", f"{slug}-acc-flops.png", scatter_by_mode(
            panels(lambda k: (label[k], method[k], counted[k][0], counted[k][1], 100 * stats[k]["acc"][0],
                              100 * stats[k]["acc"][1])),
            "training GFLOPs (counted)", "Accuracy vs compute"), f"accuracy vs compute, {name}"))
    xlabel, mem = memory_axis(groups)
    costs.append(("img", f"{slug}-acc-memory.png", scatter_by_mode(
        panels(lambda k: (label[k], method[k], mem[k][0], mem[k][1], 100 * stats[k]["acc"][0],
                          100 * stats[k]["acc"][1])),
        xlabel, "Accuracy vs memory"), f"accuracy vs memory, {name}"))
    blocks.append(("row", costs))
    timed = {k: [r for r in groups[k] if (r.get("anytime") or {}).get("points")] for k in keys}
    if any(timed.values()):
        rows = []
        for k in keys:
            if timed[k]:
                st = {m: _stats([(r.get("metrics") or {}).get(m, math.nan) for r in timed[k]])
                      for m in ("aaa", "a_auc", "stability_gap", "min_acc", "wc_acc", "anytime_eval_fraction")}
                rows.append([k[0], k[1], str(len(timed[k])), str(timed[k][0]["anytime"]["every"])]
                            + [f"{100 * st[m][0]:.2f}" if math.isfinite(st[m][0]) else "—"
                               for m in ("aaa", "a_auc", "stability_gap", "min_acc", "wc_acc")]
                            + [f"{100 * st['anytime_eval_fraction'][0]:.0f}%"])
        blocks.append(("h", 3, "Anytime evaluation"))
        blocks.append(("p", "AAA: mean over the evaluation points of the accuracy on the tasks seen so far (Caccia et "
                            "al. 2022); A_AUC: area under accuracy versus samples per sample (Koh et al. 2022); "
                            "stability gap: mean drop of an old task's accuracy right after a switch (De Lange et al. "
                            "2023); min-ACC and WC-ACC as De Lange et al. define them. Percent points."))
        blocks.append(("table", ["mode", "variant", "runs", "every", "AAA %", "A_AUC %", "gap", "min-ACC %",
                                 "WC-ACC %", "eval cost"], rows))
        blocks.append(("img", f"{slug}-anytime.png", _anytime_curves({k: v for k, v in timed.items() if v}),
                       f"anytime accuracy, {name}"))
    curves = [("p", "Each line is one task's test accuracy after training each task in turn (mean over seeds)."),
              ("img", f"{slug}-tasks.png", _task_curves(groups), f"per-task accuracy over the sequence, {name}")]
    blocks.append(("details", f"Accuracy of each task over the sequence ({len(keys)} variant(s))", len(keys) <= 6,
                   curves))
    return blocks


OPEN_HEATMAPS = 6  # up to this many heatmaps the groups start open; beyond it they start folded


def _short_run(r: dict[str, Any]) -> str:
    c = r["config"]
    return f"{c.get('method')}, {c.get('mode')}-IL, seed {c.get('seed')}"


def build(store: Any, experiment: str | None = None, max_heatmaps: int = 200) -> list[Block]:
    runs = store.runs(experiment=experiment)
    by_hash = {r["hash"]: r for r in runs}
    exps = store.experiments()
    if experiment is not None:
        exps = {experiment: exps.get(experiment, [])}
    blocks: list[Block] = [
        ("h", 1, "retain report"),
        ("p", f"Store {store.path}, generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}: {len(runs)} "
              f"run(s), {sum(r['status'] == 'done' for r in runs)} done, "
              f"{sum(r['status'] == 'failed' for r in runs)} failed, "
              f"{sum(r['status'] == 'running' for r in runs)} unfinished; {len(exps)} experiment(s)."),
        ("p", "Metrics (docs/protocols.md): ACC = mean final accuracy over tasks; BWT = mean (R[T-1,j] − R[j,j]); "
              "FWT = mean (R[j-1,j] − b[j]); forgetting = mean (max_{j≤l<T-1} R[l,j] − R[T-1,j]). Percent points."),
    ]
    in_exp = set()
    for i, (name, hashes) in enumerate(exps.items()):
        recs = [by_hash[h] for h in hashes if h in by_hash]
        in_exp.update(hashes)
        blocks += _experiment_blocks(name, recs, f"exp{i}")
    rest = [r for r in runs if r["hash"] not in in_exp]
    if rest:
        blocks += _experiment_blocks("Runs outside any experiment", rest, "other")
    blocks.append(("h", 2, "Runs"))
    body = []
    for r in runs:
        m = r.get("metrics") or {}
        acc = m.get("acc")
        body.append([r["hash"][:10], r["status"], _describe_run(r),
                     f"{100 * acc:.2f}" if acc is not None and math.isfinite(acc) else "—",
                     f"{100 * m['forgetting']:.2f}" if m.get("forgetting") is not None
                     and math.isfinite(m["forgetting"]) else "—"])
    table = ("table", ["run", "status", "configuration", "ACC %", "forgetting %"], body)
    blocks.append(("details", f"All {len(runs)} run(s)", len(runs) <= 20, [table]))
    blocks.append(("h", 2, "Accuracy matrix per run"))
    blocks.append(("p", "Rows: after training task i; columns: accuracy on task j's test set (%). One folded "
                        "group per experiment; click a group to open it."))
    shown = [r for r in runs if r["status"] == "done" and r.get("accuracy_matrix")]
    if len(shown) > max_heatmaps:
        blocks.append(("p", f"{len(shown) - max_heatmaps} more run(s) not drawn (--max-heatmaps {max_heatmaps})."))
    shown = shown[:max_heatmaps]
    home: dict[str, str] = {}  # a run's heatmap goes under the first experiment that holds it
    for name, hashes in exps.items():
        for h in hashes:
            home.setdefault(h, name)
    by_group: dict[str, list[dict[str, Any]]] = {}
    for r in shown:
        by_group.setdefault(home.get(r["hash"], "Runs outside any experiment"), []).append(r)
    few = len(shown) <= OPEN_HEATMAPS
    for name, rs in by_group.items():
        figs = [(f"run-{r['hash'][:10]}.png", heatmap(r["accuracy_matrix"], _short_run(r)),
                 f"accuracy matrix of run {r['hash'][:10]}", f"{r['hash'][:10]}: {_describe_run(r)}") for r in rs]
        blocks.append(("details", f"{name}: {len(rs)} heatmap(s)", few, [("figs", figs)]))
    failed = [r for r in runs if r["status"] == "failed"]
    if failed:
        blocks.append(("h", 2, "Failed runs"))
        blocks.append(("table", ["run", "configuration", "task", "step", "reason"],
                       [[r["hash"][:10], _describe_run(r), str(r.get("error_task") or "—"),
                         str(r.get("error_step") or "—"), r.get("error") or ""] for r in failed]))
    return blocks


def pngs(blocks: list[Block]) -> list[tuple[str, bytes]]:
    """Every (file name, PNG) in the blocks, folded ones included."""
    out = []
    for b in blocks:
        if b[0] == "img":
            out.append((b[1], b[2]))
        elif b[0] == "figs":
            out += [(f[0], f[1]) for f in b[1]]
        elif b[0] == "details":
            out += pngs(b[3])
        elif b[0] == "row":
            out += pngs(b[1])
    return out


def to_markdown(blocks: list[Block], images: str = "images") -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "table":
            out.append(markdown(b[1], [[c.replace("|", "\\|") for c in row] for row in b[2]]))
        elif b[0] == "img":
            out.append(f"![{b[3]}]({images}/{b[1]})")
        elif b[0] == "figs":
            out += [f"{f[3]}\n\n![{f[2]}]({images}/{f[0]})" for f in b[1]]
        elif b[0] == "details":  # GitHub renders <details> with Markdown inside when blank lines surround it
            out.append(f"<details{' open' if b[2] else ''}><summary>{html.escape(b[1])}</summary>")
            out.append(to_markdown(b[3], images).rstrip("\n"))
            out.append("</details>")
        elif b[0] == "row":
            out.append(to_markdown(b[1], images).rstrip("\n"))
    return "\n\n".join(out) + "\n"


_CSS = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.4}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:3px 7px;text-align:left}th{background:#f2f2f2}img{display:block;max-width:100%;margin:.8em 0}"
        "h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}"
        "details{margin:.6em 0;border:1px solid #e2e2e2;border-radius:4px;padding:.3em .8em}"
        "summary{cursor:pointer;font-weight:600;padding:.2em 0}"
        ".figs{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;width:270px}figure img{margin:0}"
        "figcaption{font-size:11px;color:#555;word-wrap:break-word}"
        ".row{display:flex;flex-wrap:wrap;gap:0 24px;align-items:flex-start}")


def _html_blocks(blocks: list[Block]) -> list[str]:
    e = html.escape
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "table":
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b[1]) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b[2]]
            out.append("</table>")
        elif b[0] == "img":
            data = base64.b64encode(b[2]).decode()
            out.append(f"<img alt='{e(b[3])}' src='data:image/png;base64,{data}'>")
        elif b[0] == "figs":
            out.append("<div class='figs'>")
            out += [f"<figure><img alt='{e(f[2])}' src='data:image/png;base64,{base64.b64encode(f[1]).decode()}'>"
                    f"<figcaption>{e(f[3])}</figcaption></figure>" for f in b[1]]
            out.append("</div>")
        elif b[0] == "details":
            out.append(f"<details{' open' if b[2] else ''}><summary>{e(b[1])}</summary>")
            out += _html_blocks(b[3])
            out.append("</details>")
        elif b[0] == "row":  # side by side where the page is wide enough, else one under the other
            out += ["<div class='row'>", *_html_blocks(b[1]), "</div>"]
    return out


def to_html(blocks: list[Block]) -> str:
    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>retain report</title>",
           f"<style>{_CSS}</style>", "</head><body>", *_html_blocks(blocks), "</body></html>"]
    return "\n".join(out) + "\n"


def write(store: Any, out_dir: str | os.PathLike, experiment: str | None = None,
          max_heatmaps: int = 200) -> tuple[Path, Path]:
    """Write ``report.md`` (+ ``images/*.png``) and ``report.html`` (self-contained) into ``out_dir``."""
    from retain.errors import ConfigError

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the report")
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the folder ({e.strerror}); choose another") from None
    blocks = build(store, experiment, max_heatmaps)
    for name, png in pngs(blocks):
        (out / "images" / name).write_bytes(png)
    md, page = out / "report.md", out / "report.html"
    for path, text in ((md, to_markdown(blocks)), (page, to_html(blocks))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return md, page
