"""The command line end to end: output, JSON record, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from retain.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retain.cli", *args], capture_output=True, text=True, timeout=300)


def test_run_prints_matrix_and_writes_json(tmp_path):
    out = tmp_path / "r.json"
    p = run_cli("run", "--benchmark", "split-digits", "--mode", "class", "--method", "finetune", "--hidden", "32",
                "--epochs", "2", "--batch-size", "64", "--optimizer", "sgd", "--lr", "0.05", "--seed", "1",
                "--json", str(out), "--quiet")
    assert p.returncode == 0, p.stderr
    assert "after task" in p.stdout and "ACC" in p.stdout and "BWT" in p.stdout
    rec = json.loads(out.read_text())
    assert set(rec) >= {"config", "accuracy_matrix", "baseline", "metrics", "timings", "versions"}
    # the matrix's metrics, and in class-IL the final old/new-class and top-5 accuracy
    assert set(rec["metrics"]) == {"acc", "bwt", "fwt", "forgetting", "learning_acc", "avg_incremental_acc",
                                   "old_acc", "new_acc", "top5_acc"}
    assert set(rec["timings"]) >= {"train_s", "eval_s"}
    c = rec["config"]
    assert (c["hidden"], c["epochs"], c["batch_size"], c["optimizer"], c["lr"], c["seed"]) == \
        ([32], 2, 64, "sgd", 0.05, 1)
    assert len(rec["accuracy_matrix"]) == 5 and all(len(r) == 5 for r in rec["accuracy_matrix"])


def test_iterations_and_n_tasks(tmp_path):
    out = tmp_path / "r.json"
    assert main(["run", "--iterations", "3", "--n-tasks", "2", "--json", str(out), "--quiet"]) == 0
    rec = json.loads(out.read_text())
    assert rec["config"]["iterations"] == 3 and len(rec["baseline"]) == 2


@pytest.mark.parametrize("args, message", [
    (["run", "--method", "nope"], "unknown method 'nope'; choose one of"),
    (["run", "--benchmark", "split-nothing"], "unknown benchmark 'split-nothing'; choose one of"),
    (["run", "--mode", "classy"], "unknown mode 'classy'; choose one of task, domain, class"),
    (["run", "--param", "lambda=1"], "finetune: unknown parameter 'lambda'"),
    (["run", "--param", "lambda"], "--param expects name=value"),
    (["run", "--lr", "fast"], "lr (--lr) expects a finite number, got 'fast'"),
    (["run", "--epochs", "2", "--iterations", "3"], "not both"),
    (["run", "--hidden", "400,x"], "hidden (--hidden) expects comma-separated positive integers"),
    (["run", "--n-tasks", "0"], "n_tasks must be at least 1"),
    (["run", "--n-tasks", "11"], "11 tasks but only 10 classes"),
    (["run", "--lr", "-1"], "lr must be a positive number, got -1.0 (--lr)"),
    (["run", "--json", "/nonexistent-dir/x.json"], "does not exist"),
    (["run", "--benchmark", "split-kmnist", "--data-dir", "/nonexistent"], "does not exist"),
    (["run", "--normalize", "0.1,x"], "normalize (--normalize) expects two comma-separated numbers"),
    (["run", "--normalize", "0.1,0"], "normalize must be two numbers MEAN,STD with STD > 0"),
    (["run", "--pad", "-1"], "pad must be a whole number of pixels >= 0, got -1"),
    (["run", "--pad", "two"], "pad (--pad) expects a whole number, got 'two'"),
    (["run", "--mode", "task", "--all-outputs"], "all_outputs (--all-outputs) is for class-IL"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        code = main(args)
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_data_names_where_it_looked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("RETAIN_DATA", raising=False)
    assert main(["run", "--benchmark", "split-kmnist", "--data-dir", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "kmnist not found (looked in" in err and "--download" in err and len(err.strip().splitlines()) == 1


def test_methods_and_benchmarks_listings(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "finetune" in out and "joint" in out and "modes:" in out
    assert main(["benchmarks"]) == 0
    out = capsys.readouterr().out
    for name in ["split-mnist", "split-fashion-mnist", "split-kmnist", "permuted-mnist", "rotated-mnist",
                 "split-cifar10", "split-cifar100", "split-digits"]:
        assert name in out
    assert "scikit-learn" in out
