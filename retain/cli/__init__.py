"""The ``retain`` command line: ``run``, ``methods``, ``benchmarks`` and the experiment commands.

Every error is one line on stderr naming the problem and the fix: exit code 2 for bad input, 1 for a fault,
no traceback unless ``--debug``. The package is layered: :mod:`retain.cli.options` (flags generated from the run
schema, config files, output files) at the bottom, :mod:`retain.cli.run` (run, methods, benchmarks) and
:mod:`retain.cli.lab` (compare, orders, sweep, reproduce, report, runs, export) above it, this module on top.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

from retain.cli import lab, prepare, run
from retain.cli.options import Parser, check_writable_file, one_line, with_config, write_json_atomic
from retain.errors import RetainError

__all__ = ["build_parser", "check_writable_file", "main", "one_line", "parse_run", "write_json_atomic"]


def build_parser() -> Parser:
    import retain

    p = Parser(prog="retain", description="Continual learning: train on a sequence of tasks, measure forgetting.")
    p.add_argument("--version", action="version", version=f"retain {retain.__version__}")
    sub = p.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")
    sub.required = True
    run.register(sub)
    lab.register(sub)
    prepare.register(sub)
    return p


def parse_run(argv: list[str]) -> Any:
    """The resolved :class:`retain.config.RunConfig` that ``retain run ARGV`` would train, without training or
    loading data; bad input raises :class:`RetainError` (or exits 2 from the argument parser)."""
    args = build_parser().parse_args(["run", *argv])
    if args.config:
        args = with_config(args, args._parser)
    return run.check_run(args).config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None):
            args = with_config(args, args._parser)
        return int(args.func(args) or 0)
    except RetainError as e:
        print(one_line(f"retain: error: {e}"), file=sys.stderr)
        if getattr(args, "debug", False):
            traceback.print_exc()
        return e.exit_code
    except BrokenPipeError:  # `retain runs | head`: the reader left; nothing is wrong with the run
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's final flush does not fail again
        return 0
    except KeyboardInterrupt:
        resumable = args.command == "run" and (args.store or args.checkpoint_every or args.resume)
        resumable = resumable or args.command in ("compare", "orders", "sweep", "reproduce")
        print("retain: interrupted" + ("; the checkpoint is saved: rerun the same command to continue"
                                       if resumable else ""), file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, exit 1
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(one_line(f"retain: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)"),
              file=sys.stderr)
        return 1
