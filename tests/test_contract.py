"""Contract tests over every registered method (timm-style: a method registered tomorrow is picked up here without
editing this file), plus the hybrids ``ewc+er`` and ``si+der`` that the registry composes on demand.

For each method, on a tiny synthetic scenario (8 Gaussian blobs in 16 dimensions, 2 tasks of 4 classes; seconds):

- every declared mode runs and learns: the accuracy on the last task right after training it is at least chance
  + 0.3 (chance: 1/4 in task- and domain-IL, 1/8 in class-IL, where every output competes at test; the untrained
  model, the baseline b, scores 0.05-0.4 on this data, and every method trained reaches 0.6-1.0);
- task-free: a method that does not need boundaries learns on one stream as well; one that does is refused (the
  API raises ConfigError, and the CLI exits 2 with the message, as it does for a mode the method does not declare);
- a run stopped mid-task (a checkpoint copied as it was written, see ``Recording``) and resumed with a *fresh*
  method instance ends with the identical accuracy matrix of the run never stopped; so does one resumed from a
  task boundary (the method's state is all that carries the earlier task over);
- the method's state round-trips: ``state_dict()`` pickled as a checkpoint does, loaded into a fresh instance,
  gives back the same state;
- memory: the rows held in the method's buffers (every :class:`retain.buffers.Buffer` reachable from it, the
  parts of a hybrid included) never exceed ``method.memory(scenario).rows``; and for known configurations
  (``KNOWN``: a buffer of 20, 3 per class, 5 per task; the methods that keep no sample report 0 rows and 0 bytes;
  joint reports every training row at 0 bytes) the report and the rows held are exactly right.

At the end the method x mode table of what ran, learned and was refused is written to /tmp/contract_table.md
(and printed with ``-s``).
"""

from __future__ import annotations

import dataclasses
import io
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import retain
from retain import checkpoint, scenarios
from retain.buffers import Buffer
from retain.checkpoint import Checkpointer
from retain.data import make_synthetic
from retain.errors import ConfigError
from retain.method import Method, create, methods, row_bytes
from retain.scenarios import MODES

HYBRIDS = ["ewc+er", "si+der"]
NAMES = [*methods(), *HYBRIDS]
SMALL = {"ranpac": {"M": 64}}  # RanPAC's paper projection (M = 10,000) is a GPU-sized solve, not a seconds test
NO_STEPS_AFTER_THE_FIRST_TASK = {"simplecil", "ranpac", "aper"}  # no mid-task checkpoint exists in task 1
RUN = {"hidden": (32,), "iterations": 30, "batch_size": 16, "lr": 0.01, "seed": 0}
TASK_FREE = {"hidden": (32,), "batch_size": 16, "lr": 0.01, "seed": 0, "task_free": True}  # one pass: 32 steps/task
MARGIN = 0.3
TABLE = Path("/tmp/contract_table.md")


def _declared(name: str) -> tuple[tuple[str, ...], bool]:
    """(modes, needs_boundaries) of the default instance; if it cannot be built, every mode (the tests then fail
    on ``create`` with its message instead of the whole file failing to collect)."""
    try:
        m = create(name)
        return tuple(m.modes), bool(m.needs_boundaries)
    except Exception:  # noqa: BLE001 - reported by the tests themselves
        return MODES, False


DECLARED = {n: _declared(n) for n in NAMES}
PAIRS = [(n, mode) for n in NAMES for mode in DECLARED[n][0]]
REFUSALS = ([(n, ["--mode", bad], "does not support") for n in NAMES for bad in MODES if bad not in DECLARED[n][0]]
            + [(n, ["--mode", DECLARED[n][0][0], "--task-free"], "task boundaries") for n in NAMES
               if DECLARED[n][1]]
            + [("er", ["--param", "selection=herding", "--task-free"], "task boundaries")])  # instance-level


def pretrained_family(name: str) -> bool:
    """A method that learns on a pre-trained backbone (it requires a frozen one, or runs the backbone itself)."""
    from retain.method import method_class

    cls = method_class(name)
    return cls.freeze is not None or cls.reads_backbone


def tiny(mode: str, n_train: int = 128, images: bool = False) -> scenarios.Scenario:
    """8 of the data's 10 classes in 2 tasks: the other two are data the stream never shows (OML meta-trains on
    them; no other method reads them). ``images``: each 16-dimensional row as a 1 x 4 x 4 image, for a ViT."""
    data = make_synthetic(n_classes=10, n_train=n_train, n_test=16, dim=16, spread=1.5, seed=0)
    if images:
        data = dataclasses.replace(data, x_train=data.x_train.view(-1, 1, 4, 4), x_test=data.x_test.view(-1, 1, 4, 4))
    return scenarios.split(data, mode, n_tasks=2, class_order=list(range(8)))


