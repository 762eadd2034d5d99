"""The web UI's Starlette application: pages rendered on the server, a JSON API the pages poll, and
the guard every request passes (Host header, token, CSRF header for changes, workspace-only paths).

Every run and sample is a ``tuner`` CLI process started by :class:`~tuner.plugins.webui.jobs.Jobs`;
the server itself never trains.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from tuner.core.api import PluginHost, TunerError
from tuner.plugins.webui import form_api, pages, runs_api
from tuner.plugins.webui.jobs import Jobs
from tuner.plugins.webui.server import HERE, MAX_BODY, Server, problem
from tuner.plugins.webui.workspace import OutsideWorkspace, Workspace

TOKEN_HEADER = "x-tuner-token"
CHANGING = ("POST", "PUT", "PATCH", "DELETE")
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",  # the first URL carries the token
    "cache-control": "no-store",
}


class Guard:
    """ASGI middleware: refuses a Host that is not an IP address, ``localhost`` or an allowed name
    (DNS rebinding), a request without the token (query on the first visit, then a cookie), and a
    state-changing request without the token in a header (a page on another site cannot set it)."""

    def __init__(self, app: Any, token: str, port: int, allowed_hosts: Iterable[str]) -> None:
        self.app, self.token, self.port = app, token, port
        self.allowed = {"localhost", *(h.lower() for h in allowed_hosts)}
        self.cookie = f"tuner_token_{port}"

    def host_allowed(self, header: str) -> bool:
        name, _, port = header.rpartition(":") if not header.endswith("]") else (header, "", "")
        if not name:
            name, port = header, ""
        if port and port != str(self.port):
            return False
        name = name.lower()
        if name in self.allowed:
            return True
        try:
            ipaddress.ip_address(name.strip("[]"))
            return True  # an address literal cannot be rebound to another machine by DNS
        except ValueError:
            return False

    def _valid(self, candidate: str | None) -> bool:
        return bool(candidate) and hmac.compare_digest(candidate.encode(), self.token.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        response: Response | None = None
        declared = request.headers.get("content-length", "0")
        if not self.host_allowed(request.headers.get("host", "")):
            response = PlainTextResponse("refused: unexpected Host header (DNS rebinding?)", status_code=400)
        elif not declared.isdigit() or int(declared) > MAX_BODY:
            response = JSONResponse({"error": f"refused: a body over {MAX_BODY} bytes"}, status_code=413)
        elif request.method == "GET" and self._valid(request.query_params.get("token")):
            query = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.path + (f"?{urlencode(query)}" if query else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(self.cookie, self.token, httponly=True, samesite="strict", path="/")
        elif request.method in CHANGING and not self._valid(request.headers.get(TOKEN_HEADER)):
            response = JSONResponse({"error": f"refused: a change needs the {TOKEN_HEADER} header"}, status_code=403)
        elif not (self._valid(request.cookies.get(self.cookie)) or self._valid(request.headers.get(TOKEN_HEADER))):
            response = HTMLResponse(
                "<h1>tuner server</h1><p>Open the link <code>tuner server</code> printed: it ends with "
                "<code>?token=...</code>.</p>",
                status_code=401,
            )
        if response is not None:
            response.headers.update(SECURITY_HEADERS)
            return await response(scope, receive, send)

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Thumbnails:
    """Small JPEGs of dataset images, kept in memory (most recent first)."""

    def __init__(self, size: int = 160, keep: int = 512) -> None:
        self.size, self.keep = size, keep
        self._cache: OrderedDict[tuple[str, float], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> bytes:
        key = (str(path), path.stat().st_mtime)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        import io

        from PIL import Image

        with Image.open(path) as image:
            image.draft("RGB", (self.size, self.size))
            image.thumbnail((self.size, self.size))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=80)
        data = buffer.getvalue()
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        return data


def create_app(
    workspace: str | Path, token: str, port: int = 8001, allowed_hosts: Iterable[str] = (), max_running: int = 1
) -> Any:
    """The guarded Starlette app: pages, the runs API and the new-run form's API over one workspace."""
    space = Workspace(workspace)
    jobs = Jobs(space, max_running=max_running)
    server = Server(space, jobs, Thumbnails(), token, sorted(PluginHost().families))

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "not found"}, status_code=404)

    async def outside(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "refused: outside the workspace"}, status_code=403)

    async def tuner_error(request: Request, exc: Exception) -> Response:
        return problem(str(exc))

    async def os_error(request: Request, exc: Exception) -> Response:  # a name too long, no permission
        return problem(f"{exc.strerror or type(exc).__name__}: {exc.filename or request.url.path}"[:300])

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        jobs.start()
        yield
        jobs.close()

    static = Mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app = Starlette(
        routes=[*pages.routes(server), *runs_api.routes(server), *form_api.routes(server), static],
        lifespan=lifespan,
        exception_handlers={
            FileNotFoundError: not_found,
            NotADirectoryError: not_found,
            OutsideWorkspace: outside,
            TunerError: tuner_error,
            OSError: os_error,
        },
    )
    app.state.workspace, app.state.jobs = space, jobs
    return Guard(app, token, port, allowed_hosts)
