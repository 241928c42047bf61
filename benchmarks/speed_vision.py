"""Vision speed benchmark (issue 19, item 7): retain's input pipeline and training step on CIFAR-10 against the
usual alternatives, in one run, as one markdown table with ratios and peak memory.

Rows (batch 32, crop-flip with 4 pixels of padding, CIFAR-10 JPEG q75 from ``../shared/data/cifar10-jpeg``):

- input pipeline alone (loading, augmentation, transfer; no model): retain (index batches over the uint8 tensor,
  the batched crop-flip of ``retain.augment`` on the device, exactly as the trainer's ``Context.batches`` and
  ``Context.view`` make them) beside the torchvision-style pipeline, written here without torchvision: a Dataset
  decoding one JPEG per item with PIL, ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``,
  ``Normalize`` per sample, in a shuffled DataLoader with 2 workers (how Mammoth feeds its models).
- the full P5 step (ResNet-18, SGD, all outputs; fine-tuning, ER and DER++ with a buffer of 500): retain
  (``retain.run`` with ``iterations``) beside a bare loop over device tensors written here, with the same batched
  augmentation and, for ER / DER++, the same replay sampling and extra forward passes.
- on CUDA (or with ``--all-rows``): the full step fed by the per-sample pipeline too, GPU utilisation and memory.

Each measurement runs in a fresh subprocess so its peak memory is its own (``--quick`` runs them in this process:
the peaks are then the process's so far). Times are steady state: warm-up steps / batches are not timed.

    python benchmarks/speed_vision.py                            # real data, CPU or CUDA, ~5 min on 2 cores
    python benchmarks/speed_vision.py --quick --synthetic        # smoke run on random images, seconds
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH, LR, BUFFER, DERPP_ALPHA, DERPP_BETA, PAD = 32, 0.03, 500, 0.2, 0.5, 4  # Mammoth's seq-cifar10 DER++ args
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615)  # Mammoth's seq-cifar10 normalisation
METHODS = ("finetune", "er", "derpp")
TASK0 = (0, 1)  # the first P5 task (airplane, automobile): the step rows train on it
DATA_DIR = ROOT.parent / "shared" / "data" / "cifar10-jpeg"


# ------------------------------------------------------------------------------------------------------ data

@dataclass
class Data:
    """Training images as retain holds them (uint8 [N, 3, 32, 32]) and as files for the per-sample pipeline."""

    x: torch.Tensor
    y: torch.Tensor
    jpegs: list  # Path of each image file, or its encoded bytes (synthetic)


def synthetic(n: int) -> Data:
    """Smooth random images (8x8 noise upsampled, so their JPEGs are the size of real ones), encoded at q75."""
    g = torch.Generator().manual_seed(0)
    small = torch.randint(0, 256, (n, 3, 8, 8), generator=g).float()
    x = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False).round().clamp(0, 255).byte()
    jpegs = []
    for img in x.permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=75)
        jpegs.append(buf.getvalue())
    return Data(x, torch.arange(n) % 10, jpegs)


def extracted(tar: Path, cache: Path) -> list[tuple[Path, int]]:
    """The training JPEGs as files (the per-sample pipeline reads files, as ImageFolder does), extracted once."""
    root = cache / "cifar10-jpeg" / "train"
    if not (root.is_dir() and sum(1 for _ in root.glob("*/*.jpg")) == 50_000):
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar) as f:
            members = [m for m in f.getmembers() if m.name.startswith("cifar10-jpeg/train/")]
            f.extractall(cache, members=members, filter="data")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [(p, i) for i, c in enumerate(classes) for p in sorted((root / c).glob("*.jpg"))]


def real(data_dir: Path, cache: Path, need_x: bool, need_files: bool) -> Data:
    tar = data_dir / "cifar10-jpeg.tar.gz"
    if not tar.exists():
        sys.exit(f"no {tar}: pass --data-dir (the folder holding cifar10-jpeg.tar.gz) or --synthetic")
    x = y = None
    if need_x:  # retain's own reader (retain.images): decoded once, in parallel, into a cached uint8 array on disk
        from retain.data import load

        arrays = load("cifar10", data_dir)
        x, y = arrays.x_train, arrays.y_train
    files = extracted(tar, cache) if need_files else []
    if y is None:
        y = torch.tensor([label for _, label in files])
    return Data(x, y, [p for p, _ in files])


# ------------------------------------------------------------------------------------ the per-sample pipeline

class PerSample(torch.utils.data.Dataset):
    """torchvision's ImageFolder + RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize, written
    out: one PIL decode and one transform chain per item, random draws from torch's global generator per item."""

    def __init__(self, jpegs: list, y: torch.Tensor, augment: bool = True):
        self.jpegs, self.y, self.augment = jpegs, y.tolist(), augment
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        src = self.jpegs[i]
        with Image.open(src if isinstance(src, Path) else io.BytesIO(src)) as f:
            img = f.convert("RGB")
        if self.augment:
            w, h = img.size
            padded = Image.new("RGB", (w + 2 * PAD, h + 2 * PAD))  # zero fill, as RandomCrop's default
            padded.paste(img, (PAD, PAD))
            top = int(torch.randint(0, 2 * PAD + 1, (1,)))
            left = int(torch.randint(0, 2 * PAD + 1, (1,)))
            img = padded.crop((left, top, left + w, top + h))
            if torch.rand(1) < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous().float().div(255)
        return x.sub_(self.mean).div_(self.std), self.y[i]


