"""Data sources -> tensors: IDX (MNIST family), CIFAR pickles (or CIFAR-10 as a JPEG image folder), the image
datasets of the vision benchmarks (Tiny-ImageNet, ImageNet-R, CUB-200-2011, CORe50: their own layouts, decoded once
into arrays on disk by :mod:`retain.images`), scikit-learn digits, synthetic data.

Every loader returns an :class:`Arrays` of uint8 (or float) images and int64 labels. Nothing here knows about
tasks; :mod:`retain.scenarios` cuts the arrays into a stream. Files are searched in a fixed order
(``--data-dir``, ``$RETAIN_DATA``, ``~/.cache/retain``, well-known system folders), validated strictly (a
corrupt or truncated file is an error naming the file, never a silently partial dataset), and downloaded only
when asked, with checksum verification and an atomic rename.

The MNIST family shares its file names, so a folder of MNIST answers a request for Fashion-MNIST as well as
for MNIST. Each IDX file is therefore identified by its md5 (of the file, and for a gzip whose own checksum is
unknown, of its uncompressed bytes): another dataset's published file is refused, and a file matching no
published checksum (a user's own re-encoding) is accepted but listed in :attr:`Arrays.unverified`. Checksums
are cached per (path, size, mtime) in memory and in ``~/.cache/retain/checksums.json``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from retain.errors import ConfigError, DataError


@dataclass
class Arrays:
    """A dataset as tensors: images ``[N, C, H, W]`` (uint8 unless ``float``), labels ``[N]`` int64."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    n_classes: int
    mean: tuple[float, ...] = (0.0,)  # per-channel normalisation applied per batch after scaling to [0, 1]
    std: tuple[float, ...] = (1.0,)
    source: str = ""  # where the files were found (for `retain benchmarks` and the result record)
    # IDX files of a known dataset whose checksum matches no published release (a user's own re-encoding):
    # accepted, but results on them may not compare with published ones. Empty when every file matched, and for
    # data that has no checksum table (CIFAR python batches, digits, synthetic, user tensors).
    unverified: tuple[str, ...] = ()
    # What makes this copy differ from the reference data, in one line for the run record (e.g. CIFAR-10 read from
    # a lossy JPEG re-encoding, a split retain made where the papers ship their own); empty for the reference data.
    variant: str = ""
    # Per training row, the acquisition group it came from (CORe50: the index of its session among the 8 training
    # sessions), for benchmarks whose tasks are such groups (CORe50 NI); None otherwise.
    group_train: Tensor | None = None
    class_names: tuple[str, ...] = ()  # label id -> the dataset's own class name (image datasets); () if unnamed


# ---------------------------------------------------------------------------------------------------- IDX files

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def read_idx(path: str | os.PathLike) -> Tensor:
    """Read one IDX file (gzip or raw) as a uint8 tensor; validate its magic number, header and size."""
    path = Path(path)
    return _parse_idx(path, _read_bytes(path))


def _read_bytes(path: Path) -> bytes:
    """The uncompressed bytes of an IDX file, gzip or raw."""
    if path.is_dir():
        raise DataError(f"{path} is a directory, expected an IDX file; point --data-dir at the folder holding it")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except PermissionError:
        raise DataError(f"{path}: permission denied; make the file readable (chmod +r)") from None
    except (OSError, EOFError) as e:  # truncated gzip stream, bad CRC, not a gzip file
        raise DataError(f"{path}: cannot be read ({e}); delete it and download it again") from None
    return raw


def _parse_idx(path: Path, raw: bytes) -> Tensor:
    if len(raw) < 8:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes); delete it and download it again")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (IMAGES_MAGIC, LABELS_MAGIC):
        raise DataError(
            f"{path}: wrong magic number {magic} (expected {IMAGES_MAGIC} for images or {LABELS_MAGIC} for "
            "labels); this is not an IDX file"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; delete it and download it again")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {kind} (header says {dims}, {expected} bytes; file has {len(raw)}); "
            "delete it and download it again"
        )
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(arr.copy())


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):  # the last: LeCun's original spelling
        p = folder / name
        if p.exists():
            return p
    return None


