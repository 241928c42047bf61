"""Image folders, tars of them and data sets larger than memory, as arrays on disk that are read by rows.

:func:`image_folder` reads torchvision's ImageFolder layout, ``root/<split>/<class>/*.{jpg,jpeg,png}`` (class
folders sorted -> label ids 0..K-1, files sorted within a class), or a ``.tar`` / ``.tar.gz`` holding one (directly
or under one top-level folder); :func:`decode_images` decodes a list of files. Both decode with PIL, in a pool of
worker processes, once, into a cache file, and return a :class:`DiskArray` over it; a later call whose inputs are
unchanged (paths, sizes, modification times, decode size) reuses the file without decoding anything. A tar is read
member by member straight from the archive, in archive order (nothing is extracted to disk).

A cache file is one array (``[N, C, H, W]`` uint8 for images) after a JSON header (padded to 4 KiB pages) holding
its shape, dtype, the key of the inputs it was made from and the SHA-256 of its rows; a tar's labels are kept in a
second such file beside it, so a cached tar is not listed again. It is written to a temporary file and renamed
into place, so a crash leaves the previous file or none; the checksum is verified the first time a process opens
the file, so a damaged file is rebuilt (by the readers here) or refused (when opened by path).

A :class:`DiskArray` stands where a :class:`retain.scenarios.Scenario` would hold an in-memory tensor: indexing it
with a batch's indices reads just those rows with ``os.preadv`` (sorted by offset, runs coalesced, into a reused
buffer), so the process holds a batch, never the data set. No memory map: the pages a map touches count in the
process's resident set, and its whole length in its address space (``RLIMIT_AS``). :func:`stream_dataset` writes
any ``torch.utils.data.Dataset`` into such a file through a DataLoader with workers; :func:`prefetch` runs a batch
iterator one or two batches ahead in a thread.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import queue
import secrets
import sys
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from retain.data import cache_dir
from retain.errors import DataError

PAGE = 4096  # the header is padded to a multiple of this, so the rows start page-aligned
MAGIC = "retain-array"
_FIRST = len(f"{MAGIC} 1 {0:012d}\n")  # the first line: magic, format, offset of the rows
FORMAT = 1
EXTENSIONS = (".jpg", ".jpeg", ".png")
STREAM_BYTES = 2 * 2**30  # from_dataset streams a data set larger than this to disk instead of stacking it
_GREY = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}  # decoded to one channel (L)
_CHUNK = 64  # images per task sent to a decoding worker
_POOL_MIN = 256  # fewer images than this are decoded in this process: a pool costs more than it saves
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) of cache files checked in this process


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


# ------------------------------------------------------------------------------------------------- DiskArray

def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _torch_dtype(name: str) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=np.dtype(name))).dtype


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from the file at ``offset`` (a short read is continued; EOF means the file was cut)."""
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view[done:]], offset + done)
        else:  # no preadv (Windows): pread returns a copy
            data = os.pread(fd, len(view) - done, offset + done)
            n = len(data)
            view[done:done + n] = data
        if n == 0:
            raise DataError(f"file descriptor {fd}: unexpected end of file at byte {offset + done}; the cache file "
                            "was cut short: delete it and run again")
        done += n


def _digest(fd: int, offset: int, length: int) -> str:
    """SHA-256 of ``length`` bytes from ``offset``, read through one 1 MiB buffer (the page cache, not RSS)."""
    h, buf = hashlib.sha256(), bytearray(2**20)
    view = memoryview(buf)
    pos = 0
    while pos < length:
        n = min(len(buf), length - pos)
        _pread_into(fd, view[:n], offset + pos)
        h.update(view[:n])
        pos += n
    return "sha256:" + h.hexdigest()


