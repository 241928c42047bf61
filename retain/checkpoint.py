"""Checkpoints: a run's state written atomically with a checksum, and read back only when it verifies.

A checkpoint holds one state dict, whatever its owner puts in it (the trainer's :meth:`~retain.trainer.Trainer.
state_dict`: model, method state, optimizer, RNGs, position...), pickled in one ``torch.save`` call, so objects that
share tensors come back sharing them. This module knows none of its keys: it adds only its own envelope (a format
number and the fingerprint of the run's configuration) and checks both when reading.

File format: ``RETAINCKPT1\\n`` + the SHA-256 of the payload (hex) + ``\\n`` + the payload. It is written to a
temporary file in the same folder, flushed to disk, then renamed over the old one: a crash or a full disk while
writing leaves the previous checkpoint intact, and a damaged file is refused by its checksum, never loaded.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from retain.errors import RetainError

MAGIC = b"RETAINCKPT1\n"
FORMAT = 2  # of the envelope {"format", "fingerprint", "state"}; 1 kept the state's keys beside them


class CheckpointError(RetainError):
    """A checkpoint could not be written, or failed its checksum / does not belong to this run. Exit code 1."""

    exit_code = 1


def save(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file + fsync + rename), with its SHA-256."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}; "
                              "free space or choose a writable folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + digest + b"\n")
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}; the previous checkpoint "
                              "is kept; free disk space and resume") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`; refuse it (:class:`CheckpointError`) unless its checksum holds."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    head = len(MAGIC) + 65
    if not raw.startswith(MAGIC) or len(raw) < head or raw[head - 1:head] != b"\n":
        raise CheckpointError(f"{path} is not a retain checkpoint (bad header); delete it to start the run afresh")
    digest, payload = raw[len(MAGIC):head - 1].decode(errors="replace"), raw[head:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch); delete it to start the run "
                              "afresh")
    # Our own file, verified by its checksum: full unpickling is needed for modules and method state.
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)


# ----------------------------------------------------------------------------------------------- the policy

def run_path(folder: str | os.PathLike, key: str) -> Path:
    """The checkpoint file, in ``folder``, of the run that ``key`` identifies (any string naming the run's
    configuration): the first 16 hex digits of the key's SHA-256, so the same command finds it again."""
    return Path(folder) / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.ckpt"


def check_folder(folder: str | os.PathLike) -> None:
    """Create ``folder`` if needed and make sure a file can be written there, before hours of training depend on
    it; a :class:`CheckpointError` naming the folder otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints to {folder}: {e.strerror or e}; "
                              "choose a writable folder") from None


class Checkpointer:
    """When and where a run checkpoints, and whether it resumes. Given to :func:`retain.trainer.train`.

    ``every``: also checkpoint every N global steps (task boundaries always). ``resume``: start from ``path``
    when it exists. ``fingerprint`` (the config hash) is stored and checked, so a checkpoint of another
    configuration is never resumed by mistake. ``keep``: leave the file after the run finishes.
    """

    def __init__(self, path: str | os.PathLike, every: int | None = None, resume: bool = False,
                 fingerprint: str = "", keep: bool = False):
        if every is not None and every < 1:
            from retain.errors import ConfigError

            raise ConfigError(f"--checkpoint-every must be at least 1 step, got {every}")
        self.path, self.every, self.resume = Path(path), every, resume
        self.fingerprint, self.keep = fingerprint, keep
        self.interrupted = False
        self.resumed_from: dict[str, Any] | None = None  # where the run resumed (set by the trainer)

    def due(self, global_step: int) -> bool:
        return self.every is not None and global_step % self.every == 0

    def load(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The state saved by :meth:`save`, or None when not resuming or there is no checkpoint yet."""
        if not (self.resume and self.path.exists()):
            return None
        saved = load(self.path, map_location)
        if saved.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {self.path} has format {saved.get('format')}, but this version of "
                                  f"retain reads format {FORMAT}; delete it to start the run afresh")
        if self.fingerprint and saved.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"checkpoint {self.path} belongs to another configuration; delete it or "
                                  "resume with the configuration that wrote it")
        return saved["state"]

    def save(self, state: dict[str, Any]) -> None:
        save(self.path, {"format": FORMAT, "fingerprint": self.fingerprint, "state": state})

    def finished(self) -> None:
        if not self.keep and self.path.exists():
            self.path.unlink()

    @contextmanager
    def guard(self) -> Iterator[None]:
        """While training: SIGINT sets a flag; the trainer checkpoints after the current step, then stops."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.interrupted:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.interrupted = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