def loader(jpegs: list, y: torch.Tensor, workers: int, device: torch.device, seed: int = 0):
    ds = PerSample(jpegs, y)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers,
                                       pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed),
                                       persistent_workers=workers > 0)


def cycle(dl):
    while True:
        yield from dl


# ----------------------------------------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GPUUse:
    """Mean GPU utilisation (torch.cuda.utilization, which needs pynvml) sampled every 0.1 s while running."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self.stop = device, [], threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.stop.wait(0.1):
            try:
                self.samples.append(torch.cuda.utilization(self.device))
            except Exception:  # no pynvml / no NVML: reported as n/a
                return

    def __enter__(self) -> GPUUse:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()

    def record(self) -> dict:
        if self.device.type != "cuda":
            return {}
        return {"gpu_util": sum(self.samples) / len(self.samples) if self.samples else None,
                "gpu_peak_mb": torch.cuda.max_memory_allocated(self.device) / 2**20}


def per_step_time(per_step: list[float], total: float, steps: int, device: torch.device) -> float:
    """Seconds per step: on the CPU the median of the steps (robust to the other processes of a shared machine
    taking the cores for a while), on CUDA the mean (the steps are not synchronised one by one)."""
    return statistics.median(per_step) if device.type == "cpu" and per_step else total / steps


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def retain_scenario(data: Data, task0: bool):
    """The P5 split (5 tasks x 2 classes, class-IL) over the data; ``task0``: only the first task, with a few test
    rows per class so that the run's evaluations cost little (they are not timed either way)."""
    from retain import scenarios
    from retain.api import only_task
    from retain.data import Arrays

    x_test, y_test = data.x[:20], data.y[:20]  # evaluation is outside every timed region
    sc = scenarios.split(Arrays("cifar10", data.x, data.y, x_test, y_test, 10, MEAN, STD), "class", n_tasks=5)
    return only_task(sc, 0) if task0 else sc


def input_retain(data: Data, args, device: torch.device) -> dict:
    """What the trainer does to make a step's batch: Context.batches (a shuffled index batch, gathered and
    normalised on the device) and Context.view (the batched crop-flip), without a model."""
    from retain import augment, scenarios
    from retain.context import Context
    from retain.data import Arrays
    from retain.method import Method
    from retain.trainer import TrainConfig

    t0 = time.perf_counter()
    sc = scenarios.split(Arrays("cifar10", data.x, data.y, data.x[:10], data.y[:10], 10, MEAN, STD), "class",
                         n_tasks=1).to(device)
    setup = time.perf_counter() - t0
    view = sc.train_view()
    ctx = Context(torch.nn.Identity(), view, TrainConfig(batch_size=BATCH, augment="crop-flip"), Method(), device,
                  torch.Generator().manual_seed(0), torch.ones(10, dtype=torch.bool, device=device))
    ctx.augment = augment.build("crop-flip", MEAN, STD, (3, 32, 32))
    n = args.input_batches
    it = ctx.batches(view.task_data(0), iterations=args.input_warmup + n)
    with GPUUse(device) as use:
        for i, batch in enumerate(it):
            if i == args.input_warmup:
                sync(device)
                t0 = time.perf_counter()
            x = ctx.view(batch).x
            ctx.step += 1
        x.sum().item()  # the last batch is complete
        seconds = time.perf_counter() - t0
    return {"rate": n / seconds, "setup_s": setup, "peak_mb": peak_rss_mb(), **use.record()}


