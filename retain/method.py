"""The method interface: a few hooks, each returning a value; the base class is fine-tuning.

A method is a ``@dataclass`` subclass of :class:`Method` whose fields are its hyper-parameters (each with a
one-line ``help`` in its metadata and the paper's name), registered by name with :func:`register`. It overrides
only the hooks it needs; the trainer (:mod:`retain.trainer`) owns the loop and the optimizer step.

=====================================  =====================================================================
hook                                   contract
=====================================  =====================================================================
``begin_task(ctx)``                    before a task; may change structure (the optimizer is rebuilt after it)
``task_data(ctx, data) -> data``       what to iterate for this task (joint returns everything seen)
``augment(ctx, batch) -> batch``       extra rows for the step (replayed / generated), ``new`` = False
``penalty(ctx, batch, out) -> T|None`` an extra loss term; ``out`` is the raw, unmasked output
``before_update(ctx)``                 after backward, before the step: may rewrite ``p.grad``
``after_update(ctx, batch, out)``      after the step: bookkeeping (path integrals, buffer insertion, ...)
``end_task(ctx)``                      after a task, before evaluation: consolidation, memory selection
``forward(ctx, x, t) -> Tensor``       raw outputs, in training and evaluation alike; accepts unseen tasks
``observe(ctx, batch) -> Tensor``      the whole step; override only when the step itself differs (MER, MAML)
=====================================  =====================================================================

Class attributes: ``modes`` (the scenario modes supported), ``needs_boundaries`` (True if the method cannot run
on a task-free stream), ``freeze`` (``"all"`` for a method that never trains a pre-trained backbone: the run
freezes it, and refuses another ``--freeze``), ``reads_backbone`` (True for a method that runs the backbone itself,
with prompts, prefixes or adapters, through ``model.features.tokens`` / ``.backbone``: its inputs are then never
replaced by cached features, see :mod:`retain.backbones`), ``presets`` (tuned hyper-parameters per
``"benchmark/mode"``, applied by default; a preset may also set the run's ``lr``, ``momentum``, ``batch_size`` or
``optimizer``, see :data:`PRESET_TRAINING`).
A misspelled hook (``end_tsak``, ``penalti``) is an error at class creation, not a silently ignored method.

Where methods come from (:func:`method_class` parses every name): the modules of :mod:`retain.methods`, the
entry-point group ``retain.methods`` of installed packages (``mine = "package.module:Class"``), any importable
``module.path:ClassName``, and hybrids ``a+b`` of any of these.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.metadata
import inspect
import math
import os
import pkgutil
import re
import sys
import typing
from typing import Any, ClassVar

import torch
from torch import Tensor

from retain.errors import ConfigError
from retain.scenarios import MODES, Batch, TaskData

HOOKS = ("begin_task", "task_data", "augment", "penalty", "before_update", "after_update", "end_task",
         "forward", "observe")
_HOOK_PREFIXES = ("begin_", "end_", "before_", "after_", "on_")
ENTRY_POINTS = "retain.methods"  # the entry-point group of installed plugin methods


def _edits(a: str, b: str) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) that turn ``a`` into ``b``: ``end_tsak`` -> 1."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def misspelled_hook(attr: str, value: Any) -> str | None:
    """Why ``attr`` of a method class looks like a hook but is not one, or None.

    The rule: a public function (not ``_private``) whose name, lower-cased, is one or two edits from a hook's
    (``penalti``, ``augmnet``, ``end_tsak``, ``Forward``, ``observer``); or any attribute that starts like one
    (``begin_``, ``end_``, ``before_``, ``after_``, ``on_``). Every other name is free: the shortest hook has 7
    letters, so ordinary names (``params``, ``parameters``, ``memory``, ``state_dict``, ``fisher``) are 3 or more
    edits away from all of them.
    """
    if attr in HOOKS or attr.startswith("_"):
        return None
    if inspect.isfunction(value) or isinstance(value, (staticmethod, classmethod)):
        near = min(HOOKS, key=lambda h: _edits(attr.lower(), h))
        if _edits(attr.lower(), near) <= 2:
            return f"is not a hook but is close to {near}(): rename it {near} if it is meant as that hook, or " \
                   "give it a name further from every hook"
    if attr.startswith(_HOOK_PREFIXES):
        return f"looks like a hook but is not one; hooks are {', '.join(HOOKS)}"
    return None


def param(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - "help" reads best at the call site
    """A hyper-parameter field: ``lambda_: float = param(1.0, "penalty strength (λ in the paper)")``."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class Method:
    """Fine-tuning: train on each task in turn with nothing to protect earlier ones (the lower bound)."""

    name: ClassVar[str] = "finetune"
    modes: ClassVar[tuple[str, ...]] = MODES
    needs_boundaries: ClassVar[bool] = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    freeze: ClassVar[str | None] = None
    reads_backbone: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "name" not in vars(cls):  # unregistered: the name that imports it again (``--method module:Class``)
            cls.name = f"{cls.__module__}:{cls.__qualname__}"
        for attr, value in vars(cls).items():
            why = misspelled_hook(attr, value)
            if why:
                raise TypeError(f"{cls.__name__}.{attr} {why}")
        bad = set(cls.modes) - set(MODES) if isinstance(cls.modes, tuple) else set()
        if bad:
            raise TypeError(f"{cls.__name__}.modes has unknown modes {sorted(bad)}")

    # ------------------------------------------------------------------------------------------------ hooks
    def begin_task(self, ctx: Any) -> None:
        pass

    def task_data(self, ctx: Any, data: TaskData) -> TaskData:
        return data

    def augment(self, ctx: Any, batch: Batch) -> Batch:
        return batch

    def penalty(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor | None:
        return None

    def before_update(self, ctx: Any) -> None:
        pass

    def after_update(self, ctx: Any, batch: Batch, out: Tensor) -> None:
        pass

    def end_task(self, ctx: Any) -> None:
        pass

    def forward(self, ctx: Any, x: Tensor, t: Tensor) -> Tensor:
        return ctx.model(x)

    def observe(self, ctx: Any, batch: Batch) -> Tensor:
        """One step: augment -> forward -> masked loss + penalty -> backward -> before_update -> step -> after.

        The ``augment`` hook adds the method's rows (ER's replay); ``ctx.view`` is what the model trains on: those
        rows under the run's data augmentation (``--augment``), and this process's share of them when
        data-parallel. ``after_update`` gets the rows as they came (un-augmented: what a buffer stores) with the
        outputs of their augmented views (DER stores those)."""
        batch = self.augment(ctx, batch)
        view = ctx.view(batch)
        with ctx.autocast():
            out = self.forward(ctx, view.x, view.t)
            loss = ctx.loss(out, view)
            extra = self.penalty(ctx, view, out)
            if extra is not None:
                loss = loss + extra
        ctx.optimizer.zero_grad(set_to_none=True)
        loss = ctx.backward(loss, len(view))
        self.before_update(ctx)
        ctx.step_optimizer()
        self.after_update(ctx, batch, ctx.gathered(out.float()))
        return loss

    # ----------------------------------------------------------------------------------------- parameters
    def params(self) -> dict[str, Any]:
        """The hyper-parameters by their public names (``lambda_`` -> ``lambda``)."""
        return {public_name(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter] | list[dict[str, Any]]:
        """What the optimizer trains (a method that adds modules of its own, e.g. a generator, extends this): the
        parameters, or torch's parameter groups ``[{"params": [...], "lr": ...}, ...]`` for parts trained at
        learning rates of their own (SLCA's slow backbone)."""
        return [p for p in model.parameters() if p.requires_grad]

    def memory(self, scenario: Any) -> Memory:
        """The stored samples this method keeps at most on ``scenario`` with its hyper-parameters (not a hook).

        ``rows``: a replay buffer's capacity, ``per_class`` x the scenario's classes, memories per task x tasks...;
        ``bytes``: what those rows take beyond the model (:func:`row_bytes` each). The trainer refuses, before any
        training, a run whose memory cannot fit (``buffer_size=10**12``); the result record and the report's
        accuracy-versus-memory plot carry it. The default, none, is right for methods that keep no samples (their
        state is the size of the model: Fisher, Ω, masks, frozen copies, generators).
        """
        return Memory(0, 0)

    # --------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything but the hyper-parameters: Fisher, Ω, buffers, masks... (saved with checkpoints)."""
        fields = {f.name for f in dataclasses.fields(self)}
        return {k: v for k, v in vars(self).items() if k not in fields}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)


def flat_parameters(params: list[Any]) -> list[torch.nn.Parameter]:
    """The parameters of what :meth:`Method.parameters` returns (a list, or parameter groups)."""
    return [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]


@dataclasses.dataclass(frozen=True)
class Memory:
    """What a method keeps of the data: at most ``rows`` stored samples, taking ``bytes`` beyond the model."""

    rows: int
    bytes: int

    def __add__(self, other: Memory) -> Memory:
        return Memory(self.rows + other.rows, self.bytes + other.bytes)

    def to_dict(self) -> dict[str, int]:
        return {"rows": self.rows, "bytes": self.bytes}

    @staticmethod
    def of(rows: int, scenario: Any, logits: bool = False) -> Memory:
        """``rows`` stored rows of ``scenario``, each :func:`row_bytes` long."""
        return Memory(int(rows), int(rows) * row_bytes(scenario, logits))


def public_name(field_name: str) -> str:
    return field_name.rstrip("_")


def row_bytes(scenario: Any, logits: bool = False) -> int:
    """Bytes of one stored row of ``scenario`` in a :class:`retain.buffers.Buffer`: the prepared input (float32),
    target, task id and key (int64 each), priority (float32), and the ``logits`` (float32 per output) when the
    method keeps them."""
    n_inputs = 1
    for d in scenario.input_shape:
        n_inputs *= int(d)
    return 4 * n_inputs + 3 * 8 + 4 + (4 * int(scenario.n_outputs) if logits else 0)


# --------------------------------------------------------------------------------------------------- Compose

def _owner(methods: tuple[Method, ...], hook: str) -> Method | None:
    owners = [m for m in methods if getattr(type(m), hook) is not getattr(Method, hook)]
    if len(owners) > 1:
        names = ", ".join(type(m).__name__ for m in owners)
        raise ConfigError(f"cannot compose {names}: more than one overrides {hook}()")
    return owners[0] if owners else None


class Compose(Method):
    """Several methods as one: events run in order, data hooks fold, penalties sum; at most one owner of
    ``forward`` and one of ``observe``.

    ``Compose(ER(), EWC())`` at run time, or a registered hybrid with its parts' hyper-parameters::

        @register("ewc_er")
        class EWCER(Compose):
            parts = (ER, EWC)
    """

    parts: ClassVar[tuple[type[Method], ...]] = ()

    def __init__(self, *methods: Method, **params: Any):
        if methods and params:
            raise TypeError("give Compose either method instances or hyper-parameters of its parts, not both")
        given = bool(methods)
        if not methods:
            methods = tuple(cls(**{_field_name(cls, k): v for k, v in params.items() if k in _field_names(cls)})
                            for cls in self.parts)
            unknown = set(params) - {k for cls in self.parts for k in _field_names(cls)}
            if unknown:
                raise TypeError(f"unknown parameters {sorted(unknown)}")
        self.methods = tuple(methods)
        if given and not self.parts:  # Compose(ER(), EWC()) is recorded as er+ewc, the name that builds it again
            self.name = "+".join(m.name for m in self.methods)
        self._forward = _owner(self.methods, "forward")
        self._observe = _owner(self.methods, "observe")

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.parts:
            seen: dict[str, str] = {}
            for part in cls.parts:
                for f in _field_names(part):
                    if f in seen:
                        raise TypeError(f"{cls.__name__}: {part.__name__} and {seen[f]} both define {f!r}")
                    seen[f] = part.__name__
            cls.modes = tuple(m for m in MODES if all(m in p.modes for p in cls.parts))
            cls.needs_boundaries = any(p.needs_boundaries for p in cls.parts)
            cls.freeze = next((p.freeze for p in cls.parts if p.freeze is not None), None)
            cls.reads_backbone = any(p.reads_backbone for p in cls.parts)

    @property
    def modes(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(m for m in MODES if all(m in x.modes for x in self.methods))

    @property
    def needs_boundaries(self) -> bool:  # type: ignore[override]
        return any(x.needs_boundaries for x in self.methods)

    @property
    def freeze(self) -> str | None:  # type: ignore[override]
        return next((x.freeze for x in self.methods if x.freeze is not None), None)

    @property
    def reads_backbone(self) -> bool:  # type: ignore[override]
        return any(x.reads_backbone for x in self.methods)

    def begin_task(self, ctx: Any) -> None:
        for m in self.methods:
            m.begin_task(ctx)

    def task_data(self, ctx: Any, data: TaskData) -> TaskData:
        for m in self.methods:
            data = m.task_data(ctx, data)
        return data

    def augment(self, ctx: Any, batch: Batch) -> Batch:
        for m in self.methods:
            batch = m.augment(ctx, batch)
        return batch

    def penalty(self, ctx: Any, batch: Batch, out: Tensor) -> Tensor | None:
        terms = [p for m in self.methods if (p := m.penalty(ctx, batch, out)) is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def before_update(self, ctx: Any) -> None:
        for m in self.methods:
            m.before_update(ctx)

    def after_update(self, ctx: Any, batch: Batch, out: Tensor) -> None:
        for m in self.methods:
            m.after_update(ctx, batch, out)

    def end_task(self, ctx: Any) -> None:
        for m in self.methods:
            m.end_task(ctx)

    def forward(self, ctx: Any, x: Tensor, t: Tensor) -> Tensor:
        return self._forward.forward(ctx, x, t) if self._forward else ctx.model(x)

    def observe(self, ctx: Any, batch: Batch) -> Tensor:
        return self._observe.observe(ctx, batch) if self._observe else super().observe(ctx, batch)

    def params(self) -> dict[str, Any]:
        return {k: v for m in self.methods for k, v in m.params().items()}

    def memory(self, scenario: Any) -> Memory:
        return sum((m.memory(scenario) for m in self.methods), Memory(0, 0))

    def parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter] | list[dict[str, Any]]:
        seen: set[int] = set()
        groups: list[dict[str, Any]] = []
        for m in self.methods:
            for g in m.parameters(model):
                g = g if isinstance(g, dict) else {"params": [g]}
                fresh = [p for p in g["params"] if id(p) not in seen]
                seen.update(id(p) for p in fresh)
                if fresh:
                    groups.append({**g, "params": fresh})
        if all(len(g) == 1 for g in groups):  # no part asked for options of its own: a plain list
            return [p for g in groups for p in g["params"]]
        return groups

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [m.state_dict() for m in self.methods]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m, s in zip(self.methods, state["parts"]):
            m.load_state_dict(s)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model as trained so far, in eval mode, with no gradients: a distillation teacher (LwF, iCaRL, BiC, WA,
    LUCIR, PODNet)."""
    old = copy.deepcopy(model).eval()
    for p in old.parameters():
        p.requires_grad_(False)
    return old


def own_step(method: Method) -> str | None:
    """The name of the method (or of a part of a hybrid) that overrides ``observe`` (its own training step), or
    None when every part uses the shared one (where mixed precision and data parallelism live)."""
    for m in getattr(method, "methods", [method]):
        if type(m).observe is not Method.observe:
            return m.name
    return None


# -------------------------------------------------------------------------------------------------- registry

REGISTRY: dict[str, type[Method]] = {"finetune": Method}


def register(name: str):
    """Class decorator: make a method available as ``retain run --method NAME``."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise TypeError(f"method name {name!r} is already registered to {REGISTRY[name].__name__}")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


_loaded = False
_loading = False  # a plugin module that calls methods() while it is being imported gets the list so far


def methods() -> dict[str, type[Method]]:
    """Every registered method: each module of :mod:`retain.methods` (imported once) and each installed plugin of
    the entry-point group ``retain.methods``. Hybrids ``a+b`` and ``module:Class`` names are not listed:
    :func:`method_class` builds or imports them on demand. A plugin that cannot be loaded is a
    :class:`ConfigError` naming it, not a shorter list."""
    global _loaded, _loading
    if not _loaded and not _loading:
        import retain.methods as pkg

        _loading = True
        try:
            for info in pkgutil.iter_modules(pkg.__path__):
                importlib.import_module(f"retain.methods.{info.name}")
            _load_plugins()
            _loaded = True
        finally:
            _loading = False
    return dict(sorted((k, v) for k, v in REGISTRY.items() if "+" not in k))


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _load_plugins() -> None:
    """Register each entry point of the group ``retain.methods`` under its name (``mine = "pkg.mod:Mine"``)."""
    built_in = {n for n, c in REGISTRY.items() if c.__module__.startswith("retain.")}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINTS):
        dist = getattr(ep.dist, "name", None) or "?"
        where = f"plugin {dist}: entry point {ep.name} = {ep.value!r} (group {ENTRY_POINTS})"
        if not re.fullmatch(r"[A-Za-z_][\w-]*", ep.name):
            raise ConfigError(f"{where}: the name must be letters, digits, _ or - (no + or :); rename it in the "
                              f"package's entry points")
        try:
            cls = ep.load()
        except Exception as e:  # noqa: BLE001 - any failure of the plugin's import is reported the same way
            raise ConfigError(f"{where} failed to load ({_one_line(e)}); fix or uninstall {dist}") from None
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ConfigError(f"{where} is a {type(cls).__name__}, not a subclass of retain.method.Method")
        if REGISTRY.get(ep.name, cls) is not cls:
            other = REGISTRY[ep.name]
            owner = "a built-in method" if ep.name in built_in else f"{other.__module__}:{other.__qualname__}"
            raise ConfigError(f"{where}: the name {ep.name!r} is already taken by {owner}; rename the entry point")
        register(ep.name)(cls)


def _import_method(spec: str) -> type[Method]:
    """The class ``spec`` (``module.path:ClassName``) names, imported; one-line errors for each way it fails. A
    module in the current directory is found too (the ``retain`` command does not put it on ``sys.path``)."""
    module_name, _, attr = spec.partition(":")
    ident = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"
    if not (re.fullmatch(ident, module_name) and re.fullmatch(ident, attr)):
        raise ConfigError(f"method {spec!r}: a method of your own is named module.path:ClassName, e.g. "
                          "mymethods:MyMethod")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or not (module_name + ".").startswith(e.name + ".") or os.getcwd() in sys.path:
                raise
            sys.path.append(os.getcwd())
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name + ".").startswith(e.name + "."):
            raise ConfigError(f"method {spec!r}: no module named {e.name!r}; put {e.name.replace('.', '/')}.py "
                              "in the current directory or on PYTHONPATH") from None
        raise ConfigError(f"method {spec!r}: importing {module_name} failed ({_one_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - a fault in the user's module, in one line (a misspelled hook too)
        raise ConfigError(f"method {spec!r}: importing {module_name} failed ({_one_line(e)})") from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            found = sorted(k for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, Method)
                           and v.__module__ == module.__name__)
            raise ConfigError(f"method {spec!r}: module {module_name} has no {attr}; the Method classes it "
                              f"defines: {', '.join(found) or 'none'}")
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise ConfigError(f"method {spec!r}: {attr} is a {type(obj).__name__}, not a subclass of "
                          "retain.method.Method")
    return obj


