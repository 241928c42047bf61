"""The front door as a new user finds it (issue 23): honest exit codes, no silently ignored option, accurate
records, a Python API that takes what a Python user writes, readable summaries, compare and runs that say what ran.
"""

from __future__ import annotations

import json

import pytest
import torch

import retain
from retain import scenarios
from retain.cli import main
from retain.errors import ConfigError

TINY = ["--epochs", "1", "--n-tasks", "2", "--quiet"]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------ exit codes

@pytest.mark.parametrize("command", [["compare", "--methods", "finetune,er", "--seeds", "2"],
                                     ["reproduce", "p1", "--quick"], ["orders", "--methods", "finetune"]])
def test_missing_data_is_one_line_exit_2_before_any_run(command, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RETAIN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    bench = [] if command[0] == "reproduce" else ["--benchmark", "split-mnist", *TINY[:-1]]
    db = tmp_path / "x.db"
    code, out, err = cli(capsys, *command, *bench, "--data-dir", str(tmp_path), "--store", str(db), "--quiet")
    assert code == 2 and "mnist not found (looked in" in err, err
    assert len(err.strip().splitlines()) == 1 and not db.exists()


def test_partly_failed_compare_exits_1_after_the_table_with_one_line_per_distinct_error(tmp_path, capsys):
    code, out, err = cli(capsys, "compare", "--methods", "finetune,ewc", "--param", "ewc.lambda=1e300", "--seeds",
                         "2", "--store", str(tmp_path / "c.db"), "--workers", "1", *TINY)
    assert code == 1
    assert "| class | finetune | 2" in out and "0 (2 failed)" in out  # the table of what ran comes first
    failed = [line for line in out.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and failed[0].startswith("failed: 2 run(s) (ewc class s0") and "loss became" in failed[0]
    assert err.strip().splitlines()[-1] == "retain: error: 2 of 4 run(s) failed (see the lines above; the store " \
                                           "keeps each reason)"
    assert sum("failed:" in line for line in err.splitlines()) == 1  # the same reason is not repeated per run


# ------------------------------------------------------------------------------------- options without effect

@pytest.mark.parametrize("args, message", [
    (["--blurry", "0.3"], "--blurry blurs the task boundaries of a task-free stream; add --task-free"),
    (["--task-free", "--iterations", "5"], "--iterations does not apply; use --epochs N for N passes"),
    (["--momentum", "0.9"], "--momentum is SGD's; with --optimizer adam it would be ignored"),
    (["--arch", "resnet18", "--hidden", "64"], "--hidden sets an MLP's layers; --arch resnet18 has none"),
])
def test_an_option_that_would_be_ignored_is_refused(args, message, capsys):
    code, _, err = cli(capsys, "run", *args, "--dry-run")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_epochs_on_a_task_free_stream_are_passes_over_each_tasks_data():
    one = retain.resolve(method="er", task_free=True, n_tasks=2)
    assert (one.config.epochs, one.config.iterations) == (1, None)  # not the benchmark's 10 epochs
    sc = one.build_scenario()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    single = list(sc.stream(32, g(), 0.0))
    double = list(sc.stream(32, g(), 0.0, passes=2))
    seen = torch.cat([idx for idx, _, _ in double])
    assert len(seen) == 2 * sum(len(t.train_idx) for t in sc.tasks)
    assert torch.equal(torch.bincount(seen), 2 * torch.bincount(torch.cat([i for i, _, _ in single])))
    tasks = torch.cat([t for _, t, _ in double])
    assert bool((tasks[1:] >= tasks[:-1]).all())  # still task after task: each task's two passes, then the next
    assert [d for *_, d in single][-1] == [d for *_, d in double][-1] == 2
    assert torch.equal(torch.cat([i for i, _, _ in single]),  # one pass is the stream it always was
                       torch.cat([i for i, _, _ in sc.stream(32, g(), 0.0, passes=1)]))
    once = retain.run(method="er", task_free=True, n_tasks=2, hidden=(32,))
    five = retain.run(method="er", task_free=True, n_tasks=2, epochs=5, hidden=(32,))
    assert five.config["epochs"] == 5
    assert five.metrics["learning_acc"] > once.metrics["learning_acc"] + 0.2  # honoured, not ignored


# -------------------------------------------------------------------------------------------- the record

def test_the_record_names_the_users_model_and_scenario(synthetic):
    from retain.models import MLP

    sc = scenarios.split(synthetic, "class", n_tasks=2)
    model = MLP(8, 4, (8,))
    r = retain.run(scenario=sc, model=model, method="er", params={"buffer_size": 12}, epochs=1)
    n = sum(p.numel() for p in model.parameters())
    assert r.model == {"class": "MLP", "parameters": n, "trainable": n, "method_parameters": 0}
    assert r.config["arch"] == "custom:MLP" and r.config["hidden"] is None
    assert r.config["params"]["buffer_size"] == 12 and r.memory["rows"] == 12
    assert r.scenario.startswith("Scenario('split-synthetic', class-IL, 2 tasks {0,1} {2,3}")
    with pytest.raises(ConfigError, match="--arch / --hidden build retain's own model, but a model was given"):
        retain.resolve(scenario=sc, model=model, hidden=(8,))


def test_the_api_takes_what_a_python_user_writes(tmp_path, monkeypatch, mnist_dir):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").symlink_to(mnist_dir)
    run = retain.resolve(benchmark="split-mnist", data_dir="~/data", lr="0.01", epochs="1")
    assert run.config.data_dir == str(tmp_path / "data") and run.config.lr == 0.01 and run.config.epochs == 1
    assert len(run.build_scenario().tasks) == 5  # found through the expanded path
    with pytest.raises(ConfigError, match=r"lr \(--lr\) expects a finite number, got 'fast'"):
        retain.resolve(lr="fast")


def test_scenarios_and_results_print_as_one_line_summaries_and_permuted_takes_a_scenario():
    x, y = torch.randint(0, 255, (40, 1, 6, 6), dtype=torch.uint8), torch.arange(40) % 4
    sc = scenarios.from_tensors(x, y, x[:8], y[:8], mode="class", n_tasks=2)
    text = repr(sc)
    assert text == ("Scenario('split-tensors', class-IL, 2 tasks {0,1} {2,3}, 40 training rows (20-20 per task), "
                    "8 test rows, inputs [1, 6, 6], 4 outputs, from user tensors)")
    p = scenarios.permuted(sc, n_tasks=3)
    assert p.n_tasks == 3 and p.transform == "permute" and len(repr(p)) < 300
    assert scenarios.rotated(sc, n_tasks=2).transform == "rotate"
    r = retain.run(scenario=sc, method="finetune", epochs=1, hidden=(8,))
    assert repr(r).startswith("Result(finetune on split-tensors (class-IL), seed 0: ACC ") and len(repr(r)) < 200


# -------------------------------------------------------------------------------------- compare and runs

def test_compare_shows_the_hyper_parameters_that_ran_and_points_to_the_report(tmp_path, capsys):
    db = tmp_path / "c.db"
    code, out, _ = cli(capsys, "compare", "--methods", "finetune,er", "--seeds", "1", "--store", str(db),
                       "--workers", "1", *TINY)
    assert code == 0
    assert "memory rows" in out and "peak MB" not in out  # the method's memory, not the process's
    assert "  er: buffer_size=200, " in out and "  finetune: no hyper-parameters" in out  # the preset that ran
    assert out.strip().splitlines()[-1] == f"plots and every run's accuracy matrix: retain report --store {db}"
    code, out, _ = cli(capsys, "runs", "--store", str(db))
    assert "buffer_size=200, per_class=0, replay_batch=0, selection=random, storage=reservoir, weighting=concat" \
        in out  # in full, not cut at 50 characters


def test_a_closed_pipe_is_not_an_internal_error(tmp_path):
    import subprocess
    import sys

    db = tmp_path / "r.db"
    assert main(["run", "--store", str(db), *TINY]) == 0
    p = subprocess.run(f"{sys.executable} -m retain.cli runs --store {db} | head -c 10", shell=True,
                       capture_output=True, text=True, timeout=120)
    assert "internal error" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert json.dumps(p.stdout)  # the first bytes of the table came through


def test_the_default_thread_count_takes_omp_num_threads_as_asked(monkeypatch):
    from retain.config import default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "x")  # not a count: the load-based rule
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert default_threads() == 1
