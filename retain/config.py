"""The run-option schema: every option of a run declared once, and :func:`resolve`, the one place a run is checked.

Each field of :class:`RunConfig` is one option, declared with :func:`option` (default, help, check, flag, how it
enters the store's hash). From that single declaration come the ``retain run`` flags (:mod:`retain.cli.options`),
the keys of config files and their types, the types of sweep files (:mod:`retain.experiments`), the store's
configuration hash (:func:`hashed`) and the ``--dry-run`` print-out. Values arrive as strings (command line), as
TOML/YAML values (files) or as Python objects (the API) and are all turned into the option's type by
:func:`coerce`, with one error message per kind of mistake.

:func:`resolve` fills every unset option in one order — the benchmark's protocol defaults < the method's preset for
that benchmark and mode < the user's values (config file, then flags) — checks everything that can be checked
without the data, creates the method once, and returns a :class:`Run`. ``retain.run``, ``retain run``, compare /
orders / sweep / reproduce and the executors all execute a :class:`Run`; nothing downstream resolves or checks
again. A benchmark run and a run on the user's own scenario differ only in where the scenario comes from.

A config file for ``retain run`` (or ``compare`` / ``orders``) holds options by name, dashes or underscores alike,
with the method's hyper-parameters under ``params``::

    benchmark = "split-digits"
    method = "ewc"
    epochs = 3
    hidden = [100, 100]
    [params]
    lambda = 100
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retain.errors import ConfigError

MODES = ("task", "domain", "class")
# retain's own models (retain.models.build_model) and on-device augmentation pipelines (retain.augment.PIPELINES)
ARCHS = ("mlp", "convnet", "resnet18", "resnet18-reduced", "resnet32")
INITS = ("default", "xavier", "agem", "pycil")  # retain.models.initialise
LOGGERS = ("tensorboard", "mlflow", "wandb")  # retain.loggers
AUGMENTS = ("none", "crop-flip", "crop-flip-jitter", "rrc-flip", "rrc-flip-jitter")


# ------------------------------------------------------------------------------------------------ the schema

def option(default: Any, help: str, *, check: Callable[[Any], str | None] | None = None,  # noqa: A002
           choices: tuple[str, ...] | None = None, hash: str = "always", group: str = "training",  # noqa: A002
           metavar: str | None = None, neutral: tuple[Any, ...] = (), aliases: tuple[str, ...] = ()) -> Any:
    """Declare a run option: a dataclass field whose metadata the CLI, files, sweeps and the store read.

    ``check(value)`` returns what is wrong with a (coerced, non-None) value as a phrase, or None. ``hash``:
    ``always``; ``unless-default`` (options added after stores were written: left out of the hash at their
    default, or at a ``neutral`` value that means the same run, so earlier runs keep their hashes); ``never``
    (where the data is or how fast it runs, not what the run is). ``aliases``: more command-line flags.
    """
    meta = {"help": help, "check": check, "choices": choices, "hash": hash, "group": group, "metavar": metavar,
            "neutral": neutral, "aliases": aliases}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be at least {low}, got {v}"


def _positive(v: float) -> str | None:
    return None if v > 0 and math.isfinite(v) else f"must be a positive number, got {v}"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 and math.isfinite(v) else f"must be a finite number >= 0, got {v}"


def _unit_interval(v: float) -> str | None:
    return None if 0.0 <= v < 1.0 else f"must be in [0, 1), got {v}"


def _seed(v: int) -> str | None:
    return None if 0 <= v < 2**32 else f"must be in 0..{2**32 - 1}, got {v}"


def _hidden(v: tuple[int, ...]) -> str | None:
    return None if v and all(s >= 1 for s in v) else f"must be positive layer sizes like 400,400, got {list(v)}"


def _normalize(v: tuple[float, float]) -> str | None:
    ok = len(v) == 2 and all(math.isfinite(x) for x in v) and v[1] > 0
    return None if ok else f"must be two numbers MEAN,STD with STD > 0, got {list(v)}"


@dataclass
class RunConfig:
    """Everything that defines a run. ``None`` means "the benchmark's default" (filled in by :func:`resolve`)."""

    benchmark: str = option("split-digits", "see `retain benchmarks` (default split-digits)", group="run")
    method: str = option("finetune", "see `retain methods`; join methods with + for a hybrid, e.g. ewc+er; or a "
                         "class of your own as module:Class (default finetune)", group="run")
    mode: str | None = option(None, "task, domain or class (default: the benchmark's)", choices=MODES, group="run")
    params: dict[str, Any] = option({}, "method hyper-parameter NAME=VALUE (repeatable), e.g. --param lambda=100; "
                                    "over the method's preset", group="run", metavar="NAME=VALUE")
    seed: int = option(0, "random seed (default 0)", check=_seed, group="run")
    n_tasks: int | None = option(None, "number of tasks (default: the benchmark's)", check=_at_least(1))
    arch: str | None = option(None, "model: " + ", ".join(ARCHS) + ", or timm:NAME[,key=value...] for a pre-trained "
                              "backbone (default: the benchmark's; see docs/vision.md, docs/pretrained.md)",
                              choices=ARCHS, aliases=("--model",), metavar="NAME")
    weights: str | None = option(None, "pre-trained weights for --model: a .safetensors, .pth or .npz file (default "
                                 "for timm:NAME: timm's local cache; never downloaded without --download)",
                                 hash="unless-default", metavar="PATH")
    freeze: str = option("auto", "freeze the pre-trained backbone: all, none, N (its first N blocks) or "
                         "parameter-name prefixes a,b; auto (the default): what the method requires, else none",
                         check=lambda v: None if v.strip() else "must be auto, all, none, N or name prefixes",
                         hash="unless-default", neutral=("auto",), metavar="WHAT")
    feature_cache: str = option("auto", "auto: a frozen backbone's features are computed once and cached (when the "
                                "method reads only features and nothing augments the inputs); off: through the "
                                "backbone at every step", choices=("auto", "off"), hash="never",
                                metavar="auto|off")
    hidden: tuple[int, ...] | None = option(None, "MLP hidden sizes, e.g. 400,400", check=_hidden, metavar="SIZES")
    init: str = option("default", "weight initialisation: default (PyTorch's), xavier (Mammoth's: Glorot-uniform "
                       "weights and zero biases in every linear layer), agem (the A-GEM authors': truncated normal, "
                       "std 0.1, biases 0.1), pycil (PyCIL's output layer: Kaiming-uniform with the linear gain, zero "
                       "bias; the rest PyTorch's)", choices=INITS, hash="unless-default", neutral=("default",))
    epochs: int | None = option(None, "passes over each task's data", check=_at_least(1))
    iterations: int | None = option(None, "steps per task (instead of --epochs)", check=_at_least(1))
    batch_size: int | None = option(None, "training batch size", check=_at_least(1))
    optimizer: str | None = option(None, "adam or sgd (default: the benchmark's)", choices=("adam", "sgd"))
    lr: float | None = option(None, "learning rate (default: the benchmark's)", check=_positive)
    momentum: float | None = option(None, "SGD momentum (default 0)", check=_non_negative)
    reset_optimizer: bool = option(False, "a fresh optimizer at each task (default: its state carries over, as in "
                                   "the reference code of the P1/P2 papers)")
    all_outputs: bool | None = option(None, "class-IL: the training loss spans every output from the first task, "
                                      "as Mammoth's code (the DER protocol) does (default: the benchmark's; else "
                                      "the classes seen so far)", hash="unless-default", neutral=(False,))
    normalize: tuple[float, float] | None = option(
        None, "inputs (x - MEAN) / STD on [0, 1] pixels, e.g. 0.1,0.2752 as Hsu et al.'s MNIST loader (default: the "
        "dataset's own)", check=_normalize, metavar="MEAN,STD")
    pad: int | None = option(None, "zero pixels added on each side of every image before the tasks' transforms "
                             "(default: the benchmark's; permuted-mnist pads to 32x32 as van de Ven's loader)",
                             check=lambda v: None if v >= 0 else f"must be a whole number of pixels >= 0, got {v}",
                             metavar="PIXELS")
    augment: str | None = option(
        None, "training augmentation on the device: " + ", ".join(AUGMENTS) + " (default: the benchmark's "
        "protocol, none for the MNIST family; evaluation is never augmented)", choices=AUGMENTS,
        hash="unless-default", neutral=("none",), metavar="PIPELINE")
    precision: str = option("fp32", "fp32, bf16, or fp16 (with a gradient scaler): autocast of forward and loss",
                            choices=("fp32", "bf16", "fp16"), hash="unless-default")
    channels_last: bool = option(False, "images in channels-last memory layout (faster convolutions on GPUs)",
                                 hash="never")
    compile: bool = option(False, "torch.compile the model (first steps slower while it compiles)", hash="never")
    eval_every: int | None = option(None, "anytime evaluation: every task's test set after each further N training "
                                    "samples, kept as the record's anytime curve (AAA, A_AUC, stability gap; "
                                    "default: at task ends only)", check=_at_least(1), hash="unless-default",
                                    metavar="N")
    count_flops: bool = option(False, "count the training's floating-point operations (torch's FLOP counter, each "
                               "step and each task boundary; the record's compute). Several times slower: time such "
                               "runs separately", hash="unless-default", neutral=(False,))
    eval_batch_size: int = option(1000, "rows per evaluation batch (default 1000)", check=_at_least(1),
                                  hash="never", metavar="N")
    devices: int = option(1, "data-parallel processes on torch.distributed (gloo on the CPU, NCCL on CUDA); the "
                          "global batch stays --batch-size (default 1; torchrun's WORLD_SIZE when launched by it)",
                          check=_at_least(1), hash="never", metavar="N")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda[:N]")
    threads: int | None = option(None, "torch CPU threads for the run (default: 2 when two cores are free, else 1; "
                                 "see docs/benchmarks.md)", check=_at_least(1), hash="never", metavar="N")
    val_fraction: float = option(0.0, "hold out this share of each task's training data as a validation split",
                                 check=_unit_interval)
    task_free: bool = option(False, "one stream of batches, no task boundaries (one pass over the data)")
    online: bool = option(False, "single-pass online learning: one pass in small batches (default 10); the task "
                          "boundaries are hidden (a task-free stream) unless the method needs them",
                          hash="unless-default", neutral=(False,))
    blurry: float = option(0.0, "task-free: blur width of task transitions in [0, 1)", check=_unit_interval)
    si_blurry: list[int] | None = option(
        None, "Si-Blurry (Moon et al. 2023): N percent of the classes disjoint, M percent of the blurry classes' "
        "rows moved to "
        "other tasks, tasks of random sizes, drawn from the seed (class-IL split benchmarks), e.g. 50,10",
        check=lambda v: None if len(v) == 2 and all(0 <= x <= 100 for x in v) else
        f"must be two percentages N,M in 0..100, e.g. 50,10, got {list(v)}", hash="unless-default", metavar="N,M")
    task_order: list[int] | None = option(None, "permutation of the tasks, e.g. 4,3,2,1,0", metavar="ORDER")
    class_order: list[int] | None = option(None, "order of the classes before they are cut into tasks",
                                           metavar="ORDER")
    train_per_class: int | None = option(None, "use only the first N training images of each class (file order): "
                                         "a reduced protocol, labelled so in the record", check=_at_least(1),
                                         hash="unless-default", metavar="N")
    test_per_class: int | None = option(None, "evaluate on the first N test images of each class only",
                                        check=_at_least(1), hash="unless-default", metavar="N")
    log: list[str] = option([], "write the run to tensorboard, mlflow or wandb, locally (repeatable, or "
                            "comma-separated; each an optional extra: pip install 'retain[NAME]')",
                            choices=LOGGERS, hash="never", group="run", metavar="NAME")
    log_dir: str | None = option(None, "folder for the loggers' files (default ./retain-logs)", hash="never",
                                 group="run", metavar="DIR")
    data_dir: str | None = option(None, "folder with the dataset files (else $RETAIN_DATA, ~/.cache/retain, ...)",
                                  hash="never", group="data", metavar="DIR")
    download: bool = option(False, "fetch missing data from the canonical mirrors (and a timm:NAME model's weights "
                            "from the Hugging Face hub)", hash="never", group="data")

    def resolved(self) -> RunConfig:
        """A copy with every default filled in and everything checked (see :func:`resolve`)."""
        return resolve(self).config

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready values (what the record, the store and ``--dry-run`` show)."""
        d = {}
        for o in OPTIONS.values():
            v = getattr(self, o.name)
            d[o.name] = list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, dict) else v)
        return d


