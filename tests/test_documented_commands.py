"""Every ``retain ...`` command that README.md and docs/*.md show runs: one test per command, on test data and a cut
budget, failing with the command and its stderr on a non-zero exit.

What is collected (``collect()``), in document order:

- every line of a fenced code block whose language is empty, ``bash``, ``sh``, ``shell`` or ``console``, and every
  line of an indented (4-space) code block, that starts a command with ``retain`` (a leading ``$ `` is dropped,
  ``\\`` continuations are joined; a line with several commands joined by ``;`` or ``&&`` gives one command per
  ``retain`` part, so ``pip install -e . && retain compare`` gives ``retain compare``);
- an inline code span `` `retain ...` `` only when it is a complete command: a sub-command followed by at least one
  argument, no synopsis syntax (``[``, ``]``, ``|``, ``...``, ``<``, ``>``), no all-capitals placeholder word
  (``FILE``, ``NAME``, ``DIR``) and not ending in an option (``retain run --store`` names a flag, it is not a
  command). Bare names such as `` `retain run` `` or `` `retain methods` `` are prose and are not collected.

Markers, written in the document where the command is shown (the convention this test reads):

- ``# illustration`` in the command line's trailing comment, ``<!-- illustration -->`` on the line before a
  code fence (every command of that block), or ``<!-- illustration -->`` right after an inline span: the command
  is an illustration (a placeholder such as MODE, a Ray cluster, a method that does not exist). It is not run;
  ``test_illustrations_are_listed`` lists every one of them.
- ``# exits N`` / ``<!-- exits N -->`` in the same places: the command is documented as refused; the test checks
  that it exits with N.

How a command is made cheap and hermetic (``prepare()``); nothing else is changed:

- it runs in-process (``retain.cli.main``) in a working directory of its own per document, commands of one
  document in document order, so ``retain report`` after ``retain compare`` reads the store compare wrote and no
  ``retain.db`` lands in the repository (a store-reading command with no store yet gets one from a 5-step run);
- ``--data-dir`` points at the real MNIST (the ``mnist_dir`` fixture) when the benchmark's dataset is MNIST; a
  command whose benchmark needs data absent here (Fashion-MNIST, KMNIST, CIFAR) is skipped with that reason;
- budget: ``--iterations`` becomes 5 (added when no ``--epochs``/``--iterations``/``--config`` is given),
  ``--epochs`` becomes 1 (a ``--task-free`` or ``--online`` run makes one pass and takes neither), an MLP on
  MNIST-size data gets ``--hidden 100,100`` (evaluating every task's 10,000 test images after each task is most of
  a 5-step run); on that data a ``retain run`` of the EWC family gets ``--param fisher_samples=500``, and a
  task-free or online run or compare ``--batch-size 1000`` (its one pass over 60,000 images in 60 steps);
  ``--seeds`` becomes 1 (added to ``compare``), ``--random-orders`` 1, ``--n-tasks`` 2 on the 10-task
  permuted/rotated MNIST;
- ``reproduce`` gets ``--quick``, with the protocol's quick settings cut to 5 steps, 1 seed and a 100-100 MLP
  (patched in-process on the protocol object; its rows are untouched);
- a config or sweep file the command names is copied into the working directory and cut the same way
  (``seeds = 1``, ``epochs = 1``, ``iterations = 5``, every grid axis to its first two values).

Run with ``-v -rs`` for the list of every command run (the test ids) and of every one skipped, with its reason;
``-s`` also prints each command as it was run after the cuts.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
MARKER = re.compile(r"\b(illustration|exits\s+\d+)\b")
SYNOPSIS = re.compile(r"[\[\]|<>]|\.\.\.|\\|(?<![\w.-])[A-Z][A-Z_]{2,}(?![\w.-])")
INLINE = re.compile(r"`([^`\n]+)`(?:\s*<!--\s*(.*?)\s*-->)?")
BLOCK_MARK = re.compile(r"^\s*<!--\s*(.*?)\s*-->\s*$")
SMALL_DATA = {"digits"}  # bundled with scikit-learn: always here
FISHER_METHODS = {"ewc", "online_ewc", "ewc_er", "ewc+er"}  # their fisher_samples caps the Fisher's cost


@dataclass(frozen=True)
class DocCommand:
    doc: str  # "README.md"
    line: int
    text: str  # the command as the document shows it
    marker: str | None  # "illustration", "exits 2" or None
    inline: bool

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"

    @property
    def expected_exit(self) -> int:
        return int(self.marker.split()[1]) if self.marker and self.marker.startswith("exits") else 0


def _marker(text: str | None) -> str | None:
    m = MARKER.search(text or "")
    return re.sub(r"\s+", " ", m.group(1)) if m else None


def _split_comment(line: str) -> tuple[str, str]:
    """``cmd args   # comment`` -> (``cmd args``, ``comment``); a ``#`` only starts a comment after a space."""
    m = re.search(r"(^|\s)#", line)
    return (line[:m.start()], line[m.end():]) if m else (line, "")


