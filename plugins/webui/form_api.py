"""The web UI's API for the new-run form: the form's schema, checking, saving and starting a
config, its memory estimate and bucket table, and the workspace-only data picker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tuner.core.api import TunerError, first_line
from tuner.plugins.webui import forms
from tuner.plugins.webui.jobs import tuner_command
from tuner.plugins.webui.server import Server, public, read_json
from tuner.plugins.webui.workspace import browse


def routes(server: Server) -> list[Route]:
    async def api_form(request: Request) -> Response:
        return JSONResponse(forms.form_schema(server.host_for(request.path_params["family"])))

    async def checked(request: Request, check_data: bool = False) -> tuple[dict[str, Any], Any]:
        body = await read_json(request)
        host = server.host_for(body.get("family"))
        values = body.get("values") or {}
        if not isinstance(values, dict):
            return {
                "error": f"values: expected an object of key: value, got {type(values).__name__}",
                "key": None,
            }, host
        return await run_in_threadpool(forms.validate, server.space, host, values, check_data), host

    async def api_validate(request: Request) -> Response:
        result, _ = await checked(request)
        return JSONResponse(public(result))

    async def api_save(request: Request) -> Response:
        result, _ = await checked(request)
        if "error" in result:
            return JSONResponse(public(result), status_code=422)
        path = forms.write_config(result["file"], result["raw"])
        return JSONResponse({**public(result), "message": f"wrote {server.space.relative(path)}"})

    async def api_start(request: Request) -> Response:
        result, _ = await checked(request, check_data=True)
        if "error" in result:
            return JSONResponse(public(result), status_code=422)
        output = Path(result["config"].output_dir).resolve()
        if (output / "run.json").exists() or server.jobs.job_for(output):
            return JSONResponse(
                {
                    "error": f"output_dir: {server.space.relative(output)} already holds a run; resume it or choose another folder",
                    "key": "output_dir",
                },
                status_code=422,
            )
        path = forms.write_config(result["file"], result["raw"])
        argv = [*tuner_command(), "run", "--config", str(path)]
        server.jobs.submit("run", argv, output, label=output.name)  # the run makes its folder once it begins
        return JSONResponse({**public(result), "run": server.space.relative(output)})

    async def api_estimate(request: Request) -> Response:
        result, host = await checked(request)
        if "error" in result:
            return JSONResponse(public(result))

        def estimate() -> dict[str, Any]:
            from tuner.core.api import cached_estimate, device_type

            config = result["config"]
            with server.estimate_lock:  # remembered as a run's start remembers it: toggling back is instant
                try:
                    found, _ = cached_estimate(host, config, device_type(), Path(config.cache_dir))
                except Exception as exc:  # advisory, as in `tuner run`: a missing config file, no network
                    return {"error": f"memory estimate unavailable: {first_line(exc)}"}
            return {"text": found.table(), "summary": found.summary()}

        return JSONResponse(await run_in_threadpool(estimate))

    async def api_buckets(request: Request) -> Response:
        result, _ = await checked(request)
        if "error" in result:
            return JSONResponse(public(result))
        try:
            return JSONResponse({"text": await run_in_threadpool(forms.bucket_table, result["config"])})
        except TunerError as exc:
            return JSONResponse({"error": str(exc)})

    async def api_browse(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(browse, server.space, request.query_params.get("path", ".")))

    return [
        Route("/api/form/{family}", api_form),
        Route("/api/validate", api_validate, methods=["POST"]),
        Route("/api/estimate", api_estimate, methods=["POST"]),
        Route("/api/buckets", api_buckets, methods=["POST"]),
        Route("/api/config", api_save, methods=["POST"]),
        Route("/api/start", api_start, methods=["POST"]),
        Route("/api/browse", api_browse),
    ]
