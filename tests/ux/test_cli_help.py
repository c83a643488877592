"""``distplan --help`` and every sub-command's ``--help`` read well: each option says what it does and its
default (issue 6). Covers every command registered in the CLI, whoever wrote it."""

from __future__ import annotations

from typing import Any

import typer
from typer.testing import CliRunner

from distplan import cli


# Typer vendors its own click, so parameters are told apart by click's ``param_type_name``.
def _commands() -> dict[str, Any]:
    cli._register_all()
    group = typer.main.get_command(cli.app)
    return dict(group.commands)  # type: ignore[attr-defined]


def _is_option(p: Any) -> bool:
    return getattr(p, "param_type_name", "") == "option"


def _shows_default(opt: Any) -> bool:
    """Whether ``--help`` states the option's default, either by click's ``[default: ...]`` or in words."""
    if opt.required:
        return True
    help_text = (opt.help or "").lower()
    if "default" in help_text:
        return True
    if opt.is_flag and not opt.secondary_opts and not opt.default:
        return True  # a plain off-by-default switch: "--json" says itself
    return opt.default is not None and opt.show_default is not False


def test_every_option_has_help_and_a_default() -> None:
    problems = []
    commands = _commands()
    # The user-facing commands the README tours must exist.
    assert {"demo", "report", "clusters"} <= set(commands)
    for name, cmd in sorted(commands.items()):
        if not (cmd.help or "").strip():
            problems.append(f"distplan {name}: no description")
        elif "\n" in (cmd.help or "").strip().split("\n\n")[0]:
            # `distplan --help` shows the first paragraph with its line breaks: keep it to one line.
            problems.append(f"distplan {name}: the docstring's first paragraph spans several lines")
        for p in cmd.params:
            if _is_option(p):
                if p.hidden or "--help" in p.opts:
                    continue
                label = f"distplan {name} {'/'.join(p.opts)}"
                if len((p.help or "").strip()) < 8:
                    problems.append(f"{label}: no help text")
                if not _shows_default(p):
                    problems.append(f"{label}: help does not state the default")
            elif len((getattr(p, "help", None) or "").strip()) < 8:
                problems.append(f"distplan {name} {p.name}: argument without help text")
    assert problems == [], "\n".join(problems)


def test_help_renders_for_the_cli_and_every_command() -> None:
    runner = CliRunner()
    r = runner.invoke(cli.app, ["--help"])
    assert r.exit_code == 0, r.output
    commands = _commands()
    for name in commands:
        assert name in r.output, f"{name} missing from distplan --help"
    for name, cmd in commands.items():
        r = runner.invoke(cli.app, [name, "--help"], terminal_width=120)
        assert r.exit_code == 0, f"distplan {name} --help failed: {r.output}"
        for p in cmd.params:
            if _is_option(p) and not p.hidden:
                assert p.opts[0] in r.output, f"distplan {name} --help does not list {p.opts[0]}"
        # The rich help must not have swallowed a literal "[default: ...]" written in a help string.
        for p in cmd.params:
            if _is_option(p) and "[default" in (p.help or ""):
                raise AssertionError(
                    f"distplan {name} {p.opts[0]}: write '(default: ...)' — rich hides '[...]'"
                )