def input_per_sample(data: Data, args, device: torch.device) -> dict:
    dl = loader(data.jpegs, data.y, args.workers, device)
    n, it = args.input_batches_per_sample, iter(cycle(dl))
    with GPUUse(device) as use:
        for i in range(args.input_warmup + n):
            if i == args.input_warmup:
                sync(device)
                t0 = time.perf_counter()
            x, y = next(it)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x.sum().item()
        seconds = time.perf_counter() - t0
    del it, dl  # joins the workers, so their peak memory is counted
    return {"rate": n / seconds, "peak_mb": peak_rss_mb(), "workers_peak_mb": peak_rss_mb(resource.RUSAGE_CHILDREN),
            **use.record()}


def step_retain(data: Data, method: str, args, device: torch.device) -> dict:
    import retain

    sc = retain_scenario(data, task0=True)
    params = {"finetune": {}, "er": {"buffer_size": BUFFER},
              "derpp": {"buffer_size": BUFFER, "alpha": DERPP_ALPHA, "beta": DERPP_BETA}}[method]
    marks: list[tuple[int, float]] = []

    def progress(task: int, step: int, n_steps: int, loss: float) -> None:
        # called after a step (a read of the losses, so the device has finished it), at most every 0.1 s: on the
        # CPU after every ResNet step
        if step >= args.warmup:
            marks.append((step, time.perf_counter()))

    with GPUUse(device) as use:
        r = retain.run(scenario=sc, arch=args.arch, method=method, params=params,
                       iterations=args.warmup + args.steps, batch_size=BATCH, optimizer="sgd", lr=LR,
                       augment="crop-flip", all_outputs=True, device=str(device), threads=args.threads, seed=0,
                       progress=progress, quiet=True)
    if len(marks) < 2:  # no progress draw between the warm-up and the end (steps under 0.1 s): all steps
        return {"step_s": r.timings["train_s"] / (args.warmup + args.steps), "peak_mb": peak_rss_mb(),
                **use.record()}
    per_step = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(marks, marks[1:]) if s1 > s0]
    return {"step_s": per_step_time(per_step, marks[-1][1] - marks[0][1], marks[-1][0] - marks[0][0], device),
            "peak_mb": peak_rss_mb(), **use.record()}


