"""``distplan --help`` and every sub-command's ``--help`` read well: each option says what it does and its
default, and a default stated in words is the default the option really has (issue 6, issue 9). Covers
every command registered in the CLI, whoever wrote it."""

from __future__ import annotations

import re
from typing import Any

import typer
from typer.testing import CliRunner

from distplan import cli

# Every command the CLI must offer (README, DESIGN.md and the issues name them).
COMMANDS = {
    "trace",
    "models",
    "clusters",
    "device-kinds",
    "plan",
    "simulate",
    "lower",
    "validate",
    "profile",
    "report",
    "demo",
    "schedule",
    "serve",
}


# Typer vendors its own click, so parameters are told apart by click's ``param_type_name``.
def _commands() -> dict[str, Any]:
    group = typer.main.get_command(cli.app)
    return dict(group.commands)  # type: ignore[attr-defined]


def _is_option(p: Any) -> bool:
    return getattr(p, "param_type_name", "") == "option"


def _options() -> list[tuple[str, Any]]:
    return [
        (f"distplan {name} {'/'.join(p.opts)}", p)
        for name, cmd in sorted(_commands().items())
        for p in cmd.params
        if _is_option(p) and not p.hidden and "--help" not in p.opts
    ]


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


_STATED = re.compile(r"default:\s*(.+?)(?=\.\s|\.$|;|\(|\)|$)", re.I | re.S)
_NUMBER = re.compile(r"^[-+]?\d+(\.\d*)?([eE][-+]?\d+)?$")


def stated_default(help_text: str | None) -> str | None:
    """The default a help text states in words (``Default: 0.001.`` -> ``0.001``), or None."""
    m = _STATED.search(help_text or "")
    return m.group(1).strip() if m else None


def _env_default(help_text: str) -> Any:
    """The default of the service setting a help text names by its variable (``env DISTPLAN_WORKERS``)."""
    from distplan.service.settings import Settings

    m = re.search(r"\bDISTPLAN_([A-Z_]+)", help_text)
    assert m, help_text
    return Settings.model_fields[m.group(1).lower()].default


def _matches(stated: str, value: Any) -> bool:
    if isinstance(value, bool):
        # A plain switch may say what being off means ("price them"); it must not claim the other state.
        return stated.lower() not in (("off", "no", "false") if value else ("on", "yes", "true"))
    if isinstance(value, (int, float)):
        return bool(_NUMBER.match(stated)) and float(stated) == float(value)
    return stated == str(value)


def default_problem(opt: Any) -> str | None:
    """What is untrue about the default ``opt``'s help states in words, or None when it is true (or
    stated by click alone, which is true by construction)."""
    stated = stated_default(opt.help)
    if stated is None or opt.required:
        return None
    value = opt.default
    if opt.is_flag and opt.secondary_opts and isinstance(value, bool):
        # A --x/--no-x switch states its default as the switch that is on: "Default: check."
        expected = (opt.opts if value else opt.secondary_opts)[0].lstrip("-")
        return None if stated == expected else f"states {stated!r}, but the default is {expected!r}"
    if value is None or value == [] or value == ():
        if "DISTPLAN_" in (opt.help or ""):
            env = _env_default(opt.help)
            return (
                None if _matches(stated, env) else f"states {stated!r}, but the setting's default is {env!r}"
            )
        if _NUMBER.match(stated):
            return f"states {stated!r}, but the option's default is empty: give the option that default"
        return None
    return None if _matches(stated, value) else f"states {stated!r}, but the default is {value!r}"


def test_every_command_is_registered() -> None:
    assert set(_commands()) == COMMANDS


def test_every_option_has_help_and_a_default() -> None:
    problems = []
    for name, cmd in sorted(_commands().items()):
        if not (cmd.help or "").strip():
            problems.append(f"distplan {name}: no description")
        elif "\n" in (cmd.help or "").strip().split("\n\n")[0]:
            # `distplan --help` shows the first paragraph with its line breaks: keep it to one line.
            problems.append(f"distplan {name}: the docstring's first paragraph spans several lines")
        for p in cmd.params:
            if not _is_option(p) and len((getattr(p, "help", None) or "").strip()) < 8:
                problems.append(f"distplan {name} {p.name}: argument without help text")
    for label, p in _options():
        if len((p.help or "").strip()) < 8:
            problems.append(f"{label}: no help text")
        if not _shows_default(p):
            problems.append(f"{label}: help does not state the default")
    assert problems == [], "\n".join(problems)


def test_every_stated_default_is_the_true_default() -> None:
    problems = [f"{label}: {why}" for label, p in _options() if (why := default_problem(p))]
    assert problems == [], "\n".join(problems)
    # The check reads what it should: a sample of stated defaults across commands.
    stated = {label: stated_default(p.help) for label, p in _options()}
    assert stated["distplan lower --lr"] == "0.001"
    assert stated["distplan plan --schedule"] == "the planner chooses"
    assert stated["distplan schedule --ageing-bound"] == "14400"
    assert stated["distplan serve --workers"] == "2"


def test_the_default_check_catches_an_untrue_default() -> None:
    """The checker itself: a help that states another value than the option's default is caught, in each
    kind of option it reads."""

    def option(*decls: str, default: Any, help: str) -> Any:
        app = typer.Typer()
        kind = {bool: "bool", int: "int", str: "str"}.get(type(default), "int | None")

        def one(x):  # type: ignore[no-untyped-def]
            """One option."""

        one.__annotations__ = {"x": kind, "return": "None"}
        one.__defaults__ = (typer.Option(default, *decls, help=help),)
        app.command()(one)
        return typer.main.get_command(app).params[0]

    assert default_problem(option("--n", default=5, help="Steps. Default: 5.")) is None
    assert default_problem(option("--n", default=5, help="Steps. Default: 10.")) is not None
    assert default_problem(option("--s", default="gpipe", help="Schedule. Default: 1f1b.")) is not None
    assert default_problem(option("--c/--no-c", default=True, help="Check it. Default: no-c.")) is not None
    assert default_problem(option("--c/--no-c", default=True, help="Check it. Default: c.")) is None
    assert default_problem(option("--quick", default=False, help="Quickly. Default: on.")) is not None
    assert default_problem(option("--quick", default=False, help="Quickly. Default: off.")) is None
    assert default_problem(option("--seq", default=None, help="Tokens (default: 512).")) is not None
    assert default_problem(option("--seq", default=None, help="Tokens (default: the model's).")) is None
    assert (
        default_problem(option("--workers", default=None, help="env DISTPLAN_WORKERS (default: 3)."))
        is not None
    )


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
