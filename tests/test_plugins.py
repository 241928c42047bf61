"""Methods from outside the package: ``module:Class`` names, the ``retain.methods`` entry-point group, misspelled
hooks refused at class definition, and docs/design.md's "Adding a method" run as written.

Nothing is installed: a plugin package is a ``*.dist-info`` folder (METADATA, entry_points.txt) written beside its
module in a temporary directory on ``sys.path``, which :mod:`importlib.metadata` finds as it finds installed ones.
Every test restores the registry, ``sys.path`` and ``sys.modules`` (fixture ``plugins``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch

from retain import cli
from retain import method as registry
from retain.errors import ConfigError
from retain.method import Compose, Method, create, method_class, methods, misspelled_hook

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"

# A small method of one's own for the paths the documentation's example does not take.
PLUGMOD = '''
from dataclasses import dataclass
from retain.method import Method, param


@dataclass
class Mine(Method):
    """A method from a module of the user's own."""

    strength: float = param(0.5, "how hard")


def helper():
    return 1
'''


def call(argv: list[str]) -> tuple[int, str, str]:
    """``retain ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return int(code or 0), out.getvalue(), err.getvalue()


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A directory for this test's modules and dist-infos (not yet on ``sys.path``: ``on_path()`` puts it there);
    the registry re-scans entry points and is restored afterwards, with ``sys.path`` and ``sys.modules``."""
    methods()  # the built-ins, imported once, stay
    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)

    class Dir:
        path = tmp_path

        def write(self, name: str, text: str) -> Path:
            f = tmp_path / name
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)
            importlib.invalidate_caches()
            return f

        def dist(self, project: str, entries: dict[str, str]) -> None:
            """A plugin package as if installed: ``<project>-0.1.dist-info`` with its ``retain.methods``."""
            info = f"{re.sub(r'[-.]+', '_', project)}-0.1.dist-info"
            self.write(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {project}\nVersion: 0.1\n")
            lines = "".join(f"{k} = {v}\n" for k, v in entries.items())
            self.write(f"{info}/entry_points.txt", f"[retain.methods]\n{lines}")

        def on_path(self) -> None:
            sys.path.insert(0, str(tmp_path))
            importlib.invalidate_caches()

    yield Dir()
    for name in set(sys.modules) - before:
        if str(tmp_path) in str(getattr(sys.modules[name], "__file__", "") or ""):
            del sys.modules[name]


# ------------------------------------------------------------------------------------------ module:Class

def test_a_module_class_is_found_in_the_directory_run_from(plugins, monkeypatch):
    plugins.write("plugmod.py", PLUGMOD)
    monkeypatch.chdir(plugins.path)  # not on sys.path: the `retain` command does not put it there
    cls = method_class("plugmod:Mine")
    assert cls.__name__ == "Mine" and issubclass(cls, Method)
    assert cls.name == "plugmod:Mine"  # the name that imports it again: what an instance's record carries
    m = create("plugmod:Mine", {"strength": "2"})
    assert m.strength == 2.0 and m.params() == {"strength": 2.0}


def test_a_module_class_composes_with_a_built_in(plugins):
    plugins.write("plugmod.py", PLUGMOD)
    plugins.on_path()
    hybrid = method_class("ewc+plugmod:Mine")
    assert [p.__name__ for p in hybrid.parts] == ["EWC", "Mine"]
    m = create("ewc+plugmod:Mine", {"strength": 3, "lambda": 7})
    assert m.params()["strength"] == 3.0 and m.params()["lambda"] == 7.0
    assert "plugmod:Mine" not in methods() and "ewc+plugmod:Mine" not in methods()  # not listed as registered


@pytest.mark.parametrize("name,message", [
    ("nosuchmodule_xyz:Mine", "no module named 'nosuchmodule_xyz'; put nosuchmodule_xyz.py in the current "
                              "directory or on PYTHONPATH"),
    ("plugmod:Nope", "module plugmod has no Nope; the Method classes it defines: Mine"),
    ("plugmod:helper", "helper is a function, not a subclass of retain.method.Method"),
    ("raising:X", "importing raising failed (RuntimeError: the module itself is broken)"),
    ("needs_missing:X", "importing needs_missing failed (ModuleNotFoundError: No module named 'not_installed_q')"),
    ("plugmod:", "a method of your own is named module.path:ClassName, e.g. mymethods:MyMethod"),
    ("ewc+plugmod:Nope", "module plugmod has no Nope; the Method classes it defines: Mine"),  # in a hybrid too
])
def test_a_bad_module_class_is_one_line_and_exit_2(plugins, name, message):
    plugins.write("plugmod.py", PLUGMOD)
    plugins.write("raising.py", "raise RuntimeError('the module itself\\nis broken')\n")
    plugins.write("needs_missing.py", "import not_installed_q\n")
    plugins.on_path()
    code, out, err = call(["run", "--method", name, "--dry-run"])
    assert code == 2, err
    assert err.strip() == f"retain: error: method {name.split('+')[-1]!r}: {message}"
    with pytest.raises(ConfigError):
        method_class(name)


def test_a_misspelled_hook_in_the_users_module_is_one_line(plugins):
    plugins.write("typo.py", "from dataclasses import dataclass\nfrom retain.method import Method\n\n\n"
                             "@dataclass\nclass T(Method):\n    def end_tsak(self, ctx):\n        pass\n")
    plugins.on_path()
    code, _, err = call(["run", "--method", "typo:T", "--dry-run"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "T.end_tsak is not a hook but is close to end_task()" in err


def test_config_and_sweep_files_and_orders_take_a_module_class(plugins, monkeypatch):
    plugins.write("plugmod.py", PLUGMOD)
    plugins.on_path()
    monkeypatch.chdir(plugins.path)
    plugins.write("run.toml", 'method = "ewc+plugmod:Mine"\n[params]\nstrength = 4\n')
    code, out, err = call(["run", "--config", "run.toml", "--dry-run"])
    assert code == 0, err
    assert '"method": "ewc+plugmod:Mine"' in out and '"strength": 4.0' in out

    plugins.write("sweep.toml", 'benchmark = "split-digits"\nseeds = 1\niterations = 2\n'
                                '[[methods]]\nname = "plugmod:Mine"\n[methods.params]\nstrength = [0.0, 1.0]\n')
    code, out, err = call(["sweep", "sweep.toml", "--workers", "1", "--store", "s.db", "--quiet"])
    assert code == 0, err
    assert "plugmod:Mine" in out and "strength" in out

    code, out, err = call(["orders", "--methods", "plugmod:Mine", "--random-orders", "1", "--seeds", "1",
                           "--iterations", "2", "--workers", "1", "--store", "o.db", "--quiet"])
    assert code == 0, err
    assert re.search(r"\| plugmod:Mine +\| 4 ", out), out  # the given order, one random one, two more


def test_an_instance_is_named_so_that_the_name_builds_it_again(plugins):
    plugins.write("plugmod.py", PLUGMOD)
    plugins.on_path()
    from plugmod import Mine

    assert Mine().name == "plugmod:Mine" and method_class(Mine().name) is Mine
    both = Compose(create("er"), Mine())
    assert both.name == "er+plugmod:Mine"  # not "finetune", which a worker would then have run instead
    again = create(both.name, both.params())
    assert [type(m) for m in again.methods] == [type(m) for m in both.methods] and again.params() == both.params()


def test_a_run_in_a_store_is_found_again_by_its_module_class_name(plugins, monkeypatch):
    plugins.write("plugmod.py", PLUGMOD)
    monkeypatch.chdir(plugins.path)
    argv = ["run", "--method", "plugmod:Mine", "--iterations", "2", "--store", "r.db", "--quiet"]
    code, out, err = call(argv)
    assert code == 0, err
    assert out.startswith("plugmod:Mine on split-digits")
    code, out, err = call(argv)
    assert code == 0 and "already done in the store r.db" in err  # the same hash from the same name


# ------------------------------------------------------------------------------------------- entry points

def test_an_installed_plugin_is_listed_and_runs(plugins, monkeypatch):
    plugins.write("plugmod.py", PLUGMOD)
    plugins.dist("retain-mine", {"mine": "plugmod:Mine"})
    plugins.on_path()
    assert methods()["mine"].__name__ == "Mine" and methods()["mine"].name == "mine"
    code, out, err = call(["methods"])
    assert code == 0, err
    assert re.search(r"^mine +A method from a module of the user's own\.$", out, re.M), out
    monkeypatch.chdir(plugins.path)
    code, out, err = call(["run", "--method", "ewc+mine", "--param", "strength=2", "--dry-run"])
    assert code == 0 and '"method": "ewc+mine"' in out and '"strength": 2.0' in out, err


@pytest.mark.parametrize("entry,message", [
    ("bad = brokenplug_mod:Bad", "plugin brokenplug: entry point bad = 'brokenplug_mod:Bad' (group retain.methods) "
                                 "failed to load (ImportError: cannot import name 'nothing' from 'retain'"),
    ("bad = plugmod:helper", "plugin brokenplug: entry point bad = 'plugmod:helper' (group retain.methods) is "
                             "a function, not a subclass of retain.method.Method"),
    ("ewc = plugmod:Mine", "plugin brokenplug: entry point ewc = 'plugmod:Mine' (group retain.methods): the name "
                           "'ewc' is already taken by a built-in method; rename the entry point"),
])
def test_a_plugin_that_cannot_load_is_one_line_naming_it(plugins, entry, message):
    plugins.write("plugmod.py", PLUGMOD)
    plugins.write("brokenplug_mod.py", "from retain import nothing\n")
    name, value = (x.strip() for x in entry.split("="))
    plugins.dist("brokenplug", {name: value})
    plugins.on_path()
    with pytest.raises(ConfigError, match=re.escape(message)):
        methods()  # an error, not a silently shorter list
    for argv in (["methods"], ["run", "--method", "finetune", "--dry-run"]):
        code, out, err = call(argv)
        assert code == 2 and out == "" and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1 and message in err


# ------------------------------------------------------------------------------------------ misspelled hooks

@pytest.mark.parametrize("attr,hook", [("penalti", "penalty"), ("augmnet", "augment"), ("end_tsak", "end_task"),
                                       ("begin_taks", "begin_task"), ("Forward", "forward"),
                                       ("after_updates", "after_update"), ("task_dta", "task_data")])
def test_a_name_one_or_two_edits_from_a_hook_is_refused_naming_it(attr, hook):
    with pytest.raises(TypeError, match=rf"M\.{attr} is not a hook but is close to {hook}\(\)"):
        dataclasses.dataclass(type("M", (Method,), {attr: lambda self, ctx: None}))


@pytest.mark.parametrize("attr", ["params", "parameters", "memory", "state_dict", "load_state_dict", "fisher",
                                  "consolidate", "project", "select", "penalties", "_penalti", "sample"])
def test_ordinary_names_are_free(attr):
    cls = type("M", (Method,), {attr: lambda self, *a: None})
    assert getattr(cls, attr) is not getattr(Method, attr, None)


def test_a_field_is_data_never_a_hook():
    cls = dataclasses.dataclass(type("M", (Method,), {"__annotations__": {"augmnet": int}, "augmnet": 3}))
    assert cls().augmnet == 3


def test_every_name_a_built_in_method_defines_passes_the_rule():
    seen = set()
    for cls in methods().values():
        for klass in cls.__mro__:
            for attr, value in vars(klass).items():
                assert misspelled_hook(attr, value) is None, f"{klass.__name__}.{attr}"
                seen.add(attr)
    assert {"params", "parameters", "memory", "state_dict"} <= seen


def test_the_prefix_rule_still_holds():
    with pytest.raises(TypeError, match="M.on_batch looks like a hook but is not one"):
        type("M", (Method,), {"on_batch": lambda self: None})


# ---------------------------------------------------------------------------- docs/design.md, as written

def section() -> str:
    text = DESIGN.read_text()
    start = text.index("## Adding a method\n")
    return text[start:text.index("\n## ", start + 1)]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", section(), re.S | re.M)


def test_the_documented_method_is_complete_and_its_maths_right(plugins, monkeypatch):
    module, _api = blocks("python")
    assert module.startswith('"""mymethod.py') and "import" in module and "needs_boundaries" in module
    plugins.write("mymethod.py", module)
    plugins.on_path()
    cls = method_class("mymethod:L2Anchor")
    assert cls.needs_boundaries and cls.name == "mymethod:L2Anchor"
    m = cls(strength=2.0)
    model = torch.nn.Linear(2, 1, bias=False)
    ctx = type("Ctx", (), {"model": model})()
    assert m.penalty(ctx, None, None) is None  # nothing to protect on the first task
    m.end_task(ctx)
    assert m.penalty(ctx, None, None).item() == 0.0  # at the anchor
    with torch.no_grad():
        model.weight += torch.tensor([[0.5, -1.0]])
    assert m.penalty(ctx, None, None).item() == pytest.approx(2.0 / 2 * (0.25 + 1.0))
    with pytest.raises(ConfigError, match="strength must be >= 0"):
        create("mymethod:L2Anchor", {"strength": -1})


def test_the_documented_api_and_run_command_work_as_written(plugins, monkeypatch):
    module, api = blocks("python")
    plugins.write("mymethod.py", module)
    monkeypatch.chdir(plugins.path)  # "saved in the directory you run from"
    commands = [line.split("  #")[0].split() for line in blocks("bash")[0].splitlines()]
    run_cmd = next(c for c in commands if c[1] == "run")
    code, out, err = call(run_cmd[1:] + ["--iterations", "5", "--quiet"])  # the budget cut, as in the doc tests
    assert code == 0, err
    assert out.startswith("mymethod:L2Anchor on split-digits (task-IL), seed 0: strength=3.0"), out
    code, _, err = call(run_cmd[1:] + ["--task-free"])
    assert code == 2 and "needs task boundaries" in err  # needs_boundaries, as the doc says

    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(api, "design.md", "exec"), namespace)  # noqa: S102 - the documented snippet, as written
    assert printed.getvalue().strip()
    assert namespace["by_name"].config["method"] == "mymethod:L2Anchor"
    assert namespace["by_name"].config["params"] == {"strength": 1.0}  # the preset for split-digits/task
    assert namespace["by_instance"].config["method"] == "mymethod:L2Anchor"  # the name that imports it again
    assert namespace["by_instance"].config["params"] == {"strength": 3.0}


def test_the_documented_compare_imports_the_method_again_in_each_worker(plugins, tmp_path_factory):
    """`retain compare ... --workers 2` as the doc shows it, in a fresh process whose workers (forkserver/spawn)
    import the method again from its name: the module is on PYTHONPATH only, not in the working directory."""
    module, _ = blocks("python")
    plugins.write("mymethod.py", module)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    line = next(c for c in blocks("bash")[0].splitlines() if c.startswith("retain compare"))
    argv = line.split("  #")[0].split()[1:] + ["--iterations", "3", "--seeds", "1", "--store", "c.db", "--quiet"]
    assert "--workers" in argv and "er+mymethod:L2Anchor" in " ".join(argv)
    env = {**os.environ, "PYTHONPATH": str(plugins.path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "retain.cli", *argv], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in ("finetune", "mymethod:L2Anchor", "er+mymethod:L2Anchor"):
        assert re.search(rf"^\| task +\| {re.escape(name)} +\| 1 ", done.stdout, re.M), done.stdout
    assert "  mymethod:L2Anchor: strength=1.0" in done.stdout  # the preset: the worker ran the real class
    assert re.search(r"  er\+mymethod:L2Anchor: .*strength=1\.0", done.stdout)


def test_the_documented_pyproject_makes_an_installed_plugin(plugins, monkeypatch):
    module, _ = blocks("python")
    project = tomllib.loads(blocks("toml")[0])["project"]
    plugins.write("mymethod.py", module)
    plugins.dist(project["name"], project["entry-points"]["retain.methods"])
    plugins.on_path()
    code, out, err = call(["methods"])
    assert code == 0, err
    assert re.search(r"^l2_anchor +Keep the weights near .*\n +modes: task, domain, class; needs task boundaries",
                     out, re.M), out
    monkeypatch.chdir(plugins.path)
    code, out, err = call(["run", "--method", "l2_anchor", "--mode", "task", "--iterations", "2", "--quiet"])
    assert code == 0, err
    assert out.startswith("l2_anchor on split-digits (task-IL), seed 0: strength=1.0")