def load_idx_folder(folder: str | os.PathLike, name: str, n_classes: int = 10) -> Arrays:
    """Load the four IDX files of an MNIST-like dataset from one folder; check they agree with each other."""
    folder = Path(folder)
    paths = {}
    for key, stem in IDX_FILES.items():
        p = _find_idx_file(folder, stem)
        if p is None:
            raise DataError(f"{folder}: missing {stem}[.gz] for {name}; put all four IDX files there or use --download")
        paths[key] = p
    checked = name in SOURCES and SOURCES[name].kind == "idx"
    known = _published() if checked else {}
    file_md5 = {k: _cached_md5(p, "file", lambda p=p: file_digest(p)) for k, p in paths.items()} if checked else {}
    for key, p in paths.items():  # before decompressing: another dataset's gzip is refused in a fraction of a second
        _check_identity(p, known.get(file_md5.get(key)), name, key)
    t, unverified = {}, []
    for key, p in paths.items():
        raw = _read_bytes(p)
        t[key] = _parse_idx(p, raw)
        if checked and file_md5[key] not in known:  # a re-compressed or uncompressed file: its bytes decide
            content = _cached_md5(p, "content", lambda raw=raw: hashlib.md5(raw).hexdigest())
            if content not in known:
                unverified.append(str(p))
            _check_identity(p, known.get(content), name, key)
    for split in ("train", "test"):
        xi, yi = t[f"{split}_images"], t[f"{split}_labels"]
        if xi.dim() != 3:
            raise DataError(f"{paths[f'{split}_images']}: expected a 3-d image file, got shape {list(xi.shape)}")
        if yi.dim() != 1:
            raise DataError(f"{paths[f'{split}_labels']}: expected a 1-d label file, got shape {list(yi.shape)}")
        if len(xi) != len(yi):
            raise DataError(
                f"{paths[f'{split}_labels']}: {len(yi)} labels for {len(xi)} images in "
                f"{paths[f'{split}_images'].name}; the files do not belong together"
            )
        if len(yi) and int(yi.max()) >= n_classes:
            raise DataError(
                f"{paths[f'{split}_labels']}: label {int(yi.max())} out of range 0..{n_classes - 1} for {name}"
            )
    return Arrays(
        name=name,
        x_train=t["train_images"].unsqueeze(1),
        y_train=t["train_labels"].long(),
        x_test=t["test_images"].unsqueeze(1),
        y_test=t["test_labels"].long(),
        n_classes=n_classes,
        source=str(folder),
        unverified=tuple(unverified),
    )


# ------------------------------------------------------------------------------- which dataset a file belongs to

DISPLAY_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "kmnist": "KMNIST"}
ROLE_NAMES = {"train_images": "training images", "train_labels": "training labels", "test_images": "test images",
              "test_labels": "test labels"}
_ROLE_OF_STEM = {stem: key for key, stem in IDX_FILES.items()}


def _published() -> dict[str, tuple[str, str]]:
    """md5 -> (dataset, role) for every published IDX file of :data:`SOURCES`, gzip and uncompressed."""
    out = {}
    for src in SOURCES.values():
        if src.kind == "idx":
            for fname, md5 in (*src.files, *src.contents):
                out[md5] = (src.name, _ROLE_OF_STEM[fname.removesuffix(".gz")])
    return out


def _check_identity(path: Path, found: tuple[str, str] | None, name: str, role: str) -> None:
    """Refuse ``path`` when its checksum says it is another dataset's file, or another file of the same one."""
    if found is None or found == (name, role):
        return
    other, other_role = found
    shown = lambda n: DISPLAY_NAMES.get(n, n)  # noqa: E731
    if other != name:
        raise DataError(
            f"{path} is {shown(other)}'s {ROLE_NAMES[other_role]}, not {shown(name)}'s; point --data-dir "
            f"(or RETAIN_DATA) at a folder of {shown(name)} files"
        )
    raise DataError(
        f"{path} is {shown(name)}'s {ROLE_NAMES[other_role]}, not its {ROLE_NAMES[role]}; restore the original "
        "file names"
    )


def unverified_warning(arrays: Arrays) -> str | None:
    """One line for the run record when some of ``arrays``' files match no published checksum, else None."""
    if not arrays.unverified:
        return None
    files = ", ".join(Path(p).name for p in arrays.unverified)
    return (f"{arrays.name}: {files} in {arrays.source} match no published checksum (a re-encoded or modified "
            "copy?); results may not compare with published ones")


_MD5_MEMO: dict[str, tuple[int, int, str]] = {}  # "kind:path" -> (size, mtime_ns, md5), this process


def _checksum_cache() -> Path:
    return cache_dir() / "checksums.json"


def _cached_md5(path: Path, kind: str, compute: Callable[[], str]) -> str:
    """``compute()`` (an md5 of ``path``'s bytes of ``kind``), cached per (path, size, mtime) so that a sweep
    hashes each data file once, not once per run: in memory, and on disk for the next process."""
    st = path.stat()
    key, stamp = f"{kind}:{path.resolve()}", (st.st_size, st.st_mtime_ns)
    hit = _MD5_MEMO.get(key)
    if hit is None:
        entry = _read_checksum_cache().get(key)
        if isinstance(entry, list) and len(entry) == 3:
            hit = (entry[0], entry[1], entry[2])
    if hit is not None and hit[:2] == stamp:
        _MD5_MEMO[key] = hit
        return hit[2]
    md5 = compute()
    _MD5_MEMO[key] = (*stamp, md5)
    _write_checksum_cache(key, [*stamp, md5])
    return md5


def _read_checksum_cache() -> dict:
    try:
        d = json.loads(_checksum_cache().read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _write_checksum_cache(key: str, entry: list) -> None:
    path = _checksum_cache()
    d = _read_checksum_cache()
    d[key] = entry
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".checksums.", suffix=".part")
        with os.fdopen(fd, "w") as f:
            json.dump(d, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache costs only a re-hash next time
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------------------ CIFAR pickles

def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise DataError(f"{path}: missing; put the CIFAR python batches there or use --download") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied; make the file readable (chmod +r)") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}); download it again") from None