def _commands_in(line: str) -> list[str]:
    parts = re.split(r"\s*(?:&&|;|\|\|)\s*", line.strip())
    return [p for p in parts if p == "retain" or p.startswith("retain ")]


def _complete_inline(text: str) -> bool:
    words = text.split()
    return (len(words) >= 3 and not SYNOPSIS.search(text) and not words[-1].startswith("-")
            and re.fullmatch(r"[a-z-]+", words[1]) is not None)


def collect() -> list[DocCommand]:
    out: list[DocCommand] = []
    for path in DOCS:
        doc = str(path.relative_to(ROOT))
        lines = path.read_text().splitlines()
        fence: str | None = None  # the language of the open fenced block
        block_marker: str | None = None
        pending = ""  # a command continued with a trailing backslash
        start = 0
        for i, raw in enumerate(lines, 1):
            stripped = raw.strip()
            if stripped.startswith("```"):
                if fence is None:
                    fence = stripped[3:].strip().lower()
                    before = next((lines[j] for j in range(i - 2, -1, -1) if lines[j].strip()), "")
                    m = BLOCK_MARK.match(before)
                    block_marker = _marker(m.group(1)) if m else None
                else:
                    fence = None
                continue
            indented = fence is None and raw.startswith("    ") and re.match(r"\s*(\$ )?retain\b", raw) is not None
            if (fence is not None and fence in SHELL_LANGS) or indented:
                text = re.sub(r"^\$ ", "", stripped)
                if pending:
                    text, start = pending + " " + text, start
                else:
                    start = i
                code, comment = _split_comment(text)
                if code.rstrip().endswith("\\"):
                    pending = code.rstrip()[:-1].rstrip()
                    continue
                pending = ""
                marker = _marker(comment) or block_marker
                out += [DocCommand(doc, start, " ".join(c.split()), marker, False) for c in _commands_in(code)]
                continue
            if fence is not None:
                continue
            for m in INLINE.finditer(raw):
                text = m.group(1).strip()
                if text.startswith("retain ") and _complete_inline(text):
                    out.append(DocCommand(doc, i, " ".join(text.split()), _marker(m.group(2)), True))
    return out


COMMANDS = collect()
RUNNABLE = [c for c in COMMANDS if c.marker != "illustration"]
ILLUSTRATIONS = [c for c in COMMANDS if c.marker == "illustration"]
STORE_IN_REPO = (ROOT / "retain.db").exists()


# ------------------------------------------------------------------------------------------ making it cheap

def _set(argv: list[str], flag: str, value: str | None, add: bool = True) -> list[str]:
    """``argv`` with ``flag``'s value replaced by ``value`` (``flag=value`` spellings too), or appended if ``add``."""
    out, found, skip = [], False, False
    for tok in argv:
        if skip:
            skip = False
            continue
        if tok == flag:
            found, skip = True, True
            out += [flag, value] if value is not None else [flag]
        elif tok.startswith(flag + "="):
            found = True
            out += [flag, value] if value is not None else [flag]
        else:
            out.append(tok)
    if not found and add:
        out += [flag, value] if value is not None else [flag]
    return out


def _get(argv: list[str], flag: str) -> str | None:
    for k, tok in enumerate(argv):
        if tok == flag and k + 1 < len(argv):
            return argv[k + 1]
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
    return None


def reduce_file(src: Path, dest: Path) -> Path:
    """A copy of a TOML/YAML config or sweep file with a cut budget (see the module docstring)."""
    text = src.read_text()
    text = re.sub(r"(?m)^(\s*seeds\s*[=:]\s*)\d+", r"\g<1>1", text)
    text = re.sub(r"(?m)^(\s*epochs\s*[=:]\s*)\d+", r"\g<1>1", text)
    text = re.sub(r"(?m)^(\s*iterations\s*[=:]\s*)\d+", r"\g<1>5", text)
    text = re.sub(r"(?m)^(\s*samples\s*[=:]\s*)\d+", r"\g<1>2", text)

    def first_two(m: re.Match) -> str:
        items = [x.strip() for x in m.group(2).split(",") if x.strip()]
        return f"{m.group(1)}[{', '.join(items[:2])}]"

    text = re.sub(r"(?m)^(\s*[\w.]+\s*[=:]\s*)\[([^\]\n{]*)\]", first_two, text)
    dest.write_text(text)
    return dest