# Names that were registered once and are gone, with the hint the unknown-name error gives. ("oml" was the course
# chapter's MAML-style learner, renamed maml_replay; the name is now Javed & White's OML, retain/methods/oml.py.)
RENAMED: dict[str, str] = {}


def _part(name: str, registry: dict[str, type[Method]]) -> type[Method]:
    if ":" in name:
        return _import_method(name)
    if name in registry:
        return registry[name]
    hint = f" ({RENAMED[name]})" if name in RENAMED else ""  # e.g. "unknown method 'x' (renamed y)"
    raise ConfigError(f"unknown method {name!r}{hint}; choose one of {', '.join(registry)} (or join them with +, "
                      "e.g. ewc+er; or a class of your own as module:Class, e.g. mymethods:MyMethod)")


def method_class(name: str) -> type[Method]:
    """The method class ``name`` means; the one place method names are parsed. ``name`` is a registered name
    (built in, or a plugin's entry point), ``module.path:ClassName`` (imported; worker processes import it again
    from this name), or ``a+b`` of any of these, a hybrid built on demand: ``Compose`` of the parts in order,
    with every part's hyper-parameters (``ewc+er`` = EWC then ER; ``ewc+mymethods:MyMethod``)."""
    registry = methods()
    if name in registry:
        return registry[name]
    if name in REGISTRY:  # a hybrid built before
        return REGISTRY[name]
    parts = [p.strip() for p in str(name).split("+")]
    if len(parts) < 2:
        return _part(parts[0], registry)
    classes = tuple(_part(p, registry) for p in parts)
    try:
        hybrid = type(re.sub(r"\W", "_", name.upper()), (Compose,), {"parts": classes})
    except TypeError as e:
        raise ConfigError(f"cannot combine {name}: {e}") from None
    hybrid.__doc__ = f"{' + '.join(parts)} together (composed on the fly)."
    presets: dict[str, dict[str, Any]] = {}  # each part's tuned values for a benchmark/mode apply to the hybrid
    for cls in classes:
        for key, values in cls.presets.items():
            presets.setdefault(key, {}).update(values)
    hybrid.presets = presets
    return register(name)(hybrid)