def read_header(path: Path) -> dict[str, Any] | None:
    """The header of an array file (its JSON, and ``offset``: where the rows start), or None when the file is
    missing or is not one."""
    try:
        with open(path, "rb") as f:
            magic, fmt, offset = f.read(_FIRST).decode("ascii").split()
            if magic != MAGIC or not PAGE <= int(offset) <= 2**24:
                return None
            head = json.loads(f.read(int(offset) - _FIRST).decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(head, dict):
        return None
    return {**head, "format": int(fmt), "offset": int(offset)}


KEEP_BUFFER = 64 * 2**20  # bytes: the largest read buffer a thread keeps for the next batch


class DiskArray:
    """A read-only array in a cache file, tensor-like for what a Scenario needs: ``shape``, ``dtype``, ``len``,
    ``x[idx]`` (reads only rows ``idx``, returns a CPU tensor), :meth:`gather` (rows onto a device) and
    ``.to("cpu")`` (itself). Pickles as its path (a worker process reopens the file)."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        head = read_header(self.path)
        if head is None:
            if not self.path.exists():
                raise DataError(f"{self.path}: no such array file; make it again (e.g. `retain prepare`)")
            raise DataError(f"{self.path}: not a retain array file (bad header); delete it and make it again")
        if head.get("format") != FORMAT:
            raise DataError(f"{self.path}: array file format {head.get('format')}, this retain reads {FORMAT}; "
                            "delete it and make it again")
        self.header = head
        self.shape = torch.Size(head["shape"])
        self.dtype = _torch_dtype(head["dtype"])
        self._np = np.dtype(head["dtype"])
        self.row_bytes = math.prod(self.shape[1:]) * self._np.itemsize
        self.checksum: str = head["checksum"]
        self.offset: int = head["offset"]
        self._local = threading.local()  # one read buffer per thread (the prefetch thread has its own)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        st = os.fstat(self._fd)
        if st.st_size != self.offset + self.nbytes:
            raise DataError(f"{self.path}: {st.st_size} bytes but its header says {self.offset + self.nbytes}; the "
                            "file was cut short or overwritten: delete it and make it again")
        if verify:
            self.verify(st)

    def verify(self, st: os.stat_result | None = None) -> None:
        """Check the rows against the header's checksum (once per process and file version)."""
        st = st or os.fstat(self._fd)
        key = (str(self.path.resolve()), st.st_size, st.st_mtime_ns)
        if key in _VERIFIED:
            return
        if _digest(self._fd, self.offset, self.nbytes) != self.checksum:
            raise DataError(f"{self.path}: damaged cache file (its rows do not match their checksum); delete it and "
                            "make it again")
        _VERIFIED.add(key)

    # ----------------------------------------------------------------------------------------- tensor-like
    def __len__(self) -> int:
        return int(self.shape[0])

    def dim(self) -> int:
        return len(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    def __repr__(self) -> str:
        return f"DiskArray({str(self.path)!r}, shape={list(self.shape)}, dtype={self.dtype})"

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except (OSError, TypeError, AttributeError):  # at interpreter exit `os` may already be torn down
                pass

    def _rows(self, idx: Any) -> np.ndarray:
        if isinstance(idx, int | np.integer):
            idx = [int(idx)]
        elif isinstance(idx, slice):
            idx = range(*idx.indices(len(self)))
        rows = idx.detach().cpu().numpy() if isinstance(idx, Tensor) else np.asarray(idx)
        if rows.dtype == np.bool_:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64, copy=False).reshape(-1)
        rows = np.where(rows < 0, rows + len(self), rows)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        return rows

    def _read(self, rows: np.ndarray, out: Tensor) -> Tensor:
        """Rows ``rows`` into ``out``: each distinct row read once, in file order, runs of rows in one call."""
        if len(rows) == 0:
            return out
        uniq, inverse = np.unique(rows, return_inverse=True)
        rb, size = self.row_bytes, len(uniq) * self.row_bytes
        buf = getattr(self._local, "buf", None)
        if size > KEEP_BUFFER:  # a read of most of the array (load()): a buffer of its own, not kept afterwards
            buf = bytearray(size)
        elif buf is None or len(buf) < size:
            buf = self._local.buf = bytearray(min(KEEP_BUFFER, max(size, 2 * len(buf) if buf is not None else 0)))
        view = memoryview(buf)
        cuts = np.flatnonzero(np.diff(uniq) != 1) + 1
        for s, e in zip(np.concatenate(([0], cuts)).tolist(), np.concatenate((cuts, [len(uniq)])).tolist()):
            _pread_into(self._fd, view[s * rb:e * rb], self.offset + int(uniq[s]) * rb)
        src = np.frombuffer(buf, dtype=self._np, count=size // self._np.itemsize).reshape(len(uniq),
                                                                                              *self.shape[1:])
        np.take(src, inverse.reshape(-1), axis=0, out=out.numpy())
        return out

    def __getitem__(self, idx: Any) -> Tensor:
        """Rows ``idx`` (a LongTensor, a list, a slice; an int gives one row) as a new CPU tensor."""
        rows = self._rows(idx)
        out = self._read(rows, torch.empty((len(rows), *self.shape[1:]), dtype=self.dtype))
        return out[0] if isinstance(idx, int | np.integer) else out

    def gather(self, idx: Tensor, device: str | torch.device = "cpu") -> Tensor:
        """Rows ``idx`` on ``device``; on CUDA they are read into pinned memory and sent without waiting."""
        device = torch.device(device)
        if device.type != "cuda":
            return self[idx].to(device)
        rows = self._rows(idx)
        pinned = torch.empty((len(rows), *self.shape[1:]), dtype=self.dtype, pin_memory=True)
        return self._read(rows, pinned).to(device, non_blocking=True)

    def load(self) -> Tensor:
        """Every row, in memory (for a data set that fits after all)."""
        return self[torch.arange(len(self))]

    def to(self, device: str | torch.device) -> DiskArray | Tensor:
        """Itself on the CPU; on another device the whole array, read into that device's memory."""
        return self if torch.device(device).type == "cpu" else self.load().to(device)


class ArrayWriter:
    """A new array file at ``path``, filled by rows and then :meth:`commit`-ted: written to a temporary file
    beside it and renamed into place (atomic). As a context manager it commits on success, removes the temporary
    file on an error."""

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], dtype: torch.dtype = torch.uint8,
                 inputs: str = "", meta: dict[str, Any] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.shape, self.dtype, self.inputs, self.meta = tuple(int(s) for s in shape), dtype, inputs, meta or {}
        self.row_bytes = math.prod(self.shape[1:]) * _np_dtype(dtype).itemsize
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        self._checksum: str | None = None
        self.head = json.dumps(self._head("sha256:" + "0" * 64)).encode("utf-8")  # its length, checksum aside
        self.offset = -(-(_FIRST + len(self.head) + 1) // PAGE) * PAGE
        self._fd: int | None = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                                       0o644)
        os.ftruncate(self._fd, self.offset + self.shape[0] * self.row_bytes)

    def _head(self, checksum: str) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": str(_np_dtype(self.dtype)), "checksum": checksum,
                "inputs": self.inputs, "meta": self.meta}

    def write(self, start: int, rows: np.ndarray | Tensor) -> None:
        """Consecutive rows from row ``start``."""
        if isinstance(rows, Tensor):
            rows = rows.detach().cpu().numpy()
        data = memoryview(np.ascontiguousarray(rows, dtype=_np_dtype(self.dtype))).cast("B")
        if len(data) != len(rows) * self.row_bytes:
            raise ValueError(f"rows of shape {list(rows.shape)} do not match the array's {list(self.shape)}")
        pos, offset = 0, self.offset + start * self.row_bytes
        while pos < len(data):
            pos += os.pwrite(self._fd, data[pos:], offset + pos)
        self._checksum = None

    def write_rows(self, rows: Iterable[int], values: np.ndarray) -> None:
        """Rows ``values[i]`` at row ``rows[i]`` (any order; consecutive runs are written at once)."""
        rows = np.asarray(list(rows), dtype=np.int64)
        if len(rows) == 0:
            return
        cuts = np.flatnonzero(np.diff(rows) != 1) + 1
        for s, e in zip(np.concatenate(([0], cuts)).tolist(), np.concatenate((cuts, [len(rows)])).tolist()):
            self.write(int(rows[s]), values[s:e])

    def checksum(self) -> str:
        if self._checksum is None:
            self._checksum = _digest(self._fd, self.offset, self.shape[0] * self.row_bytes)
        return self._checksum

    def commit(self, path: str | os.PathLike | None = None) -> DiskArray:
        """Write the header (with the rows' checksum), rename the file to ``path`` (default: the writer's)."""
        target = Path(path) if path is not None else self.path
        raw = f"{MAGIC} {FORMAT} {self.offset:012d}\n".encode("ascii") + json.dumps(self._head(self.checksum())
                                                                                    ).encode("utf-8")
        os.pwrite(self._fd, raw.ljust(self.offset - 1, b" ") + b"\n", 0)
        st = os.fstat(self._fd)
        os.close(self._fd)
        self._fd = None
        os.replace(self.tmp, target)
        # the checksum was just computed from these bytes: no need to read them again in this process
        _VERIFIED.add((str(target.resolve()), st.st_size, os.stat(target).st_mtime_ns))
        return DiskArray(target)

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ArrayWriter:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is not None:
            self.abort()


