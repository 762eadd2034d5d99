"""The web UI's API for runs: the list, one run's progress, stop, resume, sample and the LoRA tools
(each a queued ``tuner`` process)."""

from __future__ import annotations

import math
import time
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tuner.core.api import CONFIG_FILE
from tuner.plugins.webui.jobs import tuner_command
from tuner.plugins.webui.server import Server, problem, read_json
from tuner.plugins.webui.workspace import last_line

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # as run.json writes its times (sorted with them)


def _updated(folder: Path) -> float:
    """When the folder's run.json last changed (0 without one)."""
    try:
        return (folder / "run.json").stat().st_mtime
    except OSError:
        return 0.0


def routes(server: Server) -> list[Route]:
    async def api_runs(request: Request) -> Response:
        rows = server.space.runs()
        for job in server.jobs.refused_runs():  # refused before the run began: no folder, its log says why
            try:
                path = server.space.relative(job["output_dir"])
            except ValueError:
                continue  # a folder no longer inside the workspace
            rows.append(
                {
                    "path": path,
                    "name": Path(job["output_dir"]).name,
                    "status": "failed",
                    "alive": False,
                    "step": 0,
                    "started": time.strftime(TIME_FORMAT, time.localtime(job["submitted"])),
                    "reason": last_line(Path(job["log"])),
                }
            )
        rows.sort(key=lambda row: row.get("started") or "", reverse=True)
        waiting = [
            {
                "path": server.space.relative(job["output_dir"]),
                "name": Path(job["output_dir"]).name,
                "kind": job["kind"],
            }
            for job in server.jobs.waiting()
        ]
        return JSONResponse({"runs": rows, "queued": waiting})

    async def api_run(request: Request) -> Response:
        folder = server.run_folder(request)
        try:
            since = max(0, int(request.query_params.get("since", "0")))
        except ValueError:
            since = 0
        last = server.jobs.last_run_job(folder)
        detail = server.space.run_detail(folder, since, Path(last["log"]) if last else None)
        if last and last.get("returncode") and last.get("ended", 0) > _updated(folder):
            # a resume the CLI refused leaves the run as it was: its reason is shown on the page
            detail["job_error"] = last_line(Path(last["log"]))
        job = server.jobs.job_for(folder)
        detail["job"] = {"kind": job["kind"], "state": job["state"]} if job else None
        if job and job["kind"] == "run" and detail["status"] in ("none", "finished", "stopped", "died", "failed"):
            detail["status"] = "queued" if job["state"] == "queued" else "launching"
        return JSONResponse(detail)

    async def api_stop(request: Request) -> Response:
        return JSONResponse({"message": server.jobs.stop(server.run_folder(request))})

    async def api_resume(request: Request) -> Response:
        folder = server.run_folder(request)
        body = await read_json(request)
        config = folder / CONFIG_FILE
        if not config.is_file():
            return problem(f"{server.space.relative(folder)} has no {CONFIG_FILE} to resume from")
        if server.jobs.job_for(folder) or (server.space.run_summary(folder) or {}).get("alive"):
            return problem("the run is queued or running")
        argv = [*tuner_command(), "run", "--config", str(config), "--set", "resume_from_checkpoint=latest"]
        if body.get("max_train_steps") not in (None, ""):
            try:
                steps = int(body["max_train_steps"])
            except (TypeError, ValueError, OverflowError):
                return problem(f"max_train_steps: {body['max_train_steps']!r} is not a whole number")
            argv += ["--set", f"max_train_steps={steps}"]
        server.jobs.submit("run", argv, folder, label=f"resume {folder.name}")
        return JSONResponse({"message": "queued: resumes from the last checkpoint"})

    async def api_sample(request: Request) -> Response:
        folder = server.run_folder(request)
        body = await read_json(request)
        prompt = str(body.get("prompt") or "").strip()
        if not prompt:
            return problem("prompt: write what to render")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = folder / "samples" / stamp
        recipe = folder / "recipe.json"
        if recipe.is_file():
            argv = [*tuner_command(), "sample", "--recipe", str(recipe)]
        else:
            loras = sorted(folder.glob("*.safetensors"))
            if not loras or not (folder / CONFIG_FILE).is_file():
                return problem("no LoRA yet: sampling needs a finished run")
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
                    number = kind(body[field])
                    if not math.isfinite(number):
                        raise ValueError(number)
                    argv += [option, str(number)]
                except (TypeError, ValueError, OverflowError):
                    return problem(f"{field}: {body[field]!r} is not a finite number")
        server.jobs.submit("sample", argv, folder, out / "sample.log", label=f"sample {folder.name}")
        return JSONResponse(
            {"message": f"queued: images go to {server.space.relative(out)}", "folder": server.space.relative(out)}
        )

    async def api_lora(request: Request) -> Response:
        """Resize the run's LoRA or convert it to another layout, beside it (``tuner lora ...``)."""
        folder = server.run_folder(request)
        body = await read_json(request)
        lora = folder / "pytorch_lora_weights.safetensors"
        if not lora.is_file():
            return problem("no LoRA yet: the LoRA tools need a finished run's pytorch_lora_weights.safetensors")
        action = body.get("action")
        if action == "resize":
            try:
                rank = int(body.get("rank"))
                if rank < 1:
                    raise ValueError(rank)
            except (TypeError, ValueError, OverflowError):
                return problem(f"rank: {body.get('rank')!r} is not a whole number of at least 1")
            out = folder / f"pytorch_lora_weights_rank{rank}.safetensors"
            argv = [*tuner_command(), "lora", "resize", str(lora), "--rank", str(rank), "--out", str(out)]
        elif action == "convert":
            to = str(body.get("to") or "")
            family = (server.space.run_summary(folder) or {}).get("family")
            if to not in ("comfyui",) or not family:
                return problem(f"to: {to!r}: the run's LoRA converts to comfyui (its family must be known)")
            out = folder / f"pytorch_lora_weights_{to}.safetensors"
            argv = [*tuner_command(), "lora", "convert", str(lora), "--to", to, "--plugin", family, "--out", str(out)]
        else:
            return problem(f"action: {action!r}: resize or convert")
        if out.exists():
            return problem(f"{server.space.relative(out)} is there already")
        server.jobs.submit("lora", argv, folder, label=f"lora {action} {folder.name}")
        return JSONResponse({"message": f"queued: writes {server.space.relative(out)}"})

    return [
        Route("/api/runs", api_runs),
        Route("/api/run/{path:path}/lora", api_lora, methods=["POST"]),
        Route("/api/run/{path:path}/stop", api_stop, methods=["POST"]),
        Route("/api/run/{path:path}/resume", api_resume, methods=["POST"]),
        Route("/api/run/{path:path}/sample", api_sample, methods=["POST"]),
        Route("/api/run/{path:path}", api_run),
    ]
