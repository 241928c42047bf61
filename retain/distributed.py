"""Data-parallel training over several processes on torch.distributed (``--devices N``, or launched by torchrun).

Every process builds the same scenario, model (same seed) and method and walks the same global batches. In the
shared step (:meth:`retain.method.Method.observe`) each process trains on its contiguous share of the step's rows
(:func:`shard`); the gradients are then averaged over the processes, weighted by their shares
(:func:`all_reduce_gradients`), which is exactly the one-process gradient of the mean loss, and a penalty that
every process computes alike stays as it is. The outputs of all rows are gathered in row order
(:func:`all_gather_rows`) for ``after_update``, and since the methods' own randomness (``ctx.rng``) draws alike
everywhere, replay buffers and method state stay identical on every process without being sent. So a run on N
processes gives the matrix one process gives at the same global batch, up to floating-point summation order.

gloo on the CPU, NCCL on CUDA (one GPU per process, by ``LOCAL_RANK``). :func:`spawn` starts the processes of
``--devices N`` on this machine; under torchrun :func:`init` reads the usual environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Only rank 0 returns the record.

What is not data-parallel: a method with a training step of its own (one that overrides ``observe``: MER,
maml_replay, DGR) is refused (:func:`check_data_parallel`). BatchNorm normalises each process's rows by their own
statistics (as DistributedDataParallel does without SyncBatchNorm), so such a model matches one process only
approximately; :func:`broadcast_buffers` gives every process rank 0's running statistics before evaluating.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import tempfile
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from retain.errors import ConfigError, RetainError

__all__ = ["World", "all_gather_rows", "all_reduce_gradients", "broadcast_buffers", "check_data_parallel",
           "current", "init", "launched", "rank_checkpointer", "shard", "shutdown", "spawn", "world_size"]

TIMEOUT = timedelta(minutes=30)  # a collective waiting this long means a peer died without the launcher noticing


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run: its ``rank`` among ``size`` processes and its ``device``."""

    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the process that reports progress, saves checkpoints and returns the record."""
        return self.rank == 0


_world: World | None = None


def current() -> World | None:
    """The world this process belongs to, or None when it trains alone."""
    return _world


# ------------------------------------------------------------------------------------------------ the maths

def shard(n_rows: int, world: World) -> slice:
    """This process's contiguous share of ``n_rows`` rows: the first ``n_rows % size`` processes take one more."""
    base, extra = divmod(n_rows, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (world.rank < extra))