# ------------------------------------------------------------------------------------------------- decoding

class _Colour(Exception):
    """Raised by a worker decoding to greyscale when it meets a colour image: decode everything as RGB."""


def _decode_one(name: str, data: bytes | None, grey: bool, hw: tuple[int, int], resize: bool,
                first: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if data is not None else name) as im:
            if grey and im.mode not in _GREY:
                raise _Colour(name)
            if not resize and im.size != (hw[1], hw[0]):
                raise DataError(f"{name}: {im.size[1]}x{im.size[0]} pixels but {first}: {hw[0]}x{hw[1]} (HxW); the "
                                "images differ in size: pass a size to resize them all (size=(H, W), "
                                "`retain prepare --size H,W`)")
            im = im.convert("L" if grey else "RGB")
            if resize and im.size != (hw[1], hw[0]):
                im = im.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(im)
    except (DataError, _Colour):
        raise
    except UnidentifiedImageError:
        raise DataError(f"{name}: not a readable image (corrupt, or not a JPEG/PNG); replace or remove it") from None
    except PermissionError:
        raise DataError(f"{name}: permission denied; make the file readable (chmod +r)") from None
    except FileNotFoundError:
        raise DataError(f"{name}: missing (removed while the folder was read?); run again") from None
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for damaged files
        what = "truncated image" if "truncat" in str(e).lower() else "damaged image"
        raise DataError(f"{name}: {what} ({type(e).__name__}: {e}); replace or remove it") from None
    return arr[None] if grey else arr.transpose(2, 0, 1)


