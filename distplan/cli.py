"""The ``distplan`` command line: the one top-level CLI.

Every command lives in a command module, imported here statically and registered in pipeline order::

    distplan.cli                                  app, main (errors), option_of   <- the entry point
      distplan.presentation.trace_cli             trace, models
      distplan.presentation.catalogue_cli         clusters, device-kinds
      distplan.planner.cli                        plan, simulate
      distplan.lowering.cli                       lower, validate
      distplan.profiler.cli                       profile
      distplan.presentation.report_cli            report
      distplan.presentation.demo_cli              demo
      distplan.scheduler.cli                      schedule
      distplan.service.cli                        serve
        distplan.presentation.cli_support         output files, --set, shared options (below them all)
        distplan.presentation.progress            the live progress line on stderr

No module imports this one back (``tests/test_architecture.py`` checks it). The command modules import
only typer and distplan's core at their top; torch, the tracer and other heavy parts are imported inside
the command functions, so ``distplan --help`` (and any command) starts without torch.

Errors a user can cause (:class:`~distplan.errors.DistplanError`) print one paragraph and exit with code 2;
an error about a plan-request field (``DistplanError.field``) names it as its option (:func:`option_of`).
``--debug`` (anywhere on the line) or ``DISTPLAN_DEBUG=1`` shows the traceback too.
"""

from __future__ import annotations

import os
import sys

import typer

from distplan.errors import DistplanError
from distplan.lowering import cli as lowering_cli
from distplan.planner import cli as planner_cli
from distplan.presentation import catalogue_cli, demo_cli, report_cli, trace_cli
from distplan.profiler import cli as profiler_cli
from distplan.scheduler import cli as scheduler_cli
from distplan.service import cli as service_cli

__all__ = ["app", "main", "option_of"]

app = typer.Typer(
    name="distplan",
    help="Plan, lower and validate the distribution of a PyTorch model over a (mixed) GPU cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# In the order `distplan --help` lists them: the pipeline, then the tools around it.
trace_cli.register(app)
catalogue_cli.register(app)
planner_cli.register(app)
lowering_cli.register(app)
profiler_cli.register(app)
report_cli.register(app)
demo_cli.register(app)
scheduler_cli.register(app)
service_cli.register(app)


# Request fields whose command-line option is not ``--`` + the field with dashes.
_OPTIONS = {"time_limit_s": "--time-limit", "baselines": "--no-baselines", "model": "MODEL"}


def option_of(field: str | None) -> str:
    """The command-line spelling of a request field (``global_batch`` -> ``--global-batch``), for error
    messages that name a field (``DistplanError.field``; see [Note: the request spine] in
    ``distplan.request``)."""
    if not field:
        return ""
    return _OPTIONS.get(field, "--" + field.replace("_", "-"))


def main(argv: list[str] | None = None) -> None:
    """Run the ``distplan`` command line on ``argv`` (default: ``sys.argv[1:]``) and exit with its code:
    0 done, 1 a check failed (``validate``) or a distplan bug, 2 a user error (one paragraph on stderr),
    130 interrupted."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("DISTPLAN_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        # Without standalone mode, click returns a command's `typer.Exit(code)` instead of exiting.
        rc = app(args=args, prog_name="distplan", standalone_mode=False)
        if isinstance(rc, int) and not isinstance(rc, bool) and rc != 0:
            sys.exit(rc)
    except DistplanError as e:
        if debug:
            raise
        flag = option_of(e.field) if getattr(e, "field", None) else ""
        typer.echo(f"error: {flag + ': ' if flag else ''}{e}", err=True)
        if e.__cause__ is not None and not isinstance(e.__cause__, DistplanError):
            cause = str(e.__cause__).strip().splitlines()
            typer.echo(
                f"  caused by {type(e.__cause__).__name__}: {cause[0][:300] if cause else ''}", err=True
            )
        typer.echo("  (run with --debug for the traceback)", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        # Usage errors (unknown command, bad option value): typer raises its own vendored copy of click's
        # ClickException, so recognise it by behaviour rather than by class.
        show = getattr(e, "show", None)
        if callable(show) and isinstance(getattr(e, "exit_code", None), int):
            show()
            sys.exit(e.exit_code)  # type: ignore[attr-defined]
        if debug:
            raise
        typer.echo(f"internal error: {type(e).__name__}: {e}", err=True)
        typer.echo("  (this is a distplan bug; run with --debug for the traceback and report it)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