def _cifar_arrays(path: Path, d: dict, label_key: str, n_classes: int) -> tuple[Tensor, Tensor]:
    try:
        x = np.asarray(d["data"], dtype=np.uint8)
        y = np.asarray(d[label_key], dtype=np.int64)
    except KeyError as e:
        raise DataError(f"{path}: CIFAR pickle without key {e}; download it again") from None
    if x.ndim != 2 or x.shape[1] != 3072:
        raise DataError(f"{path}: expected rows of 3072 bytes, got shape {list(x.shape)}")
    if len(x) != len(y):
        raise DataError(f"{path}: {len(y)} labels for {len(x)} images")
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise DataError(f"{path}: label out of range 0..{n_classes - 1}")
    return torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y)


def load_cifar_folder(folder: str | os.PathLike, n_classes: int) -> Arrays:
    """Load CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``) python pickles."""
    folder = Path(folder)
    if n_classes == 10:
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files, key = [folder / "test_batch"], "labels"
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    else:
        train_files, test_files, key = [folder / "train"], [folder / "test"], "fine_labels"
        mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    parts = {}
    for split, files in (("train", train_files), ("test", test_files)):
        xs, ys = zip(*(_cifar_arrays(p, _unpickle(p), key, n_classes) for p in files))
        parts[split] = (torch.cat(xs), torch.cat(ys))
    return Arrays(f"cifar{n_classes}", *parts["train"], *parts["test"], n_classes, mean, std, str(folder))


def check_pad(pixels: object) -> None:
    """Refuse a padding that is not a whole number of pixels >= 0."""
    if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0:
        raise ConfigError(f"pad must be a whole number of pixels >= 0, got {pixels!r}")


def pad(arrays: Arrays, pixels: int) -> Arrays:
    """Zero-pad every image of ``arrays`` by ``pixels`` on each side (MNIST 28x28 -> 32x32 with 2).

    van de Ven's and Hsu et al.'s MNIST loaders pad to 32x32. For a permuted-MNIST MLP this is not cosmetic: the
    permutation then runs over 1,024 positions of which ~40% never carry ink, so each task leaves more first-layer
    weights untouched and the tasks overlap less (docs/regularisation.md measures the effect).
    """
    check_pad(pixels)
    if pixels == 0:
        return arrays
    if arrays.x_train.dim() != 4:
        raise ConfigError(f"pad needs image data [N, C, H, W]; {arrays.name} has shape {list(arrays.x_train.shape)}")
    grow = lambda x: torch.nn.functional.pad(x, (pixels,) * 4)  # noqa: E731 - zeros: the background
    return replace(arrays, x_train=grow(arrays.x_train), x_test=grow(arrays.x_test))


# ----------------------------------------------------------------------------------- scikit-learn digits, synthetic

def load_digits(test_fraction: float = 0.3, seed: int = 0) -> Arrays:
    """scikit-learn's bundled 8x8 digits (1,797 images, always offline), split per class into train and test.

    Pixel values 0..16 are scaled to 0..255 so that every image dataset is uint8 in [0, 255].
    """
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):  # stratified: the same share of every class in the test set
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: round(len(idx) * test_fraction)]] = True
    return Arrays("digits", x[~test], y[~test], x[test], y[test], 10, source="scikit-learn (bundled)")


def make_synthetic(
    n_classes: int = 4, n_train: int = 64, n_test: int = 32, dim: int = 8, seed: int = 0, spread: float = 3.0
) -> Arrays:
    """Gaussian blobs, one per class, as float features ``[N, dim]``: tiny, separable data for contract tests."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g) * spread

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(n_classes).repeat_interleave(n)
        return centres[y] + torch.randn(len(y), dim, generator=g), y

    return Arrays("synthetic", *draw(n_train), *draw(n_test), n_classes, source="generated")


# ---------------------------------------------------------------------------------------- locating and fetching

@dataclass(frozen=True)
class Source:
    """Where a named dataset's files live and how to fetch them."""

    name: str
    kind: str  # "idx" | "cifar10" | "cifar100" | "digits" | one of IMAGE_KINDS
    folder_names: tuple[str, ...] = ()  # sub-folders tried under each root (torchvision layout first)
    system_dirs: tuple[str, ...] = ()
    mirrors: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()  # (file name, md5): the published downloads
    contents: tuple[tuple[str, str], ...] = ()  # (IDX file name, md5 of its uncompressed bytes)
    size: int | None = None  # image datasets: the side every image is decoded (resized) to
    layout: str = ""  # image datasets: the files and folders a copy must have, for the not-found message
    more: tuple[tuple[str, str, str], ...] = ()  # further downloads (url, file name, md5) from other mirrors