def _decode_chunk(items: list[tuple[str, bytes | None]], grey: bool, hw: tuple[int, int], resize: bool,
                  first: str) -> np.ndarray:
    out = np.empty((len(items), 1 if grey else 3, *hw), dtype=np.uint8)
    for i, (name, data) in enumerate(items):
        out[i] = _decode_one(name, data, grey, hw, resize, first)
    return out


def _probe(name: str, data: bytes | None) -> tuple[bool, tuple[int, int]]:
    """Whether the first image is greyscale, and its size (H, W): read from its header, not decoded."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if data is not None else name) as im:
            return im.mode in _GREY, (im.size[1], im.size[0])
    except Exception:  # noqa: BLE001 - the decoding pass names the problem
        _decode_one(name, data, False, (1, 1), True, name)  # raises the one-line error naming the file
        raise


Items = Callable[[], Iterator[tuple[list[int], list[tuple[str, bytes | None]]]]]  # chunks of (rows, items)


def _pool(workers: int) -> Any:
    import concurrent.futures
    import multiprocessing

    # fork on Linux: the workers need PIL and numpy only, and a fresh interpreter per worker would import torch
    ctx = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx)


def _decode_into(writer: ArrayWriter, chunks: Items, grey: bool, hw: tuple[int, int], resize: bool, first: str,
                 workers: int) -> None:
    if workers <= 1 or writer.shape[0] < _POOL_MIN:
        for rows, items in chunks():
            writer.write_rows(rows, _decode_chunk(items, grey, hw, resize, first))
        return
    with _pool(workers) as pool:
        pending: list[tuple[list[int], Any]] = []
        try:
            for rows, items in chunks():
                pending.append((rows, pool.submit(_decode_chunk, items, grey, hw, resize, first)))
                while len(pending) > 3 * workers:  # bounded: a tar's bytes are not all held at once
                    done_rows, fut = pending.pop(0)
                    writer.write_rows(done_rows, fut.result())
            for done_rows, fut in pending:
                writer.write_rows(done_rows, fut.result())
        except BaseException:
            for _, fut in pending:
                fut.cancel()
            raise


def _decode(chunks: Items, n: int, probe: tuple[str, bytes | None], size: tuple[int, int] | None, cache: Path,
            inputs: str, workers: int | None, meta: dict[str, Any]) -> DiskArray:
    """Decode ``n`` images (``chunks()`` yields them, may be called again) into the cache file ``cache``."""
    if n == 0:
        raise DataError(f"no images to decode into {cache}")
    workers = default_workers() if workers is None else max(1, int(workers))
    grey, hw = _probe(*probe)
    resize = size is not None
    hw = tuple(size) if size is not None else hw
    for attempt in (grey, False) if grey else (False,):
        with ArrayWriter(cache, (n, 1 if attempt else 3, *hw), torch.uint8, inputs, meta) as writer:
            try:
                _decode_into(writer, chunks, attempt, hw, resize, probe[0], workers)
            except _Colour:  # a colour image in a folder that began greyscale: decode all as RGB
                writer.abort()
                continue
            return writer.commit()
    raise AssertionError("unreachable: an RGB decode never raises _Colour")


def _cached(cache: Path, inputs: str) -> DiskArray | None:
    """The cache file if it was made from ``inputs`` and is intact (a damaged one is rebuilt)."""
    head = read_header(cache)
    if head is None or head.get("inputs") != inputs or head.get("format") != FORMAT:
        return None
    try:
        return DiskArray(cache)
    except DataError:
        return None


def _key(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def _check_size(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        size = (size, size)
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise DataError(f"image size must be positive (H, W), got {size}")
    return h, w


def decode_images(files: list[Path], size: tuple[int, int] | None, cache: Path,
                  workers: int | None = None) -> DiskArray:
    """Decode ``files`` (in this order) once into the array file ``cache``, ``[N, C, H, W]`` uint8, and return it.

    RGB (C = 3), or L (C = 1) when every image is greyscale; resized (bilinear) to ``size`` = (H, W) if given, else
    all must share one size. The file is reused while the inputs (paths, sizes, modification times, ``size``) are
    unchanged, and rebuilt when they change or it is damaged. ``workers`` decoding processes (default
    min(4, CPUs)).
    """
    size = _check_size(size)
    files = [Path(f) for f in files]
    stats = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            raise DataError(f"{f}: cannot be read ({e.strerror}); check the path") from None
        stats.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    inputs = _key({"format": FORMAT, "files": stats, "size": size})
    cache = Path(cache)
    found = _cached(cache, inputs)
    if found is not None:
        return found

    def chunks() -> Iterator[tuple[list[int], list[tuple[str, bytes | None]]]]:
        for s in range(0, len(files), _CHUNK):
            yield list(range(s, min(s + _CHUNK, len(files)))), [(str(f), None) for f in files[s:s + _CHUNK]]

    return _decode(chunks, len(files), (str(files[0]), None) if files else ("", None), size, cache, inputs,
                   workers, {"files": len(files)})


# ---------------------------------------------------------------------------------------------- folder layout

def _is_tar(root: Path) -> bool:
    return root.is_file() and any(root.name.endswith(s) for s in (".tar", ".tar.gz", ".tgz"))


def _is_image(name: str) -> bool:
    # dot files are not images even when named like one (macOS's ._x.jpg resource forks)
    return name.lower().endswith(EXTENSIONS) and not name.startswith(".")


def splits(root: str | os.PathLike) -> list[str]:
    """The split folders (``train``, ``test``...) of an image folder or tar: those holding class folders."""
    root = Path(root)
    if _is_tar(root):
        tf, members = _tar_images(root)
        tf.close()
        return sorted({parts[-3] for parts, m in members if len(parts) in (3, 4) and m.isfile()})
    if not root.is_dir():
        raise DataError(f"{root}: no such folder or .tar/.tar.gz; expected root/<split>/<class>/*.jpg")
    return sorted(d.name for d in root.iterdir() if d.is_dir() and any(c.is_dir() for c in d.iterdir()))


def _folder_files(root: Path, split: str, classes: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    base = root / split
    if not root.is_dir():
        raise DataError(f"{root}: no such folder or .tar/.tar.gz; expected {root}/{split}/<class>/*.jpg")
    if not base.is_dir():
        found = ", ".join(sorted(d.name for d in root.iterdir() if d.is_dir())) or "none"
        raise DataError(f"{base}: missing split folder (found: {found}); expected {base}/<class>/*.jpg")
    present = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not present:
        raise DataError(f"{base}: no class folders; expected one folder per class, {base}/<class>/*.jpg")
    names = list(classes) if classes is not None else present
    files: list[Path] = []
    labels: list[int] = []
    for i, c in enumerate(names):
        folder = base / c
        if not folder.is_dir():
            raise DataError(f"{folder}: missing class folder (the split has {len(present)} classes); add it, or "
                            "leave the class out of `classes`")
        own = sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p.name))
        if not own:
            raise DataError(f"{folder}: empty class folder (no .jpg/.jpeg/.png files); add its images or remove it")
        files += own
        labels += [i] * len(own)
    return files, labels, names


_LISTED: dict[tuple[str, int, int], list[tuple[list[str], tarfile.TarInfo]]] = {}  # the last tar listed


def _tar_images(tar: Path) -> tuple[tarfile.TarFile, list[tuple[list[str], tarfile.TarInfo]]]:
    """The open archive and its members as (path parts, member), directories included (an empty class folder).

    Listing a .tar.gz means reading all of it (3 s for CIFAR-10's 60,000 members), so the last listing is kept for
    the next split of the same file."""
    try:
        tf = tarfile.open(tar, "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        why = str(e).splitlines()[0].rstrip(":")  # tarfile lists every compression it tried, one per line
        raise DataError(f"{tar}: not a readable tar archive ({why}); pack or download it again") from None
    st = tar.stat()
    key = (str(tar.resolve()), st.st_size, st.st_mtime_ns)
    if key in _LISTED:
        return tf, _LISTED[key]
    members: list[tuple[list[str], tarfile.TarInfo]] = []
    try:
        for m in tf:
            parts = [p for p in m.name.split("/") if p not in ("", ".")]
            if parts and (m.isdir() or (m.isfile() and _is_image(parts[-1]))):
                members.append((parts if m.isfile() else parts + [""], m))
    except (tarfile.TarError, OSError, EOFError) as e:
        last = members[-1][1].name if members else "its start"
        tf.close()
        raise DataError(f"{tar}: unreadable after member {last} ({type(e).__name__}: {e}); the archive is damaged: "
                        "pack or download it again") from None
    _LISTED.clear()
    _LISTED[key] = members
    return tf, members


def _tar_layout(tar: Path, split: str, classes: list[str] | None
                ) -> tuple[tarfile.TarFile, list[tarfile.TarInfo], list[int], list[str]]:
    tf, members = _tar_images(tar)
    # <split>/<class>/<file> or <top>/<split>/<class>/<file> (a directory's file part is "")
    tops = {tuple(parts[:-3]) for parts, _ in members if len(parts) in (3, 4) and parts[-3] == split}
    if not tops:
        found = sorted({parts[-3] for parts, m in members if len(parts) in (3, 4) and m.isfile()})
        tf.close()
        raise DataError(f"{tar}: no {split}/ folder of class folders (found: {', '.join(found) or 'none'}); "
                        f"expected [top/]{split}/<class>/*.jpg inside")
    if len(tops) > 1:
        tf.close()
        raise DataError(f"{tar}: more than one {split}/ folder ({', '.join('/'.join(t + (split,)) for t in tops)}); "
                        "pack one image folder per archive")
    top = list(next(iter(tops)))
    base = "/".join(top + [split])
    by_class: dict[str, list[tarfile.TarInfo]] = {}
    for parts, m in members:
        if len(parts) == len(top) + 3 and parts[:len(top) + 1] == top + [split]:
            own = by_class.setdefault(parts[-2], [])
            if m.isfile():
                own.append(m)
    present = sorted(by_class)
    if not present:
        tf.close()
        raise DataError(f"{tar}: {base}/ has no class folders; expected one folder per class, {base}/<class>/*.jpg")
    names = list(classes) if classes is not None else present
    chosen: list[tarfile.TarInfo] = []
    labels: list[int] = []
    for i, c in enumerate(names):
        if c not in by_class:
            tf.close()
            raise DataError(f"{tar}: {base}/{c}: missing class folder (the split has {len(present)} classes); add "
                            "it, or leave the class out of `classes`")
        own = sorted(by_class[c], key=lambda m: m.name)
        if not own:
            tf.close()
            raise DataError(f"{tar}: {base}/{c}: empty class folder (no .jpg/.jpeg/.png files); add its images or "
                            "remove it")
        chosen += own
        labels += [i] * len(own)
    return tf, chosen, labels, names


def _member_bytes(tf: tarfile.TarFile, tar: Path, m: tarfile.TarInfo) -> bytes:
    try:
        f = tf.extractfile(m)
        data = f.read() if f is not None else None
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise DataError(f"{tar}: member {m.name} cannot be read ({type(e).__name__}: {e}); the archive is damaged: "
                        "pack or download it again") from None
    if data is None or len(data) != m.size:
        raise DataError(f"{tar}: member {m.name} cannot be read (got {0 if data is None else len(data)} of {m.size} "
                        "bytes); the archive is damaged: pack or download it again")
    return data


def image_folder(root: str | os.PathLike, split: str, classes: list[str] | None = None,
                 size: tuple[int, int] | None = None, workers: int | None = None
                 ) -> tuple[DiskArray, Tensor, list[str]]:
    """Images, labels and class names of ``root/<split>/<class>/*.{jpg,jpeg,png}`` (torchvision's ImageFolder
    layout), or of such a folder inside the ``.tar`` / ``.tar.gz`` ``root`` (directly or under one top folder).

    Class ids follow ``classes`` (default: the class folders, sorted), files are sorted within a class. The images
    are decoded once (see :func:`decode_images`) into ``retain.data.cache_dir() / "images"``; a tar is read from the
    archive, nothing extracted.
    """
    root, size = Path(root).expanduser(), _check_size(size)
    if _is_tar(root):
        return _tar_folder(root, split, classes, size, workers)
    files, labels, names = _folder_files(root, split, classes)
    where = {"root": str(root.resolve()), "split": split, "classes": names, "size": size}
    cache = cache_dir() / "images" / f"{root.name}-{split}-{_key(where)[:16]}.u8"
    return decode_images(files, size, cache, workers), torch.tensor(labels, dtype=torch.long), names


def _tar_folder(root: Path, split: str, classes: list[str] | None, size: tuple[int, int] | None,
                workers: int | None) -> tuple[DiskArray, Tensor, list[str]]:
    """:func:`image_folder` of a tar: the key is the archive's path, size and time, so a cached split is found
    without listing the archive; the labels and class names come from the labels file beside the images."""
    st = root.stat()
    where = {"tar": str(root.resolve()), "split": split, "classes": classes, "size": size}
    cache = cache_dir() / "images" / f"{root.name.split('.')[0]}-{split}-{_key(where)[:16]}.u8"
    labels_file = cache.with_suffix(".labels")
    inputs = _key({"format": FORMAT, **where, "bytes": st.st_size, "mtime": st.st_mtime_ns})
    found, found_labels = _cached(cache, inputs), _cached(labels_file, inputs)
    if found is not None and found_labels is not None and len(found) == len(found_labels):
        return found, found_labels.load(), list(found_labels.header["meta"]["classes"])
    tf, chosen, labels, names = _tar_layout(root, split, classes)
    try:
        with ArrayWriter(labels_file, (len(labels),), torch.int64, inputs, {"classes": names}) as w:
            w.write(0, np.asarray(labels, dtype=np.int64))
            w.commit()
        row = {id(m): i for i, m in enumerate(chosen)}
        in_archive = sorted(chosen, key=lambda m: m.offset_data)  # forward seeks only: one pass over a .gz

        def chunks() -> Iterator[tuple[list[int], list[tuple[str, bytes | None]]]]:
            for s in range(0, len(in_archive), _CHUNK):
                part = in_archive[s:s + _CHUNK]
                yield [row[id(m)] for m in part], [(f"{root}:{m.name}", _member_bytes(tf, root, m))
                                                   for m in part]

        first = in_archive[0]
        found = _decode(chunks, len(chosen), (f"{root}:{first.name}", _member_bytes(tf, root, first)), size,
                        cache, inputs, workers, {"source": str(root), "split": split})
    finally:
        tf.close()
    return found, torch.tensor(labels, dtype=torch.long), names


# ------------------------------------------------------------------------------------- datasets and prefetch

def stream_dataset(ds: torch.utils.data.Dataset, name: str = "dataset", num_workers: int | None = None,
                   batch_size: int = 256) -> tuple[DiskArray, Tensor]:
    """Write a map-style ``(x, y)`` data set once into an array file under ``cache_dir() / "datasets"`` (named by
    its checksum) through a DataLoader with ``num_workers`` background workers (default min(4, CPUs)), in order;
    return the array and the labels (held in memory)."""
    n = len(ds)
    if n == 0:
        raise DataError(f"{name}: the data set is empty")
    x0 = torch.as_tensor(ds[0][0])
    workers = default_workers() if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    folder = cache_dir() / "datasets"
    ys: list[Tensor] = []
    with ArrayWriter(folder / f"{name}.u8", (n, *x0.shape), x0.dtype, meta={"name": name}) as w:
        start = 0
        for x, y in loader:
            x = torch.as_tensor(x)
            if x.shape[1:] != x0.shape or x.dtype != x0.dtype:
                raise DataError(f"{name}: row {start} has shape {list(x.shape[1:])} {x.dtype}, row 0 "
                                f"{list(x0.shape)} {x0.dtype}; every input must have one shape and dtype")
            w.write(start, x)
            ys.append(torch.as_tensor(y))
            start += len(x)
        if start != n:
            raise DataError(f"{name}: yielded {start} rows but its len() is {n}")
        array = w.commit(folder / f"{name}-{w.checksum()[7:23]}.u8")
    return array, torch.cat(ys)


def estimated_bytes(ds: torch.utils.data.Dataset) -> int:
    """The size of a data set's inputs held in memory, from its first item times its length."""
    return torch.as_tensor(ds[0][0]).nbytes * len(ds) if len(ds) else 0


T = TypeVar("T")
_END = object()


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """``items``, produced up to ``depth`` ahead in a background thread (disk reads overlap the step); the same
    items in the same order. An error in the producer is raised here; closing this iterator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put((False, e))

    thread = threading.Thread(target=produce, name="retain-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
