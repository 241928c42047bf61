"""The HTML/Markdown report, built from fake store records (no training): retain beside the paper in reproduce
sections, charts per mode coloured by method, difficulty runs kept apart, numbers for people, folded heatmaps."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from retain import report, reproduce


class FakeStore:
    def __init__(self, experiments: dict[str, list[dict]]):
        self.path = Path("fake.db")
        self._exps = {name: [r["hash"] for r in recs] for name, recs in experiments.items()}
        self._runs = {r["hash"]: r for recs in experiments.values() for r in recs}

    def runs(self, experiment: str | None = None) -> list[dict]:
        if experiment is None:
            return list(self._runs.values())
        return [self._runs[h] for h in self._exps.get(experiment, [])]

    def experiments(self) -> dict[str, list[str]]:
        return dict(self._exps)


_n = iter(range(10**6))


def rec(method: str, mode: str = "class", final: float = 0.5, params: dict | None = None, tasks: int = 3,
        rows: int | None = 0, **config) -> dict:
    R = [[1.0 if j <= i else 0.0 for j in range(tasks)] for i in range(tasks - 1)] + [[final] * tasks]
    out = {"hash": f"{next(_n):010x}".ljust(40, "a"), "status": "done", "accuracy_matrix": R,
           "config": {"method": method, "mode": mode, "benchmark": "split-mnist", "seed": 0,
                      "params": params or {}, **config},
           "metrics": {"acc": final, "bwt": -0.1, "fwt": 0.0, "forgetting": 0.2},
           "timings": {"train_s": 1.5}, "peak_memory_mb": 300.0}
    if rows is not None:
        out["memory"] = {"rows": rows, "bytes": 8 * rows}
    return out


def tables(blocks: list) -> list:
    found = []
    for b in blocks:
        if b[0] == "table":
            found.append(b)
        elif b[0] == "details":
            found += tables(b[3])
    return found


def test_reproduce_section_shows_retain_beside_the_paper_with_the_difference():
    recs = [rec("finetune", "task", 0.90), rec("finetune", "task", 0.92, seed=1),  # two seeds: mean 91.00
            rec("dgr", "class", 0.50, {"distill": True}), rec("dgr", "domain", 0.80, {"distill": False})]
    blocks = report.build(FakeStore({"reproduce p1 quick": recs}))
    head, body = next((t[1], t[2]) for t in tables(blocks) if "difference" in t[1])
    assert head == ["method", "mode", "seeds", "retain ACC % (std)", "paper (SEM)", "difference"]
    rows = {(r[0], r[1]): r for r in body}
    assert rows[("None (fine-tune)", "task")][2:] == ["2", "91.00 ± 1.41", "85.15 ± 1.00", "+5.85"]
    assert rows[("DGR + distill", "class")][3:] == ["50.00", "91.84 ± 0.27", "-41.84"]  # the most specific row
    assert rows[("DGR", "domain")][3:] == ["80.00", "95.74 ± 0.23", "-15.74"]
    assert list(rows) == [("None (fine-tune)", "task"), ("DGR", "domain"), ("DGR + distill", "class")]
    page = report.to_html(blocks)
    assert "QUICK run" in page and proto_source("p1") in page
    assert "<th>paper (SEM)</th><th>difference</th>" in page


def proto_source(name: str) -> str:
    import html

    return html.escape(reproduce.get(name).source)


def test_reproduce_accuracy_counts_the_papers_tasks_only():
    # A-GEM's protocol leaves its first 3 tasks out of the metrics: only the last column of a 4-task run counts
    r = rec("agem", "domain", 0.5, {"memory_per_task": 250}, tasks=4)
    r["accuracy_matrix"][-1] = [0.0, 0.0, 0.0, 0.7]
    _, body = reproduce.comparison(reproduce.get("p2-agem"), reproduce.cells_of(reproduce.get("p2-agem"), [r]))
    assert body == [["A-GEM", "domain", "1", "70.00", "89.10", "-19.10"]]


def test_other_experiments_have_no_paper_columns():
    blocks = report.build(FakeStore({"compare split-mnist": [rec("er"), rec("ewc")],
                                     "reproduce nosuch": [rec("er")]}))
    assert not any("difference" in t[1] for t in tables(blocks))


def test_charts_have_one_panel_per_mode_and_bars_coloured_by_method(monkeypatch):
    drawn = []
    real = report.bars_by_mode
    monkeypatch.setattr(report, "bars_by_mode", lambda panels, *a: drawn.append(panels) or real(panels, *a))
    recs = [rec(m, mode, params={"lambda": 1e9} if m == "ewc" else {}) for mode in ("class", "task", "domain")
            for m in ("finetune", "ewc", "er")]
    report.build(FakeStore({"compare": recs}))
    acc = drawn[0]
    assert list(acc) == ["task", "domain", "class"]  # one panel per mode, in the usual order
    for bars in acc.values():
        assert [(b[0], b[1]) for b in bars] == [("er", "er"), ("ewc", "ewc"), ("finetune", "finetune")]
        assert not any("mode=" in b[0] for b in bars)  # the mode is the panel, not part of the label
    colours = report._colours([b[1] for bars in acc.values() for b in bars])
    assert len(set(colours.values())) == 3


def test_reproduce_charts_use_the_papers_row_names_and_ticks(monkeypatch):
    drawn = []
    monkeypatch.setattr(report, "bars_by_mode", lambda panels, *a: drawn.append(panels) or b"")
    report.build(FakeStore({"reproduce p1": [rec("dgr", "class", 0.5, {"distill": True}),
                                             rec("dgr", "class", 0.4, {"distill": False})]}))
    bars = drawn[0]["class"]
    assert [(b[0], b[1], b[4]) for b in bars] == [("DGR", "dgr", 91.24), ("DGR + distill", "dgr", 91.84)]


def test_orders_difficulty_runs_are_kept_out_of_the_bar_charts(monkeypatch):
    drawn = []
    monkeypatch.setattr(report, "bars_by_mode", lambda panels, *a: drawn.append(panels) or b"")
    alone = [rec("finetune", tasks=1, final=acc, alone=j, task_order=None) for j, acc in enumerate((0.9, 0.4, 0.7))]
    runs = [rec(m, task_order=o) for m in ("finetune", "er") for o in ([0, 1, 2], [2, 1, 0])]
    blocks = report.build(FakeStore({"orders split-mnist": alone + runs}))
    labels = [b[0] for bars in drawn[0].values() for b in bars]
    assert labels == ["er (order=0-1-2)", "er (order=2-1-0)", "finetune (order=0-1-2)", "finetune (order=2-1-0)"]
    difficulty = next(t for t in tables(blocks) if t[1][0] == "task")
    assert difficulty[1] == ["task", "0", "1", "2"] and difficulty[2] == [["accuracy alone %", "90.00", "40.00",
                                                                          "70.00"]]
    variants = next(t for t in tables(blocks) if t[1][:2] == ["mode", "variant"])
    assert not any("alone" in row[1] for row in variants[2])


@pytest.mark.parametrize("value, text", [(1e9, "1e9"), (1000000000.0, "1e9"), (100.0, "100"), (0.001, "0.001"),
                                         (2.5e-5, "2.5e-5"), (0.1, "0.1"), (5000, "5000"), (0, "0"),
                                         ([3, 1, 2], "3-1-2"), (True, "True"), ("adam", "adam")])
def test_numbers_are_written_for_people(value, text):
    assert report.human(value) == text


def test_run_descriptions_and_variants_format_their_numbers():
    r = rec("ewc", params={"lambda": 1000000000.0, "gamma": 1.0})
    assert report._describe_run(r).endswith("; lambda=1e9, gamma=1")
    other = rec("ewc", params={"lambda": 100.0, "gamma": 1.0})
    assert report.variant(r, report._varying([r, other])) == "ewc (lambda=1e9)"
    page = report.to_html(report.build(FakeStore({"sweep": [r, other]})))
    assert "lambda=1e9" in page and "1000000000.0" not in page


def test_memory_axis_is_rows_stored_in_total():
    label, x = report.memory_axis({"agem": [rec("agem", rows=1250)], "er": [rec("er", rows=200)]})
    assert "rows kept in total" in label and x == {"agem": (1250.0, 0.0), "er": (200.0, 0.0)}


def heatmap_groups(page: str) -> list[str]:
    return re.findall(r"<details( open)?><summary>[^<]*heatmap\(s\)</summary>", page)


def test_a_few_heatmaps_are_open_many_are_folded(tmp_path):
    few = report.build(FakeStore({"compare": [rec("er"), rec("ewc")], "sweep": [rec("si")]}))
    assert heatmap_groups(report.to_html(few)) == [" open", " open"]
    many = [rec("er", seed=s) for s in range(report.OPEN_HEATMAPS + 1)]
    blocks = report.build(FakeStore({"compare": many[:3], "sweep": many[3:]}))
    page = report.to_html(blocks)
    assert heatmap_groups(page) == ["", ""]  # folded, one group per experiment
    assert page.count("<figure>") == len(many)  # every heatmap is still there, inside its group
    md = report.to_markdown(blocks)
    assert md.count("<details>") >= 2 and md.count("](images/run-") == len(many)
    md_path, _ = report.write(FakeStore({"compare": many}), tmp_path / "rep")
    assert len(list((tmp_path / "rep" / "images").glob("run-*.png"))) == len(many)
