"""``--log tensorboard|mlflow|wandb``: each logger's files read back with that tool's own reader (W&B's records with
its own protobuf schema), and a missing extra is a one-line error naming it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from retain.cli import main

RUN = ["run", "--benchmark", "split-digits", "--mode", "class", "--method", "er", "--n-tasks", "3", "--epochs", "1",
       "--hidden", "16", "--eval-every", "100", "--quiet"]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One run written by all three loggers; its JSON record."""
    for mod in ("tensorboard", "mlflow", "wandb"):
        pytest.importorskip(mod)
    d = tmp_path_factory.mktemp("logs")
    out = d / "r.json"
    assert main([*RUN, "--log", "tensorboard", "--log", "mlflow,wandb", "--log-dir", str(d / "logs"), "--json",
                 str(out)]) == 0
    return d / "logs", json.loads(out.read_text())


def test_tensorboard_events_read_back_with_its_event_accumulator(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, rec = logged
    (run_dir,) = (root / "tensorboard").iterdir()
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    tags = ea.Tags()
    loss = ea.Scalars("train/loss")
    assert len(loss) > 10 and [e.step for e in loss] == sorted(e.step for e in loss)
    points = rec["anytime"]["points"]
    seen = ea.Scalars("anytime/seen")
    assert [e.step for e in seen] == [p["samples"] for p in points]
    assert ea.Scalars("anytime/task_0")[-1].value == pytest.approx(rec["accuracy_matrix"][-1][0])
    assert ea.Scalars("metrics/acc")[-1].value == pytest.approx(rec["metrics"]["acc"])
    assert "accuracy_matrix" in tags["images"]
    img = ea.Images("accuracy_matrix")[-1]
    assert img.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and img.width > 50


def test_mlflow_file_store_reads_back_with_its_client(logged):
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    root, rec = logged
    client = MlflowClient(tracking_uri=(root / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("retain")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["method"] == "er" and run.info.status == "FINISHED"
    assert run.data.metrics["metrics/acc"] == pytest.approx(rec["metrics"]["acc"])
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(loss) > 10
    seen = client.get_metric_history(run.info.run_id, "anytime/seen")
    assert sorted(m.step for m in seen) == [p["samples"] for p in rec["anytime"]["points"]]
    assert "accuracy_matrix.png" in [a.path for a in client.list_artifacts(run.info.run_id)]


def _wandb_records(path: Path):
    """The records of a W&B offline run file: its LevelDB-log framing (32 KiB blocks of 7-byte-headed chunks after
    the ``:W&B`` header), each a ``wandb_internal_pb2.Record`` (W&B's own schema; wandb >= 0.19 ships no Python
    reader of the file, its Go core reads it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, part, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            out.append(rec)
    return out


def test_wandb_offline_run_reads_back_with_its_record_schema(logged):
    root, rec = logged
    (path,) = (root / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(path)
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert len(losses) > 10
    seen = [h["step"] for h in history if "anytime/seen" in h]
    assert seen == [p["samples"] for p in rec["anytime"]["points"]]
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") in ("config", "run")
              for i in (r.config.update if r.WhichOneof("record_type") == "config" else r.run.config.update)}
    assert config["method"] == "er"
    summary = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for r in records
               if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
    assert summary["metrics/acc"] == pytest.approx(rec["metrics"]["acc"])
    image = next(h for h in history if "accuracy_matrix/_type" in h)  # an image's fields are nested keys
    assert image["accuracy_matrix/_type"] == "image-file" and image["accuracy_matrix/format"] == "png"
    assert list((path.parent / "files" / "media" / "images").glob("accuracy_matrix*.png"))


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main([*RUN, "--log", "wandb", "--log-dir", str(tmp_path / "l")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'retain[wandb]'" in err[0]
    assert not (tmp_path / "l").exists()  # refused before anything ran or was written
    assert main([*RUN, "--log", "neptune"]) == 2
    assert "choose one of tensorboard, mlflow, wandb" in capsys.readouterr().err