def all_reduce_gradients(parameters: Iterable[nn.Parameter], world: World, n_rows: int | None = None,
                         loss: Tensor | None = None) -> Tensor | None:
    """Replace each ``p.grad`` by the average over the processes weighted by their rows: sum(n_r g_r) / sum(n_r),
    the gradient one process would get of the mean loss over all rows. ``n_rows``: this process's rows (None:
    every process counts the same).

    One all-reduce per gradient dtype. A process with no rows (the last batch of an epoch, smaller than the world)
    contributes nothing, not the NaN of its empty mean. A parameter that has a gradient on some process gets one
    everywhere; one with none anywhere keeps ``None`` (so the optimizer skips it as it would alone). Given this
    process's ``loss``, returns the loss averaged the same way (finite even where this process had no rows).
    """
    params = list(parameters)
    n = 1.0 if n_rows is None else float(n_rows)
    groups: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.dtype, []).append(i)
    main = torch.float32  # its buffer also carries one has-a-gradient flag per parameter, n and the loss
    groups.setdefault(main, [])
    device = params[0].device if params else world.device
    flat: dict[torch.dtype, Tensor] = {}
    lengths: dict[torch.dtype, int] = {}  # of each buffer's gradients
    for dtype, members in groups.items():
        parts = [torch.zeros(params[i].numel(), dtype=dtype, device=device) if params[i].grad is None
                 else params[i].grad.reshape(-1) for i in members]
        lengths[dtype] = sum(params[i].numel() for i in members)
        if dtype == main:
            tail = torch.tensor([float(p.grad is not None) for p in params] + [n, 0.0], dtype=main, device=device)
            if loss is not None and n > 0:
                tail[-1] = loss.detach().float() * n
            parts.append(tail)
        buf = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)
        grads = buf[:lengths[dtype]]
        if n == 0:
            grads.zero_()  # not 0 x the NaN of an empty mean
        else:
            grads.mul_(n)
        flat[dtype] = buf
    for buf in flat.values():
        dist.all_reduce(buf)
    tail = flat[main][lengths[main]:]
    total = tail[-2]
    for dtype, buf in flat.items():
        buf[:lengths[dtype]].div_(total.to(dtype))
    # whether a parameter without a gradient here got one elsewhere: read only when some are missing here (a
    # read waits for the device; in the usual step every parameter has a gradient and nothing waits)
    missing = [i for i, p in enumerate(params) if p.grad is None]
    has_grad = [True] * len(params)
    if missing:
        for i, flag in zip(missing, tail[missing].tolist()):
            has_grad[i] = flag > 0
    for dtype, members in groups.items():
        offset = 0
        for i in members:
            p, size = params[i], params[i].numel()
            if has_grad[i]:
                mean = flat[dtype][offset:offset + size].view(p.shape)
                if p.grad is None:
                    p.grad = mean
                else:
                    p.grad.copy_(mean)  # in place: keeps the gradient's memory layout (channels-last)
            offset += size
    return None if loss is None else (tail[-1] / total).to(loss.dtype)


def all_gather_rows(x: Tensor, world: World, n_rows: int | None = None) -> Tensor:
    """Every process's rows of ``x`` (shares of :func:`shard`, possibly of unequal sizes), concatenated in rank
    order: what one process would hold for the whole batch. ``n_rows``: the whole batch's rows when known (else
    the shares' sizes are gathered first). Detached: for bookkeeping, not for gradients."""
    if n_rows is None:
        sizes_t = torch.zeros(world.size, dtype=torch.long, device=x.device)
        sizes_t[world.rank] = len(x)
        dist.all_reduce(sizes_t)
        sizes = sizes_t.tolist()
    else:
        sizes = [len(range(n_rows)[shard(n_rows, World(r, world.size, world.device))]) for r in range(world.size)]
    x = x.detach()
    most = max(sizes)
    wire = x.dtype
    if dist.get_backend() == "gloo" and wire == torch.bfloat16:  # gloo has no bfloat16
        wire = torch.float32
    padded = torch.zeros((most, *x.shape[1:]), dtype=wire, device=x.device)
    padded[:len(x)] = x
    pieces = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)]).to(x.dtype)


def broadcast_buffers(module: nn.Module, world: World | None = None) -> None:
    """Give every process rank 0's buffers of ``module`` (BatchNorm's running statistics, which each process
    gathered from its own rows), so every process evaluates the same model. One broadcast per dtype."""
    world = world or current()
    if world is None or world.size == 1:
        return
    groups: dict[torch.dtype, list[Tensor]] = {}
    for b in module.buffers():
        groups.setdefault(b.dtype, []).append(b)
    for bufs in groups.values():
        flat = torch.cat([b.detach().reshape(-1) for b in bufs])
        dist.broadcast(flat, src=0)
        offset = 0
        for b in bufs:
            b.data.copy_(flat[offset:offset + b.numel()].view(b.shape))
            offset += b.numel()


def check_data_parallel(method: Any, devices: int) -> None:
    """Refuse ``devices`` > 1 for a method (or a hybrid with a part) that takes its own training step (it
    overrides ``observe``): its step does not shard rows or average gradients."""
    from retain.method import own_step

    name = own_step(method) if devices > 1 else None
    if name is not None:
        raise ConfigError(f"{name} takes its own training step (it overrides observe), which is not "
                          f"data-parallel: run it with --devices 1, not --devices {devices}")


