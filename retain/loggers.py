"""Writing a run to TensorBoard, MLflow or Weights & Biases (``--log NAME``, repeatable; ``--log-dir DIR``).

Each logger writes, in its tool's own format, everything a run has to show: the training loss of every step
(``train/loss`` at the global step), the anytime curve when there is one (``anytime/task_j`` and
``anytime/seen``, the accuracy on the tasks seen so far, at the sample count), the rows of R as they are filled
(``task_end/task_j`` at the task just trained), the final matrix as a heatmap image and the record's metrics. They
write locally and never need the network: TensorBoard event files under ``DIR/tensorboard/RUN``, an MLflow file
store under ``DIR/mlruns`` (experiment ``retain``), a W&B offline run under ``DIR/wandb`` (``wandb sync`` uploads it
later). Each tool is an optional extra (``pip install 'retain[tensorboard]'``, ``[mlflow]``, ``[wandb]``); a missing
one is refused before anything runs.

The trainer calls :class:`Loggers` (``losses``, ``point``, ``row``); :func:`retain.api.execute` makes it and calls
``finish`` with the record. Only the process that writes the record logs (rank 0 when data-parallel).
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import time
from pathlib import Path
from typing import Any

from retain.config import LOGGERS  # noqa: F401 (the choices of --log)
from retain.errors import ConfigError

_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
DEFAULT_DIR = "retain-logs"


def check_available(names: list[str]) -> None:
    """A one-line error naming the pip extra for the first logger whose package is not installed."""
    for name in names:
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise ConfigError(f"--log {name} needs the {name} package, which is not installed: "
                              f"pip install 'retain[{name}]'")


def run_name(config: dict[str, Any], hash_: str) -> str:
    """``method-benchmark-mode-sSEED-HASH8``: one folder / run per configuration."""
    return f"{config.get('method')}-{config.get('benchmark')}-{config.get('mode')}-s{config.get('seed')}-{hash_[:8]}"


def heatmap_png(R: list[list[float]], title: str) -> bytes:
    from retain import report

    return report.heatmap(R, title)


def _png_array(png: bytes) -> Any:
    """An [H, W, 3] uint8 array of a PNG (what the image APIs take)."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


class _TensorBoard:
    def __init__(self, root: Path, name: str, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = root / "tensorboard" / name
        self.w = SummaryWriter(log_dir=str(self.dir))
        self.w.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(config.items())))

    def scalars(self, tag_values: dict[str, float], step: int) -> None:
        for tag, v in tag_values.items():
            self.w.add_scalar(tag, v, step)

    def image(self, tag: str, png: bytes, step: int) -> None:
        self.w.add_image(tag, _png_array(png), step, dataformats="HWC")

    def close(self) -> None:
        self.w.close()


class _MLflow:
    def __init__(self, root: Path, name: str, config: dict[str, Any]):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the local file store the issue asks for
        from mlflow.tracking import MlflowClient

        self.uri = (root / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name("retain")
        eid = exp.experiment_id if exp is not None else self.client.create_experiment("retain")
        self.run_id = self.client.create_run(eid, run_name=name).info.run_id
        for k, v in sorted(config.items()):
            self.client.log_param(self.run_id, k, str(v)[:6000])

    def scalars(self, tag_values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, float(v), now, step) for tag, v in tag_values.items() if math.isfinite(v)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def image(self, tag: str, png: bytes, step: int) -> None:
        self.client.log_image(self.run_id, _png_array(png), f"{tag}.png")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _WandB:
    def __init__(self, root: Path, name: str, config: dict[str, Any]):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        root.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(mode="offline", dir=str(root), project="retain", name=name, config=config,
                              reinit="create_new")

    def scalars(self, tag_values: dict[str, float], step: int) -> None:
        self.run.log({**tag_values, "step": step})

    def image(self, tag: str, png: bytes, step: int) -> None:
        self.run.log({tag: self.wandb.Image(_png_array(png)), "step": step})

    def summary(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.run.summary[k] = v

    def close(self) -> None:
        self.run.finish()


_WRITERS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


class Loggers:
    """The run's loggers: what the trainer and the record hand them, written by each in its own format."""

    def __init__(self, names: list[str], log_dir: str | None, config: dict[str, Any], hash_: str):
        check_available(names)
        root = Path(log_dir or DEFAULT_DIR)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--log-dir {root}: cannot create the folder ({e.strerror}); choose another") from None
        self.name = run_name(config, hash_)
        self.writers = [_WRITERS[n](root, self.name, config) for n in dict.fromkeys(names)]

    def _all(self, fn: str, *args: Any) -> None:
        for w in self.writers:
            getattr(w, fn)(*args)

    def losses(self, values: list[float], where: list[tuple[int, int, int]]) -> None:
        """The losses of a block of steps: (task, step within the task, global step) of each."""
        for v, (_, _, step) in zip(values, where):
            self._all("scalars", {"train/loss": v}, step)

    def point(self, p: dict[str, Any]) -> None:
        """An anytime point: each task's accuracy and the mean over the seen tasks, at its sample count."""
        acc = p["acc"]
        seen = [a for a in acc[:p["task"] + 1] if math.isfinite(a)]
        values = {f"anytime/task_{j}": a for j, a in enumerate(acc)}
        values["anytime/seen"] = sum(seen) / len(seen) if seen else math.nan
        self._all("scalars", values, p["samples"])

    def row(self, i: int, accs: list[float]) -> None:
        """Row i of R, at task i."""
        self._all("scalars", {f"task_end/task_{j}": a for j, a in enumerate(accs)}, i)

    def finish(self, record: dict[str, Any]) -> None:
        """The final matrix as a heatmap image and the metrics, then close every writer."""
        metrics = {f"metrics/{k}": v for k, v in (record.get("metrics") or {}).items()
                   if isinstance(v, (int, float)) and math.isfinite(v)}
        last = len(record["accuracy_matrix"]) - 1
        png = heatmap_png(record["accuracy_matrix"], self.name)
        for w in self.writers:
            w.scalars(metrics, last)
            w.image("accuracy_matrix", png, last)
            if hasattr(w, "summary"):
                w.summary(metrics)
        self.close()

    def close(self) -> None:
        self._all("close")