@dataclass(frozen=True)
class Option:
    """One run option as the schema sees it (built from a :class:`RunConfig` field)."""

    name: str
    kind: str  # str | int | float | bool | ints | strs | floats2 | params
    optional: bool
    default: Any
    help: str
    check: Callable[[Any], str | None] | None
    choices: tuple[str, ...] | None
    hash: str
    group: str
    metavar: str | None
    neutral: tuple[Any, ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def label(self) -> str:
        """How errors name the option: ``lr (--lr)``."""
        return f"{self.name} ({self.flag})"


def _kind(annotation: Any) -> tuple[str, bool]:
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if args and optional else annotation
    if base in (str, int, float, bool):
        return base.__name__, optional
    origin, inner = typing.get_origin(base), typing.get_args(base)
    if origin is dict:
        return "params", optional
    if origin in (list, tuple) and inner and inner[0] is int:
        return "ints", optional
    if origin is list and inner == (str,):
        return "strs", optional
    if origin is tuple and inner == (float, float):
        return "floats2", optional
    raise TypeError(f"run option type {annotation} is not supported by the schema")  # pragma: no cover


def _schema() -> dict[str, Option]:
    hints = typing.get_type_hints(RunConfig)
    out = {}
    for f in dataclasses.fields(RunConfig):
        kind, optional = _kind(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        m = f.metadata
        out[f.name] = Option(f.name, kind, optional, default, m["help"], m["check"], m["choices"], m["hash"],
                             m["group"], m["metavar"], m["neutral"], m["aliases"])
    return out


OPTIONS: dict[str, Option] = _schema()


# -------------------------------------------------------------------------------------------------- values

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def coerce(name: str, value: Any, where: str = "") -> Any:
    """``value`` (a string from the command line, a TOML/YAML value, or a Python object) as option ``name``'s
    type, checked; a :class:`ConfigError` naming the option and the fix otherwise."""
    o = OPTIONS[name]
    prefix = f"{where}: " if where else ""
    if value is None or (o.optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if o.optional or o.kind == "params":
            return {} if o.kind == "params" else None
        raise ConfigError(f"{prefix}{o.label()} needs a value, got none")

    def bad(expect: str) -> ConfigError:
        return ConfigError(f"{prefix}{o.label()} expects {expect}, got {value!r}")

    k = o.kind
    if k == "params":
        if not isinstance(value, dict):
            raise ConfigError(f"{prefix}params must be a mapping of hyper-parameter names to values, got {value!r}")
        out: Any = {str(key): v for key, v in value.items()}
    elif k == "bool":
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            out = value.strip().lower() in _TRUE
        else:
            raise bad("true or false")
    elif k == "int":
        out = _number(value, int)
        if out is None:
            raise bad("a whole number")
    elif k == "float":
        out = _number(value, float)
        if out is None or not math.isfinite(out):
            raise bad("a finite number")
    elif k == "str":
        if isinstance(value, os.PathLike):  # data_dir=Path(...) from the API
            value = os.fspath(value)
        if not isinstance(value, str):
            raise bad("a string")
        out = value.strip()
    elif k == "ints":
        parts = _parts(value)
        nums = [_number(p, int) for p in parts] if parts is not None else None
        if not nums or any(n is None for n in nums):
            raise bad("comma-separated positive integers like 400,400" if name == "hidden" else
                      "comma-separated whole numbers like 0,1,2")
        out = tuple(nums) if name == "hidden" else list(nums)
    elif k == "strs":  # repeatable flags (a list of strings), or one comma-separated string
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, str) for v in items):
            raise bad("names like tensorboard,mlflow")
        out = list(dict.fromkeys(p.strip() for v in items for p in v.split(",") if p.strip()))
        for v in out:
            if o.choices and v not in o.choices:
                raise ConfigError(f"{prefix}unknown {name} {v!r}; choose one of {', '.join(o.choices)}")
    else:  # floats2
        parts = _parts(value)
        nums = [_number(p, float) for p in parts] if parts is not None else None
        if not nums or len(nums) != 2 or any(n is None for n in nums):
            raise bad("two comma-separated numbers like 0.1,0.2752")
        out = (float(nums[0]), float(nums[1]))
    own = name == "arch" and str(out).startswith(("custom:", "timm:"))
    if o.choices and k != "strs" and out not in o.choices and not own:
        # ("custom:Class" is what a run with the user's own model records as its arch)
        raise ConfigError(f"{prefix}unknown {name} {out!r}; choose one of {', '.join(o.choices)}")
    problem = o.check(out) if o.check else None
    if problem:
        raise ConfigError(f"{prefix}{name} {problem}" + (f" ({o.flag})" if not where else ""))
    return out


def _number(value: Any, typ: type) -> Any:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip()) if typ is float or not value.strip().lstrip("+-").isdigit() \
                else int(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)):
        if typ is int:
            return int(value) if float(value).is_integer() else None
        return float(value)
    return None