_BACKBONE: list[torch.nn.Module] = []


def pretrained_vit() -> torch.nn.Module:
    """A tiny ViT over 4 x 4 images, pre-trained (300 Adam steps, supervised) on other data: blobs of another draw
    (seed 1: other class centres), so its features are not random; made once."""
    if not _BACKBONE:
        from retain.vit import ViT, ViTConfig

        torch.manual_seed(0)
        other = make_synthetic(n_classes=10, n_train=64, n_test=1, dim=16, spread=1.5, seed=1)
        vit = ViT(ViTConfig(img_size=4, patch_size=2, in_chans=1, embed_dim=16, depth=5, num_heads=2))  # CODA: 0-4
        head = torch.nn.Linear(16, 10)
        opt = torch.optim.Adam([*vit.parameters(), *head.parameters()], lr=3e-3)
        x, y = other.x_train.view(-1, 1, 4, 4), other.y_train
        g = torch.Generator().manual_seed(0)
        for _ in range(300):
            i = torch.randint(0, len(y), (64,), generator=g)
            loss = torch.nn.functional.cross_entropy(head(vit(x[i])), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        _BACKBONE.append(vit)
    return _BACKBONE[0]


def setup(name: str, mode: str) -> tuple[scenarios.Scenario, dict[str, Any]]:
    """The scenario and the model options of ``name``'s contract runs: for the pre-trained-model methods a tiny
    ViT pre-trained on other data (:func:`pretrained_vit`) over the blobs as 4 x 4 images."""
    if not pretrained_family(name):
        return tiny(mode), {}
    import copy

    from retain.backbones import Pretrained

    sc = tiny(mode, images=True)
    return sc, {"model": Pretrained(copy.deepcopy(pretrained_vit()), sc.n_outputs, img_size=4, in_chans=1)}


def run_of(name: str, mode: str, options: dict[str, Any], **kw: Any):
    """``retain.run`` of ``name`` on its contract scenario and model (a fresh copy of the model each time)."""
    import copy

    sc, model = setup(name, mode)
    model = {k: copy.deepcopy(v) for k, v in model.items()}
    options = {k: v for k, v in options.items() if not (model and k == "hidden")}
    return retain.run(scenario=sc, **model, **options, **kw), sc


def chance(mode: str, sc: scenarios.Scenario) -> float:
    per_task = len(sc.tasks[-1].classes)
    return 1.0 / (sum(len(t.classes) for t in sc.tasks) if mode == "class" else per_task)


_runs: dict[tuple, tuple[Any, Method, scenarios.Scenario]] = {}
_table: dict[tuple[str, str], list[str]] = {}


def plain_run(name: str, mode: str, task_free: bool = False, **params: Any):
    """One run of ``name`` in ``mode`` (cached: the learning, memory and state tests share it)."""
    key = (name, mode, task_free, tuple(sorted(params.items())))
    if key not in _runs:
        torch.manual_seed(0)
        method = create(name, {**SMALL.get(name, {}), **params})
        result, sc = run_of(name, mode, TASK_FREE if task_free else RUN, method=method)
        _runs[key] = (result, method, sc)
    return _runs[key]


def note(name: str, mode: str, text: str) -> None:
    _table.setdefault((name, mode), []).append(text)


@pytest.fixture(scope="module", autouse=True)
def _write_table():
    yield
    modes = list(MODES)
    lines = ["| method | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for n in NAMES:
        cells = ["; ".join(_table.get((n, m), ["—"])) for m in modes]
        lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
    text = ("Contract tests (tests/test_contract.py): last-task accuracy right after training (chance + "
            f"{MARGIN} needed), task-free, refusals (exit 2)\n\n" + "\n".join(lines) + "\n")
    TABLE.write_text(text)
    print("\n" + text)


# ---------------------------------------------------------------------------------------------------- learning

@pytest.mark.parametrize("name,mode", PAIRS, ids=[f"{n}-{m}" for n, m in PAIRS])
def test_every_declared_mode_learns(name, mode):
    result, _, sc = plain_run(name, mode)
    R = result.accuracy_matrix
    assert len(R) == sc.n_tasks and all(len(row) == sc.n_tasks for row in R)
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for row in R for v in row)
    last = R[-1][-1]
    note(name, mode, f"learns {last:.2f}" if last >= chance(mode, sc) + MARGIN else f"FAILS to learn {last:.2f}")
    assert last >= chance(mode, sc) + MARGIN, (
        f"{name} in {mode}-IL: {last:.2f} on the task just trained, chance {chance(mode, sc):.2f}; R = {R}, "
        f"untrained b = {result.baseline}")


@pytest.mark.parametrize("name,mode", PAIRS, ids=[f"{n}-{m}" for n, m in PAIRS])
def test_task_free_learns_or_is_refused(name, mode):
    if DECLARED[name][1]:
        with pytest.raises(ConfigError, match="task boundaries"):
            run_of(name, mode, TASK_FREE, method=create(name, SMALL.get(name, {})))
        note(name, mode, "task-free refused")
        return
    result, _, sc = plain_run(name, mode, task_free=True)
    last = result.accuracy_matrix[-1][-1]
    note(name, mode, f"task-free {last:.2f}" if last >= chance(mode, sc) + MARGIN else f"task-free FAILS {last:.2f}")
    assert last >= chance(mode, sc) + MARGIN, (name, mode, result.accuracy_matrix)


@pytest.mark.parametrize("name,extra,message", REFUSALS, ids=[f"{n}{' '.join(e)}" for n, e, _ in REFUSALS])
def test_cli_refuses_an_unsupported_pairing_with_exit_2(name, extra, message, capsys, tmp_path, monkeypatch):
    from retain import cli

    monkeypatch.chdir(tmp_path)
    code = cli.main(["run", "--method", name, "--benchmark", "split-digits", "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.count("\n") == 1, err
    if "--mode" in extra and "--task-free" not in extra:
        note(name, extra[1], "refused (exit 2)")
    assert not any(tmp_path.iterdir())  # refused before anything was written


# ------------------------------------------------------------------------------------------- resume and state

class Recording(Checkpointer):
    """Keeps a copy of every checkpoint as it was written: resuming from one is resuming a run stopped there."""

    def __init__(self, path: Path, every: int):
        super().__init__(path, every)
        self.copies: list[Path] = []

    def save(self, state: dict[str, Any]) -> None:
        super().save(state)
        copy = self.path.with_name(f"copy{len(self.copies)}.ckpt")
        shutil.copy(self.path, copy)
        self.copies.append(copy)


def _position(saved: dict[str, Any]) -> dict[str, int]:
    """Where a checkpoint stands (task, step within the task), inside the envelope or beside it."""
    return saved["position"] if "position" in saved else saved["state"]["position"]


def _resume_mode(name: str) -> str:
    modes = DECLARED[name][0]
    return "class" if "class" in modes else modes[0]


@pytest.mark.parametrize("name", NAMES)
def test_stopped_mid_task_and_resumed_gives_the_identical_matrix(name, tmp_path):
    mode = _resume_mode(name)
    plain, _, _ = plain_run(name, mode)
    rec = Recording(tmp_path / "run.ckpt", every=7)
    torch.manual_seed(0)
    with_ckpt, _ = run_of(name, mode, RUN, method=create(name, SMALL.get(name, {})), checkpointer=rec)
    assert with_ckpt.accuracy_matrix == plain.accuracy_matrix  # checkpointing changes nothing
    positions = [_position(checkpoint.load(c)) for c in rec.copies]
    mid = [c for c, p in zip(rec.copies, positions) if p["task"] == 1 and p["task_step"] > 0]
    boundary = [c for c, p in zip(rec.copies, positions) if p["task"] == 1 and p["task_step"] == 0]
    assert mid or name in NO_STEPS_AFTER_THE_FIRST_TASK, positions
    for copy in [*mid[len(mid) // 2:][:1], *boundary[:1]]:
        ck = Checkpointer(copy, every=7, resume=True, keep=True)
        torch.manual_seed(123)  # the global RNG is restored from the checkpoint, not from here
        resumed, _ = run_of(name, mode, RUN, method=create(name, SMALL.get(name, {})), checkpointer=ck)
        assert ck.resumed_from is not None and ck.resumed_from["task"] == 1
        assert resumed.accuracy_matrix == plain.accuracy_matrix, (name, ck.resumed_from)
    note(name, mode, "resume identical")


def _same(a: Any, b: Any, path: str = "state") -> None:
    """Structural equality of two method states (tensors exactly, modules and buffers by their state)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, path
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), path
    elif isinstance(a, (torch.nn.Module, Buffer)):
        assert type(a) is type(b), path
        _same(a.state_dict(), b.state_dict(), path)
    elif isinstance(a, torch.optim.Optimizer):
        _same(a.state_dict(), b.state_dict(), path)
    elif isinstance(a, torch.Generator):
        assert torch.equal(a.get_state(), b.get_state()), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (path, a.keys(), b.keys())
        for k in a:
            _same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    elif dataclasses.is_dataclass(a) and not isinstance(a, type) or hasattr(a, "__dict__") and not callable(a):
        assert type(a) is type(b), path
        _same(vars(a), vars(b), path)
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_into_a_fresh_instance(name):
    _, method, _ = plain_run(name, _resume_mode(name))
    state = method.state_dict()
    hyper = {f.name for f in dataclasses.fields(method)} if dataclasses.is_dataclass(method) else set()
    assert not (hyper & set(state)), f"state_dict holds hyper-parameters {hyper & set(state)}"
    buf = io.BytesIO()
    torch.save(state, buf)  # as a checkpoint stores it
    buf.seek(0)
    fresh = create(name, method.params())
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    _same(fresh.state_dict(), state)
    assert fresh.params() == method.params()


# ------------------------------------------------------------------------------------------------------ memory

def buffers_of(obj: Any, seen: set[int] | None = None) -> list[Buffer]:
    """Every Buffer reachable from a method's attributes (a hybrid's parts, lists and dicts included)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (torch.Tensor, torch.nn.Module, str, bytes, int, float, type(None))):
        return []
    seen.add(id(obj))
    if isinstance(obj, Buffer):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif isinstance(obj, Method) or dataclasses.is_dataclass(obj):
        items = list(vars(obj).values())
    else:
        return []
    return [b for item in items for b in buffers_of(item, seen)]


@pytest.mark.parametrize("name", NAMES)
def test_rows_held_never_exceed_the_memory_report(name):
    _, method, sc = plain_run(name, _resume_mode(name))
    report = method.memory(sc)
    held = sum(len(b) for b in buffers_of(method))
    note(name, _resume_mode(name), f"memory {held}/{report.rows} rows")
    assert 0 <= held <= report.rows, (name, held, report)
    if buffers_of(method):  # stored copies: each row costs at least its input, target and task
        assert report.bytes >= report.rows * row_bytes(sc), (name, report)


# (method, params) -> (rows reported, rows held in buffers after the run, bytes) on the tiny scenario: 2 tasks of
# 4 classes, 512 training rows per task, 30 steps of 16 rows per task (960 rows seen). Bytes "rows" = rows x
# row_bytes, "logits" = rows x row_bytes with the logits; a number is exact.
N_TRAIN = 2 * 4 * 128
KNOWN = [
    ("er", {"buffer_size": 20}, 20, 20, "rows"),
    ("er", {"per_class": 3}, 3 * 8, 3 * 8, "rows"),
    ("er", {"buffer_size": 20, "storage": "class_balanced"}, 20, 20, "rows"),
    ("der", {"buffer_size": 20}, 20, 20, "logits"),
    ("derpp", {"buffer_size": 20}, 20, 20, "logits"),
    ("gem", {"memory_per_task": 5}, 5 * 2, 5 * 2, "rows"),
    ("agem", {"memory_per_task": 5}, 5 * 2, 5 * 2, "rows"),
    ("mer", {"buffer_size": 20}, 20, 20, "rows"),
    ("maml_replay", {"buffer_size": 20}, 20, 20, "rows"),
    ("mir", {"buffer_size": 20}, 20, 20, "rows"),
    ("gss", {"buffer_size": 20}, 20, 20, "rows"),
    ("er_aml", {"buffer_size": 20}, 20, 20, "rows"),
    ("scr", {"buffer_size": 20}, 20, 20, "rows"),
    ("ewc+er", {"buffer_size": 20}, 20, 20, "rows"),
    ("si+der", {"buffer_size": 20}, 20, 20, "logits"),
    ("joint", {}, N_TRAIN, 0, 0),  # every training row, read in place by index: no copy
    *[(n, {}, 0, 0, 0) for n in ("finetune", "ewc", "online_ewc", "si", "mas", "lwf", "dgr")],  # no sample kept
    *[(n, {}, 0, 0, 0) for n in ("pnn", "packnet", "oml")],
]


@pytest.mark.parametrize("name,params,rows,held,size", KNOWN, ids=[f"{n}-{p}" for n, p, *_ in KNOWN])
def test_memory_report_is_right_for_a_known_configuration(name, params, rows, held, size):
    mode = "class" if "class" in DECLARED[name][0] else DECLARED[name][0][0]
    _, method, sc = plain_run(name, mode, **params)
    report = method.memory(sc)
    expected = size if isinstance(size, int) else rows * row_bytes(sc, logits=size == "logits")
    assert (report.rows, report.bytes) == (rows, expected), (name, params, report)
    got = sum(len(b) for b in buffers_of(method))
    assert got == held, f"{name} {params}: {got} rows held after 960 rows seen, expected {held} ({report})"
