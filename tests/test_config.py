"""One configuration path (issue 18): the schema behind the CLI, files, sweeps, the store's hash and the API.

Each option of :class:`retain.config.RunConfig` is declared once; these tests check that every surface is made
from that declaration (a flag, a config-file key, a sweep type, a hash policy, a dry-run key), that the CLI, the
API, config files and sweeps resolve to the same run, that ``a+b`` composes everywhere, that ``retain run --store``
takes the job path, that a store written by release 0.1.0 still skips its finished runs, and that the package
has no import circles.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

import retain
from retain import config as cfg
from retain import experiments as ex
from retain.cli import build_parser, main, parse_run
from retain.config import OPTIONS, RunConfig, resolve
from retain.errors import ConfigError
from retain.store import Store, config_hash

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--iterations", "2", "--n-tasks", "2", "--hidden", "16", "--quiet"]
RUN = build_parser()._subparsers._group_actions[0].choices["run"]


def test_every_option_has_a_flag_a_file_key_a_sweep_type_a_hash_policy_and_a_dry_run_key(capsys):
    flags = {s for a in RUN._actions for s in a.option_strings}
    assert main(["run", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for o in OPTIONS.values():
        assert (o.flag if o.kind != "params" else "--param") in flags, o.name
        assert o.name in printed, o.name
        assert o.hash in ("always", "unless-default", "never")
        assert cfg.from_mapping({o.name.replace("_", "-"): o.default}) == {o.name: cfg.coerce(o.name, o.default)}
        if o.name not in ("method", "params", "seed", "val_fraction"):
            assert o.name in ex.RUN_FIELDS
    assert set(printed) == set(OPTIONS)


@pytest.mark.parametrize("name, raw, value", [
    ("lr", "0.01", 0.01), ("lr", 1, 1.0), ("epochs", "3", 3), ("epochs", 3.0, 3), ("hidden", "64,32", (64, 32)),
    ("hidden", [64], (64,)), ("normalize", "0.1,0.2752", (0.1, 0.2752)), ("normalize", [0, 1], (0.0, 1.0)),
    ("task_free", "true", True), ("task_free", False, False), ("task_order", "1,0", [1, 0]), ("mode", "none", None),
    ("data_dir", "~/data", "~/data"),
])
def test_one_coercion_for_strings_file_values_and_python_values(name, raw, value):
    assert cfg.coerce(name, raw) == value


@pytest.mark.parametrize("name, raw, message", [
    ("lr", "fast", "lr (--lr) expects a finite number, got 'fast'"),
    ("lr", 0, "lr must be a positive number"),
    ("epochs", 2.5, "epochs (--epochs) expects a whole number"),
    ("epochs", True, "epochs (--epochs) expects a whole number"),
    ("hidden", "64,x", "hidden (--hidden) expects comma-separated positive integers"),
    ("hidden", [0], "hidden must be positive layer sizes"),
    ("normalize", "1", "normalize (--normalize) expects two comma-separated numbers"),
    ("task_free", "maybe", "task_free (--task-free) expects true or false"),
    ("optimizer", "rmsprop", "unknown optimizer 'rmsprop'; choose one of adam, sgd"),
    ("seed", None, "seed (--seed) needs a value"),
])
def test_bad_values_are_refused_naming_the_option(name, raw, message):
    with pytest.raises(ConfigError, match=None) as e:
        cfg.coerce(name, raw)
    assert message in str(e.value)


def test_cli_api_and_config_file_resolve_to_the_same_run(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('method = "ewc"\nmode = "task"\nhidden = [32, 32]\nlr = "0.01"\n[params]\nlambda = 10\n')
    from_cli = parse_run(["--method", "ewc", "--mode", "task", "--hidden", "32,32", "--lr", "0.01",
                          "--param", "lambda=10"])
    from_file = parse_run(["--config", str(f)])
    from_api = resolve(method="ewc", mode="task", hidden=[32, 32], lr="0.01", params={"lambda": 10}).config
    assert from_cli.to_dict() == from_file.to_dict() == from_api.to_dict()
    assert parse_run(["--config", str(f), "--lr", "0.1"]).lr == 0.1  # a typed flag wins over the file


def test_resolve_is_idempotent_and_fills_from_benchmark_then_preset_then_user():
    run = resolve(benchmark="permuted-mnist", method="ewc", iterations=7)
    c = run.config
    assert (c.pad, c.hidden, c.lr, c.iterations, c.mode) == (2, (1000, 1000), 1e-4, 7, "domain")
    assert run.method.params() == c.params  # one method instance, its values recorded
    assert resolve(c).config.to_dict() == c.to_dict()


def test_a_user_scenario_differs_only_in_where_the_scenario_comes_from(synthetic):
    from retain import scenarios
    from retain.methods.ewc import EWC
    from retain.models import MLP

    sc = scenarios.split(synthetic, "task", n_tasks=2)
    model = MLP(8, 4, (8,))
    run = resolve(scenario=sc, model=model, method=EWC(lambda_=10.0), epochs=1)
    assert run.config.params["lambda"] == 10.0  # the instance's value, not the preset's
    assert run.config.arch == "custom:MLP" and run.config.hidden is None  # the user's model, said so
    result = retain.run(run)
    assert result.config["params"]["lambda"] == 10.0 and result.config["arch"] == "custom:MLP"
    with pytest.raises(ConfigError, match="pad=2 applies to the named benchmarks"):
        resolve(scenario=sc, pad=2)


@pytest.mark.parametrize("name", ["ewc+er", "si+der"])
def test_composition_is_parsed_by_the_registry_everywhere(name, tmp_path, capsys):
    from retain.method import Compose, create

    m = create(name, {"buffer_size": 20})
    assert isinstance(m, Compose) and m.params()["buffer_size"] == 20 and len(m.methods) == 2
    # the Python API
    assert retain.run(method=name, params={"buffer_size": 20}, iterations=2, n_tasks=2, hidden=(16,)).metrics
    # retain run, compare, orders
    assert main(["run", "--method", name, *TINY]) == 0
    store = str(tmp_path / "s.db")
    assert main(["compare", "--methods", f"finetune,{name}", "--seeds", "1", "--store", store, "--workers", "1",
                 *TINY]) == 0
    out = capsys.readouterr().out
    assert f"| {name}" in out
    assert main(["orders", "--methods", name, "--random-orders", "0", "--store", store, "--workers", "1",
                 *TINY]) == 0
    # a config file and a sweep file
    f = tmp_path / "run.toml"
    f.write_text(f'method = "{name}"\niterations = 2\nn_tasks = 2\nhidden = [16]\n')
    assert main(["run", "--config", str(f), "--quiet"]) == 0
    s = tmp_path / "s.toml"
    s.write_text(f'iterations = 2\nn_tasks = 2\nhidden = [16]\n[[methods]]\nname = "{name}"\n'
                 '[methods.params]\nbuffer_size = [10, 20]\n')
    assert main(["sweep", str(s), "--store", store, "--workers", "1", "--quiet"]) == 0


def test_unknown_and_renamed_methods_are_refused_with_the_choices():
    with pytest.raises(ConfigError, match="unknown method 'nosuch'.*or join them with \\+"):
        resolve(method="ewc+nosuch")
    from retain import method as registry

    registry.RENAMED["oldname"] = "renamed newname"
    try:
        with pytest.raises(ConfigError, match="unknown method 'oldname' \\(renamed newname\\)"):
            resolve(method="oldname")
    finally:
        del registry.RENAMED["oldname"]


def test_a_sweep_over_normalize_and_hidden_uses_the_schema_types(tmp_path, capsys):
    s = tmp_path / "s.toml"
    s.write_text("iterations = 2\nn_tasks = 2\nhidden = [16]\nnormalize = [[0.0, 1.0], [0.5, 0.25]]\n"
                 '[[methods]]\nname = "finetune"\n')
    sweep = ex.parse_sweep(cfg.load(s), str(s), RunConfig())
    jobs = ex.sweep_jobs(sweep)
    assert sorted(j.config.normalize for _, j in jobs) == [(0.0, 1.0), (0.5, 0.25)]
    assert jobs[0][1].config.hidden == (16,)
    assert main(["sweep", str(s), "--store", str(tmp_path / "s.db"), "--workers", "1", "--quiet"]) == 0
    assert "normalize=(0.5, 0.25)" in capsys.readouterr().out
    s.write_text('normalize = [[0.0, 0.0]]\n[[methods]]\nname = "finetune"\n')
    with pytest.raises(ConfigError, match="normalize must be two numbers MEAN,STD with STD > 0"):
        ex.parse_sweep(cfg.load(s), str(s), RunConfig())


def test_run_with_a_store_takes_the_job_path(tmp_path, monkeypatch, capsys):
    calls = []
    real = ex.run_jobs

    def spy(jobs, store, *a, **k):
        calls.append([j.hash for j in jobs])
        return real(jobs, store, *a, **k)

    monkeypatch.setattr(ex, "run_jobs", spy)
    db = tmp_path / "r.db"
    out = tmp_path / "r.json"
    assert main(["run", "--store", str(db), "--json", str(out), *TINY]) == 0
    rec = json.loads(out.read_text())
    (h,) = calls[0]
    assert h == config_hash(rec["config"])
    with Store(db) as s:
        assert s.get(h)["status"] == "done"
    assert main(["run", "--store", str(db), *TINY]) == 0  # done: shown from the store, not trained again
    assert len(calls) == 1 and "already done in the store" in capsys.readouterr().err


def test_a_store_written_by_release_0_1_0_still_skips_its_finished_runs(tmp_path, monkeypatch, capsys):
    """tests/data/store-0.1.0.db was written by retain 0.1.0 (before the schema) with these four commands; the
    same commands now find every run done, so nothing is trained."""
    db = tmp_path / "old.db"
    shutil.copy(ROOT / "tests" / "data" / "store-0.1.0.db", db)
    from retain import trainer

    def tripwire(*a, **k):
        raise AssertionError("a run that the old store holds as done was trained again")

    monkeypatch.setattr(trainer, "train", tripwire)
    monkeypatch.setattr("retain.api.train", tripwire)
    tiny = ["--iterations", "3", "--n-tasks", "2", "--hidden", "16", "--store", str(db), "--quiet"]
    assert main(["run", *tiny]) == 0
    assert main(["run", "--method", "ewc", "--param", "lambda=10", "--mode", "task", *tiny]) == 0
    assert main(["compare", "--methods", "finetune,er", "--seeds", "1", "--workers", "1", *tiny]) == 0
    assert "2 run(s) already in the store" in capsys.readouterr().err
    mnist = ROOT.parent / "shared" / "data" / "mnist"
    argv = ["run", "--benchmark", "permuted-mnist", "--pad", "0", "--data-dir", str(mnist), *tiny]
    assert config_hash(parse_run(argv[1:]).to_dict()) == "f66f686243f26ff9b0d6"
    with Store(db) as s:
        assert {r["hash"] for r in s.runs()} == {"f53f4c2534af426746b4", "7cf2d31d46d867193824",
                                                 "3c321765997060415884", "f66f686243f26ff9b0d6"}


def _imports(path: Path, package: str) -> set[str]:
    """The retain modules ``path`` imports at module level (imports inside functions are deliberate deferrals)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("retain"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("retain")}
    return out


def test_the_package_has_no_import_circles():
    root = ROOT / "retain"
    modules = {}
    for p in root.rglob("*.py"):
        name = ".".join(("retain", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        modules[name] = p
    graph = {m: {i for i in _imports(p, m) if i in modules and i != m} for m, p in modules.items()}
    for m in graph:  # a package's modules may import the package's __init__ only if it imports none of them
        graph[m] = {i for i in graph[m] if not (m.startswith(i + ".") and i == "retain")}

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for m in graph if (c := cycle_from(m))]
    assert not cycles, cycles[0]