def _parts(value: Any) -> list[Any] | None:
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return None


def from_mapping(values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Run options from a mapping (a config file, keyword arguments): keys by name, dashes or underscores alike,
    each value coerced; ``params`` (or ``param``) holds the method's hyper-parameters. Unknown keys are an error
    listing the valid ones."""
    return {key: coerce(key, value, where) for key, value in _by_option(values, where).items()}


def _by_option(values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``values`` keyed by option name (dashes or underscores alike, ``param`` for ``params``), not yet coerced;
    an unknown key is an error listing the valid ones."""
    out: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key == "param":
            key = "params"
        if key not in OPTIONS:
            raise ConfigError(f"{where + ': ' if where else ''}unknown option {raw_key!r}; valid options: "
                              f"{', '.join(OPTIONS)}")
        out[key] = value
    return out


def hashed(spec: dict[str, Any]) -> dict[str, Any]:
    """The part of a run's spec that its store hash covers (see :func:`option`'s ``hash``); keys the schema does
    not know (a job's ``alone``) are kept."""
    out = {}
    for k, v in spec.items():
        o = OPTIONS.get(k)
        if o is not None and (o.hash == "never" or (o.hash == "unless-default" and (v == o.default
                                                                                 or v in o.neutral))):
            continue
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------- config files

def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML (``.yaml`` / ``.yml``) file whose top level is a mapping."""
    if not str(path) or "\0" in str(path):
        raise ConfigError(f"config file {str(path)!r} is not a usable file name")
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give a .toml or .yaml file")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read ({e}); check its permissions and encoding") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        data = _toml(text, path)
    elif suffix in (".yaml", ".yml"):
        data = _yaml(text, path)
    else:
        raise ConfigError(f"config file {path}: unknown type {suffix or '(no suffix)'!r}; name it .toml or .yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of option names to values")
    return data


def _toml(text: str, path: Path) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("reading TOML on Python 3.10 needs tomli: pip install tomli") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def _yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError("reading YAML needs PyYAML: pip install pyyaml (or use a .toml file)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None


# ------------------------------------------------------------------------------------------------- resolving

# Classes per dataset, to refuse an impossible split before loading the data (the split checks again).
DATASET_CLASSES = {"mnist": 10, "fashion-mnist": 10, "kmnist": 10, "cifar10": 10, "cifar100": 100, "digits": 10,
                   "tinyimagenet": 200, "imagenet-r": 200, "cub200": 200, "core50": 50}
_TRAINING_DEFAULTS = {"arch": "mlp", "hidden": (400, 400), "batch_size": 128, "optimizer": "adam", "lr": 1e-3,
                      "momentum": 0.0, "pad": 0}


def default_threads() -> int:
    """Torch CPU threads for a run when ``threads`` is not given: 2 when two cores are free, else 1.

    Measured on 2 cores (docs/benchmarks.md, "Threads"): on an idle machine 2 threads train 1.7 x faster than 1,
    but beside one busy process they are over 4 x slower (the threads wait for each other at every operation);
    more than 2 rarely helps the small models here. "Free" counts the processes running right now. An
    ``OMP_NUM_THREADS`` in the environment (the usual way to ask for a thread count) is taken as it is."""
    asked = os.environ.get("OMP_NUM_THREADS", "")
    if asked.isdigit() and int(asked) >= 1:
        return int(asked)
    cores = os.cpu_count() or 1
    return 2 if cores - _others_running() >= 2 else 1


def _others_running() -> int:
    """Other threads on the CPUs now: Linux's count of runnable tasks (the median of five looks 10 ms apart, less
    this one), else the one-minute load average, else 0."""
    import time

    try:
        looks = []
        for _ in range(5):
            with open("/proc/loadavg") as f:
                looks.append(int(f.read().split()[3].split("/")[0]) - 1)
            time.sleep(0.01)
        return sorted(looks)[2]
    except (OSError, ValueError, IndexError):
        pass
    try:
        return round(os.getloadavg()[0])
    except (OSError, AttributeError):
        return 0


@dataclass
class Run:
    """A resolved run: every option filled in and checked, the method created. What every path executes.

    ``scenario`` / ``model``: the user's own (``retain.run(scenario=..., model=...)``); ``None`` for a benchmark
    run, whose scenario :meth:`build_scenario` makes from the data and whose model :meth:`build_model` makes.
    """

    config: RunConfig
    method: Any  # retain.method.Method
    scenario: Any = None  # retain.scenarios.Scenario | None
    model: Any = None  # torch.nn.Module | None

    def spec(self) -> dict[str, Any]:
        """The resolved configuration as JSON values, with the method's actual hyper-parameters."""
        d = self.config.to_dict()
        d["params"] = dict(self.method.params())
        return d

    @property
    def threads(self) -> int:
        """The torch CPU threads this run trains with: the ``threads`` option, else :func:`default_threads`."""
        return self.config.threads or default_threads()

    def build_scenario(self) -> Any:
        if self.scenario is not None:
            sc = self.scenario
        else:
            from retain import benchmarks

            c = self.config
            sc = benchmarks.scenario(c.benchmark, c.mode, c.n_tasks, c.seed, c.data_dir, c.download, c.val_fraction,
                                     c.class_order, c.task_order, pad=c.pad)
        if self.config.normalize is not None:
            sc.mean, sc.std = (self.config.normalize[0],), (self.config.normalize[1],)
        if self.config.train_per_class or self.config.test_per_class:
            from retain.scenarios import per_class

            sc = per_class(sc, self.config.train_per_class, self.config.test_per_class)
        if self.config.si_blurry is not None:
            from retain.scenarios import si_blurry

            sc = si_blurry(sc, *self.config.si_blurry, seed=self.config.seed)
        return sc

    def build_model(self, scenario: Any) -> Any:
        """The user's model, or the configured one, created after seeding torch with the run's seed."""
        import torch

        from retain.models import build_model, initialise

        torch.manual_seed(self.config.seed)
        c = self.config
        if self.model is None and (c.weights is not None or (c.arch or "").startswith("timm:")):
            from retain import backbones

            model, info = backbones.build(c.arch, c.weights, c.download, scenario.input_shape, scenario.n_outputs,
                                          c.hidden)
            initialise(model.head, c.init)
            model.pretrained = info  # the record's model.weights (retain.api)
            return model
        model = self.model if self.model is not None else build_model(c.arch, scenario.input_shape,
                                                                      scenario.n_outputs, c.hidden)
        return initialise(model, c.init)

    def train_config(self) -> Any:
        from retain.trainer import TrainConfig

        c = self.config
        return TrainConfig(epochs=c.epochs, iterations=c.iterations, batch_size=c.batch_size, optimizer=c.optimizer,
                           lr=c.lr, momentum=c.momentum, seed=c.seed, reset_optimizer=c.reset_optimizer,
                           all_outputs=c.all_outputs, device=c.device, task_free=c.task_free, blurry=c.blurry,
                           evaluate_val=c.val_fraction > 0, augment=c.augment or "none", precision=c.precision,
                           channels_last=c.channels_last, compile=c.compile, eval_batch_size=c.eval_batch_size,
                           devices=c.devices, eval_every=c.eval_every, count_flops=c.count_flops)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Run:
        """The run a resolved spec describes (an executor's job): values taken as they are, not resolved again."""
        from retain.method import create

        fields = {k: v for k, v in spec.items() if k in OPTIONS}
        if fields.get("hidden") is not None:
            fields["hidden"] = tuple(fields["hidden"])
        if fields.get("normalize") is not None:
            fields["normalize"] = tuple(fields["normalize"])
        config = RunConfig(**fields)
        return cls(config, create(config.method, config.params))