class Reservoir:
    """A plain tensor reservoir (Vitter's algorithm R) of un-augmented rows, with DER's logits."""

    def __init__(self, device: torch.device):
        self.x = torch.zeros(BUFFER, 3, 32, 32, device=device)
        self.y = torch.zeros(BUFFER, dtype=torch.long, device=device)
        self.logits = torch.zeros(BUFFER, 10, device=device)
        self.seen, self.g = 0, torch.Generator().manual_seed(1)

    def sample(self) -> torch.Tensor:
        n = min(self.seen, BUFFER)
        return torch.randperm(n, generator=self.g)[:BATCH].to(self.x.device)

    def add(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> None:
        pos = torch.arange(self.seen, self.seen + len(y))
        j = torch.where(pos < BUFFER, pos, (torch.rand(len(y), generator=self.g) * (pos + 1)).long())
        keep = (j < BUFFER).nonzero().flatten()
        slots, keep = j[keep].to(x.device), keep.to(x.device)
        self.x[slots], self.y[slots], self.logits[slots] = x[keep], y[keep], logits[keep]
        self.seen += len(y)


def step_bare(data: Data, method: str, args, device: torch.device, per_sample: bool = False) -> dict:
    """The same step written plainly: index batches over a device tensor (or, ``per_sample``, batches from the
    per-sample DataLoader), the batched crop-flip, SGD; ER / DER++ with a tensor reservoir of 500 rows."""
    from retain import augment
    from retain.models import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.arch, (3, 32, 32), 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    aug = augment.build("crop-flip", MEAN, STD, (3, 32, 32))
    idx = torch.isin(data.y, torch.tensor(TASK0)).nonzero().flatten()
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    if per_sample:
        stream = cycle(loader([data.jpegs[i] for i in idx.tolist()], data.y[idx], args.workers, device))
    else:
        x_dev, y_dev = torch.as_tensor(data.x[idx]).to(device), data.y[idx].to(device)
        g = torch.Generator().manual_seed(0)

        def batches():
            while True:
                perm = torch.randperm(len(idx), generator=g).to(device)
                for s in range(0, len(perm), BATCH):
                    sel = perm[s:s + BATCH]
                    yield (x_dev[sel].float().div_(255) - mean) / std, y_dev[sel]
        stream = batches()
    buf = Reservoir(device) if method != "finetune" else None
    stamps = []
    with GPUUse(device) as use:
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                sync(device)
                t0 = time.perf_counter()
            if step >= args.warmup:
                stamps.append(time.perf_counter())
            x, y = next(stream)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            gen = torch.Generator().manual_seed(step)
            rows, targets = x, y
            if method == "er" and buf.seen:
                r = buf.sample()
                rows, targets = torch.cat([x, buf.x[r]]), torch.cat([y, buf.y[r]])
            if per_sample:  # the stream's rows came augmented from the workers; replayed rows are augmented here
                view = rows if rows is x else torch.cat([x, aug(rows[len(x):], gen)])
            else:
                view = aug(rows, gen)
            out = model(view)
            loss = F.cross_entropy(out, targets)
            if method == "derpp" and buf.seen:
                a = buf.sample()
                loss = loss + DERPP_ALPHA * F.mse_loss(model(aug(buf.x[a], gen)), buf.logits[a])
                b = buf.sample()
                loss = loss + DERPP_BETA * F.cross_entropy(model(aug(buf.x[b], gen)), buf.y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if buf is not None:
                buf.add(x, y, out[:len(y)].detach())
        sync(device)
        stamps.append(time.perf_counter())
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"step_s": per_step_time(per_step, stamps[-1] - t0, args.steps, device), "peak_mb": peak_rss_mb(),
            **use.record()}


# ------------------------------------------------------------------------------------------------- the run

def jobs(device: torch.device, all_rows: bool, synthetic: bool) -> list[str]:
    # retain reads real images from its on-disk array (retain.images); retain-memory: the same rows loaded first
    out = ["input:retain", "input:per-sample"] + ([] if synthetic else ["input:retain-memory"])
    for m in METHODS:
        out += [f"step:retain:{m}", f"step:bare:{m}"]
        if device.type == "cuda" or all_rows:
            out.append(f"step:per-sample:{m}")
    return out


def load_for(job: str, args) -> Data:
    if args.synthetic:
        return synthetic(args.synthetic_n)
    need_files = "per-sample" in job
    data = real(Path(args.data_dir), Path(args.cache), need_x=not need_files, need_files=need_files)
    if job == "input:retain-memory":
        data.x = data.x.load() if hasattr(data.x, "load") else data.x
    return data


def run_job(job: str, args) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    data = load_for(job, args)
    kind, impl, *rest = job.split(":")
    if kind == "input":
        return input_per_sample(data, args, device) if impl == "per-sample" else input_retain(data, args, device)
    method = rest[0]
    if impl == "retain":
        return step_retain(data, method, args, device)
    return step_bare(data, method, args, device, per_sample=impl == "per-sample")


def in_subprocess(job: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--job", job]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{job} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def hardware(device: torch.device, threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {threads} threads"
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text


def mb(r: dict, gpu: bool) -> str:
    text = f"{r['peak_mb']:.0f} MB"
    if r.get("workers_peak_mb"):
        text += f" + workers ({r['workers_peak_mb']:.0f} MB the largest)"
    if gpu and r.get("gpu_peak_mb") is not None:
        text += f"; GPU {r['gpu_peak_mb']:.0f} MB"
    return text


def table(results: dict[str, dict], args, device: torch.device, label: str) -> str:
    gpu = device.type == "cuda"
    steps_per_epoch = -(-10_000 // BATCH)  # a P5 task: 10,000 training images
    lines = [f"Data: {label}. Batch {BATCH}, crop-flip (padding {PAD}), {args.arch}. {hardware(device, args.threads)}"
             f". Steady state: {args.warmup} warm-up steps, then {args.steps} timed steps ("
             f"{'median' if not gpu else 'mean'} step); input rows "
             f"{args.input_batches} batches (per-sample {args.input_batches_per_sample}) after {args.input_warmup}.",
             "",
             "| measurement | retain | compared with | its value | ratio | target | peak memory: retain / other |",
             "|---|---:|---|---:|---:|---|---|"]
    b = results["input:per-sample"]
    where = {"input:retain": "" if args.synthetic else " (images on disk)", "input:retain-memory": " (in memory)"}
    for job, words in where.items():
        if job in results:
            a = results[job]
            lines.append(f"| input pipeline{words}, batches/s | {a['rate']:,.0f} | per-sample PIL, DataLoader "
                         f"{args.workers} workers | {b['rate']:,.0f} | {a['rate'] / b['rate']:.1f}x faster | >= 5x | "
                         f"{mb(a, gpu)} / {mb(b, gpu)} |")
    names = {"finetune": "fine-tuning", "er": f"ER, buffer {BUFFER}", "derpp": f"DER++, buffer {BUFFER}"}
    for m in METHODS:
        r, bare = results[f"step:retain:{m}"], results[f"step:bare:{m}"]
        lines.append(f"| step: {names[m]}, ms/step | {1000 * r['step_s']:.1f} | bare loop, same augmentation | "
                     f"{1000 * bare['step_s']:.1f} | {r['step_s'] / bare['step_s']:.2f}x the time | <= 1.15x | "
                     f"{mb(r, gpu)} / {mb(bare, gpu)} |")
        ps = results.get(f"step:per-sample:{m}")
        if ps is not None:
            lines.append(f"| step: {names[m]}, ms/step | {1000 * r['step_s']:.1f} | bare loop fed by the per-sample "
                         f"pipeline | {1000 * ps['step_s']:.1f} | {ps['step_s'] / r['step_s']:.2f}x faster | "
                         f">= 3x (GPU) | {mb(r, gpu)} / {mb(ps, gpu)} |")
    lines += ["", f"Epoch of a P5 task ({steps_per_epoch} steps; s/step x steps"
              + (", measured steps = one epoch" if args.steps >= steps_per_epoch else ", extrapolated") + "):", "",
              "| method | retain | bare loop |" + (" per-sample |" if any("per-sample:" in k for k in results)
                                                  else "") + (" GPU use retain / bare |" if gpu else ""),
              "|---|---:|---:|" + ("---:|" if any("per-sample:" in k for k in results) else "")
              + ("---|" if gpu else "")]
    for m in METHODS:
        r, bare, ps = (results.get(f"step:{i}:{m}") for i in ("retain", "bare", "per-sample"))
        row = f"| {names[m]} | {r['step_s'] * steps_per_epoch:.1f} s | {bare['step_s'] * steps_per_epoch:.1f} s |"
        if ps is not None:
            row += f" {ps['step_s'] * steps_per_epoch:.1f} s |"
        if gpu:
            util = [x.get("gpu_util") for x in (r, bare)]
            row += " " + " / ".join("n/a" if u is None else f"{u:.0f}%" for u in util) + " |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(DATA_DIR), help="folder holding cifar10-jpeg.tar.gz")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "retain" / "speed_vision"),
                   help="where the per-sample pipeline's JPEG files are extracted once")
    p.add_argument("--synthetic", action="store_true", help="random images instead of the JPEG files")
    p.add_argument("--synthetic-n", type=int, default=10_000, help="synthetic images")
    p.add_argument("--quick", action="store_true", help="a smoke run: few steps, an MLP, in-process")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the per-sample pipeline")
    p.add_argument("--arch", default="resnet18", help="retain model name (--quick: mlp)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per step row (CPU 20, CUDA one epoch)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--input-batches", type=int, default=2000)
    p.add_argument("--input-batches-per-sample", type=int, default=500)
    p.add_argument("--input-warmup", type=int, default=10)
    p.add_argument("--all-rows", action="store_true", help="the per-sample step rows on the CPU too")
    p.add_argument("--in-process", action="store_true", help="no subprocesses (peak memory is then cumulative)")
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.arch = "mlp" if args.arch == "resnet18" else args.arch  # the script's paths, not the ResNet's time
        args.steps, args.warmup, args.in_process = args.steps or 2, 1, True
        args.input_batches, args.input_batches_per_sample, args.input_warmup = 40, 20, 2
        args.synthetic_n = min(args.synthetic_n, 320)
    if args.steps is None:
        args.steps = -(-10_000 // BATCH) if args.device.startswith("cuda") else 20
    if args.job:
        print("RESULT " + json.dumps(run_job(args.job, args)))
        return
    device = torch.device(args.device)
    argv = list(sys.argv[1:] if argv is None else argv)
    argv += ["--steps", str(args.steps)]
    results = {}
    for job in jobs(device, args.all_rows, args.synthetic):
        print(f"running {job} ...", file=sys.stderr, flush=True)
        results[job] = run_job(job, args) if args.in_process else in_subprocess(job, argv)
    label = (f"synthetic, {args.synthetic_n} smooth random images (JPEG q75 in memory)" if args.synthetic else
             "CIFAR-10 (JPEG q75), 50,000 training images (the step rows train on the first task's 10,000)")
    print(table(results, args, device, label))


if __name__ == "__main__":
    main()
