"""What the web UI's routes share: the workspace, the job queue, templates, the installed families,
and the small helpers every handler uses (one page render, one refusal, one family host)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from tuner.core.api import PluginHost, TunerError
from tuner.plugins.webui.jobs import Jobs
from tuner.plugins.webui.workspace import Workspace

HERE = Path(__file__).parent


@dataclass
class Server:
    """One ``tuner server``: built once by :func:`tuner.plugins.webui.app.create_app`."""

    space: Workspace
    jobs: Jobs
    thumbnails: Any
    token: str
    families: list[str]
    templates: Any = None
    estimate_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        import jinja2

        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
        )

    def page(self, template: str, **context: Any) -> HTMLResponse:
        html = self.templates.get_template(template).render(
            token=self.token, families=self.families, workspace=str(self.space.root), **context
        )
        return HTMLResponse(html)

    def host_for(self, family: str | None) -> PluginHost:
        if family not in self.families:
            raise TunerError(f"unknown family {family!r}; installed: {', '.join(self.families)}")
        return PluginHost(family)

    def run_folder(self, request: Request) -> Path:
        return self.space.resolve(request.path_params["path"], must_exist=False)


MAX_BODY = 1 << 20  # the UI's largest body is a form of a few KiB


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object, or an empty one (a body that is not an object says nothing); a
    body over ``MAX_BODY`` is refused (the guard refuses a declared one before it is read)."""
    import json

    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise TunerError(f"request body of {len(raw)} bytes refused; the limit is {MAX_BODY}")
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def problem(message: str, status: int = 400) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def public(result: dict[str, Any]) -> dict[str, Any]:
    """A form check's result as the page sees it (no config object, no paths outside configs/)."""
    if "error" in result:
        return {"ok": False, "error": result["error"], "key": result.get("key")}
    return {"ok": True, "warnings": result["warnings"], "config_file": f"configs/{result['file'].name}"}
