"""Where runs execute: in this process, in a local process pool, or as tasks on a Ray cluster.

Every executor runs the same function, :func:`retain.jobs.execute`, on a job spec (a resolved run configuration
as a dict) and hands back an *outcome* dict; only the driver writes to the results store. Inside a worker torch uses one
thread, so a run computes exactly the same numbers whichever executor ran it and however many ran beside it.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import queue as queue_mod
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from retain.errors import ConfigError
from retain.jobs import Outcome, execute

Report = Callable[[int, int, int, int, float], None]  # (job index, task, step, n_steps, loss)

_progress_queue: Any = None  # set in pool workers: where per-run progress goes


# ------------------------------------------------------------------------------------------------ executors

class Executor:
    """Runs jobs, yields ``(index, outcome)`` as they finish; ``report`` receives per-run progress."""

    name = "base"

    def map(self, jobs: list[tuple[int, dict[str, Any]]], options: dict[str, Any],
            report: Report | None = None) -> Iterator[tuple[int, Outcome]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class InProcess(Executor):
    """One run after the other, in this process (``--workers 1``)."""

    name = "local"

    def map(self, jobs, options, report=None):
        for index, spec in jobs:
            yield index, execute(spec, options, index, report)


def _init_worker(q: Any) -> None:
    global _progress_queue
    _progress_queue = q
    torch.set_num_threads(1)


def _pool_execute(spec: dict[str, Any], options: dict[str, Any], index: int) -> Outcome:
    last = [0.0]

    def report(i: int, task: int, step: int, n: int, loss: float) -> None:
        now = time.monotonic()
        if _progress_queue is not None and (now - last[0] > 0.2 or step == n):
            last[0] = now
            try:
                _progress_queue.put_nowait((i, task, step, n, loss))
            except Exception:  # noqa: BLE001 - progress is best effort
                pass

    return execute(spec, options, index, report)


class LocalPool(Executor):
    """A pool of ``workers`` processes on this machine. Workers fork from a clean server process that has
    imported retain once (``forkserver``; ``spawn`` where it is unavailable): nothing inherited from the
    driver's state or threads, and torch imported once rather than once per worker."""

    name = "local"

    def __init__(self, workers: int):
        self.workers = workers
        if "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["retain.executors", "retain.jobs", "retain.api", "retain.benchmarks"])
        else:
            ctx = mp.get_context("spawn")
        self.queue = ctx.Queue()
        self.pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                           initargs=(self.queue,))

    def map(self, jobs, options, report=None):
        futures = {self.pool.submit(_pool_execute, spec, options, index): index for index, spec in jobs}
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
            self._drain(report)
            for f in done:
                try:
                    outcome = f.result()
                except Exception as e:  # noqa: BLE001 - a worker died (killed, out of memory)
                    outcome = {"status": "failed", "reason": f"worker died: {type(e).__name__}: {e}",
                               "task": None, "step": None}
                yield futures[f], outcome

    def _drain(self, report: Report | None) -> None:
        while True:
            try:
                msg = self.queue.get_nowait()
            except (queue_mod.Empty, OSError, ValueError):
                return
            if report is not None:
                report(*msg)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.queue.close()


class RayExecutor(Executor):
    """Each run a Ray task (one CPU) on the cluster at ``address``; outcomes flow back to the driver."""

    name = "ray"

    def __init__(self, address: str | None):
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'retain[ray]' (or pip install ray)") from None
        self.ray = ray
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR",
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"cannot connect to the Ray cluster at {address}: {str(e).splitlines()[0]}; "
                              "start one with `ray start --head` or fix --address") from None
        self.remote = ray.remote(num_cpus=1, max_retries=0)(execute)

    def map(self, jobs, options, report=None):
        refs = {self.remote.remote(spec, options, index): index for index, spec in jobs}
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:
                try:
                    outcome = self.ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the task or its node died
                    outcome = {"status": "failed", "reason": f"ray task failed: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}", "task": None, "step": None}
                yield refs[ref], outcome

    def close(self) -> None:
        self.ray.shutdown()


def make_executor(kind: str = "local", workers: int | None = None, address: str | None = None) -> Executor:
    """``local`` with ``workers`` processes (1: in this process), or ``ray`` at ``address``."""
    if kind == "ray":
        return RayExecutor(address)
    if kind != "local":
        raise ConfigError(f"unknown executor {kind!r}; choose local or ray")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    return InProcess() if workers == 1 else LocalPool(workers)


def default_workers() -> int:
    """Half the cores (at least 1, at most 8): each run uses one thread, and the machine stays responsive."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))
