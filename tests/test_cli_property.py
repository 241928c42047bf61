"""Property tests (issue 6): random command lines and config files thrown at the parser.

Every outcome of ``retain run ... --dry-run`` is either a valid run configuration (exit 0, the resolved
configuration as JSON) or a clean refusal (exit 2, one line on stderr) — never a traceback, never exit 1. Nothing
is trained: ``--dry-run`` stops before the data, and training is replaced by a tripwire as well. Random sweep
files go through the sweep parser the same way: a list of resolved jobs, or a ConfigError.
"""

from __future__ import annotations

import contextlib
import io
import json
import string

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from retain import api, trainer
from retain.benchmarks import BENCHMARKS
from retain.cli import build_parser, main
from retain.method import hyperparameters, methods
from retain.scenarios import MODES

RUN = build_parser()._subparsers._group_actions[0].choices["run"]  # the `retain run` parser
FLAGS = sorted({s for a in RUN._actions for s in a.option_strings if s.startswith("--")}
               - {"--help", "--debug", "--dry-run"})  # --debug would rightly print tracebacks
KEYS = sorted(a.dest for a in RUN._actions if a.option_strings and a.dest not in ("help", "debug", "dry_run"))
NAMES = sorted(methods())
PARAMS = sorted({h[0] for cls in methods().values() for h in hyperparameters(cls)})
REAL = ["er", "ewc", "finetune", "pnn", "agem", "split-digits", "split-mnist", "permuted-mnist", *MODES, "cpu",
        "auto", "1", "2", "3", "0", "-1", "0.5", "1e-3", "100,100", "0,1", "1,0", "4,3,2,1,0", "adam", "sgd", "mlp"]

garbage = st.text(alphabet=string.printable + "é→\x00", max_size=10)
number = st.one_of(st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str))
value = st.one_of(st.sampled_from(REAL + NAMES + list(BENCHMARKS)), number, garbage)
param = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(PARAMS) | garbage, value)
pair = st.one_of(st.tuples(st.sampled_from(FLAGS), value).map(list),
                 st.tuples(st.just("--param"), param).map(list),
                 st.sampled_from(FLAGS).map(lambda f: [f]),
                 garbage.map(lambda t: [t]))
plausible = st.one_of(  # flags with values of the right kind, so that valid configurations come up often too
    st.tuples(st.just("--method"), st.sampled_from(NAMES)), st.tuples(st.just("--mode"), st.sampled_from(MODES)),
    st.tuples(st.sampled_from(["--epochs", "--iterations", "--batch-size", "--n-tasks", "--seed"]),
              st.integers(-1, 12).map(str)),
    st.tuples(st.sampled_from(["--lr", "--momentum", "--val-fraction", "--blurry"]),
              st.floats(-0.5, 1.5).map(str)),
    st.tuples(st.just("--hidden"), st.sampled_from(["100", "64,64", "0", "10,x"])),
    st.tuples(st.just("--param"), st.builds(lambda k, v: f"{k}={v}", st.sampled_from(PARAMS),
                                            st.integers(-2, 500).map(str) | st.sampled_from(["true", "0.5"]))),
    st.tuples(st.sampled_from(["--task-free", "--force", "--resume"])).map(list)).map(list)
argvs = st.one_of(st.lists(pair, max_size=6), st.lists(plausible, max_size=5)).map(
    lambda pairs: [t for p in pairs for t in p])

scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, width=32),
                   st.sampled_from(REAL), garbage)
conf_value = st.one_of(scalar, st.lists(scalar, max_size=3),
                       st.dictionaries(st.sampled_from(PARAMS) | garbage, scalar, max_size=3))
conf_key = st.one_of(st.sampled_from(KEYS + ["params", "n-tasks", "batch-size"]), garbage)
conf = st.dictionaries(conf_key, conf_value, max_size=5)


def toml_text(d: dict) -> str:
    """A small TOML writer (scalars, lists, inline tables); what TOML cannot say (None) makes a malformed file."""
    def v(x):
        if isinstance(x, bool):
            return "true" if x else "false"
        if isinstance(x, (list, tuple)):
            return "[" + ", ".join(v(i) for i in x) + "]"
        if isinstance(x, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {v(i)}" for k, i in x.items()) + "}"
        if x is None:
            return "nothing"
        return json.dumps(x)
    return "".join(f"{json.dumps(k)} = {v(x)}\n" for k, x in d.items())


@st.composite
def config_files(draw):
    """(suffix, text): a valid TOML/YAML rendering of random options, or one damaged, or random text."""
    suffix = draw(st.sampled_from([".toml", ".yaml", ".yml", ".json"]))
    d = draw(conf)
    text = toml_text(d) if suffix == ".toml" else yaml.safe_dump(d, allow_unicode=True)
    how = draw(st.sampled_from(["valid", "valid", "cut", "insert", "random"]))
    if how == "cut":
        text = text[:draw(st.integers(0, len(text)))]
    elif how == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["[", "]", ":", "=", "\"", "{", "- ", "\t", "\n  x"])) + text[at:]
    elif how == "random":
        text = draw(st.text(max_size=40))
    return suffix, text


