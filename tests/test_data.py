"""Data readers on small files the tests write, including corrupted ones; search order; download; digits;
which dataset a folder of IDX files really holds (checksums)."""

import gzip
import hashlib
import os
import pickle
import shutil
import struct
import types

import numpy as np
import pytest
import torch

from retain import data
from retain.cli import main
from retain.errors import DataError


@pytest.fixture(autouse=True)
def _private_checksum_cache(tmp_path, monkeypatch):
    """Each test hashes into its own cache: nothing is written to the user's, and no test sees another's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(data, "_MD5_MEMO", {}, raising=False)


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_mnist_like(folder, n_train=20, n_test=10, gz=True, corrupt=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n_train, 28, 28)), 2051),
        "train-labels-idx1-ubyte": idx_bytes(np.arange(n_train) % 10, 2049),
        "t10k-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n_test, 28, 28)), 2051),
        "t10k-labels-idx1-ubyte": idx_bytes(np.arange(n_test) % 10, 2049),
    }
    if corrupt:
        name, content = corrupt(files)
        files[name] = content
    for name, content in files.items():
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(content)
        else:
            (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize("gz", [True, False])
def test_reads_flat_layout(tmp_path, gz):
    write_mnist_like(tmp_path / "m", gz=gz)
    a = data.load_idx_folder(tmp_path / "m", "mnist")
    assert a.x_train.shape == (20, 1, 28, 28) and a.x_train.dtype == torch.uint8
    assert a.y_train.tolist() == [i % 10 for i in range(20)] and a.y_test.shape == (10,)


def test_reads_torchvision_layout_through_data_dir(tmp_path):
    write_mnist_like(tmp_path / "root" / "MNIST" / "raw")
    a = data.load("mnist", tmp_path / "root")
    assert a.x_test.shape == (10, 1, 28, 28) and "MNIST/raw" in a.source


def test_search_order_data_dir_before_env(tmp_path, monkeypatch):
    write_mnist_like(tmp_path / "a", n_train=20)
    write_mnist_like(tmp_path / "b", n_train=30)
    monkeypatch.setenv("RETAIN_DATA", str(tmp_path / "b"))
    assert len(data.load("mnist", tmp_path / "a").y_train) == 20
    assert len(data.load("mnist").y_train) == 30


def _set(name, content):
    return lambda files: (name, content)


@pytest.mark.parametrize("corrupt, message", [
    (_set("train-images-idx3-ubyte", idx_bytes(np.zeros((20, 28, 28)), 1234)), "wrong magic number 1234"),
    (lambda f: ("train-images-idx3-ubyte", f["train-images-idx3-ubyte"][:-100]), "truncated"),
    (_set("train-labels-idx1-ubyte", idx_bytes(np.zeros(19), 2049)), "19 labels for 20 images"),
    (_set("t10k-labels-idx1-ubyte", idx_bytes(np.full(10, 12), 2049)), "label 12 out of range"),
    (_set("train-labels-idx1-ubyte", b"\x00\x00"), "truncated IDX file"),
])
def test_corrupt_files_are_named(tmp_path, corrupt, message):
    write_mnist_like(tmp_path / "m", corrupt=corrupt)
    with pytest.raises(DataError, match=message) as e:
        data.load("mnist", tmp_path / "m")
    assert "idx" in str(e.value)  # the message names the file


def test_truncated_gzip_stream(tmp_path):
    folder = write_mnist_like(tmp_path / "m")
    p = folder / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot be read"):
        data.load("mnist", folder)


def test_missing_file_and_missing_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("RETAIN_DATA", raising=False)
    folder = write_mnist_like(tmp_path / "m")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        data.load("mnist", folder)
    with pytest.raises(DataError, match="does not exist"):
        data.load("mnist", tmp_path / "nowhere")
    with pytest.raises(DataError, match="not found .*looked in.*--download"):
        data.load("kmnist", tmp_path)


def test_directory_where_a_file_should_be(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        data.read_idx(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_file(tmp_path):
    folder = write_mnist_like(tmp_path / "m")
    (folder / "train-images-idx3-ubyte.gz").chmod(0)
    with pytest.raises(DataError, match="permission denied"):
        data.load("mnist", folder)


def test_download_verifies_checksum_and_writes_atomically(tmp_path, monkeypatch):
    mirror = write_mnist_like(tmp_path / "mirror")
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz"]
    md5 = {n: hashlib.md5((mirror / n).read_bytes()).hexdigest() for n in names}
    good = data.Source("mnist", "idx", ("MNIST/raw",), (), (mirror.as_uri() + "/",), tuple(md5.items()))
    monkeypatch.setitem(data.SOURCES, "mnist", good)
    a = data.load("mnist", tmp_path / "dl", download_missing=True)
    assert len(a.y_train) == 20 and (tmp_path / "dl" / "MNIST" / "raw" / names[0]).exists()
    # a wrong checksum: refused, and nothing (not even a partial file) is left behind
    bad = data.Source("mnist", "idx", ("MNIST/raw",), (), (mirror.as_uri() + "/",),
                      tuple((n, "0" * 32) for n in names))
    monkeypatch.setitem(data.SOURCES, "mnist", bad)
    with pytest.raises(DataError, match="checksum mismatch"):
        data.load("mnist", tmp_path / "dl2", download_missing=True)
    leftovers = list((tmp_path / "dl2").rglob("*")) if (tmp_path / "dl2").exists() else []
    assert [p for p in leftovers if p.is_file()] == []


def test_download_without_network_is_one_clear_error(tmp_path, monkeypatch):
    src = data.Source("kmnist", "idx", ("KMNIST/raw",), (), ("http://127.0.0.1:9/",),
                      (("train-images-idx3-ubyte.gz", "0" * 32),))
    monkeypatch.setitem(data.SOURCES, "kmnist", src)
    with pytest.raises(DataError, match="could not download .*by hand"):
        data.download("kmnist", tmp_path)


def test_cifar_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 9]}, f)
    a = data.load("cifar10", tmp_path)
    assert a.x_train.shape == (20, 3, 32, 32) and a.y_test.tolist() == [0, 1, 2, 9]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 10]}, f)
    with pytest.raises(DataError, match="test_batch: label out of range"):
        data.load("cifar10", tmp_path)
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="data_batch_3: not a readable CIFAR pickle"):
        data.load("cifar10", tmp_path)


def test_digits_are_offline_uint8_and_stratified():
    a = data.load("digits")
    assert a.x_train.dtype == torch.uint8 and a.x_train.shape[1:] == (1, 8, 8)
    assert int(a.x_train.max()) == 255
    assert len(a.y_train) + len(a.y_test) == 1797
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 50  # every class in the test set


# ---------------------------------------------------------------------------- the right dataset or a clear error

@pytest.fixture
def mnist_copy(mnist_dir, tmp_path):
    """The four published MNIST gzip files, copied where a test may rename or replace them."""
    return shutil.copytree(mnist_dir, tmp_path / "looks-like-fashion")


@pytest.mark.parametrize("benchmark, shown", [("split-fashion-mnist", "Fashion-MNIST"), ("split-kmnist", "KMNIST")])
def test_mnist_asked_for_as_another_dataset_is_refused(mnist_copy, tmp_path, monkeypatch, capsys, benchmark, shown):
    monkeypatch.chdir(tmp_path)  # should the run go ahead, its records stay in tmp
    code = main(["run", "--benchmark", benchmark, "--data-dir", str(mnist_copy), "--iterations", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (f"retain: error: {mnist_copy / 'train-images-idx3-ubyte.gz'} is MNIST's training images, not "
                   f"{shown}'s; point --data-dir (or RETAIN_DATA) at a folder of {shown} files")


def test_retain_data_pointing_at_mnist_is_refused_too(mnist_copy, monkeypatch):
    monkeypatch.setenv("RETAIN_DATA", str(mnist_copy))
    with pytest.raises(DataError, match="is MNIST's training images, not Fashion-MNIST's") as e:
        data.load("fashion-mnist")
    assert e.value.exit_code == 2


def test_published_mnist_is_accepted_as_verified_also_when_recompressed(mnist_copy):
    labels = mnist_copy / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(labels) as f:
        raw = f.read()
    labels.write_bytes(gzip.compress(raw, mtime=0))  # other gzip bytes, the same content
    assert hashlib.md5(labels.read_bytes()).hexdigest() != dict(data.SOURCES["mnist"].files)[labels.name]
    a = data.load("mnist", mnist_copy)
    assert a.unverified == () and data.unverified_warning(a) is None
    assert a.x_train.shape == (60000, 1, 28, 28) and a.y_test.shape == (10000,)


def test_recompressed_or_uncompressed_mnist_file_is_still_recognised(mnist_dir, tmp_path):
    with gzip.open(mnist_dir / "t10k-labels-idx1-ubyte.gz") as f:
        raw = f.read()
    folder = write_mnist_like(tmp_path / "raw", gz=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(raw)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is MNIST's test labels, not KMNIST's"):
        data.load("kmnist", folder)
    folder = write_mnist_like(tmp_path / "regz")
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw, mtime=0))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is MNIST's test labels, not Fashion-MNIST's"):
        data.load("fashion-mnist", folder)


def test_swapped_files_of_the_right_dataset_are_named(mnist_copy):
    train, test = mnist_copy / "train-labels-idx1-ubyte.gz", mnist_copy / "t10k-labels-idx1-ubyte.gz"
    train.rename(mnist_copy / "swap")
    test.rename(train)
    (mnist_copy / "swap").rename(test)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz is MNIST's test labels, not its training labels"):
        data.load("mnist", mnist_copy)


def test_unknown_files_are_accepted_and_flagged(tmp_path):
    folder = write_mnist_like(tmp_path / "mine")
    a = data.load("fashion-mnist", folder)
    assert len(a.y_train) == 20
    assert sorted(a.unverified) == sorted(str(folder / f"{s}.gz") for s in data.IDX_FILES.values())
    assert "match no published checksum" in data.unverified_warning(a)
    assert data.load_idx_folder(folder, "my-own-data").unverified == ()  # no table to check a user's dataset against


def test_checksums_are_cached_per_path_size_and_mtime(tmp_path, monkeypatch):
    folder = write_mnist_like(tmp_path / "mine")
    assert len(data.load("mnist", folder).unverified) == 4
    calls = []
    real_md5 = hashlib.md5
    monkeypatch.setattr(data, "hashlib", types.SimpleNamespace(md5=lambda *a: calls.append(1) or real_md5(*a)))
    monkeypatch.setattr(data, "_MD5_MEMO", {})  # a new process: only the cache on disk remains
    assert len(data.load("mnist", folder).unverified) == 4 and calls == []
    p = folder / "t10k-labels-idx1-ubyte.gz"
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))  # a changed file is hashed again
    data.load("mnist", folder)
    assert len(calls) == 2  # its gzip bytes and its content
