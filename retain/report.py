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
from pathlib import Path
from typing import Any

import numpy as np

from retain.experiments import markdown, record_values

Block = tuple  # ("h", level, text) | ("p", text) | ("table", head, body) | ("img", name, png, alt)


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
        name = k[7:] if k.startswith("params.") else k
        if isinstance(v, list):
            v = "-".join(map(str, v))
        parts.append(f"{name}={v}")
    return c.get("method", "?") + (f" ({', '.join(parts)})" if parts else "")


def _group(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    varying = _varying(records)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(variant(r, varying), []).append(r)
    return groups


def _stats(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


# ----------------------------------------------------------------------------------------------------- plots

def _bars(names: list[str], means: list[float], errs: list[float], ylabel: str, title: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(names) + 2), 3.2))
    ax.bar(range(len(names)), means, yerr=errs, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30 if max(map(len, names)) > 8 else 0, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _scatter(points: list[tuple[str, float, float, float, float]], xlabel: str, title: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, x, xe, y, ye in points:
        ax.errorbar([x], [y], xerr=[xe], yerr=[ye], fmt="o", capsize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ACC %")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(points) <= 12:
        ax.legend(fontsize=7, loc="best")
    return _png(fig)


def _task_curves(groups: dict[str, list[dict[str, Any]]]) -> bytes:
    """Accuracy of each task (one line per task) after training each task, mean over the variant's runs."""
    plt = _plt()
    names = list(groups)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        mats = [np.asarray(r["accuracy_matrix"], dtype=float) for r in groups[name] if r.get("accuracy_matrix")]
        shapes = {m.shape for m in mats}
        if not mats or len(shapes) > 1:
            ax.set_visible(False)
            continue
        R = np.nanmean(np.stack(mats), 0) * 100
        T = R.shape[0]
        for j in range(R.shape[1]):
            ax.plot(range(T), R[:, j], marker="o", ms=3, label=f"task {j}")
            ax.axvline(j, color="grey", lw=0.3) if j < T else None
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("after training task", fontsize=8)
        ax.set_ylabel("accuracy %", fontsize=8)
        ax.set_ylim(-2, 102)
        ax.set_xticks(range(T))
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(10, len(labels)), fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _png(fig)


def heatmap(R: list[list[float]], title: str) -> bytes:
    plt = _plt()
    A = np.asarray(R, dtype=float) * 100
    T = A.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * A.shape[1], 0.9 + 0.4 * T))
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
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


# ---------------------------------------------------------------------------------------------- the document

def _describe_run(r: dict[str, Any]) -> str:
    c = r["config"]
    params = ", ".join(f"{k}={v}" for k, v in (c.get("params") or {}).items())
    extra = f", order {'-'.join(map(str, c['task_order']))}" if c.get("task_order") else ""
    extra += f", task {c['alone']} alone" if c.get("alone") is not None else ""
    return (f"{c.get('method')} on {c.get('benchmark')} ({c.get('mode')}-IL), seed {c.get('seed')}"
            f"{extra}{'; ' + params if params else ''}")


def memory_axis(groups: dict[str, list[dict[str, Any]]]) -> tuple[str, dict[str, tuple[float, float]]]:
    """The x axis of the accuracy-versus-memory plot: the stored samples each variant keeps at most, as its
    records report them (``record["memory"]["rows"]``, from ``Method.memory``), or, when any record predates that
    report (older stores have no ``memory`` key), the peak resident memory in MB, labelled so."""
    if all(isinstance(r.get("memory"), dict) and "rows" in r["memory"] for g in groups.values() for r in g):
        return ("stored samples (rows the method keeps; 0 = none)",
                {n: _stats([float(r["memory"]["rows"]) for r in g]) for n, g in groups.items()})
    return ("peak resident memory (MB; these records predate the stored-samples report)",
            {n: _stats([record_values(r).get("peak_mb", math.nan) for r in g]) for n, g in groups.items()})


def _experiment_blocks(name: str, records: list[dict[str, Any]], slug: str) -> list[Block]:
    done = [r for r in records if r["status"] == "done"]
    blocks: list[Block] = [("h", 2, name),
                           ("p", f"{len(records)} run(s): {len(done)} done, "
                                 f"{sum(r['status'] == 'failed' for r in records)} failed, "
                                 f"{sum(r['status'] == 'running' for r in records)} unfinished.")]
    if not done:
        return blocks
    groups = dict(sorted(_group(done).items()))
    names = list(groups)
    vals = {n: [record_values(r) for r in groups[n]] for n in names}
    body = []
    stats: dict[str, dict[str, tuple[float, float]]] = {}
    for n in names:
        stats[n] = {m: _stats([v.get(m, math.nan) for v in vals[n]])
                    for m in ("acc", "bwt", "fwt", "forgetting", "train_s", "peak_mb")}
        s = stats[n]
        many = len(groups[n]) > 1
        pct = lambda t, many=many: (f"{100 * t[0]:.2f}" + (f" ± {100 * t[1]:.2f}" if many else "")  # noqa: E731
                                    if math.isfinite(t[0]) else "—")
        body.append([n, str(len(groups[n])), pct(s["acc"]), pct(s["bwt"]), pct(s["fwt"]), pct(s["forgetting"]),
                     f"{s['train_s'][0]:.2f}", f"{s['peak_mb'][0]:.0f}" if math.isfinite(s["peak_mb"][0]) else "—"])
    blocks.append(("table", ["variant", "runs", "ACC %", "BWT", "FWT", "forgetting", "train s", "peak MB"], body))
    short = [n if len(n) <= 28 else n[:26] + "…" for n in names]
    acc = [100 * stats[n]["acc"][0] for n in names]
    blocks.append(("img", f"{slug}-acc.png", _bars(short, acc, [100 * stats[n]["acc"][1] for n in names],
                                                   "ACC %", "Final average accuracy (± std over seeds)"),
                   f"ACC per variant, {name}"))
    blocks.append(("img", f"{slug}-forgetting.png",
                   _bars(short, [100 * stats[n]["forgetting"][0] for n in names],
                         [100 * stats[n]["forgetting"][1] for n in names], "forgetting %",
                         "Forgetting (± std over seeds; lower is better)"), f"forgetting per variant, {name}"))
    pts_t = [(s_, stats[n]["train_s"][0], stats[n]["train_s"][1], 100 * stats[n]["acc"][0],
              100 * stats[n]["acc"][1]) for s_, n in zip(short, names)]
    blocks.append(("img", f"{slug}-acc-time.png", _scatter(pts_t, "training time (s)", "Accuracy vs time"),
                   f"accuracy vs training time, {name}"))
    xlabel, mem = memory_axis(groups)
    pts_m = [(s_, mem[n][0], mem[n][1], 100 * stats[n]["acc"][0], 100 * stats[n]["acc"][1])
             for s_, n in zip(short, names)]
    blocks.append(("img", f"{slug}-acc-memory.png", _scatter(pts_m, xlabel, "Accuracy vs memory"),
                   f"accuracy vs memory, {name}"))
    blocks.append(("p", "Accuracy of each task over the sequence (mean over seeds): each line is one task's test "
                        "accuracy after training each task in turn."))
    blocks.append(("img", f"{slug}-tasks.png", _task_curves(groups), f"per-task accuracy over the sequence, {name}"))
    return blocks


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
        ("p", "Metrics (PROTOCOLS.md): ACC = mean final accuracy over tasks; BWT = mean (R[T-1,j] − R[j,j]); "
              "FWT = mean (R[j-1,j] − b[j]); forgetting = mean (max_l R[l,j] − R[T-1,j]). Percent points."),
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
    blocks.append(("table", ["run", "status", "configuration", "ACC %", "forgetting %"], body))
    blocks.append(("h", 2, "Accuracy matrix per run"))
    blocks.append(("p", "Rows: after training task i; columns: accuracy on task j's test set (%)."))
    shown = [r for r in runs if r["status"] == "done" and r.get("accuracy_matrix")]
    if len(shown) > max_heatmaps:
        blocks.append(("p", f"{len(shown) - max_heatmaps} more run(s) not drawn (--max-heatmaps {max_heatmaps})."))
    for r in shown[:max_heatmaps]:
        blocks.append(("h", 3, f"run {r['hash'][:10]}: {_describe_run(r)}"))
        blocks.append(("img", f"run-{r['hash'][:10]}.png", heatmap(r["accuracy_matrix"], _describe_run(r)),
                       f"accuracy matrix of run {r['hash'][:10]}"))
    failed = [r for r in runs if r["status"] == "failed"]
    if failed:
        blocks.append(("h", 2, "Failed runs"))
        blocks.append(("table", ["run", "configuration", "task", "step", "reason"],
                       [[r["hash"][:10], _describe_run(r), str(r.get("error_task") or "—"),
                         str(r.get("error_step") or "—"), r.get("error") or ""] for r in failed]))
    return blocks


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
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[Block]) -> str:
    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>retain report</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;"
           "padding:3px 7px;text-align:left}th{background:#f2f2f2}img{max-width:100%;margin:.5em 0}</style>",
           "</head><body>"]
    e = html.escape
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
    out.append("</body></html>")
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
    for b in blocks:
        if b[0] == "img":
            (out / "images" / b[1]).write_bytes(b[2])
    md, page = out / "report.md", out / "report.html"
    for path, text in ((md, to_markdown(blocks)), (page, to_html(blocks))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return md, page
