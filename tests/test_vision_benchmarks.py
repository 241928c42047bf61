"""The vision benchmarks on tiny fixtures that copy each dataset's real file layout (folder and file names,
annotation formats): class order, task split, train/test sizes, decoded shapes, and the one-line errors."""

from __future__ import annotations

import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retain import benchmarks, data
from retain.errors import ConfigError, DataError

# The first ten classes of iCaRL's CIFAR-100 order as LUCIR / PODNet / PyCIL publish it (PODNet's
# options/data/cifar100_order, iCaRL's seed 1993): an independent check of the computed permutation.
ICARL_PREFIX = [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]


def colour(label: int) -> tuple[int, int, int]:
    """A flat colour per class, far apart, so a decoded row shows which class's file it came from."""
    return (label * 37) % 256, (label * 91 + 40) % 256, (255 - label * 53) % 256


def write_image(path: Path, label: int, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour(label))
    (img.convert("L") if mode == "L" else img).save(path, quality=95)


def forget_loaded() -> None:
    """Drop the process's cache of loaded datasets (the files were changed under it)."""
    benchmarks._loaded.cache_clear()
    benchmarks._arrays.cache_clear()


def row_colour(x: torch.Tensor) -> torch.Tensor:
    """Mean colour of decoded rows [N, 3, H, W] -> [N, 3]."""
    return x.float().mean(dim=(2, 3))


def assert_rows_are(x, labels: torch.Tensor) -> None:
    """Every decoded row carries its label's colour (within JPEG error): images and labels line up."""
    got = row_colour(x[torch.arange(len(labels))])
    want = torch.tensor([colour(int(c)) for c in labels], dtype=torch.float32)
    assert (got - want).abs().max() < 6


# ------------------------------------------------------------------------------------------ CIFAR-10 (JPEG)

def cifar10_jpeg_tar(root: Path, n_train: int = 3, n_test: int = 2) -> Path:
    """cifar10-jpeg.tar.gz as in ../shared/data: cifar10-jpeg/{train,test}/<class>/NNNN.jpg."""
    src = root / "src" / "cifar10-jpeg"
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(data.CIFAR10_CLASSES):
            for i in range(n):
                write_image(src / split / name / f"{i:04d}.jpg", c)
    out = root / "cifar10-jpeg"
    out.mkdir()
    with tarfile.open(out / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="cifar10-jpeg")
    return out


def test_seq_cifar10_from_a_jpeg_tar(tmp_path):
    folder = cifar10_jpeg_tar(tmp_path)
    sc = benchmarks.scenario("seq-cifar10", data_dir=folder)
    assert [t.classes for t in sc.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert sc.mode == "class" and sc.n_outputs == 10
    assert [len(t.train_idx) for t in sc.tasks] == [6] * 5 and [len(t.test_idx) for t in sc.tasks] == [4] * 5
    assert sc.input_shape == (3, 32, 32) and sc.x_train.dtype == torch.uint8
    assert_rows_are(sc.x_train, sc.y_train)
    assert_rows_are(sc.x_test, sc.y_test)
    assert "CIFAR-10 from JPEG files (a lossy re-encoding" in sc.info["unverified"]
    assert "label its numbers CIFAR-10 (JPEG q75)" in sc.info["unverified"]
    assert (sc.mean, sc.std) == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615))  # P5's normalisation
    assert "JPEG" in benchmarks.where("seq-cifar10", folder)


def test_seq_cifar10_defaults_are_the_der_protocol():
    d = benchmarks.get("seq-cifar10").defaults
    assert (d["arch"], d["optimizer"], d["lr"], d["batch_size"], d["epochs"], d["augment"], d["all_outputs"]) == (
        "resnet18", "sgd", 0.1, 32, 50, "crop-flip", True)
    for name in ("split-cifar10", "split-cifar100"):  # the A-GEM protocol keeps its 20-filter network
        assert benchmarks.get(name).defaults["arch"] == "resnet18-reduced"


def test_cifar10_jpeg_folder_missing_a_class(tmp_path):
    folder = tmp_path / "c10"
    for split in ("train", "test"):
        for c, name in enumerate(data.CIFAR10_CLASSES[:9]):  # no truck
            write_image(folder / split / name / "0000.jpg", c)
    (folder / "train" / "airplane").mkdir(exist_ok=True)
    with pytest.raises(DataError, match="truck: missing class folder"):
        benchmarks.scenario("seq-cifar10", data_dir=folder)


# ---------------------------------------------------------------------------------------- CIFAR-100 pickles