def _benchmark_of(argv: list[str], workdir: Path) -> str | None:
    sub = argv[0]
    if sub in ("run", "compare", "orders"):
        bench = _get(argv, "--benchmark")
        cfg = _get(argv, "--config")
        if bench is None and cfg is not None:
            m = re.search(r'(?m)^\s*benchmark\s*[=:]\s*"?([\w-]+)', (workdir / cfg).read_text())
            bench = m.group(1) if m else None
        return bench or "split-digits"
    if sub == "sweep":
        m = re.search(r'(?m)^\s*benchmark\s*[=:]\s*"?([\w-]+)', (workdir / argv[1]).read_text())
        return m.group(1) if m else "split-digits"
    if sub == "reproduce":
        from retain import reproduce

        return reproduce.get(argv[1]).benchmark
    return None


def prepare(cmd: DocCommand, workdir: Path, mnist: Path | None, monkeypatch) -> list[str]:
    """The argv (after ``retain``) that runs ``cmd`` on test data with a cut budget, in ``workdir``."""
    argv = shlex.split(cmd.text)[1:]
    sub = argv[0] if argv else ""
    # Files the command names (config, sweep): copied into the working directory, cut.
    for tok in argv:
        src = ROOT / tok
        if re.search(r"\.(toml|ya?ml)$", tok) and src.is_file():
            dest = workdir / tok
            dest.parent.mkdir(parents=True, exist_ok=True)
            reduce_file(src, dest)
    bench = _benchmark_of(argv, workdir)
    if bench is not None:
        from retain.benchmarks import BENCHMARKS

        b = BENCHMARKS.get(bench)
        dataset = b.dataset if b else None
        if dataset == "mnist":
            if mnist is None:
                pytest.skip(f"{bench} needs MNIST, absent here")
            argv = _set(argv, "--data-dir", str(mnist))
        elif dataset is not None and dataset not in SMALL_DATA:
            pytest.skip(f"{bench} needs the {dataset} data, absent here")
        if sub in ("run", "compare", "orders") and b is not None:
            if dataset not in SMALL_DATA and _get(argv, "--hidden") is None and _get(argv, "--arch") is None:
                argv = _set(argv, "--hidden", "100,100")  # evaluating 10,000 test images per task dominates
            if dataset not in SMALL_DATA and ("--task-free" in argv or "--online" in argv):
                argv = _set(argv, "--batch-size", "1000")  # its one pass over 60,000 images in 60 steps
            if dataset not in SMALL_DATA and sub == "run":
                if _get(argv, "--method") in FISHER_METHODS and not any("fisher_samples" in a for a in argv):
                    argv += ["--param", "fisher_samples=500"]  # the Fisher over 500 samples, not 60,000
            if "--task-free" not in argv and "--online" not in argv:  # one pass over the data, no step count
                if _get(argv, "--epochs") is not None:
                    argv = _set(argv, "--epochs", "1")
                if _get(argv, "--iterations") is not None or (_get(argv, "--epochs") is None
                                                             and _get(argv, "--config") is None):
                    argv = _set(argv, "--iterations", "5")
            if b.n_tasks > 5 and _get(argv, "--task-order") is None:
                argv = _set(argv, "--n-tasks", "2")
    elif _get(argv, "--data-dir") is not None and mnist is not None:
        argv = _set(argv, "--data-dir", str(mnist))
    if sub in ("compare", "orders", "reproduce"):
        argv = _set(argv, "--seeds", "1", add=sub == "compare")
    if sub == "orders":
        argv = _set(argv, "--random-orders", "1", add=False)
    if sub == "reproduce":
        from retain import reproduce

        proto = reproduce.get(argv[1])
        quick = {**proto.quick, "seeds": 1, "iterations": 5}
        if "epochs" in quick or proto.settings.get("epochs"):
            quick["epochs"] = None
        if "hidden" in proto.settings:
            quick["hidden"] = (100, 100)
        monkeypatch.setattr(proto, "quick", quick)
        if "--quick" not in argv:
            argv.append("--quick")
    if sub in ("report", "runs", "export"):
        store = _get(argv, "--store") or "retain.db"
        if not (workdir / store).exists():  # run alone: give it a store to read
            code, _, err = call(["run", "--iterations", "5", "--store", store, "--quiet"])
            assert code == 0, err
    return argv