SOURCES = {
    "mnist": Source(
        "mnist", "idx", ("MNIST/raw", "mnist", "MNIST"), (),
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        (
            ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
        (  # computed from the published gzip files above
            ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
            ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
            ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
            ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
        ),
    ),
    "fashion-mnist": Source(
        "fashion-mnist", "idx", ("FashionMNIST/raw", "fashion-mnist", "FashionMNIST"),
        ("/usr/share/datasets/fashion-mnist",),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        (
            ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),  # as the dataset's README lists
        ),
        (  # computed from Debian's dataset-fashion-mnist, whose gzip files are re-compressed (other md5s)
            ("train-images-idx3-ubyte", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
            ("train-labels-idx1-ubyte", "9018921c3c673c538a1fc5bad174d6f9"),
            ("t10k-images-idx3-ubyte", "8181f5470baa50b63fa0f6fddb340f0a"),
            ("t10k-labels-idx1-ubyte", "15d484375f8d13e6eb1aabb0c3f46965"),
        ),
    ),
    "kmnist": Source(
        "kmnist", "idx", ("KMNIST/raw", "kmnist", "KMNIST"), (),
        ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        (
            ("train-images-idx3-ubyte.gz", "bdb82020997e1d708af4cf47b453dcf7"),
            ("train-labels-idx1-ubyte.gz", "e144d726b3acfaa3e44228e80efcd344"),
            ("t10k-images-idx3-ubyte.gz", "5c965bf0a639b31b8f53240b1b52f4d7"),
            ("t10k-labels-idx1-ubyte.gz", "7320c461ea6c1c855c0b718fb2a4b134"),
        ),
        # No uncompressed checksums: the authors publish none and no copy was at hand to compute them, so an
        # uncompressed or re-compressed KMNIST loads as unverified.
    ),
    "cifar10": Source(  # the python pickles, or a JPEG image folder / tar of one (read as a labelled variant)
        "cifar10", "cifar10", ("cifar-10-batches-py", "CIFAR10/cifar-10-batches-py", "cifar10-jpeg"), (),
        ("https://www.cs.toronto.edu/~kriz/",), (("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
    ),
    "cifar100": Source(
        "cifar100", "cifar100", ("cifar-100-python", "CIFAR100/cifar-100-python"), (),
        ("https://www.cs.toronto.edu/~kriz/",), (("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
    ),
    "digits": Source("digits", "digits"),
    # Image datasets, decoded once into a cached uint8 array on disk (retain.images). Checksums: the md5s that
    # independent loaders publish for the same canonical archive (Avalanche's dataset metadata, and several
    # torchvision-style loaders on GitHub agree on each one).
    "tinyimagenet": Source(
        "tinyimagenet", "tinyimagenet", ("tiny-imagenet-200",), (), ("http://cs231n.stanford.edu/",),
        (("tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de"),), size=64,
        layout="tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
               "val/val_annotations.txt}",
    ),
    "imagenet-r": Source(
        "imagenet-r", "imagenet-r", ("imagenet-r",), (), ("https://people.eecs.berkeley.edu/~hendrycks/",),
        (("imagenet-r.tar", "a61312130a589d0ca1a8fca1f2bd3337"),), size=224,
        layout="imagenet-r/{train,test}/<wnid>/*.jpg (APER/PILOT's split folders), or the original "
               "imagenet-r/<wnid>/*.jpg (from imagenet-r.tar) optionally with CODA-Prompt's split files "
               "imagenet-r_train.yaml and imagenet-r_test.yaml beside the <wnid> folders",
    ),
    "cub200": Source(
        "cub200", "cub200", ("CUB_200_2011",), (),
        ("https://data.caltech.edu/records/65de6-vp158/files/",
         "http://www.vision.caltech.edu/visipedia-data/CUB-200-2011/"),
        (("CUB_200_2011.tgz", "97eceeb196236b17998738112f37df78"),), size=224,
        layout="CUB_200_2011/{images/<class>/*.jpg, images.txt, train_test_split.txt, image_class_labels.txt, "
               "classes.txt}",
    ),
    "core50": Source(
        "core50", "core50", ("core50_128x128", "core50/core50_128x128"), (),
        ("http://bias.csr.unibo.it/maltoni/download/core50/",),
        (("core50_128x128.zip", "745f3373fed08d69343f1058ee559e13"),), size=128,
        layout="core50_128x128/s1..s11/o1..o50/C_<ss>_<oo>_<fff>.png (for NC's official class order also "
               "batches_filelists/NC_inc/run0/train_batch_00..08_filelist.txt beside core50_128x128/)",
        more=(("https://vlomonaco.github.io/core50/data/batches_filelists.zip", "batches_filelists.zip",
               "e3297508a8998ba0c99a83d6b36bde62"),),
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "retain"


def search_roots(data_dir: str | os.PathLike | None) -> list[Path]:
    """The roots searched, in order: ``--data-dir``, ``$RETAIN_DATA``, the user cache."""
    roots = [Path(data_dir)] if data_dir else []
    if os.environ.get("RETAIN_DATA"):
        roots.append(Path(os.environ["RETAIN_DATA"]))
    roots.append(cache_dir())
    return roots


def _complete(folder: Path, src: Source) -> bool:
    """Whether ``folder`` holds a copy of ``src`` (for an image dataset: its marker file or folder; the reader then
    names any file that is missing, rather than the search passing a partial copy by silently)."""
    if src.kind == "idx":
        return all(_find_idx_file(folder, stem) for stem in IDX_FILES.values())
    if src.kind == "cifar10":
        return (folder / "data_batch_1").is_file() or cifar10_jpeg(folder) is not None
    if src.kind in IMAGE_KINDS:
        return _IMAGE_MARKERS[src.kind](folder)
    return (folder / "train").is_file()


def candidate_folders(src: Source, data_dir: str | os.PathLike | None) -> list[Path]:
    """Every folder where ``src``'s files may be, in search order (flat layout first under each root)."""
    out = []
    for root in search_roots(data_dir):
        out.append(root)
        out.extend(root / sub for sub in src.folder_names)
    out.extend(Path(d) for d in src.system_dirs)
    return out


def locate(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first folder holding a complete copy of dataset ``name``, or None."""
    src = SOURCES[name]
    if src.kind == "digits":
        return Path("scikit-learn")
    if data_dir is not None and not Path(data_dir).exists():
        raise DataError(f"--data-dir {data_dir} does not exist; create it or point it at the folder with the data")
    for folder in candidate_folders(src, data_dir):
        if folder.is_dir() and _complete(folder, src):
            return folder
    # An explicitly given folder with some but not all files is a mistake worth naming precisely.
    if data_dir is not None and src.kind == "idx":
        for folder in [Path(data_dir), *(Path(data_dir) / s for s in src.folder_names)]:
            present = [s for s in IDX_FILES.values() if folder.is_dir() and _find_idx_file(folder, s)]
            if present:
                missing = [s for s in IDX_FILES.values() if s not in present]
                raise DataError(f"{folder}: has {name} files but is missing {', '.join(missing)}[.gz]")
    return None


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """The hex digest of a file's bytes (``md5`` for the data mirrors' checksums, ``sha256`` for weights files),
    read a MiB at a time."""
    h = getattr(hashlib, algorithm)()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(url: str, dest: Path, md5: str, timeout: float = 30.0) -> None:
    """Download ``url`` to ``dest`` through a temporary file in the same folder; verify md5, then rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as r:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                out.write(chunk)
        got = file_digest(Path(tmp))
        if got != md5:
            raise DataError(f"{url}: checksum mismatch (md5 {got}, expected {md5}); nothing was written")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def download(name: str, root: str | os.PathLike | None = None) -> Path:
    """Fetch dataset ``name`` into ``root`` (default: the user cache) from its mirrors; return its folder."""
    src = SOURCES[name]
    if not src.files:
        raise DataError(f"{name} ships with its package and needs no download")
    root = Path(root) if root else cache_dir()
    target = root / src.folder_names[0] if src.kind == "idx" else root
    for fname, md5 in src.files:
        dest = target / fname
        if dest.exists() and file_digest(dest) == md5:
            continue
        errors = []
        for mirror in src.mirrors:
            try:
                fetch(mirror + fname, dest, md5)
                break
            except DataError as e:
                errors.append(str(e))
            except OSError as e:
                errors.append(f"{mirror}{fname}: {getattr(e, 'reason', e)}")
        else:
            raise DataError(
                f"could not download {fname} for {name} ({'; '.join(errors)}); copy the files into "
                f"{target} by hand"
            )
    for url, fname, md5 in src.more:  # companion files from another mirror (CORe50's batch filelists)
        dest = target / fname
        if not (dest.exists() and file_digest(dest) == md5):
            try:
                fetch(url, dest, md5)
            except OSError as e:
                raise DataError(f"could not download {url} for {name} ({getattr(e, 'reason', e)}); copy "
                                f"{fname} into {target} by hand") from None
    if src.kind != "idx":
        if src.kind in IMAGE_KINDS and (target / src.folder_names[0]).is_dir() and _complete(
                target / src.folder_names[0], src):
            return target / src.folder_names[0]  # unpacked before: a second --download does not unpack again
        for fname in [f for f, _ in src.files] + [f for _, f, _ in src.more]:
            _extract(target / fname, target)
        target = target / src.folder_names[0]
    return target


def _extract(archive: Path, into: Path) -> None:
    """Unpack a .tar / .tar.gz / .tgz / .zip archive into ``into`` (paths outside it refused)."""
    if archive.suffix == ".zip":
        import zipfile

        with zipfile.ZipFile(archive) as z:  # zipfile drops absolute paths and ".." from member names
            z.extractall(into)
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")


def load(name: str, data_dir: str | os.PathLike | None = None, download_missing: bool = False) -> Arrays:
    """Load dataset ``name`` (a key of :data:`SOURCES`), searching the usual places; download if allowed."""
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(SOURCES)}")
    src = SOURCES[name]
    if src.kind == "digits":
        return load_digits()
    fresh_target = download_missing and data_dir is not None and not Path(data_dir).exists()
    folder = None if fresh_target else locate(name, data_dir)
    if folder is None:
        if not download_missing:
            looked = ", ".join(str(p) for p in candidate_folders(src, data_dir))
            if src.layout:  # an image dataset: say exactly which files go where
                raise DataError(
                    f"{name} not found (looked in {looked}); put {src.layout} under --data-dir DIR (or "
                    f"$RETAIN_DATA){', or add --download' if src.files else ''}"
                )
            raise DataError(
                f"{name} not found (looked in {looked}); pass --data-dir DIR with the files, set RETAIN_DATA, "
                "or add --download"
            )
        folder = download(name, data_dir)
    if src.kind == "idx":
        arrays = load_idx_folder(folder, name)
        arrays.source = str(folder)
        return arrays
    if src.kind in IMAGE_KINDS:
        return load_image_dataset(name, folder)
    if src.kind == "cifar10" and not (folder / "data_batch_1").is_file():
        return load_cifar10_jpeg(folder)
    return load_cifar_folder(folder, 10 if src.kind == "cifar10" else 100)


# ------------------------------------------------------------------------------------------------ image datasets
# Each reader turns a dataset's own file layout into file lists and labels; retain.images decodes the files once
# into a cached uint8 array on disk (resized to the source's ``size``), so the data never has to fit in memory.

IMAGE_KINDS = ("tinyimagenet", "imagenet-r", "cub200", "core50")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# CORe50 (Lomonaco & Maltoni, CoRL 2017): 11 sessions of 50 objects; sessions 3, 7 and 10 are the test set.
CORE50_TRAIN_SESSIONS, CORE50_TEST_SESSIONS = (1, 2, 4, 5, 6, 8, 9, 11), (3, 7, 10)


@dataclass
class ImageLists:
    """An image dataset before decoding: files and label ids per split, the class names (label id -> name)."""

    train_files: list[Path]
    train_labels: list[int]
    test_files: list[Path]
    test_labels: list[int]
    classes: list[str]
    train_groups: list[int] | None = None
    variant: str = ""


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _is_wnid(name: str) -> bool:  # an ImageNet synset id: "n" and eight digits
    return len(name) == 9 and name[0] == "n" and name[1:].isdigit()


def _wnid_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if _is_wnid(p.name) and p.is_dir()) if folder.is_dir() else []


def _read_lines(path: Path, layout: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n\r") for line in f if line.strip()]
    except FileNotFoundError:
        raise DataError(f"{path}: missing; the layout is {layout}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read ({type(e).__name__}); unpack the archive again") from None


def tinyimagenet_lists(folder: Path) -> ImageLists:
    """Tiny-ImageNet (cs231n): train/<wnid>/images/*.JPEG; the labelled val/ split is the test set (its test/
    has no labels), labelled by val/val_annotations.txt (file, wnid, box, tab-separated). Label ids: the wnids of
    wnids.txt sorted (ImageFolder's convention, as the CL loaders that read these folders use)."""
    layout = SOURCES["tinyimagenet"].layout
    wnids = [w.strip() for w in _read_lines(folder / "wnids.txt", layout)]
    if len(set(wnids)) != len(wnids) or not all(_is_wnid(w) for w in wnids):
        raise DataError(f"{folder / 'wnids.txt'}: expected distinct wnids (n and 8 digits), one a line")
    classes = sorted(wnids)
    label = {w: i for i, w in enumerate(classes)}
    train_files, train_labels = [], []
    for w in classes:
        d = folder / "train" / w / "images"
        if not d.is_dir():
            raise DataError(f"{d}: missing; every wnid of wnids.txt needs its training images in train/<wnid>/images/")
        files = _images_in(d)
        if not files:
            raise DataError(f"{d}: no images (.JPEG) in it; unpack tiny-imagenet-200.zip again")
        train_files += files
        train_labels += [label[w]] * len(files)
    ann = folder / "val" / "val_annotations.txt"
    test_files, test_labels = [], []
    for n, line in enumerate(_read_lines(ann, layout), 1):
        cols = line.split("\t")
        if len(cols) < 2 or cols[1] not in label:
            raise DataError(f"{ann}, line {n}: expected <file>\\t<wnid of wnids.txt>\\t<box>, got {line!r}")
        path = folder / "val" / "images" / cols[0]
        if not path.is_file():
            raise DataError(f"{path}: listed in {ann.name} line {n} but missing; unpack tiny-imagenet-200.zip again")
        test_files.append(path)
        test_labels.append(label[cols[1]])
    return ImageLists(train_files, train_labels, test_files, test_labels, classes)


def _coda_split(folder: Path, classes: list[str]) -> tuple[list[list[Path]], list[list[int]]] | None:
    """CODA-Prompt's ImageNet-R split (``dataloaders/splits/imagenet-r_{train,test}.yaml``: 24,000 / 6,000 paths
    ``data/imagenet-r/<wnid>/<file>``) when both files lie beside the wnid folders, else None. Only the file sets
    are taken; labels stay retain's (the sorted wnids)."""
    paths = [folder / "imagenet-r_train.yaml", folder / "imagenet-r_test.yaml"]
    if not all(p.is_file() for p in paths):
        return None
    import yaml

    label = {w: i for i, w in enumerate(classes)}
    files, labels = [], []
    for p in paths:
        try:
            entries = yaml.load(p.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))["data"]
        except (yaml.YAMLError, KeyError, TypeError) as e:
            raise DataError(f"{p}: not CODA-Prompt's split file (a YAML with a 'data' list; "
                            f"{type(e).__name__})") from None
        fs, ls = [], []
        for entry in entries:
            wnid, name = Path(entry).parts[-2:]
            if wnid not in label or not (folder / wnid / name).is_file():
                raise DataError(f"{p}: lists {entry}, which is not in {folder}; use the split files that belong to "
                                "the original imagenet-r.tar")
            fs.append(folder / wnid / name)
            ls.append(label[wnid])
        files.append(fs)
        labels.append(ls)
    return files, labels


def imagenet_r_lists(folder: Path, test_fraction: float = 0.2) -> ImageLists:
    """ImageNet-R (Hendrycks et al., 2021; 200 ImageNet classes, 30,000 renditions), with the split of the
    prompt-learning papers: APER/PILOT's train/ and test/ folders (RevisitingCIL's download, 24,000 / 6,000
    images) when present; else the original imagenet-r/<wnid>/ folders with CODA-Prompt's split files; else a split
    retain makes (the last 20% of each class's files in a RandomState(0) permutation are test), recorded as a variant.
    Label ids: the sorted wnids (ImageFolder's, as APER and PILOT read the folders)."""
    if _wnid_dirs(folder / "train") and (folder / "test").is_dir():
        classes = _wnid_dirs(folder / "train")
        missing = [w for w in classes if not (folder / "test" / w).is_dir()]
        if missing:
            raise DataError(f"{folder / 'test' / missing[0]}: missing ({len(missing)} classes of train/ have no test "
                            "folder); the split needs test/<wnid>/ for every train/<wnid>/")
        split = [[], []], [[], []]
        for i, part in enumerate(("train", "test")):
            for c, w in enumerate(classes):
                files = _images_in(folder / part / w)
                split[0][i].extend(files)
                split[1][i].extend([c] * len(files))
        (trf, tef), (trl, tel) = split
        return ImageLists(trf, trl, tef, tel, classes)
    classes = _wnid_dirs(folder)
    if not classes:
        raise DataError(f"{folder}: no <wnid> folders; the layout is {SOURCES['imagenet-r'].layout}")
    coda = _coda_split(folder, classes)
    if coda is not None:
        (trf, tef), (trl, tel) = coda
        return ImageLists(trf, trl, tef, tel, classes)
    rng = np.random.RandomState(0)
    trf, trl, tef, tel = [], [], [], []
    for c, w in enumerate(classes):
        files = _images_in(folder / w)
        perm = rng.permutation(len(files))
        n_test = int(round(len(files) * test_fraction))
        keep = len(files) - n_test
        trf += [files[i] for i in sorted(perm[:keep])]
        tef += [files[i] for i in sorted(perm[keep:])]
        trl += [c] * keep
        tel += [c] * n_test
    note = (f"imagenet-r: {folder} has no train/test split (APER/PILOT's train/ and test/ folders, or CODA-Prompt's "
            "imagenet-r_train.yaml / imagenet-r_test.yaml), so retain split each class 80/20 itself (RandomState(0)); "
            "results compare with the papers' only approximately")
    return ImageLists(trf, trl, tef, tel, classes, variant=note)


def cub200_lists(folder: Path) -> ImageLists:
    """CUB-200-2011 (Wah et al., 2011): the official train/test split of train_test_split.txt (5,994 / 5,794), label
    ids from image_class_labels.txt (1-based, here 0-based: the classes.txt order, i.e. the sorted folder names)."""
    layout = SOURCES["cub200"].layout

    def table(name: str) -> dict[str, str]:
        out = {}
        for n, line in enumerate(_read_lines(folder / name, layout), 1):
            cols = line.split(maxsplit=1)
            if len(cols) != 2:
                raise DataError(f"{folder / name}, line {n}: expected '<id> <value>', got {line!r}")
            out[cols[0]] = cols[1].strip()
        return out

    images, is_train, labels, names = (table(n) for n in ("images.txt", "train_test_split.txt",
                                                             "image_class_labels.txt", "classes.txt"))
    classes = [names[k] for k in sorted(names, key=int)]
    split = ([], []), ([], [])
    for image_id in sorted(images, key=int):
        for name, t in (("train_test_split.txt", is_train), ("image_class_labels.txt", labels)):
            if image_id not in t:
                raise DataError(f"{folder / name}: no line for image {image_id} of images.txt; the files do not "
                                "belong together")
        c = int(labels[image_id]) - 1
        if not 0 <= c < len(classes):
            raise DataError(f"{folder / 'image_class_labels.txt'}: class {c + 1} of image {image_id} is not in "
                            "classes.txt")
        path = folder / "images" / images[image_id]
        if not path.is_file():
            raise DataError(f"{path}: listed in images.txt but missing; unpack CUB_200_2011.tgz again")
        part = 0 if is_train[image_id] == "1" else 1
        split[part][0].append(path)
        split[part][1].append(c)
    (trf, trl), (tef, tel) = split
    return ImageLists(trf, trl, tef, tel, classes)


def core50_lists(folder: Path) -> ImageLists:
    """CORe50 (Lomonaco & Maltoni, CoRL 2017) at 128x128: s<session>/o<object>/*.png; training sessions 1, 2, 4, 5,
    6, 8, 9, 11 and test sessions 3, 7, 10 (the paper's fixed test set); label id = object - 1 (50 classes).
    ``train_groups``: each training row's session index 0..7, the NI scenario's tasks."""
    objects = [f"o{i}" for i in range(1, 51)]
    split = ([], [], []), ([], [], [])
    for s in range(1, 12):
        d = folder / f"s{s}"
        if not d.is_dir():
            raise DataError(f"{d}: missing; CORe50 needs all 11 sessions s1..s11 (training s1 s2 s4 s5 s6 s8 s9 s11, "
                            "test s3 s7 s10) as core50_128x128.zip unpacks them")
        part = 0 if s in CORE50_TRAIN_SESSIONS else 1
        group = CORE50_TRAIN_SESSIONS.index(s) if part == 0 else -1
        for c, o in enumerate(objects):
            od = d / o
            if not od.is_dir():
                raise DataError(f"{od}: missing; every session holds the 50 objects o1..o50")
            files = _images_in(od)
            split[part][0].extend(files)
            split[part][1].extend([c] * len(files))
            split[part][2].extend([group] * len(files))
    (trf, trl, trg), (tef, tel, _) = split
    return ImageLists(trf, trl, tef, tel, objects, train_groups=trg)


_IMAGE_MARKERS = {
    "tinyimagenet": lambda f: (f / "wnids.txt").is_file(),
    "imagenet-r": lambda f: bool(_wnid_dirs(f / "train")) or bool(_wnid_dirs(f)),
    "cub200": lambda f: (f / "images.txt").is_file(),
    "core50": lambda f: (f / "s1").is_dir() and (f / "s2").is_dir(),
}
_IMAGE_READERS = {"tinyimagenet": tinyimagenet_lists, "imagenet-r": imagenet_r_lists, "cub200": cub200_lists,
                  "core50": core50_lists}
_IMAGE_STATS = {  # per-channel normalisation: Mammoth's for Tiny-ImageNet, ImageNet's for the others
    "tinyimagenet": ((0.4802, 0.4480, 0.3975), (0.2770, 0.2691, 0.2821)),
}


def _decode(name: str, folder: Path, split: str, files: list[Path], size: int | None):
    """The decoded images of one split: retain.images' cached uint8 array ``[N, 3, size, size]`` on disk."""
    from retain import images

    where = hashlib.md5(str(folder.resolve()).encode()).hexdigest()[:8]  # two copies never share a cache file
    cache = cache_dir() / "images" / f"{name}-{split}-{size or 'native'}-{where}.u8"
    return images.decode_images(files, (size, size) if size else None, cache)


def load_image_dataset(name: str, folder: str | os.PathLike) -> Arrays:
    """Read image dataset ``name`` (a key of :data:`SOURCES` of an image kind) from its folder: the layout is
    parsed and checked here, the files decoded (once, cached) by retain.images at the source's size."""
    folder, src = Path(folder), SOURCES[name]
    lists = _IMAGE_READERS[src.kind](folder)
    mean, std = _IMAGE_STATS.get(src.kind, (IMAGENET_MEAN, IMAGENET_STD))
    return Arrays(
        name,
        _decode(name, folder, "train", lists.train_files, src.size),
        torch.tensor(lists.train_labels, dtype=torch.long),
        _decode(name, folder, "test", lists.test_files, src.size),
        torch.tensor(lists.test_labels, dtype=torch.long),
        len(lists.classes), mean, std, source=str(folder), variant=lists.variant,
        group_train=torch.tensor(lists.train_groups, dtype=torch.long) if lists.train_groups is not None else None,
        class_names=tuple(lists.classes),
    )


CIFAR10_JPEG_NOTE = ("CIFAR-10 from JPEG files (a lossy re-encoding, {where}): label its numbers CIFAR-10 (JPEG q75) "
                     "and compare them with published CIFAR-10 numbers only with that caveat, or with a reference "
                     "implementation run on the same files")


def cifar10_jpeg(folder: Path) -> Path | None:
    """The CIFAR-10 JPEG copy in ``folder`` (an image-folder tar ``cifar10-jpeg.tar[.gz]`` or an unpacked
    ``train/<class>/``, ``test/<class>/`` folder), or None."""
    for name in ("cifar10-jpeg.tar.gz", "cifar10-jpeg.tar"):
        if (folder / name).is_file():
            return folder / name
    if (folder / "train" / "airplane").is_dir() and (folder / "test" / "airplane").is_dir():
        return folder
    return None


def load_cifar10_jpeg(folder: str | os.PathLike) -> Arrays:
    """CIFAR-10 from a JPEG image folder or a tar of one (retain.images.image_folder; the ten class folders give the
    standard label ids), with the lossy re-encoding recorded in :attr:`Arrays.variant`."""
    from retain import images

    where = cifar10_jpeg(Path(folder))
    if where is None:
        raise DataError(f"{folder}: no CIFAR-10 JPEG copy (cifar10-jpeg.tar.gz, or train/<class>/ and test/<class>/)")
    x_train, y_train, _ = images.image_folder(where, "train", list(CIFAR10_CLASSES))
    x_test, y_test, _ = images.image_folder(where, "test", list(CIFAR10_CLASSES))
    for x, split in ((x_train, "train"), (x_test, "test")):
        if tuple(x.shape[1:]) != (3, 32, 32):
            raise DataError(f"{where}: {split} images are {list(x.shape[1:])}, CIFAR-10's are [3, 32, 32]")
    return Arrays("cifar10", x_train, y_train.long(), x_test, y_test.long(), 10, (0.4914, 0.4822, 0.4465),
                  (0.2470, 0.2435, 0.2616), source=str(where), variant=CIFAR10_JPEG_NOTE.format(where=where),
                  class_names=CIFAR10_CLASSES)
