"""The Python API: one call from a configuration (or the user's own scenario and model) to a result record.

>>> import retain
>>> result = retain.run(benchmark="split-digits", method="joint", mode="class", quiet=True)
>>> result.metrics["acc"] > 0.8
True

Configuration resolves in one order (:func:`retain.config.resolve`): the benchmark's protocol defaults < the
method's preset for that benchmark and mode < the user's values (config file, then command-line flags).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import retain
from retain import distributed
from retain.checkpoint import Checkpointer
from retain.config import Run, RunConfig, resolve
from retain.errors import ConfigError
from retain.method import Method
from retain.metrics import all_metrics, anytime_metrics, old_new_accuracy, stability_gap
from retain.scenarios import Scenario
from retain.trainer import Progress, Trained, resolve_device, train

__all__ = ["Result", "Run", "RunConfig", "execute", "resolve", "run"]


@dataclass
class Result:
    """One run's record: config, the accuracy matrix R, the baseline b, metrics, timings, versions, warnings."""

    config: dict[str, Any]
    accuracy_matrix: list[list[float]]
    baseline: list[float]
    metrics: dict[str, float]
    timings: dict[str, float]
    versions: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    val_matrix: list[list[float]] | None = None
    peak_memory_mb: float | None = None
    gpu_memory_mb: float | None = None  # peak memory allocated on the GPU by the run (None on the CPU)
    # class-IL runs: R again with each task's rows scored among that task's classes only (the same model and
    # forward pass); what Mammoth's tables report as "Task-IL" beside a class-IL number
    task_il_matrix: list[list[float]] | None = None
    memory: dict[str, int] | None = None  # the method's sample memory: {"rows", "bytes"} (Method.memory)
    model: dict[str, Any] | None = None  # what was trained: {"class", "parameters"} (the user's own model too)
    scenario: str | None = None  # the scenario that ran, in one line (tasks, classes, sizes, where the data came from)
    # --eval-every: the anytime curve {"every", "test_sizes", "points": [{"samples", "task", "acc", "end"}], "eval_s"}
    # and its stability gap per (switch, old task) (retain.metrics.stability_gap's pairs)
    anytime: dict[str, Any] | None = None
    # --count-flops: {"train_flops", "steps", "flops_per_step", "step_flops", "boundary_flops", "counter"}
    compute: dict[str, Any] | None = None

    def __repr__(self) -> str:
        c, m = self.config, self.metrics
        return (f"Result({c.get('method')} on {c.get('benchmark')} ({c.get('mode')}-IL), seed {c.get('seed')}: "
                f"ACC {100 * m['acc']:.2f}%, BWT {100 * m['bwt']:+.2f}, forgetting {100 * m['forgetting']:.2f}, "
                f"{len(self.accuracy_matrix)} tasks, train {self.timings['train_s']:.1f} s"
                + (f", {len(self.warnings)} warning(s)" if self.warnings else "") + ")")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    @property
    def val_metrics(self) -> dict[str, float] | None:
        """Metrics of the validation-split matrix (for choosing hyper-parameters without touching test)."""
        if self.val_matrix is None:
            return None
        return all_metrics(self.val_matrix, [0.0] * len(self.val_matrix))

    def table(self) -> str:
        """The accuracy matrix (rows: after training task i; columns: task j) and the metrics, as text."""
        R = np.asarray(self.accuracy_matrix) * 100
        T = len(R)
        head = "after task | " + " ".join(f"{'T' + str(j):>6}" for j in range(T)) + " |   mean"
        lines = [head, "-" * len(head)]
        lines.append(f"{'init (b)':>10} | " + " ".join(f"{100 * v:6.2f}" for v in self.baseline)
                     + f" | {100 * np.mean(self.baseline):6.2f}")
        for i in range(T):
            lines.append(f"{i:>10} | " + " ".join(f"{v:6.2f}" for v in R[i]) + f" | {R[i].mean():6.2f}")
        m = self.metrics
        lines.append("")
        lines.append(f"ACC {100 * m['acc']:.2f}%   BWT {100 * m['bwt']:+.2f}   FWT {100 * m['fwt']:+.2f}   "
                     f"forgetting {100 * m['forgetting']:.2f}   learning acc {100 * m['learning_acc']:.2f}%")
        if "old_acc" in m:  # class-IL
            lines.append(f"old classes {100 * m['old_acc']:.2f}%   new classes {100 * m['new_acc']:.2f}%   "
                         f"top-5 {100 * m.get('top5_acc', float('nan')):.2f}%   "
                         f"avg incremental {100 * m['avg_incremental_acc']:.2f}%")
        if self.anytime and "aaa" in m:
            a = self.anytime
            lines.append(f"anytime, every {a['every']} samples ({len(a['points'])} points): "
                         f"AAA {100 * m['aaa']:.2f}%   A_AUC {100 * m['a_auc']:.2f}%   "
                         f"stability gap {100 * m['stability_gap']:.2f}   "
                         f"min-ACC {100 * m['min_acc']:.2f}%   evaluation {100 * m['anytime_eval_fraction']:.0f}% "
                         "of the training time")
        if self.task_il_matrix:  # a class-IL run: its final model scored within each task (Mammoth's "Task-IL")
            lines.append(f"within each task's classes (task-IL of this class-IL model): "
                         f"{100 * np.mean(self.task_il_matrix[-1]):.2f}%")
        lines.append(f"train {self.timings['train_s']:.2f} s   eval {self.timings['eval_s']:.2f} s"
                     + (f"   peak memory {self.peak_memory_mb:.0f} MB" if self.peak_memory_mb else ""))
        return "\n".join(lines)


