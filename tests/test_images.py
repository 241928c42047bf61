"""Image folders, tars of them and data on disk (retain.images): readers, one-line errors, the cache, the
scenario path with prefetch, streamed datasets, `retain prepare`, and a run under a memory cap smaller than the data.

Every image is a tiny file the test writes with PIL into tmp_path (the conftest gives each test its own cache)."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import retain
from retain import images
from retain.cli import main
from retain.context import Context
from retain.errors import DataError
from retain.images import ArrayWriter, DiskArray, decode_images, image_folder
from retain.scenarios import from_dataset, from_tensors
from retain.trainer import TrainConfig

COLOURS = {"cat": [(200, 10, 10), (190, 20, 20), (180, 30, 30)], "ant": [(10, 200, 10), (20, 190, 20)]}


def write_image(path: Path, colour, hw=(4, 5), fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((*hw, 3), dtype=np.uint8) + np.array(colour, dtype=np.uint8)
    arr[0, 0] = (colour[0] // 2, 255, 7)  # one pixel apart, so a transposed or shifted read shows
    Image.fromarray(arr).save(path, format=fmt)


def write_folder(root: Path, split: str = "train", colours=COLOURS, hw=(4, 5)) -> Path:
    # names sort as strings: "10.png" before "2.png"
    for c, cols in colours.items():
        for i, col in zip((2, 10, 11), cols):
            write_image(root / split / c / f"{i}.png", col, hw)
    return root


def expected_rows(colours=COLOURS, hw=(4, 5)) -> tuple[np.ndarray, list[int]]:
    rows, labels = [], []
    for k, c in enumerate(sorted(colours)):
        cols = dict(zip(("2", "10", "11"), colours[c]))
        for name in sorted(cols):  # string order, as the reader sorts
            arr = np.zeros((*hw, 3), dtype=np.uint8) + np.array(cols[name], dtype=np.uint8)
            arr[0, 0] = (cols[name][0] // 2, 255, 7)
            rows.append(arr.transpose(2, 0, 1))
            labels.append(k)
    return np.stack(rows), labels


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------- readers

def test_image_folder_sorts_classes_and_files_and_reads_the_pixels(tmp_path):
    root = write_folder(tmp_path / "data")
    x, y, classes = image_folder(root, "train")
    want, labels = expected_rows()
    assert isinstance(x, DiskArray) and classes == ["ant", "cat"]
    assert list(x.shape) == [5, 3, 4, 5] and x.dtype == torch.uint8 and len(x) == 5
    assert y.tolist() == labels and y.dtype == torch.long
    assert torch.equal(x[torch.arange(5)], torch.from_numpy(want))
    assert x.path.parent == retain.data.cache_dir() / "images"


def test_classes_argument_sets_the_label_order(tmp_path):
    root = write_folder(tmp_path / "data")
    x, y, classes = image_folder(root, "train", classes=["cat", "ant"])
    assert classes == ["cat", "ant"] and y.tolist() == [0, 0, 0, 1, 1]
    assert x[0][0, 1, 1] == 190  # cat's first file: "10.png" (names sort as strings: 10, 11, 2)


def test_greyscale_folder_gives_one_channel_and_a_colour_image_among_them_gives_rgb(tmp_path):
    folder = tmp_path / "g" / "s" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((4, 4), 30 * i, dtype=np.uint8), "L").save(folder / f"{i}.png")
    x, _, _ = image_folder(tmp_path / "g", "s")
    assert list(x.shape) == [3, 1, 4, 4] and x[2][0, 0, 0] == 60
    write_image(folder / "3.png", (1, 2, 3), hw=(4, 4))  # a colour image after greyscale ones
    x, _, _ = image_folder(tmp_path / "g", "s")
    assert list(x.shape) == [4, 3, 4, 4]
    assert x[2][:, 1, 1].tolist() == [60, 60, 60] and x[3][:, 1, 1].tolist() == [1, 2, 3]


def test_size_resizes_and_mixed_sizes_without_it_name_a_file_of_each_size(tmp_path):
    write_image(tmp_path / "d" / "train" / "a" / "0.png", (9, 9, 9), hw=(4, 4))
    write_image(tmp_path / "d" / "train" / "a" / "1.png", (9, 9, 9), hw=(6, 8))
    with pytest.raises(DataError) as e:
        image_folder(tmp_path / "d", "train")
    msg = one_line_error(e)
    assert "1.png: 6x8" in msg and "0.png: 4x4" in msg and "pass a size" in msg
    x, _, _ = image_folder(tmp_path / "d", "train", size=(3, 5))
    assert list(x.shape) == [2, 3, 3, 5]
    assert int(x[1][0, 2, 2]) == 9


def pack(root: Path, tar_path: Path, top: str | None) -> Path:
    mode = "w:gz" if tar_path.name.endswith(".gz") else "w"
    with tarfile.open(tar_path, mode) as tf:
        for split in sorted(os.listdir(root)):
            tf.add(root / split, arcname=f"{top}/{split}" if top else split)
    return tar_path


@pytest.mark.parametrize("name,top", [("d.tar", None), ("d.tar.gz", "cifar10-jpeg")])
def test_a_tar_reads_like_the_folder_it_holds(tmp_path, name, top):
    root = write_folder(tmp_path / "d")
    write_folder(root, "test", {"ant": [(1, 2, 3)], "cat": [(4, 5, 6)]})
    tar = pack(root, tmp_path / name, top)
    x, y, classes = image_folder(root, "train")
    tx, ty, tclasses = image_folder(tar, "train")
    assert tclasses == classes and torch.equal(ty, y) and torch.equal(tx.load(), x.load())
    assert images.splits(tar) == ["test", "train"] == images.splits(root)
    assert len(image_folder(tar, "test")[0]) == 2


# -------------------------------------------------------------------------------------------------- errors

def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


@pytest.mark.parametrize("case,words", [
    ("corrupt", ["bad.jpg", "not a readable image"]),
    ("truncated", ["cut.jpg", "truncated image"]),
    ("missing class", ["dog", "missing class folder"]),
    ("missing split", ["val", "missing split folder"]),
    ("no class folders", ["empty-split", "no class folders"]),
    ("empty class", ["cat", "empty class folder"]),
])
def test_folder_errors_are_one_line_naming_the_file(tmp_path, case, words):
    root = write_folder(tmp_path / "d")
    split, classes = "train", None
    if case == "corrupt":
        (root / "train" / "cat" / "bad.jpg").write_bytes(b"this is not a jpeg" * 10)
    elif case == "truncated":
        _truncated_jpeg(root / "train" / "cat" / "cut.jpg")
    elif case == "missing class":
        classes = ["ant", "cat", "dog"]
    elif case == "missing split":
        split = "val"
    elif case == "no class folders":
        (root / "empty-split").mkdir()
        split = "empty-split"
    elif case == "empty class":
        for f in (root / "train" / "cat").iterdir():
            f.unlink()
    with pytest.raises(DataError) as e:
        image_folder(root, split, classes=classes, size=(4, 5))
    msg = one_line_error(e)
    assert all(w in msg for w in words), msg


def test_tar_errors_name_the_archive_and_member(tmp_path):
    root = write_folder(tmp_path / "d")
    tar = pack(root, tmp_path / "d.tar", "top")
    raw = tar.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: len(raw) // 2 + 100])  # a member's data cut off
    with pytest.raises(DataError) as e:
        image_folder(cut, "train")
    assert "cut.tar" in one_line_error(e) and "damaged" in str(e.value)
    with pytest.raises(DataError) as e:
        image_folder(tar, "val")
    assert "no val/ folder" in one_line_error(e) and "found: train" in str(e.value)
    not_tar = tmp_path / "x.tar"
    not_tar.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DataError) as e:
        image_folder(not_tar, "train")
    assert "x.tar" in one_line_error(e)
    (root / "train" / "bee").mkdir()  # an empty class folder, packed as a directory member
    with pytest.raises(DataError) as e:
        image_folder(pack(root, tmp_path / "e.tar", None), "train")
    assert "train/bee: empty class folder" in one_line_error(e)
    _truncated_jpeg(root / "train" / "ant" / "zz.jpg")
    (root / "train" / "bee").rmdir()
    with pytest.raises(DataError) as e:
        image_folder(pack(root, tmp_path / "f.tar", None), "train", size=(4, 5))
    assert "f.tar:train/ant/zz.jpg: truncated image" in one_line_error(e)


# --------------------------------------------------------------------------------------------------- cache

def test_cache_is_reused_without_decoding_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "d")
    calls = []
    real = images._decode_chunk
    monkeypatch.setattr(images, "_decode_chunk", lambda items, *a: calls.append(len(items)) or real(items, *a))
    x1, _, _ = image_folder(root, "train")
    assert sum(calls) == 5
    x2, _, _ = image_folder(root, "train")
    assert sum(calls) == 5 and x2.path == x1.path and x2.checksum == x1.checksum  # nothing decoded
    f = root / "train" / "ant" / "10.png"
    write_image(f, (77, 77, 77))
    (root / "train" / "ant" / "._10.png").write_bytes(b"resource fork")  # a dot file: not an image, ignored
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    x3, _, _ = image_folder(root, "train")
    assert sum(calls) == 10 and x3.path == x1.path and x3.checksum != x1.checksum
    assert int(x3[0][1, 2, 2]) == 77
    assert len(list(x3.path.parent.iterdir())) == 1  # replaced in place, no temporary file left


def test_a_cached_tar_is_not_listed_again(tmp_path, monkeypatch):
    tar = pack(write_folder(tmp_path / "d"), tmp_path / "d.tar.gz", "top")
    x1, y1, c1 = image_folder(tar, "train")
    monkeypatch.setattr(images, "_tar_layout", lambda *a: pytest.fail("listed a cached tar"))
    x2, y2, c2 = image_folder(tar, "train")
    assert (x2.checksum, y2.tolist(), c2) == (x1.checksum, y1.tolist(), c1)


def test_a_damaged_cache_file_is_rebuilt_by_the_reader_and_refused_by_path(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "d")
    x, _, _ = image_folder(root, "train")
    good = x.load()
    with open(x.path, "r+b") as f:
        f.seek(x.offset + 7)
        f.write(b"\xff")
    images._VERIFIED.clear()  # as in a new process
    with pytest.raises(DataError) as e:
        DiskArray(x.path)
    assert "damaged cache file" in one_line_error(e) and str(x.path) in str(e.value)
    again, _, _ = image_folder(root, "train")
    assert torch.equal(again.load(), good)
    with open(x.path, "r+b") as f:  # cut short
        f.truncate(x.offset + 10)
    with pytest.raises(DataError, match="cut short"):
        DiskArray(x.path)


def test_decode_images_keeps_the_files_order(tmp_path):
    files = []
    for i, col in enumerate([(5, 5, 5), (100, 1, 1), (7, 8, 9)]):
        files.append(tmp_path / f"{9 - i}.jpeg")
        write_image(files[-1], col, fmt="PNG")  # PNG bytes under .jpeg: decoded by content
    x = decode_images(files, None, tmp_path / "cache" / "x.u8")
    assert [int(v) for v in x[torch.arange(3)][:, 2, 3, 3]] == [5, 1, 9]


def test_the_process_pool_decodes_what_one_process_does(tmp_path, monkeypatch):
    files = []
    for i in range(40):
        files.append(tmp_path / f"{i:03d}.png")
        write_image(files[-1], (i, 2 * i, 3 * i))
    monkeypatch.setattr(images, "_POOL_MIN", 10)
    monkeypatch.setattr(images, "_CHUNK", 7)
    pooled = decode_images(files, None, tmp_path / "a.u8", workers=2).load()
    alone = decode_images(files, None, tmp_path / "b.u8", workers=1).load()
    assert torch.equal(pooled, alone) and pooled[39, 2, 3, 3] == 117


# ------------------------------------------------------------------------------------------------ DiskArray

def test_disk_array_reads_any_rows_like_the_tensor(tmp_path):
    for dtype in (torch.uint8, torch.float32):
        data = (torch.rand(50, 2, 3, 3) * 200).to(dtype)
        with ArrayWriter(tmp_path / f"{dtype}.u8", tuple(data.shape), dtype) as w:
            w.write(0, data[:20])
            w.write_rows([30, 31, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29] + list(range(32, 50)),
                         torch.cat([data[30:32], data[20:30], data[32:]]).numpy())
            arr = w.commit()
        idx = torch.tensor([49, 3, 3, 0, -1, 17, 18, 19, 4])
        assert torch.equal(arr[idx], data[idx]) and arr.dtype == dtype and arr.shape == data.shape
        assert torch.equal(arr[5], data[5]) and torch.equal(arr[10:20:3], data[10:20:3])
        assert torch.equal(arr.gather(idx, "cpu"), data[idx]) and arr.to("cpu") is arr
        back = pickle.loads(pickle.dumps(arr))
        assert torch.equal(back[idx], data[idx]) and back.path == arr.path
        assert arr[torch.tensor([], dtype=torch.long)].shape == (0, 2, 3, 3)
        with pytest.raises(IndexError):
            arr[torch.tensor([50])]


def test_prefetch_yields_the_same_items_raises_the_producers_error_and_stops_when_closed():
    import threading

    assert list(images.prefetch(iter(range(10)), depth=2)) == list(range(10))

    def failing():
        yield 1
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        list(images.prefetch(failing()))
    made = []

    def endless():
        while True:
            made.append(len(made))
            yield made[-1]

    it = images.prefetch(endless(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert not any(t.name == "retain-prefetch" for t in threading.enumerate())
    assert len(made) <= 3 + 2 + 1  # at most depth ahead, plus the one being put


# ---------------------------------------------------------------------------------------------- scenarios

def tiny_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = (torch.tensor([40, 90, 150, 210])[y][:, None, None, None] + torch.randint(-30, 31, (n, 1, 6, 6), generator=g))
    return x.clamp(0, 255).to(torch.uint8), y


def on_disk(x: torch.Tensor, path: Path) -> DiskArray:
    with ArrayWriter(path, tuple(x.shape), x.dtype) as w:
        w.write(0, x)
        return w.commit()


def test_a_scenario_on_disk_gives_the_batches_of_the_one_in_memory_with_prefetch(tmp_path):
    x, y = tiny_images(60, 0)
    mem = from_tensors(x, y, x[:20], y[:20], n_tasks=2)
    disk = from_tensors(on_disk(x, tmp_path / "x.u8"), y, on_disk(x[:20], tmp_path / "t.u8"), y[:20], n_tasks=2)
    assert isinstance(disk.to("cpu").x_train, DiskArray) and disk.input_shape == (1, 6, 6)
    config = TrainConfig(batch_size=7, epochs=2, seed=3)
    seen = torch.ones(disk.n_outputs, dtype=torch.bool)
    runs = []
    for sc in (mem, disk):
        ctx = Context(torch.nn.Identity(), sc.train_view(), config, None, torch.device("cpu"), torch.Generator(),
                      seen, task=1)
        runs.append(list(ctx.batches(sc.task_data(1), start=2)))
    assert len(runs[0]) == len(runs[1]) == 2 * 5 - 2
    for a, b in zip(*runs):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.t, b.t)
    assert torch.equal(disk.batch(torch.tensor([3, 1]), 0, "test").x, mem.batch(torch.tensor([3, 1]), 0, "test").x)


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        self.x, self.y = tiny_images(n, seed)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def test_from_dataset_streamed_to_disk_gives_the_same_accuracy_matrix(tmp_path):
    results = []
    for stream in (False, True):
        sc = from_dataset(Images(80, 0), Images(40, 1), n_tasks=2, stream=stream, num_workers=1)
        assert isinstance(sc.x_train, DiskArray) == stream and isinstance(sc.x_test, DiskArray) == stream
        r = retain.run(scenario=sc, method="er", epochs=2, batch_size=8, hidden=(16,), eval_batch_size=7)
        results.append(r.accuracy_matrix)
    assert results[0] == results[1]
    assert (retain.data.cache_dir() / "datasets").is_dir()


def test_a_task_free_stream_from_disk_gives_the_same_accuracy_matrix(tmp_path):
    results = []
    for stream in (False, True):  # the stream's batches are prefetched from disk in the second run
        sc = from_dataset(Images(80, 0), Images(40, 1), n_tasks=2, stream=stream, num_workers=1)
        r = retain.run(scenario=sc, method="er", task_free=True, batch_size=8, hidden=(16,))
        results.append(r.accuracy_matrix)
    assert results[0] == results[1]


# -------------------------------------------------------------------------------------------------- the CLI

def test_retain_prepare_decodes_once_and_prints_path_shape_checksum(tmp_path, capsys):
    root = write_folder(tmp_path / "d")
    write_folder(root, "test", {"ant": [(1, 2, 3)], "cat": [(4, 5, 6)]})
    assert main(["prepare", str(root), "--size", "4,4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["test", "train"]
    path = out[1].split()[1]
    x = DiskArray(path)
    assert "shape [5, 3, 4, 4]" in out[1] and x.checksum in out[1] and list(x.shape) == [5, 3, 4, 4]
    assert main(["prepare", str(root), "--split", "train", "--size", "4x4"]) == 0
    assert capsys.readouterr().out.split()[1] == path


@pytest.mark.parametrize("argv,words", [
    (["prepare", "{tmp}/nowhere"], "nowhere"),
    (["prepare", "{tmp}/d", "--size", "big"], "--size expects H,W"),
    (["prepare", "{tmp}/d", "--split", "val"], "missing split folder"),
])
def test_retain_prepare_errors_exit_2_with_one_line(tmp_path, capsys, argv, words):
    write_folder(tmp_path / "d")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("retain: error:") and words in err


# --------------------------------------------------------------------------------------------- memory cap

CAPPED = textwrap.dedent("""
    import json, resource, sys, torch
    import retain
    from retain.images import DiskArray
    from retain.scenarios import from_tensors

    torch.set_num_threads(1)
    x = DiskArray(sys.argv[1], verify=False)  # the test checked it; hashing would only add time
    y = torch.arange(len(x)) % 4
    test = torch.arange(0, len(x), 97)
    sc = from_tensors(x, y, x[test], y[test], n_tasks=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x.shape[1:].numel(), 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 4))
    retain.run(scenario=sc, model=model, method="finetune", iterations=2, batch_size=8)  # warm: lazy imports
    with open("/proc/self/status") as f:
        vm = dict(line.split(":", 1) for line in f)
    used = int(vm["VmSize"].split()[0]) * 1024
    cap = used + int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    r = retain.run(scenario=sc, model=model, method="finetune", iterations=100, batch_size=64)
    # the peak resident set of this process's own memory (VmHWM): ru_maxrss would start from the parent's size at
    # the fork (a full pytest session is larger than the data) and keep it across exec
    with open("/proc/self/status") as f:
        peak = int(dict(line.split(":", 1) for line in f)["VmHWM"].split()[0]) * 1024
    print(json.dumps({"address_space": used, "cap": cap, "maxrss": peak, "acc": r.accuracy_matrix}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_a_run_over_data_larger_than_a_memory_cap_completes_with_peak_rss_below_the_data(tmp_path):
    resource = pytest.importorskip("resource")
    n, shape = 24_000, (3, 96, 96)  # 664 MB of uint8 rows; the process holds ~0.35 GB after torch's imports
    rng = np.random.default_rng(0)
    with ArrayWriter(tmp_path / "big.u8", (n, *shape)) as w:
        # each row's first kilobyte is written (noise, and the label in pixel 0), the rest left a hole of zeros:
        # the reader reads every byte of a row either way, and the shared disk is spared 0.6 GB of writes
        head = rng.integers(0, 256, (n, 1024), dtype=np.uint8)
        head[:, 0] = np.arange(n) % 4 * 60
        for i in range(n):
            os.pwrite(w._fd, head[i].tobytes(), w.offset + i * w.row_bytes)  # the rows as the writer lays them
        big = w.commit()
    size = big.nbytes
    margin = 200 * 2**20
    assert margin < size and resource.RLIM_INFINITY is not None
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CAPPED, str(big.path), str(margin)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\ndata {size / 2**20:.0f} MiB; address space after imports {got['address_space'] / 2**20:.0f} MiB, "
          f"cap {got['cap'] / 2**20:.0f} MiB (+{margin / 2**20:.0f} MiB); peak RSS {got['maxrss'] / 2**20:.0f} MiB")
    assert got["maxrss"] < size
    assert len(got["acc"]) == 2
