"""compare / orders / sweep / reproduce / report / runs / export on split-digits (tiny budgets)."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import pytest

from retain import experiments as ex
from retain import reproduce
from retain.cli import main
from retain.store import Store

TINY = ["--epochs", "1", "--n-tasks", "3", "--quiet"]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compare_table_and_workers_give_identical_results(tmp_path, capsys):
    db1, db2 = str(tmp_path / "one.db"), str(tmp_path / "two.db")
    code, out, _ = cli(capsys, "compare", "--methods", "finetune,er", "--seeds", "2", "--store", db1,
                       "--workers", "1", *TINY)
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("| mode"))
    for col in ("method", "ACC %", "BWT", "FWT", "forgetting", "memory rows", "memory MB", "train s"):
        assert col in header
    rows = [line for line in out.splitlines() if re.match(r"\| class +\| (finetune|er) ", line)]
    assert len(rows) == 2 and all(" ± " in r for r in rows)
    assert "*" in out  # best of each column marked
    code, _, _ = cli(capsys, "compare", "--methods", "finetune,er", "--seeds", "2", "--store", db2,
                     "--workers", "2", *TINY)
    assert code == 0
    with Store(db1) as a, Store(db2) as b:
        ra, rb = {r["hash"]: r for r in a.runs()}, {r["hash"]: r for r in b.runs()}
        assert len(ra) == 4 and ra.keys() == rb.keys()
        for h in ra:  # same seed -> identical matrix, in this process or in a pool of 2
            assert ra[h]["status"] == rb[h]["status"] == "done"
            assert ra[h]["accuracy_matrix"] == rb[h]["accuracy_matrix"]


def test_compare_default_is_the_classic_comparison(monkeypatch, tmp_path):
    seen = {}

    def fake(args, jobs, store, experiment, label):
        seen["methods"] = sorted({j.config.method for j in jobs})
        seen["benchmark"] = {j.config.benchmark for j in jobs}
        return []

    from retain.cli import lab

    monkeypatch.setattr(lab, "_run", fake)
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--quiet"]) == 0
    available, _ = ex.available(ex.CLASSIC)
    assert seen["methods"] == sorted(available) and seen["benchmark"] == {"split-digits"}


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    db = tmp_path / "x.db"
    code, _, err = cli(capsys, "compare", "--methods", "finetune,nosuch", "--store", str(db), *TINY)
    assert code == 2 and "unknown method 'nosuch'" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.toml"
    for text, msg in (("name = [", "not valid TOML"), ("methodz = 1", "unknown key"),
                      ("methods = []", "methods must be"), ("val_fraction = 0\n[[methods]]\nname='er'", "validation"),
                      ("[[methods]]\nname = 'er'\n[methods.params]\nnope = [1]", "unknown parameter")):
        bad.write_text(text)
        code, _, err = cli(capsys, "sweep", str(bad), "--store", str(db), "--quiet")
        assert code == 2 and msg in err, (text, err)
        assert len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "reproduce", "p9", "--store", str(db))
    assert code == 2 and "unknown protocol" in err
    assert not db.exists()
    db.write_text("not a database" * 100)
    code, _, err = cli(capsys, "runs", "--store", str(db))
    assert code == 2 and "not a retain results store" in err


def test_orders_table(tmp_path, capsys):
    code, out, _ = cli(capsys, "orders", "--methods", "finetune", "--random-orders", "1", "--store",
                       str(tmp_path / "o.db"), "--workers", "1", *TINY)
    assert code == 0
    for word in ("Task difficulty", "given", "easy-to-hard", "hard-to-easy", "random-1", "Most order-sensitive"):
        assert word in out
    with Store(tmp_path / "o.db") as s:
        alone = [r for r in s.runs() if r["config"].get("alone") is not None]
        assert len(alone) == 3 and all(len(r["accuracy_matrix"]) == 1 for r in alone)
        orders = {tuple(r["config"]["task_order"]) for r in s.runs() if r["config"].get("task_order")}
        assert len(orders) == 4  # given, easy-to-hard, hard-to-easy, one random (all distinct here)


def test_task_orders_follow_difficulty():
    o = ex.task_orders([0.5, 0.9, 0.7], k=2, seed=1)
    assert o["easy-to-hard"] == [1, 2, 0] and o["hard-to-easy"] == [0, 2, 1]
    assert len({tuple(v) for v in o.values()}) == len(o) == 5


def _rec(h, val, test):
    return {"hash": h, "status": "done", "val_matrix": [[val, val], [val, val]],
            "metrics": {"acc": test, "bwt": 0.0, "fwt": 0.0, "forgetting": 0.0},
            "timings": {"train_s": 1.0}, "peak_memory_mb": 1.0}


def test_sweep_chooses_on_validation_never_test():
    from retain.api import RunConfig

    sweep = ex.parse_sweep({"methods": [{"name": "er", "params": {"buffer_size": [10, 20]}}], "epochs": 1},
                           "s.toml", RunConfig())
    pairs = ex.sweep_jobs(sweep)
    assert [p[1].config.params["buffer_size"] for p in pairs] == [10, 20]
    assert all(p[1].config.val_fraction == 0.2 for p in pairs)
    # candidate 0: better on validation, worse on test -> it is the one chosen
    chosen = ex.choose(sweep, pairs, [_rec("a", 0.9, 0.1), _rec("b", 0.5, 0.99)])
    (best,) = chosen["best"]
    assert best["params"] == {"buffer_size": 10} and math.isclose(best["acc"][0], 0.1)


def test_sweep_end_to_end_with_a_failed_candidate(tmp_path, capsys):
    f = tmp_path / "s.toml"
    f.write_text('name = "t"\nbenchmark = "split-digits"\nn_tasks = 2\nepochs = 1\nseeds = 1\noptimizer = "sgd"\n'
                 '[[methods]]\nname = "finetune"\n[methods.train]\nlr = [1e30, 0.05, 0.01]\n')
    out_json = tmp_path / "chosen.json"
    code, out, _ = cli(capsys, "sweep", str(f), "--store", str(tmp_path / "s.db"), "--quiet", "--workers", "1",
                       "--json", str(out_json))
    assert code == 1 and "failed" in out and "Pareto" in out  # a partial failure: the report, then exit 1
    chosen = json.loads(out_json.read_text())
    vals = [c["val_score"] for c in chosen["candidates"] if c["val_score"] is not None]
    assert len(vals) == 2  # the diverged one is recorded as failed, the others ran
    (best,) = chosen["best"]
    assert best["val_score"] == max(vals)
    with Store(tmp_path / "s.db") as s:
        failed = s.runs(status="failed")
        assert len(failed) == 1 and "nan" in failed[0]["error"] and failed[0]["error_step"] is not None


def test_yaml_random_sweep_parses():
    from retain import config
    from retain.api import RunConfig

    path = Path(__file__).resolve().parents[1] / "examples" / "random_search.yaml"
    sweep = ex.parse_sweep(config.load(path), str(path), RunConfig())
    assert len(sweep.candidates) == 6 and sweep.search == "random"
    lams = [c[1]["lambda"] for c in sweep.candidates]
    assert all(1.0 <= x <= 1e5 for x in lams) and len(set(lams)) == 6
    assert all(3e-4 <= c[2]["lr"] <= 1e-2 for c in sweep.candidates)


def test_report_runs_export(tmp_path, capsys):
    db = str(tmp_path / "r.db")
    assert main(["compare", "--methods", "finetune,er", "--seeds", "1", "--store", db, "--workers", "1", *TINY]) == 0
    assert main(["run", "--lr", "1e30", "--optimizer", "sgd", "--store", db, *TINY]) == 1  # a failed run too
    capsys.readouterr()
    code, out, _ = cli(capsys, "report", "--store", db, "--out", str(tmp_path / "rep"))
    assert code == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    page = (tmp_path / "rep" / "report.html").read_text()
    with Store(db) as s:
        runs = s.runs()
    assert len(runs) == 3
    for r in runs:
        assert r["hash"][:10] in md and r["hash"][:10] in page
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) >= 2 + 5  # a heatmap per finished run + ACC, forgetting, time, memory, per-task plots
    assert all(i.startswith("iVBORw0KGgo") for i in images)  # PNG signature
    assert "src='images/" not in page  # self-contained
    for name in re.findall(r"\]\((images/[^)]+)\)", md):
        assert (tmp_path / "rep" / name).exists()
    assert "Failed runs" in md and "nan" in md
    code, out, _ = cli(capsys, "runs", "--store", db)
    assert code == 0 and "3 run(s)" in out and "failed" in out
    code, out, _ = cli(capsys, "export", "--store", db, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 3 and {r["status"] for r in rows} == {"done", "failed"}
    code, out, _ = cli(capsys, "export", "--store", db, "--format", "json", "--status", "done")
    assert len(json.loads(out)) == 2


def test_run_config_file_and_flags_override(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text("benchmark: split-digits\nmethod: er\nepochs: 1\nn_tasks: 2\nparams:\n  buffer_size: 33\n")
    out = tmp_path / "r.json"
    assert main(["run", "--config", str(f), "--quiet", "--json", str(out)]) == 0
    cfg = json.loads(out.read_text())["config"]
    assert cfg["method"] == "er" and cfg["epochs"] == 1 and cfg["params"]["buffer_size"] == 33
    assert main(["run", "--config", str(f), "--quiet", "--json", str(out), "--param", "buffer_size=7",
                 "--n-tasks", "3"]) == 0
    cfg = json.loads(out.read_text())["config"]
    assert cfg["params"]["buffer_size"] == 7 and cfg["n_tasks"] == 3 and cfg["epochs"] == 1
    f.write_text("epochz: 1\n")
    capsys.readouterr()
    assert main(["run", "--config", str(f)]) == 2
    assert "unknown option 'epochz'" in capsys.readouterr().err


def test_reproduce_prints_paper_numbers_and_skips_missing(tmp_path, capsys, monkeypatch):
    proto = reproduce.Protocol(
        "tiny", "tiny protocol", "test", "split-digits", ("class",), {"epochs": 1, "n_tasks": 2}, 2,
        [reproduce.Row("Fine-tune", "finetune", {}, {"class": (50.0, 1.0)}),
         reproduce.Row("Missing", "nosuchmethod", {}, {"class": (90.0, 1.0)})],
        {"seeds": 1})
    monkeypatch.setitem(reproduce.PROTOCOLS, "tiny", proto)
    code, out, err = cli(capsys, "reproduce", "tiny", "--quick", "--store", str(tmp_path / "p.db"), "--quiet",
                         "--workers", "1")
    assert code == 0
    assert "QUICK" in out and "paper" in out and "difference" in out and "50.00 ± 1.00" in out
    assert "nosuchmethod" in err and "skipped" in err
    row = next(line for line in out.splitlines() if line.startswith("| Fine-tune"))
    ours, diff = float(row.split("|")[4]), float(row.split("|")[6])
    assert math.isclose(ours - 50.0, diff, abs_tol=0.011)


@pytest.mark.parametrize("name", list(reproduce.PROTOCOLS))
def test_protocol_registry_is_consistent(name):
    from retain import benchmarks
    from retain.method import create, methods

    p = reproduce.PROTOCOLS[name]
    benchmarks.get(p.benchmark)
    for row in p.rows:
        assert set(row.published) <= set(p.modes)
        if row.method in methods():  # the recorded hyper-parameters are ones the method takes
            create(row.method, row.params)


def _der_cifar10_jobs(quick: bool) -> list[tuple[reproduce.Row, str, dict]]:
    """Each cell ``reproduce der-cifar10`` would run, resolved as the CLI resolves it (no data, no training)."""
    from retain.config import RunConfig

    p = reproduce.get("der-cifar10")
    settings = dict(p.settings)
    if quick:
        settings.update({k: v for k, v in p.quick.items() if k != "seeds"})
    base = RunConfig(benchmark=p.benchmark, data_dir="/nowhere", device="cpu")
    return [(row, mode, ex.make_job(base, row.label, method=row.method, mode=mode, seed=0, params=dict(row.params),
                                    **{**settings, **row.train}).spec) for row, mode in reproduce.plan(p, quick)]


def test_der_cifar10_holds_the_papers_table_and_best_arguments():
    p = reproduce.get("der-cifar10")
    assert reproduce.get("p5") is p and p.benchmark == "seq-cifar10" and p.seeds == 10 and p.spread == "std"
    run = reproduce.plan(p)
    assert {mode for _, mode in run} == {"class"}  # the task-IL cells are read from the class-IL runs
    cells = {(row.label, mode): row for row, _ in run for mode in ("class", "task")}
    labels = {label for label, _ in cells}
    assert labels == {f"{m} ({b})" for m in ("ER", "DER", "DER++") for b in (200, 500, 5120)} | \
        {f"{m} ({b})" for m in ("A-GEM", "GEM") for b in (200, 500)} | {"oEWC", "SI", "LwF", "JOINT", "SGD"}
    assert all(row.published.get("class") and row.published.get("task") for row in cells.values())
    # spot checks against PROTOCOLS.md P5 (Buzzega et al. 2020, Table 2)
    assert cells[("DER (500)", "class")].published["class"] == (70.51, 1.67)
    assert cells[("DER (500)", "task")].published["task"] == (93.40, 0.39)
    assert cells[("DER++ (5120)", "class")].published["class"] == (85.24, 0.49)
    assert cells[("ER (200)", "task")].published["task"] == (91.19, 0.94)
    assert cells[("A-GEM (500)", "class")].published["class"] == (22.67, 0.57)
    assert cells[("SGD", "task")].published["task"] == (61.02, 3.33)
    assert cells[("JOINT", "class")].published["class"] == (92.20, 0.15)
    # best arguments (Mammoth utils/best_args.py, seq-cifar10)
    assert cells[("DER++ (200)", "class")].params == {"buffer_size": 200, "alpha": 0.1, "beta": 0.5,
                                                       "replay_batch": 32}
    assert cells[("DER++ (5120)", "task")].params["alpha"] == 0.1 and \
        cells[("DER++ (5120)", "task")].params["beta"] == 1.0
    assert cells[("A-GEM (200)", "class")].params == {"memory_per_task": 40, "sample_size": 32}
    lrs = {label: row.train["lr"] for (label, _), row in cells.items()}
    assert lrs["ER (5120)"] == 0.1 and lrs["DER (200)"] == 0.03 and lrs["GEM (500)"] == 0.03 and lrs["SGD"] == 0.1


def test_der_cifar10_cells_resolve_and_find_their_row_again():
    full = _der_cifar10_jobs(quick=False)
    assert len(full) == 18  # one class-IL run per configuration; its task-IL number comes from the same model
    for row, mode, spec in full:
        assert spec["arch"] == "resnet18" and spec["augment"] == "crop-flip" and spec["batch_size"] == 32
        assert spec["optimizer"] == "sgd" and spec["momentum"] == 0.0 and spec["epochs"] == 50
        assert mode == "class" and spec["all_outputs"] is True  # Mammoth's loss over every output
        assert reproduce.row_of(reproduce.get("der-cifar10"), spec) is row  # the record maps back to its row


def test_der_cifar10_quick_is_the_reduced_protocol_of_the_mammoth_comparison():
    quick = _der_cifar10_jobs(quick=True)
    assert sorted((row.label, mode) for row, mode, _ in quick) == \
        [("DER (500)", "class"), ("DER++ (500)", "class"), ("ER (500)", "class"), ("SGD", "class")]
    for _, _, spec in quick:
        assert (spec["epochs"], spec["train_per_class"], spec["test_per_class"]) == (1, 500, 200)
        assert spec["batch_size"] == 32 and spec["augment"] == "crop-flip"
    assert reproduce.get("der-cifar10").quick["seeds"] == 1
    # a finished quick run sits beside the paper's row, its difference in percent points
    row, mode, spec = next(c for c in quick if c[0].label == "DER (500)")
    rec = {"config": spec, "status": "done", "accuracy_matrix": [[0.5] * 5] * 5, "task_il_matrix": [[0.9] * 5] * 5}
    head, body = reproduce.comparison(reproduce.get("der-cifar10"), reproduce.cells_of(reproduce.get("der-cifar10"),
                                                                                        [rec]))
    assert body == [["DER (500)", "class", "1", "50.00", "70.51 ± 1.67", "-20.51"],
                    ["DER (500)", "task", "1", "90.00", "93.40 ± 0.39", "-3.40"]]  # the same run, within each task


def test_der_cifar10_presets_are_the_buffer_500_best_arguments():
    from retain.method import create

    p = reproduce.get("der-cifar10")
    rows = {row.label: row for row in p.rows}
    for label, method in [("ER (500)", "er"), ("DER (500)", "der"), ("DER++ (500)", "derpp"), ("A-GEM (500)", "agem"),
                          ("GEM (500)", "gem"), ("oEWC", "online_ewc"), ("SI", "si"), ("LwF", "lwf")]:
        for mode in ("class", "task"):
            assert create(method, preset=f"seq-cifar10/{mode}").params() == create(method, rows[label].params).params()
