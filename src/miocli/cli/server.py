"""`mio serve`: the command that starts the warm server (`miocli.serve`)."""

from __future__ import annotations

from typing import Annotated

import typer

from miocli.cli.options import (
    Common,
    err,
    with_options,
)
from miocli.errors import EnvironmentProblem, UsageError


# ---- the server ------------------------------------------------------------------------------------
@with_options("model")
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8765,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="MIO_API_KEY", help="Key clients must send "
                                                "(Authorization: Bearer KEY); needed to listen beyond loopback.",
                                                show_default=False)] = None,
    insecure_no_api_key: Annotated[bool, typer.Option("--insecure-no-api-key", help="Listen beyond loopback "
                                                      "without a key: anyone who can reach the port can use the "
                                                      "model.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Most inputs in one generation batch "
                                            "(requests for the same task are gathered).")] = 8,
    batch_window: Annotated[float, typer.Option("--batch-window", help="Seconds to wait for other requests to "
                                                "join a batch.")] = 0.005,
    idle_unload: Annotated[str | None, typer.Option("--idle-unload", help="Unload the model after this long "
                                                    "without requests (e.g. 10m); it loads again on use.")] = None,
    max_body_mb: Annotated[int, typer.Option("--max-body-mb", help="Largest request body, in MiB.")] = 64,
    request_timeout: Annotated[float, typer.Option("--request-timeout", help="Seconds a request may take.")] = 600.0,
    allow_host: Annotated[list[str] | None, typer.Option("--allow-host", help="Another name clients may call "
                                                         "this server by (NAME or NAME:PORT; repeatable; * for "
                                                         "any), e.g. behind a proxy.", show_default=False)] = None,
    allow_origin: Annotated[list[str] | None, typer.Option("--allow-origin", help="A web page origin that may "
                                                           "call the API (e.g. http://localhost:3000; "
                                                           "repeatable; * for any), answered with CORS headers.",
                                                           show_default=False)] = None,
    shutdown_timeout: Annotated[float, typer.Option("--shutdown-timeout", help="Seconds requests in flight may "
                                                    "take to finish after SIGTERM before they are cancelled.")
                                ] = 10.0,
    *, opts: Common,
) -> int:
    """Keep MIO loaded and serve every command (`--server URL`), scripts and OpenAI clients over HTTP."""
    try:
        from miocli.serve.app import check_bind
        from miocli.serve.app import serve as run_server
        from miocli.serve.guard import check_allowed
        from miocli.serve.worker import ServeSettings, parse_duration
    except ImportError as exc:
        raise EnvironmentProblem(f"`mio serve` needs the server extra ({exc.name} is missing)",
                                 hint="pip install 'miocli[serve]'") from None

    check_bind(host, api_key, insecure_no_api_key)
    if not 0 < port < 65536:
        raise UsageError(f"--port must be between 1 and 65535 (got {port})")
    if batch_size < 1 or max_body_mb < 1 or not 0 <= batch_window <= 5 or not request_timeout > 0 or not (
            0 <= shutdown_timeout <= 3600):
        raise UsageError("--batch-size and --max-body-mb must be at least 1, --batch-window 0-5 s, "
                         "--request-timeout above 0, --shutdown-timeout 0-3600 s")
    allowed = check_allowed(allow_host or [], allow_origin or [])
    if not api_key and host not in ("127.0.0.1", "::1", "localhost"):
        err(f"mio serve: WARNING: listening on {host} WITHOUT an API key: anyone who can reach it can use it")
    settings = ServeSettings(host=host, port=port, api_key=api_key or None, batch_size=batch_size,
                             batch_window_s=batch_window, max_body_bytes=max_body_mb * 2**20,
                             request_timeout_s=request_timeout,
                             idle_unload_s=parse_duration(idle_unload) if idle_unload else None)
    return run_server(opts.make_mio(local=True), settings, allowed, shutdown_timeout)