def call(argv: list[str]) -> tuple[int, str, str]:
    """``retain ARGV`` in this process: (exit code, stdout, stderr)."""
    from retain import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # the argument parser's exit
            code = e.code if isinstance(e.code, int) else 1
    return int(code or 0), out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """One working directory per document: its commands share a store, as they would in a reader's shell."""
    made: dict[str, Path] = {}

    def get(doc: str) -> Path:
        if doc not in made:
            made[doc] = tmp_path_factory.mktemp(re.sub(r"\W", "_", doc))
        return made[doc]

    return get


@pytest.fixture
def mnist_or_none(request) -> Path | None:
    try:
        return request.getfixturevalue("mnist_dir")
    except pytest.skip.Exception:
        return None


@pytest.mark.parametrize("cmd", RUNNABLE, ids=[c.id for c in RUNNABLE])
def test_documented_command_runs(cmd: DocCommand, workdirs, mnist_or_none, monkeypatch):
    workdir = workdirs(cmd.doc)
    monkeypatch.chdir(workdir)
    argv = prepare(cmd, workdir, mnist_or_none, monkeypatch)
    print("retain", shlex.join(argv))
    torch.set_num_threads(2)  # both cores: the runs are in this process, one at a time
    code, out, err = call(argv)
    assert code == cmd.expected_exit, (
        f"`{cmd.text}` ({cmd.doc}:{cmd.line}) ran as `retain {shlex.join(argv)}` and exited {code}, "
        f"expected {cmd.expected_exit}\nstderr:\n{err.strip()[-3000:]}")
    assert (ROOT / "retain.db").exists() == STORE_IN_REPO, "a documented command wrote a store into the repository"


def test_illustrations_are_listed():
    """Illustration-only commands are marked in their document and listed here, never dropped silently."""
    for c in ILLUSTRATIONS:
        print(f"illustration, not run: {c.id}")
    assert all(c.marker == "illustration" for c in ILLUSTRATIONS)


def test_collected_list_covers_the_main_commands():
    texts = [c.text for c in COMMANDS]
    assert len(RUNNABLE) >= 20, texts
    assert "retain compare" in texts
    assert any(t.startswith("retain run ") and "--method ewc+er" in t for t in texts), texts
    subs = {shlex.split(t)[1] for t in texts if len(t.split()) > 1}
    assert {"run", "compare", "orders", "sweep", "reproduce", "report", "runs", "export", "methods",
            "benchmarks"} <= subs, subs
    # The rule on inline spans: complete commands only.
    assert not any(c.inline and c.text in ("retain run --store", "retain run") for c in COMMANDS)


def test_the_collector_follows_its_rules(tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text("\n".join([
        "Prose `retain run` and `retain runs [--status S]` and `retain run --store` and `retain report --out DIR`.",
        "A full one: `retain orders --methods ewc` and `retain run --method nosuch --seed 1`<!-- illustration -->.",
        "```bash",
        "pip install -e . && retain compare --seeds 2   # the comparison",
        "retain run --method er \\",
        "    --seed 3   # illustration: a comment marks it",
        "```",
        "<!-- illustration -->",
        "```",
        "retain sweep x.toml --executor ray --address HEAD:6379",
        "```",
        "```python",
        "retain = 1",
        "```",
        "",
        "    retain methods",
    ]))
    monkeypatch.setitem(globals(), "DOCS", [doc])
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    got = [(c.line, c.text, c.marker, c.inline) for c in collect()]
    assert got == [
        (2, "retain orders --methods ewc", None, True),
        (2, "retain run --method nosuch --seed 1", "illustration", True),
        (4, "retain compare --seeds 2", None, False),
        (5, "retain run --method er --seed 3", "illustration", False),
        (10, "retain sweep x.toml --executor ray --address HEAD:6379", "illustration", False),
        (16, "retain methods", None, False),
    ]


def test_reduce_file_cuts_the_budget(tmp_path):
    src = tmp_path / "s.toml"
    src.write_text('seeds = 3\nepochs = 10\n[[methods]]\nname = "er"\n[methods.params]\n'
                   "buffer_size = [20, 100, 400]\n")
    text = reduce_file(src, tmp_path / "r.toml").read_text()
    assert "seeds = 1" in text and "epochs = 1" in text and "buffer_size = [20, 100]" in text
