"""Progress outside a terminal (a plain line every N seconds, silenced by --quiet) and the ``threads`` run option."""

from __future__ import annotations

import io
import re

import pytest
import torch

import retain.api
import retain.config
from retain.cli import main
from retain.cli.options import ProgressBar
from retain.config import resolve
from retain.experiments import Overall
from retain.store import config_hash


class Clock:
    """A clock the test moves by hand: no sleeping."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Log:
    """stderr as a log file (not a terminal): everything written to it so far."""

    def __init__(self, capsys) -> None:
        self.capsys, self.text = capsys, ""

    def getvalue(self) -> str:
        self.text += self.capsys.readouterr().err
        return self.text


@pytest.fixture
def log(capsys) -> Log:
    return Log(capsys)


def lines(stream: Log | io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


# ------------------------------------------------------------------------------------------------ one run

def test_log_lines_come_at_the_interval_with_task_step_loss_rate_and_eta(log):
    clock = Clock()
    bar = ProgressBar(3, enabled=True, interval=30, clock=clock)
    bar(0, 10, 100, 2.0)  # the first report starts the clock: nothing yet
    for step in range(11, 60):  # 12.5 s of steps: still nothing
        clock.now += 0.5 if step % 2 else 0.0
        bar(0, step, 100, 1.5)
    assert lines(log) == []
    clock.now = 130.0  # 30 s after the first report, 50 steps later
    bar(0, 60, 100, 0.75)
    clock.now = 131.0  # a second later: not again
    bar(0, 61, 100, 0.7)
    assert lines(log) == ["task 1/3 step 60/100 loss 0.7500 1.7 steps/s ETA 2m24s"]  # 240 steps left at 50/30 s
    clock.now = 161.0
    bar(1, 20, 100, 0.5)  # the second task: 90 + 20 steps in 61 s since the first report, 180 left
    assert lines(log)[1] == "task 2/3 step 20/100 loss 0.5000 1.8 steps/s ETA 1m40s"
    bar.close()
    assert len(lines(log)) == 2 and "\r" not in log.getvalue()  # no terminal codes in a log


def test_task_free_stream_eta_counts_the_one_stream(log):
    clock = Clock()
    bar = ProgressBar(2, interval=10, clock=clock)
    bar(0, 0, 200, 1.0)
    clock.now += 10
    bar(1, 100, 200, 1.0)  # the task changed without the count restarting: one stream of 200 steps
    assert lines(log) == ["task 2/2 step 100/200 loss 1.0000 10.0 steps/s ETA 10s"]


def test_quiet_prints_nothing(log):
    clock = Clock()
    bar = ProgressBar(2, enabled=False, interval=1, clock=clock)
    for step in range(50):
        clock.now += 1
        bar(0, step, 50, 1.0)
    bar.close()
    overall = Overall(4, enabled=False, interval=1, clock=clock)
    overall.report(0, 0, 1, 10, 1.0)
    clock.now += 5
    overall.finished(0, True)
    overall.close()
    assert log.getvalue() == ""


def test_terminal_bar_is_redrawn_in_place_as_before(monkeypatch):
    out = TTY()
    monkeypatch.setattr("sys.stderr", out)
    clock = Clock()
    bar = ProgressBar(2, interval=30, clock=clock)
    bar(0, 5, 10, 0.5)
    clock.now += 0.05
    bar(0, 6, 10, 0.4)  # within a tenth of a second: not redrawn
    clock.now += 0.1
    bar(0, 10, 10, 0.25)
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 4 and "6/10" not in text and "\n" not in text and "steps/s" not in text
    assert "task 1/2 [############------------] 5/10 loss 0.5000" in text
    assert "task 1/2 [########################] 10/10 loss 0.2500" in text


# ------------------------------------------------------------------------------------------------ many runs

def test_overall_log_lines_show_runs_done_the_current_run_rate_and_eta(log):
    clock = Clock()
    bar = Overall(4, "compare ", interval=60, clock=clock)
    bar.labels.update({0: "ewc s0", 1: "er s0"})
    bar.report(0, 0, 50, 100, 0.9)
    clock.now += 30
    bar.report(0, 1, 50, 100, 0.8)  # 150 steps in 30 s
    assert lines(log) == []
    clock.now += 30
    bar.finished(0, True)  # 60 s per run, 3 to go
    bar.report(1, 0, 30, 100, 1.2)
    clock.now += 1
    bar.report(1, 0, 40, 100, 1.1)
    assert lines(log) == ["compare 1/4 runs | 2.5 steps/s | ETA 3m00s"]
    clock.now += 60
    bar.report(1, 0, 90, 100, 0.6)
    # 240 steps in 121 s; ETA from the 121 s the first finished run stands for, times the 3 left
    assert lines(log)[1] == "compare 1/4 runs | er s0 task 1 step 90/100 loss 0.6000 | 2.0 steps/s | ETA 6m03s"


def test_overall_in_a_terminal_is_unchanged(monkeypatch):
    out = TTY()
    monkeypatch.setattr("sys.stderr", out)
    bar = Overall(2, "sweep ", interval=0, clock=Clock())
    bar.labels[0] = "ewc s0"
    bar.report(0, 0, 5, 10, 0.5)
    bar.close()
    assert out.getvalue().startswith("\rsweep [--------------------] 0/2 runs | ewc s0 task 1 5/10 loss 0.500")
    assert "steps/s" not in out.getvalue() and "\n" not in out.getvalue()


def test_retain_run_logs_progress_outside_a_terminal_and_quiet_silences_it(monkeypatch, capsys):
    monkeypatch.setattr(ProgressBar, "LOG_EVERY_S", 0.0)
    assert main(["run", "--benchmark", "split-digits", "--iterations", "3", "--batch-size", "16"]) == 0
    progress = [line for line in capsys.readouterr().err.splitlines() if "steps/s" in line]
    assert progress and all(re.fullmatch(r"task \d/5 step \d/3 loss [\d.]+ [\d.]+ steps/s ETA \S+", p)
                            for p in progress)
    assert main(["run", "--benchmark", "split-digits", "--iterations", "3", "--batch-size", "16", "--quiet"]) == 0
    assert "steps/s" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ threads

@pytest.fixture
def threads_seen(monkeypatch) -> list[int]:
    """torch's thread count inside every run that trains (api.execute is what every path calls)."""
    seen: list[int] = []
    real = retain.api.execute

    def spy(run, *args, **kw):
        seen.append(torch.get_num_threads())
        return real(run, *args, **kw)

    monkeypatch.setattr(retain.api, "execute", spy)
    return seen