def resolve(config: RunConfig | dict[str, Any] | None = None, *, scenario: Any = None, model: Any = None,
            method: Any = None, **values: Any) -> Run:
    """Fill, check and freeze a run. ``config`` (a :class:`RunConfig` or a mapping of options) with ``values``
    over it; ``method`` a name or an instance (its own hyper-parameters are recorded); ``scenario`` / ``model``
    the user's own. Every problem is a :class:`ConfigError` raised here, before any data is loaded."""
    from retain.method import Method, check_pairing, create

    if isinstance(config, dict):
        config = RunConfig(**_by_option(config, "config"))
    config = dataclasses.replace(config or RunConfig(), **_by_option(values))
    for o in OPTIONS.values():  # values from flags, files, the API or a hand-built RunConfig: one coercion
        setattr(config, o.name, coerce(o.name, getattr(config, o.name)))
    c = config
    if c.data_dir:
        c.data_dir = os.path.expanduser(c.data_dir)  # the API gets no shell: "~/data/mnist" means the home folder
    if isinstance(method, str):
        c.method, method = method, None
    if method is not None and not isinstance(method, Method):
        raise ConfigError(f"method must be a registered name or a retain Method instance, got {type(method).__name__}")
    if c.iterations is not None and c.epochs not in (None, 1):  # 1: what resolving fills in beside iterations
        raise ConfigError("give --epochs or --iterations, not both")
    _check_effect(c)
    if scenario is None:
        from retain import benchmarks

        b = benchmarks.get(c.benchmark)
        defaults, dataset, kind = b.defaults, b.dataset, b.kind
        c.mode = c.mode or b.mode
        c.n_tasks = b.n_tasks if c.n_tasks is None else c.n_tasks
    else:
        if c.pad:
            raise ConfigError(f"pad={c.pad} applies to the named benchmarks; pad your own images before building "
                              "the scenario (retain.data.pad)")
        defaults, dataset, kind = {}, None, None
        c.benchmark, c.mode, c.n_tasks = scenario.name, scenario.mode, scenario.n_tasks
    if model is not None and (c.hidden is not None or (c.arch is not None and not c.arch.startswith("custom:"))):
        raise ConfigError("--arch / --hidden build retain's own model, but a model was given: drop them")
    if model is not None and c.weights is not None:
        raise ConfigError("--weights loads into retain's own or a timm model, but a model was given: load your "
                          "weights into it yourself, or drop the model")
    if model is not None:
        c.arch = f"custom:{type(model).__name__}"
    if scenario is None:  # a protocol's per-method training values (the preset's lr...), under the user's
        from retain.method import method_class, training_preset

        cls = type(method) if method is not None else method_class(c.method)
        for k, v in training_preset(cls, f"{c.benchmark}/{c.mode}").items():
            if getattr(c, k) is None:
                setattr(c, k, coerce(k, v))
    if c.online:  # one pass in small batches (Aljundi et al. 2019, Mai et al. 2022: 10), whatever the benchmark's
        c.epochs, c.iterations = 1, None
        c.batch_size = 10 if c.batch_size is None else c.batch_size
    _fill_training(c, defaults)
    if method is None:
        method = create(c.method, c.params, preset=f"{c.benchmark}/{c.mode}")
    else:
        c.method = method.name
    c.params = dict(method.params())
    if c.online and not c.task_free:  # boundaries hidden unless the method needs them
        if method.needs_boundaries and c.blurry:
            raise ConfigError(f"--online --blurry: {method.name} needs task boundaries, which a blurred stream does "
                              "not have; drop --blurry or pick a method that works without boundaries")
        c.task_free = not method.needs_boundaries
    if c.si_blurry is not None and c.mode != "class":
        raise ConfigError(f"--si-blurry is a class-incremental stream; use --mode class (not {c.mode})")
    check_pairing(method, c.mode, c.task_free, c.all_outputs)
    _check_step(method, c)
    _check_pretrained(method, c, model)
    if c.log:
        from retain.loggers import check_available

        check_available(c.log)
    if c.count_flops and (c.devices > 1 or os.environ.get("WORLD_SIZE")):
        raise ConfigError("--count-flops counts one process's operations; drop --devices (the FLOPs of a step do not "
                          "depend on how many processes share it)")
    if c.devices > 1 or os.environ.get("WORLD_SIZE"):
        from retain import distributed

        distributed.check_data_parallel(method, distributed.world_size(c.devices))
    _check_shape(c, dataset, kind)
    from retain.trainer import resolve_device

    resolve_device(c.device)
    return Run(c, method, scenario, model)