def check_pairing(method: Method, mode: str, task_free: bool = False, all_outputs: bool = False) -> None:
    """Refuse a method in a mode it does not support, on a task-free stream when it needs boundaries, and
    ``all_outputs`` outside class-IL (it changes only the class-IL training mask; elsewhere it would be ignored)."""
    if mode not in method.modes:
        raise ConfigError(f"{method.name} does not support {mode}-IL; it supports "
                          f"{', '.join(method.modes)} (use --mode {method.modes[0]})")
    if task_free and method.needs_boundaries:
        raise ConfigError(f"{method.name} needs task boundaries and cannot run on a task-free stream; "
                          "drop --task-free or pick a method that works without boundaries")
    if all_outputs and mode != "class":
        raise ConfigError(f"all_outputs (--all-outputs) is for class-IL: in {mode}-IL the training outputs are "
                          f"fixed by the mode; drop it or use --mode class")


def _field_names(cls: type[Method]) -> list[str]:
    if issubclass(cls, Compose):
        return [f for p in cls.parts for f in _field_names(p)]
    return [public_name(f.name) for f in dataclasses.fields(cls)]


def hyperparameters(cls: type[Method]) -> list[tuple[str, type, Any, str]]:
    """``(public name, type, default, help)`` of each hyper-parameter of a method class."""
    if issubclass(cls, Compose):
        return [h for p in cls.parts for h in hyperparameters(p)]
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append((public_name(f.name), hints[f.name], default, f.metadata.get("help", "")))
    return out


