"""The web UI's pages (runs, new run, one run) and the workspace files they show (thumbnails,
images, downloads)."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from tuner.plugins.webui import forms
from tuner.plugins.webui.server import Server


def routes(server: Server) -> list[Route]:
    async def runs_page(request: Request) -> Response:
        return server.page("runs.html", runs=server.space.runs())

    async def new_page(request: Request) -> Response:
        family = request.query_params.get("family") or (server.families[0] if server.families else None)
        schema = forms.form_schema(server.host_for(family))
        return server.page("new.html", schema=schema, family=family)

    async def run_page(request: Request) -> Response:
        folder = server.run_folder(request)
        return server.page("run.html", path=server.space.relative(folder), name=folder.name)

    async def thumbnail(request: Request) -> Response:
        path = server.space.resolve(request.path_params["path"])
        data = await run_in_threadpool(server.thumbnails.get, path)
        return Response(data, media_type="image/jpeg")

    async def file(request: Request) -> Response:
        path = server.space.resolve(request.path_params["path"])
        if not path.is_file():
            raise FileNotFoundError(request.path_params["path"])
        if request.query_params.get("download"):
            return FileResponse(path, filename=path.name, content_disposition_type="attachment")
        return FileResponse(path)

    return [
        Route("/", runs_page),
        Route("/new", new_page),
        Route("/run/{path:path}", run_page),
        Route("/thumb/{path:path}", thumbnail),
        Route("/files/{path:path}", file),
    ]