def _check_pretrained(method: Any, c: RunConfig, model: Any) -> None:
    """The pre-trained backbone's options: the model spelled right, weights found, a freeze the method allows."""
    from retain import backbones

    if backbones.is_timm(c.arch):
        spec = backbones.parse_spec(c.arch)
        if backbones.vit_config(spec) is None and backbones.timm_version() is None:  # (a malformed name fails here)
            raise ConfigError(f"--model {c.arch}: retain builds {', '.join(backbones.TIMM_VITS)} itself; other timm "
                              "models need timm: pip install 'retain[timm]'")
    if backbones.is_timm(c.arch) or c.weights is not None:  # (--hidden with a timm model: _fill_training refuses it)
        backbones.locate_weights(c.arch, c.weights, c.download, fetch=False)
        if c.normalize is not None:
            raise ConfigError("--normalize: a pre-trained backbone normalises its inputs as its weights were trained "
                              "(the record's model.weights.preprocess); drop --normalize")
    elif c.freeze not in ("auto", "none"):
        raise ConfigError(f"--freeze {c.freeze} freezes a pre-trained backbone: add --weights PATH (or --model "
                          "timm:NAME), or drop --freeze")
    need = getattr(method, "freeze", None)
    if need is not None and c.freeze not in ("auto", need):
        raise ConfigError(f"{method.name} needs --freeze {need} (it never trains the backbone), got --freeze "
                          f"{c.freeze}: drop --freeze")
    if need is not None and not (backbones.is_timm(c.arch) or c.weights is not None or model is not None):
        raise ConfigError(f"{method.name} learns on a pre-trained backbone: add --model timm:NAME --weights PATH "
                          "(or --weights PATH for retain's own model); see docs/pretrained.md")


