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
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tuner.core.errors import TunerError, first_line
from tuner.core.plugins import PluginHost
from tuner.core.runinfo import CONFIG_FILE
from tuner.plugins.webui import forms
from tuner.plugins.webui.jobs import Jobs, tuner_command
from tuner.plugins.webui.workspace import OutsideWorkspace, Workspace, browse

HERE = Path(__file__).parent
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
        if not self.host_allowed(request.headers.get("host", "")):
            response = PlainTextResponse("refused: unexpected Host header (DNS rebinding?)", status_code=400)
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
    import jinja2

    space = Workspace(workspace)
    jobs = Jobs(space, max_running=max_running)
    thumbnails = Thumbnails()
    templates = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    estimate_lock = threading.Lock()
    families = sorted(PluginHost().families)

    def page(template: str, **context: Any) -> HTMLResponse:
        html = templates.get_template(template).render(
            token=token, families=families, workspace=str(space.root), **context
        )
        return HTMLResponse(html)

    def host_for(family: str | None) -> PluginHost:
        if family not in families:
            raise TunerError(f"unknown family {family!r}; installed: {', '.join(families)}")
        return PluginHost(family)

    def run_folder(request: Request) -> Path:
        return space.resolve(request.path_params["path"], must_exist=False)

    # -- pages ------------------------------------------------------------------------------------

    async def runs_page(request: Request) -> Response:
        return page("runs.html", runs=space.runs())

    async def new_page(request: Request) -> Response:
        family = request.query_params.get("family") or (families[0] if families else None)
        schema = forms.form_schema(host_for(family))
        return page("new.html", schema=schema, family=family)

    async def run_page(request: Request) -> Response:
        folder = run_folder(request)
        return page("run.html", path=space.relative(folder), name=folder.name)

    # -- API: runs --------------------------------------------------------------------------------

    async def api_runs(request: Request) -> Response:
        rows = space.runs()
        with jobs._lock:
            waiting = [
                {"path": space.relative(job["output_dir"]), "name": Path(job["output_dir"]).name, "kind": job["kind"]}
                for job in jobs.queued
            ]
        return JSONResponse({"runs": rows, "queued": waiting})

    async def api_run(request: Request) -> Response:
        folder = run_folder(request)
        try:
            since = max(0, int(request.query_params.get("since", "0")))
        except ValueError:
            since = 0
        detail = space.run_detail(folder, since)
        job = jobs.job_for(folder)
        detail["job"] = {"kind": job["kind"], "state": job["state"]} if job else None
        if job and job["kind"] == "run" and detail["status"] in ("none", "finished", "stopped", "died", "failed"):
            detail["status"] = "queued" if job["state"] == "queued" else "launching"
        return JSONResponse(detail)

    async def api_stop(request: Request) -> Response:
        return JSONResponse({"message": jobs.stop(run_folder(request))})

    async def api_resume(request: Request) -> Response:
        folder = run_folder(request)
        body = await _json(request)
        config = folder / CONFIG_FILE
        if not config.is_file():
            return _problem(f"{space.relative(folder)} has no {CONFIG_FILE} to resume from")
        if jobs.job_for(folder) or (space.run_summary(folder) or {}).get("alive"):
            return _problem("the run is queued or running")
        argv = [*tuner_command(), "run", "--config", str(config), "--set", "resume_from_checkpoint=latest"]
        if body.get("max_train_steps") not in (None, ""):
            try:
                steps = int(body["max_train_steps"])
            except (TypeError, ValueError):
                return _problem(f"max_train_steps: {body['max_train_steps']!r} is not a whole number")
            argv += ["--set", f"max_train_steps={steps}"]
        jobs.submit("run", argv, folder, folder / "console.log", label=f"resume {folder.name}")
        return JSONResponse({"message": "queued: resumes from the last checkpoint"})

    async def api_sample(request: Request) -> Response:
        folder = run_folder(request)
        body = await _json(request)
        prompt = str(body.get("prompt") or "").strip()
        if not prompt:
            return _problem("prompt: write what to render")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = folder / "samples" / stamp
        recipe = folder / "recipe.json"
        if recipe.is_file():
            argv = [*tuner_command(), "sample", "--recipe", str(recipe)]
        else:
            loras = sorted(folder.glob("*.safetensors"))
            if not loras or not (folder / CONFIG_FILE).is_file():
                return _problem("no LoRA yet: sampling needs a finished run")
            argv = [*tuner_command(), "sample", "--config", str(folder / CONFIG_FILE), "--lora", str(loras[0])]
        argv += ["--prompt", prompt, "--out", str(out)]
        for field, option, kind in (
            ("seed", "--seed", int),
            ("steps", "--steps", int),
            ("guidance", "--guidance", float),
            ("lora_scale", "--lora-scale", float),
        ):
            if body.get(field) not in (None, ""):
                try:
                    argv += [option, str(kind(body[field]))]
                except (TypeError, ValueError):
                    return _problem(f"{field}: {body[field]!r} is not a number")
        jobs.submit("sample", argv, folder, out / "sample.log", label=f"sample {folder.name}")
        return JSONResponse({"message": f"queued: images go to {space.relative(out)}", "folder": space.relative(out)})

    # -- API: the new-run form ------------------------------------------------------------------

    async def api_form(request: Request) -> Response:
        return JSONResponse(forms.form_schema(host_for(request.path_params["family"])))

    async def checked(request: Request, check_data: bool = False) -> tuple[dict[str, Any], Any]:
        body = await _json(request)
        host = host_for(body.get("family"))
        return await run_in_threadpool(forms.validate, space, host, body.get("values") or {}, check_data), host

    async def api_validate(request: Request) -> Response:
        result, _ = await checked(request)
        return JSONResponse(_public(result))

    async def api_save(request: Request) -> Response:
        result, _ = await checked(request)
        if "error" in result:
            return JSONResponse(_public(result), status_code=422)
        path = forms.write_config(result["file"], result["raw"])
        return JSONResponse({**_public(result), "message": f"wrote {space.relative(path)}"})

    async def api_start(request: Request) -> Response:
        result, _ = await checked(request, check_data=True)
        if "error" in result:
            return JSONResponse(_public(result), status_code=422)
        output = Path(result["config"].output_dir).resolve()
        if (output / "run.json").exists() or jobs.job_for(output):
            return JSONResponse(
                {
                    "error": f"output_dir: {space.relative(output)} already holds a run; resume it or choose another folder",
                    "key": "output_dir",
                },
                status_code=422,
            )
        path = forms.write_config(result["file"], result["raw"])
        output.mkdir(parents=True, exist_ok=True)
        argv = [*tuner_command(), "run", "--config", str(path)]
        jobs.submit("run", argv, output, output / "console.log", label=output.name)
        return JSONResponse({**_public(result), "run": space.relative(output)})

    async def api_estimate(request: Request) -> Response:
        result, host = await checked(request)
        if "error" in result:
            return JSONResponse(_public(result))

        def estimate() -> dict[str, Any]:
            from tuner.core.estimate.cached import cached_estimate
            from tuner.core.runtime import device_type

            config = result["config"]
            with estimate_lock:  # remembered as a run's start remembers it: toggling back is instant
                try:
                    found, _ = cached_estimate(host, config, device_type(), Path(config.cache_dir))
                except Exception as exc:  # advisory, as in `tuner run`: a missing config file, no network
                    return {"error": f"memory estimate unavailable: {first_line(exc)}"}
            return {"text": found.table(), "summary": found.summary()}

        return JSONResponse(await run_in_threadpool(estimate))

    async def api_buckets(request: Request) -> Response:
        result, _ = await checked(request)
        if "error" in result:
            return JSONResponse(_public(result))
        try:
            return JSONResponse({"text": await run_in_threadpool(forms.bucket_table, result["config"])})
        except TunerError as exc:
            return JSONResponse({"error": str(exc)})

    async def api_browse(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(browse, space, request.query_params.get("path", ".")))

    # -- files ------------------------------------------------------------------------------------

    async def thumbnail(request: Request) -> Response:
        path = space.resolve(request.path_params["path"])
        data = await run_in_threadpool(thumbnails.get, path)
        return Response(data, media_type="image/jpeg")

    async def file(request: Request) -> Response:
        path = space.resolve(request.path_params["path"])
        if not path.is_file():
            raise FileNotFoundError(request.path_params["path"])
        if request.query_params.get("download"):
            return FileResponse(path, filename=path.name, content_disposition_type="attachment")
        return FileResponse(path)

    # -- errors -----------------------------------------------------------------------------------

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "not found"}, status_code=404)

    async def outside(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "refused: outside the workspace"}, status_code=403)

    async def tuner_error(request: Request, exc: Exception) -> Response:
        return _problem(str(exc))

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        jobs.start()
        yield
        jobs.close()

    routes = [
        Route("/", runs_page),
        Route("/new", new_page),
        Route("/run/{path:path}", run_page),
        Route("/api/runs", api_runs),
        Route("/api/run/{path:path}/stop", api_stop, methods=["POST"]),
        Route("/api/run/{path:path}/resume", api_resume, methods=["POST"]),
        Route("/api/run/{path:path}/sample", api_sample, methods=["POST"]),
        Route("/api/run/{path:path}", api_run),
        Route("/api/form/{family}", api_form),
        Route("/api/validate", api_validate, methods=["POST"]),
        Route("/api/estimate", api_estimate, methods=["POST"]),
        Route("/api/buckets", api_buckets, methods=["POST"]),
        Route("/api/config", api_save, methods=["POST"]),
        Route("/api/start", api_start, methods=["POST"]),
        Route("/api/browse", api_browse),
        Route("/thumb/{path:path}", thumbnail),
        Route("/files/{path:path}", file),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            FileNotFoundError: not_found,
            NotADirectoryError: not_found,
            OutsideWorkspace: outside,
            TunerError: tuner_error,
        },
    )
    app.state.workspace, app.state.jobs = space, jobs
    return Guard(app, token, port, allowed_hosts)


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _problem(message: str, status: int = 400) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def _public(result: dict[str, Any]) -> dict[str, Any]:
    if "error" in result:
        return {"ok": False, "error": result["error"], "key": result.get("key")}
    return {"ok": True, "warnings": result["warnings"], "config_file": f"configs/{result['file'].name}"}