def rank_checkpointer(checkpointer: Any, world: World) -> Any:
    """``checkpointer`` as one process of ``world`` uses it: every process resumes from the file, only rank 0
    writes it, and Ctrl-C is not caught (it reaches the processes at different steps, and one that stopped to
    save would leave the others waiting in a collective): it stops the run at once, which resumes from its last
    checkpoint."""
    from retain.checkpoint import Checkpointer

    class RankCheckpointer(Checkpointer):
        def save(self, state: dict[str, Any]) -> None:
            if world.main:
                super().save(state)

        def finished(self) -> None:
            if world.main:
                super().finished()

        @contextlib.contextmanager
        def guard(self) -> Iterator[None]:
            yield

    shared = RankCheckpointer.__new__(RankCheckpointer)
    vars(shared).update(vars(checkpointer))
    return shared


# ------------------------------------------------------------------------------------------- the processes

def launched() -> bool:
    """Whether torchrun (or another launcher setting its environment) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def world_size(devices: int) -> int:
    """The processes a run trains on: torchrun's ``WORLD_SIZE`` when launched by it (``--devices`` must then be
    1, its default, or the same number), else ``devices``."""
    if not launched():
        return devices
    size = int(os.environ["WORLD_SIZE"])
    if devices not in (1, size):
        raise ConfigError(f"--devices {devices} but torchrun started {size} processes (WORLD_SIZE); drop "
                          f"--devices or give --devices {size}")
    return size


def _device(kind: str, local_rank: int) -> torch.device:
    if kind == "cuda":
        torch.cuda.set_device(local_rank)  # "cuda" then means this process's GPU everywhere else in the run
        return torch.device("cuda", local_rank)
    return torch.device(kind)


def init(device: str | torch.device = "cpu", rank: int | None = None, size: int | None = None,
         local_rank: int | None = None) -> World:
    """Join the process group (NCCL for a CUDA ``device``, gloo otherwise): ``rank``/``size`` given, or read from
    the environment torchrun sets. ``MASTER_ADDR``/``MASTER_PORT`` come from the environment."""
    global _world
    if _world is not None:
        return _world
    env = os.environ
    rank = int(env["RANK"]) if rank is None else rank
    size = int(env["WORLD_SIZE"]) if size is None else size
    local_rank = int(env.get("LOCAL_RANK", rank)) if local_rank is None else local_rank
    kind = torch.device(device).type if str(device) != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and local_rank >= torch.cuda.device_count():
        raise ConfigError(f"process {rank} (local rank {local_rank}) needs a GPU of its own but only "
                          f"{torch.cuda.device_count()} are visible; lower --devices")
    dev = _device(kind, local_rank)
    dist.init_process_group("nccl" if kind == "cuda" else "gloo", rank=rank, world_size=size, timeout=TIMEOUT,
                            **({"device_id": dev} if kind == "cuda" else {}))
    _world = World(rank, size, dev)
    return _world


def shutdown() -> None:
    """Leave the process group (a no-op when this process is in none)."""
    global _world
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _world = None


def free_port() -> int:
    """A TCP port free on localhost now, for the processes' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _portable(e: BaseException) -> tuple[Any, ...]:
    """An exception as something that pickles even when its class takes other arguments than its message."""
    return (type(e), e.args, dict(vars(e)), "".join(traceback.format_exception(type(e), e, e.__traceback__)))


def _rebuilt(kind: type, args: tuple, attrs: dict[str, Any]) -> BaseException:
    e = kind.__new__(kind, *args)
    e.args = args
    vars(e).update(attrs)
    return e


