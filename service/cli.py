"""``distplan serve``: run the REST service with uvicorn. A command module, registered by ``distplan.cli``."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["register", "serve_command"]


def serve_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free port)."),
    db: Path | None = typer.Option(
        None, "--db", help="SQLite database file; env DISTPLAN_DB (default: .distplan/service.db)."
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=1,
        max=64,
        help="Worker processes for solves and validations; env DISTPLAN_WORKERS (default: 2).",
    ),
    log_level: str = typer.Option(
        "info", "--log-level", help="uvicorn log level: critical, error, warning, info, debug or trace."
    ),
) -> None:
    """Serve the REST API (OpenAPI docs at /docs). Other settings come from DISTPLAN_* variables."""
    import uvicorn
    from pydantic import ValidationError

    from distplan.errors import DistplanError
    from distplan.service.app import create_app
    from distplan.service.settings import Settings

    overrides: dict[str, object] = {}
    if db is not None:
        overrides["db"] = db
    if workers is not None:
        overrides["workers"] = workers
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        msgs = "; ".join(
            f"DISTPLAN_{'_'.join(str(x) for x in err['loc']).upper()}: {err['msg']}" for err in e.errors()
        )
        raise DistplanError(f"bad service settings: {msgs}") from None
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=20)


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to the distplan CLI."""
    app.command("serve")(serve_command)
