"""The ``morpheus`` command: one parser, one error printer.

A `UserError` (bad config, file, dataset, checkpoint or flag) is printed as one line
``morpheus COMMAND: error: …`` with exit status 2, and so is the environment refusing a path
or running out of a resource (`core.errors.path_problem`, `resource_exhausted`); any other
exception is a bug and keeps its traceback. In a multi-process job a failed process leaves at once
(`distributed.leave_job`).
"""

from __future__ import annotations

import argparse
import sys

from morpheus_jax.cli import bank, data, downstream, export, scaling, tcga, train
from morpheus_jax.core.errors import UserError, path_problem, resource_exhausted


class Parser(argparse.ArgumentParser):
    """argparse with the package's error format: one line ``morpheus COMMAND: error: …`` and
    exit status 2 (argparse would print its whole usage first); ``--help`` shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="morpheus",
        description="MORPHEUS in JAX: masked omics modelling over H&E patch features, RNA, DNA methylation "
                    "and copy number. Subcommands run the data flow: synth → prepare → pretrain.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for module in (data, tcga, train, bank, downstream, export, scaling):
        module.register(sub)
    return p


def command_name(args) -> str:
    """``finetune survival``, ``evaluate reconstruction``, ``scaling fit`` … for messages."""
    parts = [args.command] + [getattr(args, k) for k in ("evaluation", "task_kind", "scaling_command", "tcga_command", "bank_command")
                              if getattr(args, k, None)]
    return " ".join(parts)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags and ``key=value`` overrides in any order: argparse stops collecting a ``nargs="*"``
    positional at the first flag, so overrides after a flag come back unrecognised and are
    appended (in order, later ones still win)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:
        if not hasattr(args, "overrides") or any(r.startswith("-") for r in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = list(args.overrides or []) + rest
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    name = command_name(args)
    try:
        code = args.fn(args)
    except UserError as e:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line, always
        print(f"morpheus {name}: error: {message}", file=sys.stderr)
        code = 2
    except Exception as e:
        ran_out = resource_exhausted(e) or path_problem(e)
        if ran_out is None:
            _leave_failed_job(1, name, print_traceback=True)
            raise
        print(f"morpheus {name}: error: {ran_out}", file=sys.stderr)
        code = 2
    except BaseException:
        _leave_failed_job(1, name, print_traceback=True)
        raise
    if code:
        _leave_failed_job(code, name)
    return code


def _leave_failed_job(code: int, command: str, *, print_traceback: bool = False) -> None:
    """In a multi-process job, a failed process leaves at once (`distributed.leave_job`)."""
    if "jax" in sys.modules:  # else JAX never started: not part of a job
        from morpheus_jax.core.distributed import leave_job  # lazy: start-up time
        leave_job(code, f"morpheus {command}", print_traceback=print_traceback)


if __name__ == "__main__":
    sys.exit(main())