def _check_step(method: Any, c: RunConfig) -> None:
    """Mixed precision lives in the shared step (``Method.observe``): a method that writes its own step (MER's
    per-sample updates, the meta-learner's inner loop) would silently train in fp32."""
    from retain.method import own_step

    if c.precision != "fp32" and (name := own_step(method)):
        raise ConfigError(f"--precision {c.precision}: {name} takes its own training step, which does not use mixed "
                          "precision; use --precision fp32")


def _check_effect(c: RunConfig) -> None:
    """Refuse an option the user set that would have no effect in this run (it would be silently ignored)."""
    if c.blurry and not (c.task_free or c.online):
        raise ConfigError("--blurry blurs the task boundaries of a task-free stream; add --task-free or drop it")
    if c.online and (c.iterations is not None or c.epochs not in (None, 1)):
        raise ConfigError("--online makes a single pass over the stream: drop --epochs / --iterations")
    if c.task_free and c.iterations is not None:
        raise ConfigError("a task-free stream has no per-task step budget: --iterations does not apply; use --epochs "
                          "N for N passes over each task's data as it streams by, or drop --task-free")


def _fill_training(c: RunConfig, d: dict[str, Any]) -> None:
    """Fill ``c``'s unset model and training options from ``d`` (a benchmark's protocol defaults, or none).
    A task-free stream takes ``epochs`` passes (1 unless given), never the benchmark's per-task budget; only an
    MLP has hidden sizes."""
    if c.task_free:
        c.epochs, c.iterations = c.epochs or 1, None
    elif c.epochs is None and c.iterations is None:
        c.epochs, c.iterations = d.get("epochs", 1), d.get("iterations")
    elif c.epochs is None:
        c.epochs = 1
    if c.arch is None:
        c.arch = coerce("arch", d.get("arch", "mlp"))
    if c.augment is None and d.get("augment"):
        c.augment = coerce("augment", d["augment"])
    if c.all_outputs is None:  # a protocol's class-IL loss (P5: Mammoth's); no effect in the other modes
        c.all_outputs = bool(d.get("all_outputs", False)) and c.mode == "class"
    if c.arch != "mlp" and c.hidden is not None and not c.arch.startswith("custom:"):
        raise ConfigError(f"--hidden sets an MLP's layers; --arch {c.arch} has none: drop --hidden")
    for k, default in _TRAINING_DEFAULTS.items():
        if getattr(c, k) is None and (k != "hidden" or c.arch == "mlp"):
            setattr(c, k, coerce(k, d.get(k, default)))
    if c.momentum and c.optimizer != "sgd":
        raise ConfigError(f"--momentum is SGD's; with --optimizer {c.optimizer} it would be ignored: add "
                          "--optimizer sgd or drop it")