def versions() -> dict[str, str]:
    return {"retain": retain.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "platform": platform.platform()}


def peak_memory_mb() -> float:
    """Peak resident memory of this process (MB); on CUDA, the peak allocated device memory is reported too."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def run(config: RunConfig | Run | None = None, *, scenario: Scenario | None = None, model: nn.Module | None = None,
        method: Method | str | None = None, progress: Progress | None = None, quiet: bool = True,
        checkpointer: Checkpointer | None = None, **overrides: Any) -> Result:
    """Run one continual-learning experiment and return its :class:`Result`.

    Either a :class:`RunConfig` (or its options as keyword arguments: ``run(benchmark="split-mnist",
    method="ewc", mode="task", params={"lambda": 1e4})``), or the user's own ``scenario`` (and optionally
    ``model``; an MLP of ``hidden`` sizes otherwise) with the training options as keywords. ``method`` may be a
    name (``"ewc+er"`` composes) or an instance, whose own hyper-parameters are then recorded. A
    :class:`retain.checkpoint.Checkpointer` makes the run checkpoint (and resume from its file if asked).
    Everything is resolved and checked once (:func:`retain.config.resolve`) before any data is loaded.
    """
    if not isinstance(config, Run):
        config = resolve(config, scenario=scenario, model=model, method=method, **overrides)
    elif scenario is not None or model is not None or method is not None or overrides:
        raise ConfigError("a resolved Run already names its scenario, model and method; pass them to resolve()")
    before = torch.get_num_threads()
    torch.set_num_threads(config.threads)  # the option, else retain.config.default_threads()
    try:
        return execute(config, progress, checkpointer)
    finally:
        torch.set_num_threads(before)


def execute(run: Run, progress: Progress | None = None, checkpointer: Checkpointer | None = None,
            alone: int | None = None) -> Result | None:
    """Train a resolved :class:`Run` (``alone``: only its task ``alone``, to measure how hard a task is).

    With ``devices`` > 1, or in a process torchrun started, the run trains data-parallel over that many processes
    (:mod:`retain.distributed`): rank 0 reports progress, checkpoints and returns the record; the others None."""
    world = distributed.current()
    if world is None and distributed.world_size(run.config.devices) > 1:
        return _data_parallel(run, progress, checkpointer, alone)
    if world is not None:
        progress = progress if world.main else None
        checkpointer = None if checkpointer is None else distributed.rank_checkpointer(checkpointer, world)
    scenario = run.build_scenario()
    if alone is not None:
        scenario = only_task(scenario, alone)
    model = run.build_model(scenario)
    from retain import backbones

    scenario, model, pretrained = backbones.prepare(run, scenario, model)
    cuda = torch.cuda.is_available() and resolve_device(run.config.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loggers = None
    if run.config.log and (world is None or world.main):
        from retain.loggers import Loggers
        from retain.store import config_hash

        loggers = Loggers(run.config.log, run.config.log_dir, run.spec(), config_hash(run.spec()))
    try:
        trained = train(scenario, run.method, model, run.train_config(), progress, checkpointer, loggers)
    except BaseException:
        if loggers is not None:
            loggers.close()
        raise
    warnings = list(trained.warnings)
    timings = dict(trained.timings)
    if pretrained is not None and pretrained["feature_cache"].get("used"):  # features computed (or read) once
        timings["features_s"] = pretrained["feature_cache"]["seconds"]
    if scenario.info.get("unverified"):  # data files matching no published checksum (retain.data)
        warnings.append(scenario.info["unverified"])
    if world is not None and not world.main:
        return None
    metrics, anytime = record_metrics(trained, scenario)
    result = Result(
        config=run.spec(),
        accuracy_matrix=trained.accuracy_matrix,
        baseline=trained.baseline,
        metrics=metrics,
        timings=timings,
        versions=versions(),
        warnings=warnings,
        val_matrix=trained.val_matrix,
        task_il_matrix=trained.task_il_matrix,
        peak_memory_mb=peak_memory_mb(),
        gpu_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        memory=run.method.memory(scenario).to_dict(),  # the samples it keeps, in the method's own words
        model=model_entry(model, run.method, pretrained, trained.trainable),
        scenario=repr(scenario),
        anytime=anytime,
        compute=trained.compute,
    )
    if loggers is not None:
        loggers.finish(result.to_dict())
    return result


def model_entry(model: torch.nn.Module, method: Any, pretrained: dict[str, Any] | None, trainable: int = 0
                ) -> dict[str, Any]:
    """The record's ``model``: its class, parameters (a cached backbone's counted in), ``trainable``: the most
    parameters any task's optimizer trained (the method's own modules, prompts or generators, included; 0 for a
    method that takes no step), ``method_parameters``: those of the method's own modules now, and for a
    pre-trained backbone its weights, freezing and feature cache (:func:`retain.backbones.prepare`)."""
    from retain.method import flat_parameters

    n = sum(p.numel() for p in model.parameters())
    own = {id(p) for p in model.parameters()}
    trained = flat_parameters(method.parameters(model))
    entry: dict[str, Any] = {"class": type(model).__name__, "parameters": n,
                             "trainable": trainable,
                             "method_parameters": sum(p.numel() for p in trained if id(p) not in own)}
    if pretrained is not None:
        if pretrained.get("feature_cache", {}).get("used"):
            entry["class"], entry["parameters"] = "Pretrained", n + pretrained["backbone_parameters"]
        entry.update(pretrained)
    return entry


def record_metrics(trained: Trained, scenario: Scenario) -> tuple[dict[str, float], dict[str, Any] | None]:
    """The record's metrics and its anytime entry. Metrics: those of R and b; in class-IL the final old/new-class
    and top-5 accuracy; with an anytime curve its AAA, A_AUC, stability gap, min-ACC and WC-ACC. The anytime entry:
    the trainer's curve with the stability gap of each (switch, old task) pair."""
    m = all_metrics(trained.accuracy_matrix, trained.baseline)
    sizes = [len(task.test_idx) for task in scenario.tasks]
    if scenario.mode == "class":
        m.update(old_new_accuracy(trained.accuracy_matrix, sizes))
        if trained.top5:
            m["top5_acc"] = float(np.mean(trained.top5))
    a = trained.anytime
    if a is None:
        return m, None
    if not a["points"]:
        return m, {**a, "stability_gap": []}
    gap = stability_gap(a["points"])
    m.update(anytime_metrics(a["points"], a["test_sizes"], gap))
    if trained.timings.get("train_s"):
        m["anytime_eval_fraction"] = a["eval_s"] / trained.timings["train_s"]
    return m, {**a, "stability_gap": gap["pairs"]}


def _data_parallel(run: Run, progress: Progress | None, checkpointer: Checkpointer | None,
                   alone: int | None) -> Result | None:
    """The run over several processes: joining torchrun's group when it started this one, else spawning
    ``devices`` processes here (each with this process's threads divided among them)."""
    n = distributed.world_size(run.config.devices)
    distributed.check_data_parallel(run.method, n)
    run = dataclasses.replace(run, config=dataclasses.replace(run.config, devices=n))  # torchrun's: recorded
    if not distributed.launched():
        return distributed.spawn(n, execute, (run, progress, checkpointer, alone), run.config.device)
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", n))))
    distributed.init(run.config.device)
    try:
        return execute(run, progress, checkpointer, alone)
    finally:
        distributed.shutdown()




def only_task(scenario: Scenario, j: int) -> Scenario:
    """The scenario reduced to its task ``j`` (the same outputs and mode): to measure how hard a task is alone."""
    tp = scenario.transform_params
    return dataclasses.replace(scenario, tasks=[scenario.tasks[j]], label_map=scenario.label_map[[j]],
                               task_out=scenario.task_out[[j]],
                               transform_params=tp[[j]] if tp is not None else None)