@pytest.mark.parametrize("store", [False, True])
def test_threads_option_is_applied_inside_the_run_and_restored(threads_seen, tmp_path, store):
    torch.set_num_threads(3)
    extra = ["--store", str(tmp_path / "r.db")] if store else []
    argv = ["run", "--benchmark", "split-digits", "--iterations", "2", "--quiet", *extra]
    assert main([*argv, "--threads", "1"]) == 0
    assert main([*argv, "--threads", "2", "--seed", "1"]) == 0
    assert threads_seen == [1, 2] and torch.get_num_threads() == 3


def test_python_api_takes_threads(threads_seen):
    torch.set_num_threads(3)
    retain.run(benchmark="split-digits", iterations=2, threads="2")
    assert threads_seen == [2] and torch.get_num_threads() == 3


@pytest.mark.parametrize("cores, others, expected", [(2, 0, 2), (2, 1, 1), (16, 14, 2), (16, 15, 1), (1, 0, 1)])
def test_default_threads_is_two_when_two_cores_are_free_else_one(threads_seen, monkeypatch, cores, others, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # conftest asks for 1 thread that way
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    monkeypatch.setattr(retain.config, "_others_running", lambda: others)
    retain.run(benchmark="split-digits", iterations=1)
    assert threads_seen == [expected]


def test_others_running_reads_a_number():
    assert 0 <= retain.config._others_running() < 10_000


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_threads_below_one_is_refused(value, capsys):
    assert main(["run", "--benchmark", "split-digits", "--threads", value]) == 2
    err = capsys.readouterr().err.strip()
    assert "threads" in err and err.count("\n") == 0


def test_threads_is_not_part_of_the_store_hash():
    hashes = {config_hash(resolve(benchmark="split-digits", threads=t).spec()) for t in (None, 1, 4)}
    assert len(hashes) == 1