def _check_shape(c: RunConfig, dataset: str | None, kind: str | None) -> None:
    """The scenario-shape checks that need no data: class and task orders against the number of tasks."""
    n_classes = DATASET_CLASSES.get(dataset or "")
    if kind == "split" and n_classes is not None:
        order = c.class_order if c.class_order is not None else list(range(n_classes))
        if len(set(order)) != len(order) or any(not 0 <= k < n_classes for k in order):
            raise ConfigError(f"class_order must list distinct classes in 0..{n_classes - 1}, got {order}")
        if c.n_tasks > len(order):
            raise ConfigError(f"{c.n_tasks} tasks but only {len(order)} classes; use --n-tasks {len(order)} "
                              "or fewer")
    elif kind == "sessions" and c.mode != "domain":  # refused before the data loads (the builder says it too)
        raise ConfigError(f"{c.benchmark} is domain-incremental (the same objects in every session); use --mode "
                          f"domain, or core50-nc for new classes, not --mode {c.mode}")
    elif c.class_order is not None and kind is not None and kind != "split":
        raise ConfigError(f"--class-order is for split benchmarks; {c.benchmark} is {kind}")
    if c.si_blurry is not None and kind is not None and kind != "split":
        raise ConfigError(f"--si-blurry re-deals the classes of a split benchmark; {c.benchmark} is {kind}")
    if c.task_order is not None and sorted(c.task_order) != list(range(c.n_tasks)):
        raise ConfigError(f"task_order must be a permutation of 0..{c.n_tasks - 1}, got {list(c.task_order)}")
