"""Adds ``tuner server``. Import-cheap: the web stack is imported when the command runs."""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path

from tuner.core import hookimpl
from tuner.core.api import ConfigError, PluginError

EXTRA_HINT = "tuner server needs the webui extra: pip install 'tuner[webui]'"
TOKEN_VARIABLE = "TUNER_SERVER_TOKEN"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@hookimpl
def register_commands(app):
    import typer

    @app.command()
    def server(
        workspace: Path = typer.Option(
            Path("."), "--workspace", "-w", help="Folder the UI works in (runs, data, configs)."
        ),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
        port: int = typer.Option(8001, "--port", min=1, max=65535, help="Port to bind."),
        token: str | None = typer.Option(
            None, "--token", help=f"Access token (default: ${TOKEN_VARIABLE}, else a random one printed in the URL)."
        ),
        allow_remote: bool = typer.Option(
            False, "--allow-remote", help="Allow binding a non-loopback address (anyone who has the token can train)."
        ),
        allowed_host: list[str] | None = typer.Option(
            None, "--allowed-host", help="A host name the browser may use besides IP addresses and localhost."
        ),
        max_running: int = typer.Option(1, "--max-running", min=1, help="Jobs run at once (one per accelerator)."),
    ) -> None:
        """Serve the web UI: configure, launch, watch, compare, stop, resume and sample runs in a browser."""
        try:
            import starlette  # noqa: F401
            import uvicorn
        except ImportError:
            raise PluginError(EXTRA_HINT) from None
        if not is_loopback(host) and not allow_remote:
            raise ConfigError(
                f"--host {host}: not a loopback address; anyone who can reach it and has the token can start "
                "jobs on this machine. Add --allow-remote to do it anyway"
            )
        if not workspace.is_dir():
            raise ConfigError(f"--workspace {workspace}: not a folder")
        workspace = workspace.resolve()
        busy = port_problem(host, port)  # before anything starts: uvicorn would log a traceback-like error
        if busy:
            raise ConfigError(f"--port {port}: {busy}; stop the other server or choose another --port")
        from tuner.plugins.webui.app import create_app

        token = token or os.environ.get(TOKEN_VARIABLE) or secrets.token_urlsafe(24)
        os.chdir(workspace)  # relative paths in the UI (and in the jobs it starts) are the workspace's
        application = create_app(workspace, token, port=port, allowed_hosts=allowed_host or (), max_running=max_running)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        if not is_loopback(host):
            typer.echo(f"warning: serving on {host}:{port}, reachable from other machines", err=True)
        typer.echo(f"tuner server: workspace {Path.cwd()}")
        typer.echo(f"open http://{shown}:{port}/?token={token}")
        uvicorn.run(application, host=host, port=port, log_level="warning")


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be served (in use, not an address here), or None."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))  # no SO_REUSEADDR: a listening server makes this fail
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"{host}:{port} is in use (another tuner server?)"
            return f"cannot listen on {host}:{port} ({exc.strerror or exc})"
    return None