def _rank_main(rank: int, n: int, port: int, device: str, threads: int, folder: str, fn: Callable[..., Any],
               args: tuple) -> None:
    """One process of :func:`spawn`: join the group, run ``fn(*args)``, leave its outcome in ``folder``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(n), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    outcome: tuple[Any, ...]
    try:
        init(device, rank, n, rank)
        try:
            value = fn(*args)
        finally:
            shutdown()
        outcome = ("value", value if rank == 0 else None)
    except BaseException as e:
        outcome = ("error", *_portable(e))
        _write(Path(folder) / f"{rank}.pkl", outcome)
        raise
    _write(Path(folder) / f"{rank}.pkl", outcome)


def _write(path: Path, outcome: tuple[Any, ...]) -> None:
    try:
        data = pickle.dumps(outcome)
    except Exception:  # noqa: BLE001 - an unpicklable value or exception still says what happened
        data = pickle.dumps(("error", RuntimeError, (f"process result could not be sent: {outcome[:2]!r}",), {},
                             ""))
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _start_method(kind: str) -> str:
    """fork where it is safe (POSIX, and CUDA not yet initialised here): the processes start at once and inherit
    the scenario, the model and the user's own classes unpickled; spawn otherwise (its arguments must pickle)."""
    import multiprocessing

    if "fork" in multiprocessing.get_all_start_methods() and not (torch.cuda.is_available()
                                                                  and torch.cuda.is_initialized()):
        return "fork"
    return "spawn"


def spawn(n: int, fn: Callable[..., Any], args: tuple = (), device: str | torch.device = "cpu",
          threads: int | None = None) -> Any:
    """Run ``fn(*args)`` in ``n`` processes on this machine joined in one group (gloo on the CPU, NCCL on CUDA:
    process r on GPU r) and return rank 0's value. Each process gets ``threads`` torch threads (default: this
    process's threads divided among them, at least 1). The first failure ends every process and is raised here
    as it was raised there (a ConfigError stays a ConfigError)."""
    import torch.multiprocessing as mp

    kind = torch.device(device).type if str(device) != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and str(device) not in ("cuda", "auto"):
        raise ConfigError(f"--devices {n} puts one process on each GPU from cuda:0: use --device cuda, not "
                          f"--device {device}")
    if kind == "cuda" and n > torch.cuda.device_count():
        raise ConfigError(f"--devices {n} needs {n} GPUs but {torch.cuda.device_count()} are visible; use "
                          f"--devices {torch.cuda.device_count()} or fewer")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"--devices {n} runs on the CPU (gloo) or on CUDA GPUs (NCCL), not on {kind}")
    threads = threads or max(1, torch.get_num_threads() // n)
    with tempfile.TemporaryDirectory(prefix="retain-ddp-") as folder:
        method = _start_method(kind)
        try:
            ctx = mp.start_processes(_rank_main, (n, free_port(), kind, threads, folder, fn, args), nprocs=n,
                                     join=False, start_method=method)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise ConfigError(f"--devices {n}: the run cannot be sent to its processes ({e}); define the model and "
                              "scenario at a module's top level") from None
        failure: BaseException | None = None
        try:
            while not ctx.join():
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            failure = e
        except BaseException:  # Ctrl-C here: the processes go too
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join()
            raise
        outcomes = {}
        for rank in range(n):
            path = Path(folder) / f"{rank}.pkl"
            if path.exists():
                outcomes[rank] = pickle.loads(path.read_bytes())
    errors = [(rank, o) for rank, o in sorted(outcomes.items()) if o[0] == "error"]
    if errors:
        # the cause, not its echo: a peer's broken connection follows the process that raised first
        ours = [o for _, o in errors if isinstance(o[1], type) and issubclass(o[1], RetainError)]
        _, kind_, eargs, attrs, text = (ours or [o for _, o in errors])[0]
        try:
            error = _rebuilt(kind_, eargs, attrs)
        except Exception:  # noqa: BLE001
            error = RuntimeError(text)
        if isinstance(error, RetainError) or not text:
            raise error
        raise error from RuntimeError(f"in a process of --devices {n}:\n{text}")
    if failure is not None or 0 not in outcomes:
        raise RuntimeError(f"a process of --devices {n} ended without a result: {failure}")
    return outcomes[0][1]