def _coerce(method: str, name: str, typ: Any, value: Any, choices: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        typ = args[0]
    if typing.get_origin(typ) is typing.Literal:
        choices = typing.get_args(typ)
        typ = type(choices[0])
    try:
        if typ is bool:
            if isinstance(value, bool):
                out = value
            elif str(value).lower() in ("true", "1", "yes", "on"):
                out = True
            elif str(value).lower() in ("false", "0", "no", "off"):
                out = False
            else:
                raise ValueError
        elif typ is int:
            number = float(value) if isinstance(value, str) else value
            if isinstance(value, bool) or (isinstance(number, float) and not number.is_integer()):
                raise ValueError
            out = int(number)
        elif typ is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        elif typ is str:
            out = str(value)
        else:
            out = value
    except (TypeError, ValueError):
        tname = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{method}: parameter {name} must be {tname}, got {value!r}") from None
    if typ is float and not math.isfinite(out):
        raise ConfigError(f"{method}: parameter {name} must be a finite number, got {value!r}")
    if choices and out not in choices:
        raise ConfigError(f"{method}: parameter {name} must be one of {', '.join(map(str, choices))}, got {out!r}")
    return out


# Run options a preset may set beside the hyper-parameters: a protocol's per-method training values (P5's best
# arguments give DER lr 0.03 where ER trains at 0.1). Applied by retain.config.resolve over the benchmark's
# defaults and under the user's values.
PRESET_TRAINING = ("lr", "momentum", "batch_size", "optimizer")


def training_preset(cls: type[Method], preset: str) -> dict[str, Any]:
    """The run options (:data:`PRESET_TRAINING`) that ``cls``'s preset for ``"benchmark/mode"`` sets."""
    fields = {h[0] for h in hyperparameters(cls)}
    return {k: v for k, v in cls.presets.get(preset, {}).items() if k in PRESET_TRAINING and k not in fields}


def create(name: str, params: dict[str, Any] | None = None, preset: str | None = None) -> Method:
    """Instantiate method ``name`` (or a hybrid ``a+b``, see :func:`method_class`) with ``params`` (strings are
    converted to the field types).

    ``preset`` (``"benchmark/mode"``) applies the method's tuned values first; explicit ``params`` win.
    Unknown names, unknown parameters and wrong types raise :class:`ConfigError` listing the valid choices.
    """
    cls = method_class(name)
    spec = {h[0]: h for h in hyperparameters(cls)}
    values = {k: v for k, v in (cls.presets.get(preset, {}) if preset else {}).items()
              if k in spec or k not in PRESET_TRAINING}  # a preset's training options are resolve()'s
    values.update(params or {})
    kwargs = {}
    for key, value in values.items():
        if key not in spec:
            valid = ", ".join(spec) or "none"
            raise ConfigError(f"{name}: unknown parameter {key!r}; valid parameters: {valid}")
        _, typ, _, _ = spec[key]
        choices = _choices(cls, key)
        kwargs[_field_name(cls, key)] = _coerce(name, key, typ, value, choices)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: {e}") from None


def _choices(cls: type[Method], key: str) -> Any:
    classes = cls.parts if issubclass(cls, Compose) else (cls,)
    for c in classes:
        if issubclass(c, Compose):
            got = _choices(c, key)
            if got:
                return got
            continue
        for f in dataclasses.fields(c):
            if public_name(f.name) == key:
                return f.metadata.get("choices")
    return None


def _field_name(cls: type[Method], key: str) -> str:
    if issubclass(cls, Compose):
        return key  # Compose distributes by public name; parts translate below
    for f in dataclasses.fields(cls):
        if public_name(f.name) == key:
            return f.name
    return key