def _outcome(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # the argument parser exits 2 itself
            code = e.code
    return code, out.getvalue(), err.getvalue()


def _check(code: int, out: str, err: str, counts: dict[str, int]) -> None:
    assert "Traceback" not in err, err
    if code == 0:
        cfg = json.loads(out)  # a valid, fully resolved run configuration
        assert err == "" and cfg["method"] in methods() and cfg["mode"] in MODES
        hidden = tuple(cfg.pop("hidden"))
        again = api.RunConfig(**cfg, hidden=hidden).resolved()  # resolving it again changes nothing
        assert again.to_dict() == {**cfg, "hidden": list(hidden)}
        counts["valid"] += 1
    else:
        assert code == 2, (code, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("retain: error: "), err
        counts["refused"] += 1


@pytest.fixture
def no_training(monkeypatch):
    def tripwire(*a, **k):
        raise AssertionError("the parser started training")

    monkeypatch.setattr(api, "run", tripwire)
    monkeypatch.setattr(trainer, "train", tripwire)


def test_random_command_lines_and_config_files_give_a_config_or_a_clean_exit_2(tmp_path, no_training):
    counts = {"valid": 0, "refused": 0}

    @settings(max_examples=200, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(argv=argvs, config=st.none() | config_files())
    @example(argv=["--method", "er", "--param", "buffer_size=10", "--epochs", "1"], config=None)
    @example(argv=["--seed", "3"], config=(".toml", 'method = "ewc"\nepochs = 2\n[params]\nlambda = 10\n'))
    @example(argv=["--mode", "class"], config=(".yaml", "method: pnn\n"))
    @example(argv=[], config=(".toml", "epochs = [\n"))
    def check(argv: list[str], config: tuple[str, str] | None) -> None:
        full = ["run", *argv]
        if config is not None:
            path = tmp_path / f"c{config[0]}"
            path.write_text(config[1], encoding="utf-8", errors="surrogatepass")
            full += ["--config", str(path)]
        _check(*_outcome([*full, "--dry-run"]), counts)

    check()
    assert counts["valid"] >= 2 and counts["refused"] >= 50, counts  # both outcomes were exercised


SWEEP_KEYS = ["name", "seeds", "val_fraction", "select", "search", "samples", "random_seed", "modes", "benchmark",
              "epochs", "n_tasks", "lr", "hidden", "optimizer", "mode", "batch_size"]
small = st.one_of(st.integers(-3, 4), st.floats(-1, 2, allow_nan=False), st.booleans(), st.sampled_from(REAL),
                  garbage)
grid = st.one_of(small, st.lists(small, max_size=3),
                 st.fixed_dictionaries({"low": small, "high": small}, optional={"log": st.booleans()}))
method_entry = st.one_of(
    st.fixed_dictionaries({"name": st.sampled_from(NAMES) | garbage.filter(lambda t: "+" not in t)},
                          optional={"params": st.dictionaries(st.sampled_from(PARAMS) | garbage, grid, max_size=2),
                                    "train": st.dictionaries(st.sampled_from(["lr", "epochs", "mode", "x"]), grid,
                                                             max_size=2)}),
    small)
sweeps = st.dictionaries(st.sampled_from(SWEEP_KEYS) | garbage, grid, max_size=4).flatmap(
    lambda d: st.builds(lambda ms: {**d, "methods": ms}, st.lists(method_entry, max_size=2)) | st.just(d))


def test_random_sweep_files_give_a_plan_or_a_clean_exit_2(tmp_path, no_training, monkeypatch):
    """``retain sweep FILE`` end to end, with the runs themselves replaced by failed records (nothing trains)."""
    from retain.cli import lab

    planned = []

    def fake_run(args, jobs, store, experiment, label):
        planned.append(len(jobs))
        return [{"hash": j.hash, "status": "failed", "error": "not run", "error_step": None, "config": j.spec}
                for j in jobs]

    monkeypatch.setattr(lab, "_run", fake_run)
    counts = {"valid": 0, "refused": 0}

    @settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(d=sweeps, suffix=st.sampled_from([".toml", ".yaml"]), damage=st.booleans())
    @example(d={"epochs": 1, "methods": [{"name": "er", "params": {"buffer_size": [10, 20]}}]}, suffix=".toml",
             damage=False)
    def check(d: dict, suffix: str, damage: bool) -> None:
        text = toml_text(d) if suffix == ".toml" else yaml.safe_dump(d, allow_unicode=True)
        if damage:
            text = text[: len(text) // 2] + "[{:"
        path = tmp_path / f"s{suffix}"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        code, out, err = _outcome(["sweep", str(path), "--store", str(tmp_path / "s.db"), "--quiet", "--workers",
                                   "1"])
        assert "Traceback" not in err, err
        if code == 1:  # a valid plan whose every (fake) run failed: exit 1, said in one line
            assert "Sweep" in out and planned and planned[-1] > 0
            assert err.strip().splitlines()[-1].startswith(f"retain: error: all {planned[-1]} run(s) failed"), err
            counts["valid"] += 1
        else:
            assert code == 2, (code, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("retain: error: "), err
            counts["refused"] += 1

    check()
    assert counts["valid"] >= 1 and counts["refused"] >= 20, counts