def cifar100_pickles(root: Path) -> Path:
    """cifar-100-python/{train,test}: pickled dicts with 'data' [N, 3072] uint8 and 'fine_labels'."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, per in (("train", 2), ("test", 1)):
        y = np.repeat(np.arange(100), per)
        x = np.stack([np.full((3, 32, 32), c, np.uint8) for c in y]).reshape(len(y), 3072)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": x, "fine_labels": y.tolist(), "coarse_labels": [0] * len(y)}, f)
    return root


def test_seq_cifar100_label_order_10_and_20_tasks(tmp_path):
    root = cifar100_pickles(tmp_path)
    sc = benchmarks.scenario("seq-cifar100", data_dir=root)
    assert [t.classes for t in sc.tasks] == [list(range(i, i + 10)) for i in range(0, 100, 10)]
    assert [len(t.train_idx) for t in sc.tasks] == [20] * 10 and [len(t.test_idx) for t in sc.tasks] == [10] * 10
    sc20 = benchmarks.scenario("seq-cifar100", n_tasks=20, data_dir=root)
    assert [t.classes for t in sc20.tasks] == [list(range(i, i + 5)) for i in range(0, 100, 5)]


def test_seq_cifar100_b50_is_podnets_start_in_icarls_order(tmp_path):
    root = cifar100_pickles(tmp_path)
    sc = benchmarks.scenario("seq-cifar100-b50", data_dir=root)
    order = np.random.RandomState(1993).permutation(100).tolist()
    assert order[:10] == ICARL_PREFIX and sc.info["class_order"] == order
    assert [len(t.classes) for t in sc.tasks] == [50, 10, 10, 10, 10, 10]
    assert sc.tasks[0].classes == order[:50] and sc.tasks[1].classes == order[50:60]
    assert len(sc.tasks[0].train_idx) == 100 and sc.n_outputs == 100
    assert [len(t.classes) for t in benchmarks.scenario("seq-cifar100-b50", n_tasks=11, data_dir=root).tasks] == (
        [50] + [5] * 10)
    with pytest.raises(ConfigError, match="50 in 6 equal tasks is not possible"):
        benchmarks.scenario("seq-cifar100-b50", n_tasks=7, data_dir=root)


# --------------------------------------------------------------------------------------------- Tiny-ImageNet

WNIDS = [f"n{w:08d}" for w in np.random.RandomState(3).choice(10**8, 20, replace=False)]  # 20 wnids, unsorted


def tiny_imagenet(root: Path, n_train: int = 2, n_val: int = 1) -> Path:
    """tiny-imagenet-200: wnids.txt (not sorted), train/<wnid>/images/<wnid>_<i>.JPEG + <wnid>_boxes.txt,
    val/images/val_<i>.JPEG + val/val_annotations.txt (file, wnid, x0, y0, x1, y1, tab-separated), test/images/."""
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("".join(w + "\n" for w in WNIDS))
    (folder / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(WNIDS)))
    label = {w: i for i, w in enumerate(sorted(WNIDS))}
    for w in WNIDS:
        for i in range(n_train):
            write_image(folder / "train" / w / "images" / f"{w}_{i}.JPEG", label[w], (64, 64),
                        "L" if (w, i) == (WNIDS[0], 0) else "RGB")  # Tiny-ImageNet has some greyscale JPEGs
        (folder / "train" / w / f"{w}_boxes.txt").write_text(
            "".join(f"{w}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(n_train)))
    lines, k = [], 0
    for w in reversed(WNIDS):  # the annotation file is in no class order
        for _ in range(n_val):
            write_image(folder / "val" / "images" / f"val_{k}.JPEG", label[w], (64, 64))
            lines.append(f"val_{k}.JPEG\t{w}\t3\t5\t60\t61\n")
            k += 1
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    write_image(folder / "test" / "images" / "test_0.JPEG", 0, (64, 64))
    return root


def test_seq_tinyimagenet_layout_order_and_sizes(tmp_path):
    root = tiny_imagenet(tmp_path)
    sc = benchmarks.scenario("seq-tinyimagenet", data_dir=root)
    arrays = benchmarks.load_arrays("tinyimagenet", root)
    assert list(arrays.class_names) == sorted(WNIDS) != WNIDS  # label ids: the sorted wnids, not wnids.txt's order
    assert [t.classes for t in sc.tasks] == [[2 * i, 2 * i + 1] for i in range(10)]  # 10 tasks, label order
    assert [len(t.train_idx) for t in sc.tasks] == [4] * 10 and [len(t.test_idx) for t in sc.tasks] == [2] * 10
    assert sc.input_shape == (3, 64, 64)  # the greyscale file decoded as RGB
    assert_rows_are(sc.x_test, sc.y_test)  # val_annotations.txt's labels belong to their files
    grey = 2 * sorted(WNIDS).index(WNIDS[0])  # the greyscale file's row (its class's first of 2)
    rows = torch.tensor([i for i in range(len(sc.y_train)) if i != grey])
    assert_rows_are(sc.x_train[rows], sc.y_train[rows])
    assert row_colour(sc.x_train[torch.tensor([grey])]).std() < 1  # grey decoded as three equal channels


def test_tinyimagenet_missing_files_are_named(tmp_path):
    root = tiny_imagenet(tmp_path)
    (root / "tiny-imagenet-200" / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataError, match=r"val_annotations.txt: missing; the layout is tiny-imagenet-200/\{wnids.txt"):
        data.load("tinyimagenet", root)
    root = tiny_imagenet(tmp_path / "b")
    w = sorted(WNIDS)[3]
    for p in (root / "tiny-imagenet-200" / "train" / w / "images").iterdir():
        p.unlink()
    (root / "tiny-imagenet-200" / "train" / w / "images").rmdir()
    with pytest.raises(DataError, match=f"train/{w}/images: missing; every wnid of wnids.txt needs"):
        data.load("tinyimagenet", root)


def test_tinyimagenet_bad_annotation_line(tmp_path):
    root = tiny_imagenet(tmp_path)
    ann = root / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text().replace("\t", " ", 5))
    with pytest.raises(DataError, match=r"val_annotations.txt, line 1: expected <file>\\t<wnid"):
        data.load("tinyimagenet", root)


# ---------------------------------------------------------------------------------------------- ImageNet-R

def imagenet_r_raw(root: Path, per_class: int = 5) -> Path:
    """imagenet-r/<wnid>/<rendition>_<i>.jpg as imagenet-r.tar unpacks (plus its README.txt); odd image sizes."""
    folder = root / "imagenet-r"
    label = {w: i for i, w in enumerate(sorted(WNIDS))}
    for w in WNIDS:
        for i in range(per_class):
            write_image(folder / w / f"{['art', 'cartoon', 'sketch'][i % 3]}_{i}.jpg", label[w], (41, 27))
    (folder / "README.txt").write_text("ImageNet-R\n")
    return root


def test_imagenet_r_aper_split_folders(tmp_path):
    folder = tmp_path / "imagenet-r"
    label = {w: i for i, w in enumerate(sorted(WNIDS))}
    for w in WNIDS:
        for i in range(2):
            write_image(folder / "train" / w / f"art_{i}.jpg", label[w], (50, 30))
        write_image(folder / "test" / w / "sketch_0.jpg", label[w], (30, 50))
    sc = benchmarks.scenario("imagenet-r", data_dir=tmp_path)
    order = np.random.RandomState(1993).permutation(20).tolist()  # APER/PILOT: seed 1993 over the sorted wnids
    assert sc.info["class_order"] == order
    assert [t.classes for t in sc.tasks] == [order[i:i + 2] for i in range(0, 20, 2)]
    assert len(sc.y_train) == 40 and len(sc.y_test) == 20 and sc.input_shape == (3, 224, 224)
    assert not sc.info["unverified"]
    assert_rows_are(sc.x_test, sc.y_test)
    (folder / "test" / sorted(WNIDS)[5] / "sketch_0.jpg").unlink()
    (folder / "test" / sorted(WNIDS)[5]).rmdir()
    forget_loaded()
    with pytest.raises(DataError, match=f"test/{sorted(WNIDS)[5]}: missing"):
        benchmarks.scenario("imagenet-r", data_dir=tmp_path)


def test_imagenet_r_coda_prompt_split_files(tmp_path):
    root = imagenet_r_raw(tmp_path)
    folder = root / "imagenet-r"
    files = sorted(folder.glob("n*/*.jpg"))
    test = files[::5]
    train = [f for f in files if f not in test]
    for name, part in (("imagenet-r_train.yaml", train), ("imagenet-r_test.yaml", test)):
        label = {w: i for i, w in enumerate(WNIDS)}  # CODA's own target ids, which retain does not use
        (folder / name).write_text("data:\n" + "".join(f"- data/imagenet-r/{f.parent.name}/{f.name}\n" for f in part)
                                   + "targets:\n" + "".join(f"- {label[f.parent.name]}\n" for f in part))
    lists = data.imagenet_r_lists(folder)
    assert lists.train_files == train and lists.test_files == test and not lists.variant
    assert lists.test_labels == [sorted(WNIDS).index(f.parent.name) for f in test]


def test_imagenet_r_without_a_split_is_labelled(tmp_path):
    root = imagenet_r_raw(tmp_path)
    sc = benchmarks.scenario("imagenet-r", n_tasks=2, data_dir=root)
    assert len(sc.y_train) == 80 and len(sc.y_test) == 20  # 4 / 1 of each class's 5
    assert torch.bincount(sc.y_test).tolist() == [1] * 20
    assert "retain split each class 80/20 itself" in sc.info["unverified"]
    assert "seeded 80/20" in benchmarks.where("imagenet-r", root)


# ------------------------------------------------------------------------------------------------- CUB-200

CUB_CLASSES = [f"{i:03d}.Bird_{chr(64 + i)}" for i in range(1, 21)]


def cub(root: Path) -> Path:
    """CUB_200_2011/{images/<NNN.Name>/<Name>_<n>_<id>.jpg, images.txt, train_test_split.txt,
    image_class_labels.txt, classes.txt} (space-separated '<id> <value>' lines, ids from 1)."""
    folder = root / "CUB_200_2011"
    images, split, labels = [], [], []
    k = 0
    for c, name in enumerate(CUB_CLASSES):
        for i in range(3):
            k += 1
            rel = f"{name}/{name.split('.')[1]}_{i:04d}_{790000 + k}.jpg"
            write_image(folder / "images" / rel, c, (60, 45))
            images.append(f"{k} {rel}\n")
            split.append(f"{k} {0 if i == 2 else 1}\n")
            labels.append(f"{k} {c + 1}\n")
    (folder / "images.txt").write_text("".join(images))
    (folder / "train_test_split.txt").write_text("".join(split))
    (folder / "image_class_labels.txt").write_text("".join(labels))
    (folder / "classes.txt").write_text("".join(f"{c + 1} {n}\n" for c, n in enumerate(CUB_CLASSES)))
    (folder / "bounding_boxes.txt").write_text("".join(f"{i} 0 0 10 10\n" for i in range(1, k + 1)))
    return root


def test_cub200_official_split_and_order(tmp_path):
    root = cub(tmp_path)
    sc = benchmarks.scenario("cub200", data_dir=root)
    order = np.random.RandomState(1993).permutation(20).tolist()
    assert [t.classes for t in sc.tasks] == [order[i:i + 2] for i in range(0, 20, 2)]
    assert len(sc.y_train) == 40 and len(sc.y_test) == 20 and sc.input_shape == (3, 224, 224)
    assert list(benchmarks.load_arrays("cub200", root).class_names) == CUB_CLASSES
    assert_rows_are(sc.x_train, sc.y_train)


def test_cub200_missing_index_file(tmp_path):
    root = cub(tmp_path)
    (root / "CUB_200_2011" / "train_test_split.txt").unlink()
    with pytest.raises(DataError, match=r"train_test_split.txt: missing; the layout is CUB_200_2011/\{images/"):
        data.load("cub200", root)


# -------------------------------------------------------------------------------------------------- CORe50

def core50(root: Path, frames: int = 1) -> Path:
    """core50_128x128/s1..s11/o1..o50/C_<ss>_<oo>_<fff>.png, as core50_128x128.zip unpacks."""
    folder = root / "core50_128x128"
    for s in range(1, 12):
        for o in range(1, 51):
            for f in range(frames):
                write_image(folder / f"s{s}" / f"o{o}" / f"C_{s:02d}_{o:02d}_{f:03d}.png", o - 1, (8, 8))
    return root


def test_core50_ni_sessions(tmp_path):
    root = core50(tmp_path)
    sc = benchmarks.scenario("core50", data_dir=root)
    assert sc.mode == "domain" and sc.n_tasks == 8 and sc.n_outputs == 50
    assert sc.info["sessions"] == [1, 2, 4, 5, 6, 8, 9, 11]
    assert all(t.classes == list(range(50)) for t in sc.tasks)
    assert [len(t.train_idx) for t in sc.tasks] == [50] * 8
    assert all(len(t.test_idx) == 150 for t in sc.tasks)  # s3, s7, s10 for every task
    assert sc.input_shape == (3, 128, 128)
    assert sc.targets(sc.y_train[sc.tasks[3].train_idx], 3).tolist() == list(range(50))
    with pytest.raises(ConfigError, match="CORe50 NI is domain-incremental"):
        benchmarks.scenario("core50", mode="class", data_dir=root)


def test_core50_nc_order_from_the_official_filelists(tmp_path):
    root = core50(tmp_path)
    sc = benchmarks.scenario("core50-nc", data_dir=root)  # no filelists: label order, and the record says so
    assert [len(t.classes) for t in sc.tasks] == [10] + [5] * 8 and sc.tasks[0].classes == list(range(10))
    assert "not CORe50's official NC order" in sc.info["unverified"]
    objects = np.random.RandomState(7).permutation(50).tolist()  # an order unlike label order
    lists = root / "batches_filelists" / "NC_inc" / "run0"
    lists.mkdir(parents=True)
    batches = [objects[:10]] + [objects[10 + 5 * i:15 + 5 * i] for i in range(8)]
    for b, objs in enumerate(batches):
        (lists / f"train_batch_{b:02d}_filelist.txt").write_text("".join(
            f"s{s}/o{o + 1}/C_{s:02d}_{o + 1:02d}_000.png {o}\n" for o in objs for s in (1, 2, 4)))
    (lists / "test_filelist.txt").write_text("s3/o1/C_03_01_000.png 0\n")
    forget_loaded()
    sc = benchmarks.scenario("core50-nc", data_dir=root)
    assert [t.classes for t in sc.tasks] == [sorted(b) for b in batches]
    assert not sc.info["unverified"]
    assert [len(t.train_idx) for t in sc.tasks] == [80] + [40] * 8 and len(sc.tasks[0].test_idx) == 30


def test_core50_missing_session(tmp_path):
    root = core50(tmp_path)
    for p in (root / "core50_128x128" / "s7").rglob("*.png"):
        p.unlink()
    for d in sorted((root / "core50_128x128" / "s7").iterdir()):
        d.rmdir()
    (root / "core50_128x128" / "s7").rmdir()
    with pytest.raises(DataError, match=r"s7: missing; CORe50 needs all 11 sessions s1..s11"):
        data.load("core50", root)


# ---------------------------------------------------------------------------------- not found, download

@pytest.mark.parametrize("name, layout", [
    ("tinyimagenet", "tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
                     "val/val_annotations.txt}"),
    ("cub200", "CUB_200_2011/{images/<class>/*.jpg, images.txt, train_test_split.txt"),
    ("core50", "core50_128x128/s1..s11/o1..o50/C_<ss>_<oo>_<fff>.png"),
    ("imagenet-r", "imagenet-r/{train,test}/<wnid>/*.jpg (APER/PILOT's split folders)"),
])
def test_not_found_says_which_files_go_where(tmp_path, name, layout):
    with pytest.raises(DataError) as e:
        data.load(name, tmp_path)
    msg = str(e.value)
    assert f"{name} not found (looked in {tmp_path}" in msg and layout in msg and msg.endswith("or add --download")
    bench = {"tinyimagenet": "seq-tinyimagenet", "core50": "core50-nc"}.get(name, name)
    assert benchmarks.where(bench, tmp_path).startswith("not found")


def test_download_unpacks_a_verified_zip(tmp_path, monkeypatch):
    """--download fetches (here: a stand-in for the network) the archive, which fetch checks against its md5,
    and unpacks it where the search finds it."""
    archive = tmp_path / "made" / "tiny-imagenet-200.zip"
    tiny_imagenet(tmp_path / "made")
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted((tmp_path / "made" / "tiny-imagenet-200").rglob("*")):
            z.write(p, p.relative_to(tmp_path / "made"))
    fetched = []

    def fake_fetch(url, dest, md5, timeout=30.0):
        fetched.append((url, md5))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(archive.read_bytes())

    monkeypatch.setattr(data, "fetch", fake_fetch)
    folder = data.download("tinyimagenet", tmp_path / "dl")
    assert fetched == [("http://cs231n.stanford.edu/tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de")]
    assert folder == tmp_path / "dl" / "tiny-imagenet-200" and data.locate("tinyimagenet", tmp_path / "dl") == folder
    assert len(data.tinyimagenet_lists(folder).train_files) == 40


def test_core50_ni_refuses_another_mode_before_any_data_loads(tmp_path):
    from retain.config import resolve

    with pytest.raises(ConfigError, match="core50 is domain-incremental.*use --mode domain, or core50-nc"):
        resolve(benchmark="core50", mode="class", data_dir=str(tmp_path))  # an empty folder: never read
