"""Jobs: one resolved run to do, its store hash, and :func:`execute`, the one function every executor runs.

A :class:`Job` wraps a resolved :class:`retain.config.Run` (optionally restricted to one task trained alone, for
task difficulty). Its *spec* — the resolved configuration as JSON — is what travels to a worker process or a Ray
node and what the store hashes. ``retain run --store``, compare, orders, sweep and reproduce all go through
:func:`retain.experiments.run_jobs`, which hands specs to an executor, which calls :func:`execute` on each.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retain.config import Run, resolve
from retain.errors import RetainError
from retain.store import Store, config_hash

# {"status": "done", "result": {...}, "resumed_from"} | {"status": "failed", "reason", "task", "step", "exit_code"}
Outcome = dict[str, Any]


@dataclass
class Job:
    """One run to do: a resolved run, optionally restricted to one task trained alone."""

    run: Run
    alone: int | None = None  # train only this task (task difficulty), else the whole sequence
    label: str = ""

    @property
    def config(self) -> Any:
        """The resolved :class:`retain.config.RunConfig`."""
        return self.run.config

    @property
    def spec(self) -> dict[str, Any]:
        d = self.run.spec()
        if self.alone is not None:
            d["alone"] = self.alone
        return d

    @property
    def hash(self) -> str:
        return config_hash(self.spec)


def make_job(base: Any, label: str = "", alone: int | None = None, **values: Any) -> Job:
    """A job from a base :class:`retain.config.RunConfig` with ``values`` over it, resolved now (bad input fails
    here, before anything runs)."""
    run = resolve(base, **values)
    return Job(run, alone, label or f"{run.config.method} s{run.config.seed}")


def checkpoint_dir(store: Store) -> Path:
    """Checkpoints of unfinished runs live beside the store: ``retain.db`` -> ``retain.db.checkpoints/``."""
    return store.path.with_name(store.path.name + ".checkpoints")


def _reset_peak_memory() -> None:
    """Reset this process's resident-memory high-water mark (Linux), so each run reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_memory_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def execute(spec: dict[str, Any], options: dict[str, Any], index: int = 0, report: Any = None) -> Outcome:
    """Run one job spec and describe how it went. Never raises for a run's own failure: a diverged run, a bad
    configuration or a crash inside a method becomes a ``failed`` outcome with the reason (and step).

    ``options``: ``checkpoint_dir``, ``checkpoint_every``, ``resume``, ``threads`` (torch threads for the run
    when its spec gives none; 1 in pool workers, so a run computes the same numbers whichever executor ran it and
    however many ran beside it). ``report(index, task, step,
    n_steps, loss)`` receives progress."""
    from retain import api
    from retain.checkpoint import Checkpointer
    from retain.trainer import TrainingError

    threads = torch.get_num_threads()
    torch.set_num_threads(spec.get("threads") or options.get("threads") or 1)  # the run's own option wins
    h = config_hash(spec)
    ckpt = None
    if options.get("checkpoint_dir"):
        ckpt = Checkpointer(Path(options["checkpoint_dir"]) / f"{h}.ckpt", options.get("checkpoint_every"),
                            resume=options.get("resume", True), fingerprint=h)
    progress = None
    if report is not None:
        progress = lambda task, step, n, loss: report(index, task, step, n, loss)  # noqa: E731
    _reset_peak_memory()
    try:
        result = api.execute(Run.from_spec(spec), progress, ckpt, alone=spec.get("alone"))
    except TrainingError as e:
        return {"status": "failed", "reason": str(e), "task": e.task, "step": e.step, "exit_code": e.exit_code}
    except RetainError as e:
        return {"status": "failed", "reason": str(e), "task": None, "step": None, "exit_code": e.exit_code}
    except Exception as e:  # noqa: BLE001 - a bug in one method must not take the sweep down
        last = traceback.extract_tb(e.__traceback__)[-1]
        return {"status": "failed", "reason": f"internal error {type(e).__name__}: {e} "
                f"({Path(last.filename).name}:{last.lineno})", "task": None, "step": None}
    finally:
        torch.set_num_threads(threads)
    resumed = ckpt.resumed_from if ckpt is not None else None
    if ckpt is not None:
        ckpt.finished()
    record = result.to_dict()
    record["config"] = spec  # the job's own spec (it says `alone` where the run trained one task)
    record["peak_memory_mb"] = _peak_memory_mb() or record["peak_memory_mb"]
    return {"status": "done", "result": record, "resumed_from": resumed}
