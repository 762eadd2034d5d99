"""The web UI's server through Starlette's test client: the guard (token, Host, CSRF header), no
route outside the workspace, the form generated from the plugins' keys with the CLI's messages, the
data picker, the run list read from output folders, and the job queue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tuner.core.host.manager import PluginHost
from tuner.core.outputs.runinfo import read_run

from .conftest import REPO, base_settings, train
from .webui_support import TOKEN, free_port, make_workspace

PORT = 8123
BASE = f"http://127.0.0.1:{PORT}"


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    space = make_workspace(
        tmp_path, REPO / "examples" / "models" / "tiny-chroma", REPO / "examples" / "data" / "shapes"
    )
    monkeypatch.chdir(space)  # `tuner server` works in its workspace
    return space


@pytest.fixture
def client(workspace):
    from starlette.testclient import TestClient

    from tuner.plugins.webui.app import create_app

    app = create_app(workspace, TOKEN, port=PORT, allowed_hosts=["trainer.lan"])
    with TestClient(app, base_url=BASE, follow_redirects=False) as client:
        client.cookies.set(f"tuner_token_{PORT}", TOKEN)
        client.headers["x-tuner-token"] = TOKEN
        yield client


def anonymous(workspace):
    from starlette.testclient import TestClient

    from tuner.plugins.webui.app import create_app

    return TestClient(create_app(workspace, TOKEN, port=PORT), base_url=BASE, follow_redirects=False)


VALUES = {
    "pretrained_model_name_or_path": "models/tiny-chroma",
    "data_dir": "data/shapes",
    "output_dir": "output/ui",
    "resolution": "64",
    "tokenizer_max_length": "16",
    "mixed_precision": "no",
    "max_train_steps": "4",
}


# -- the guard --------------------------------------------------------------------------------------


def test_every_request_needs_the_token_then_a_cookie(workspace):
    with anonymous(workspace) as browser:
        assert browser.get("/").status_code == 401
        assert browser.get("/api/runs").status_code == 401
        assert browser.get("/static/app.js").status_code == 401
        assert browser.get("/?token=wrong").status_code == 401
        first = browser.get(f"/new?family=chroma&token={TOKEN}")
        assert first.status_code == 303 and first.headers["location"] == "/new?family=chroma"  # token out of the URL
        cookie = first.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        page = browser.get("/new?family=chroma")  # the cookie from now on
        assert page.status_code == 200 and f'content="{TOKEN}"' in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY" and page.headers["referrer-policy"] == "no-referrer"


def test_a_change_needs_the_token_in_a_header_so_other_sites_cannot_post(workspace):
    with anonymous(workspace) as browser:
        browser.cookies.set(f"tuner_token_{PORT}", TOKEN)  # a cross-site form would carry the cookie...
        refused = browser.post("/api/config", json={"family": "chroma", "values": VALUES})
        assert refused.status_code == 403 and "x-tuner-token" in refused.json()["error"]
        assert not (workspace / "configs").exists()
        allowed = browser.post(
            "/api/config", json={"family": "chroma", "values": VALUES}, headers={"X-Tuner-Token": TOKEN}
        )
        assert allowed.status_code == 200 and (workspace / "configs" / "ui.yaml").is_file()


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        (f"127.0.0.1:{PORT}", True),
        (f"localhost:{PORT}", True),
        (f"[::1]:{PORT}", True),
        (f"192.168.1.20:{PORT}", True),  # an address literal cannot be rebound by DNS
        (f"trainer.lan:{PORT}", True),  # --allowed-host
        (f"attacker.example:{PORT}", False),  # DNS rebinding: a name that now points at 127.0.0.1
        ("127.0.0.1:9999", False),
        ("", False),
    ],
)
def test_the_host_header_must_name_this_server(client, host, allowed):
    response = client.get("/api/runs", headers={"host": host})
    assert (response.status_code == 200) is allowed, response.text


def test_no_route_reads_outside_the_workspace(client, workspace, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    (tmp_path / "outside").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside" / "x.png")
    (workspace / "link.txt").symlink_to(secret)
    (workspace / "data" / "out").symlink_to(tmp_path / "outside", target_is_directory=True)
    attempts = [
        "/files/%2e%2e/secret.txt",
        "/files/..%2fsecret.txt",
        f"/files/{secret}",  # an absolute path
        "/files/link.txt",  # a symlink out
        "/files/data/out/x.png",
        "/files/%252e%252e/secret.txt",  # double-encoded: a name, not a way up
        "/thumb/data/out/x.png",
        "/api/browse?path=..",
        f"/api/browse?path={tmp_path}",
        "/api/browse?path=data/out",
        "/api/run/%2e%2e",
        "/api/run/..%2f..%2f",
    ]
    for url in attempts:
        response = client.get(url)
        assert response.status_code in (403, 404), url
        assert "top secret" not in response.text and "x.png" not in response.text, url
    assert client.get("/files/data/shapes/00_red_circle.txt").text.startswith("a red circle")
    listing = client.get("/api/browse?path=data").json()
    assert [f["name"] for f in listing["folders"]] == ["shapes"]  # the link out is not offered
    # nor can a config make a run read or write there
    for key, value in (("output_dir", str(tmp_path / "elsewhere")), ("data_dir", "../"), ("cache_dir", "/tmp/c")):
        result = client.post("/api/validate", json={"family": "chroma", "values": {**VALUES, key: value}}).json()
        assert result["key"] == key and "outside the workspace" in result["error"], result


# -- the new-run form --------------------------------------------------------------------------------


def test_the_form_is_generated_from_the_family_and_its_plugins_keys(client):
    schema = client.get("/api/form/chroma").json()
    assert [g["name"] for g in schema["groups"]] == ["model", "data", "LoRA", "optimisation", "validation", "saving"]
    fields = {
        f["name"]: (g["name"], part, f) for g in schema["groups"] for part in ("central", "advanced") for f in g[part]
    }
    assert fields["flux_t5_padding"][2]["owner"] == "chroma"  # the family plugin's own key
    assert fields["learning_rate"][:2] == ("optimisation", "central")
    assert fields["adam_beta2"][:2] == ("optimisation", "advanced")
    assert fields["validation_prompts"][:2] == ("validation", "central")
    assert fields["model_flavour"][2]["choices"] == ["base", "hd", "flash"]
    assert {"no_change", "int8-quanto", "nf4-bnb"} <= set(fields["base_model_precision"][2]["choices"])
    assert fields["resolution"][2]["memory"] and not fields["learning_rate"][2]["memory"]
    assert fields["data_dir"][2]["browse"]
    refused_or_ignored = {"flux_fast_schedule", "flux_guidance_value", "model_type"}
    assert not refused_or_ignored & set(fields)
    central = [f["name"] for f in schema["groups"][0]["central"]]
    assert central[0] == "model_flavour"  # the order `tuner configure` asks in
    sd3 = client.get("/api/form/sd3").json()  # a third-party family's keys appear without changes here
    assert "sd3_lora_target" in {f["name"] for g in sd3["groups"] for p in ("central", "advanced") for f in g[p]}
    page = client.get("/new?family=chroma")
    assert page.status_code == 200 and 'id="k-flux_t5_padding"' in page.text
    assert client.get("/api/form/nope").json()["error"].startswith("unknown family 'nope'")


def test_form_errors_are_the_messages_tuner_run_prints(client, workspace):
    from typer.testing import CliRunner

    from tuner.core.cli import app

    for key, value in (("learning_rate", "abc"), ("mixed_precision", "fp8"), ("network_rank", "0")):
        result = client.post("/api/validate", json={"family": "chroma", "values": {**VALUES, key: value}}).json()
        assert result["ok"] is False and result["key"] == key
        saved = client.post("/api/config", json={"family": "chroma", "values": VALUES}).json()
        assert saved["config_file"] == "configs/ui.yaml"
        config = workspace / "configs" / "ui.yaml"
        text = config.read_text().replace(f"{key}: ", f"{key}: '{value}'  # ", 1)
        if f"{key}:" not in config.read_text():
            text += f"{key}: {value}\n"
        config.write_text(text)
        cli = CliRunner().invoke(app, ["run", "--config", "configs/ui.yaml"], catch_exceptions=True)
        assert str(cli.exception) == result["error"]  # the CLI prints it as "error: <message>"
        assert "\n" not in result["error"]
    started = client.post("/api/start", json={"family": "chroma", "values": {**VALUES, "data_dir": "models"}})
    assert started.status_code == 422 and started.json()["key"] == "data_dir"
    assert "holds no images" in started.json()["error"]


def test_save_config_writes_what_tuner_run_reads(client, workspace):
    from tuner.core.config.build import build_config
    from tuner.core.config.values import read_config_file

    response = client.post(
        "/api/config", json={"family": "chroma", "values": {**VALUES, "validation_prompts": "a\nb\n"}}
    )
    assert response.json()["message"] == "wrote configs/ui.yaml"
    raw = read_config_file(workspace / "configs" / "ui.yaml")
    assert raw["validation_prompts"] == ["a", "b"] and raw["resolution"] == 64 and raw["cache_dir"] == "cache"
    config = build_config(PluginHost("chroma"), raw, "ui.yaml")
    assert (config.model_family, config.network_rank, config.max_train_steps) == ("chroma", 16, 4)


def phase_mib(table: str, phase: str) -> float:
    """The memory panel's tensor bytes of one phase, in MiB (the table's first figure on its row)."""
    row = next(line for line in table.splitlines() if line.strip().startswith(phase))
    value, unit = row[len(row) - len(row.lstrip()) + len(phase) :].split()[:2]
    return float(value) * {"KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0}[unit]


def test_the_memory_panel_and_bucket_table_follow_the_settings(client):
    small = client.post("/api/estimate", json={"family": "chroma", "values": VALUES}).json()
    large = client.post("/api/estimate", json={"family": "chroma", "values": {**VALUES, "resolution": "128"}}).json()
    assert "64 px" in small["text"] and "128 px" in large["text"]
    # the numbers follow too: encoding images holds 4x the pixels, training more activations
    ratio = phase_mib(large["text"], "encode images") / phase_mib(small["text"], "encode images")
    assert 3 < ratio < 5, (small["text"], large["text"])
    assert phase_mib(large["text"], "train") > phase_mib(small["text"], "train")
    buckets = client.post(
        "/api/buckets",
        json={"family": "chroma", "values": {**VALUES, "resolution": "128", "aspect_bucket_alignment": "32"}},
    )
    assert buckets.json()["text"].startswith("3 bucket(s) for 20 image(s):")


def test_the_data_picker_counts_images_and_says_why_files_are_skipped(client, workspace):
    folder = workspace / "data" / "mine"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 20), "red").save(folder / "a.png")
    (folder / "a.txt").write_text("a red thing")
    Image.new("RGB", (20, 40), "blue").save(folder / "b.jpg")  # no caption
    Image.new("RGB", (8, 8)).save(folder / "sub" / "c.png")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.pdf").write_bytes(b"%PDF")
    Image.new("RGB", (8, 8)).save(folder / ".hidden.png")
    listing = client.get("/api/browse?path=data/mine").json()
    assert listing["folders"] == [{"name": "sub", "path": "data/mine/sub", "images": 1}]
    assert [(i["name"], i["caption"], i["size"]) for i in listing["images"]] == [
        ("a.png", "a red thing", [40, 20]),
        ("b.jpg", "", [20, 40]),
    ]
    assert listing["uncaptioned"] == 1 and listing["parent"] == "data"
    reasons = {s["name"]: s["why"] for s in listing["skipped"]}
    assert reasons["broken.png"].startswith("unreadable image") and reasons[".hidden.png"] == "hidden file"
    assert reasons["notes.pdf"].startswith("not an image")
    thumbnail = client.get("/thumb/data/mine/a.png")
    assert thumbnail.headers["content-type"] == "image/jpeg" and thumbnail.content[:2] == b"\xff\xd8"


# -- runs ---------------------------------------------------------------------------------------------


def test_the_run_list_reads_output_folders_including_runs_from_a_terminal(
    client, workspace, tiny_chroma, shapes_dir, monkeypatch
):
    settings = base_settings(tiny_chroma, shapes_dir, workspace)  # output_dir: <workspace>/out
    result, _, _ = train({**settings, "validation_prompts": ["a red circle"], "validation_num_inference_steps": 2})
    died = workspace / "output" / "killed"
    died.mkdir(parents=True)
    (died / "run.json").write_text(
        json.dumps({"status": "training", "pid": 2**22 + 7, "started": "2026-01-01T00:00:00+0000"})
    )
    live = workspace / "output" / "live"
    live.mkdir()
    (live / "run.json").write_text(
        json.dumps({"status": "training", "pid": os.getpid(), "started": "2026-01-02T00:00:00+0000"})
    )
    (workspace / "output" / "broken").mkdir()
    (workspace / "output" / "broken" / "run.json").write_text("[1, 2")  # damaged: listed with its problem
    refused = workspace / "output" / "refused"  # the CLI refused the config before the run began
    refused.mkdir()
    (refused / "console.log").write_text(
        "\n$ tuner run --config configs/refused.yaml\nerror: configs/refused.yaml: seed: bad\n"
    )
    assert client.get("/api/run/output/refused").json()["status"] == "failed"
    assert client.get("/api/run/output/refused").json()["reason"] == "error: configs/refused.yaml: seed: bad"
    runs = {run["path"]: run for run in client.get("/api/runs").json()["runs"]}
    assert set(runs) == {"out", "output/killed", "output/live", "output/broken"}
    assert runs["output/broken"]["status"] == "damaged"
    finished = runs["out"]
    assert (finished["status"], finished["family"], finished["precision"]) == ("finished", "chroma", "no_change")
    assert (finished["step"], finished["total"], finished["loss"]) == (4, 4, result.losses[-1])
    assert runs["output/killed"]["status"] == "died" and runs["output/live"]["status"] == "training"
    page = client.get("/")
    assert page.status_code == 200 and 'href="/run/out"' in page.text

    detail = client.get("/api/run/out?since=0").json()
    assert [r["loss"] for r in detail["records"]] == result.losses
    assert sum(detail["sigma_histogram"]) == 4  # one sigma per sample of each step
    assert client.get("/api/run/out?since=3").json()["records"] == detail["records"][3:]
    assert client.get("/api/run/out?since=99").json()["reset"] is True  # a log cut back by a resume
    assert [v["step"] for v in detail["validations"]] == [4]
    names = [f["name"] for f in detail["files"]]
    assert "pytorch_lora_weights.safetensors" in names and "config.yaml" in names
    download = client.get("/files/out/pytorch_lora_weights.safetensors?download=1")
    assert download.headers["content-disposition"].startswith("attachment")
    assert download.content == (workspace / "out" / "pytorch_lora_weights.safetensors").read_bytes()

    # the LoRA tools: each a queued `tuner lora` job writing beside the LoRA (run here in-process)
    import tuner.plugins.webui.runs_api as runs_api
    from tuner.plugins.webui.jobs import Jobs

    submitted = []
    monkeypatch.setattr(runs_api, "tuner_command", lambda: ["tuner"])
    monkeypatch.setattr(Jobs, "submit", lambda self, kind, argv, *a, **k: submitted.append((kind, argv)))
    assert "queued" in client.post("/api/run/out/lora", json={"action": "resize", "rank": 2}).json()["message"]
    assert "queued" in client.post("/api/run/out/lora", json={"action": "convert", "to": "comfyui"}).json()["message"]
    from typer.testing import CliRunner

    from tuner.core.cli import app

    for kind, argv in submitted:
        assert kind == "lora" and argv[:2] == ["tuner", "lora"]
        done = CliRunner().invoke(app, argv[1:])
        assert done.exit_code == 0, done.output
    names = {f["name"] for f in client.get("/api/run/out").json()["files"]}
    assert {"pytorch_lora_weights_rank2.safetensors", "pytorch_lora_weights_comfyui.safetensors"} <= names
    again = client.post("/api/run/out/lora", json={"action": "resize", "rank": 2})
    assert again.status_code == 400 and "is there already" in again.json()["error"]
    for body, says in (({"action": "resize", "rank": "x"}, "rank: 'x'"), ({"action": "melt"}, "resize or convert")):
        refused = client.post("/api/run/out/lora", json=body)
        assert refused.status_code == 400 and says in refused.json()["error"]


def test_a_torn_last_log_line_waits_for_its_end(workspace):
    from tuner.plugins.webui.workspace import LogCache

    log = workspace / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0, "sigmas": [0.5]}\n{"step": 2, "lo')
    cache = LogCache()
    assert [r["step"] for r in cache.read(log).records] == [1]
    with log.open("a") as handle:
        handle.write('ss": 0.5, "sigmas": [0.97]}\nnot json\n')
    parsed = cache.read(log)
    assert (
        [r["step"] for r in parsed.records] == [1, 2] and parsed.sigma_counts[10] == 1 and parsed.sigma_counts[19] == 1
    )


def sleeper(seconds: float, marker: Path) -> list[str]:
    code = f"import pathlib, time; pathlib.Path({str(marker)!r}).write_text('ran'); time.sleep({seconds})"
    return [sys.executable, "-c", code]


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_jobs_run_one_at_a_time_in_their_own_session_and_survive_a_server_restart(workspace):
    from tuner.plugins.webui.jobs import Jobs
    from tuner.plugins.webui.workspace import Workspace

    space = Workspace(workspace)
    jobs = Jobs(space, max_running=1)
    first, second = workspace / "output" / "first", workspace / "output" / "second"
    jobs.submit("run", sleeper(60, workspace / "first.ran"), first, first / "console.log")
    jobs.submit("run", sleeper(0, workspace / "second.ran"), second, second / "console.log")
    wait_for(lambda: (workspace / "first.ran").exists())
    pid = jobs.running[0]["pid"]
    assert os.getsid(pid) == pid  # its own session: the server's Ctrl-C or exit does not reach it
    assert jobs.job_for(second)["state"] == "queued" and not (workspace / "second.ran").exists()

    restarted = Jobs(space, max_running=1)  # a new server process reads jobs.json
    assert [j["pid"] for j in restarted.running] == [pid] and restarted.job_for(second)["state"] == "queued"
    assert restarted.stop(first).startswith("stopping")  # SIGTERM, as Ctrl-C
    wait_for(lambda: (restarted.tick(), (workspace / "second.ran").exists())[1])
    assert restarted.job_for(first) is None
    jobs._children.pop(pid).wait(timeout=10)  # reap it (the first server's child)


def test_a_run_from_a_terminal_holds_the_queue(workspace):
    from tuner.plugins.webui.jobs import Jobs
    from tuner.plugins.webui.workspace import Workspace

    terminal = workspace / "output" / "terminal"
    terminal.mkdir(parents=True)
    record = {"status": "training", "pid": os.getpid(), "started": "2026-01-01T00:00:00+0000"}
    (terminal / "run.json").write_text(json.dumps(record))
    jobs = Jobs(Workspace(workspace), max_running=1)
    queued = workspace / "output" / "queued"
    jobs.submit("run", sleeper(0, workspace / "queued.ran"), queued, queued / "console.log")
    time.sleep(0.5)
    jobs.tick()
    assert jobs.job_for(queued)["state"] == "queued" and not (workspace / "queued.ran").exists()
    assert jobs.stop(queued) == "removed from the queue" and jobs.job_for(queued) is None
    assert read_run(terminal)["status"] == "training"


# -- the command --------------------------------------------------------------------------------------


def test_tuner_server_binds_loopback_prints_a_token_url_and_refuses_other_addresses(workspace):
    from typer.testing import CliRunner

    from tuner.core.cli import app, register_plugin_commands

    register_plugin_commands()
    refused = CliRunner().invoke(app, ["server", "--host", "0.0.0.0"])
    assert refused.exit_code != 0 and "not a loopback address" in str(refused.exception)
    assert "--allow-remote" in str(refused.exception)

    port = free_port()
    env = {**os.environ, "TUNER_SERVER_TOKEN": "from-the-environment"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tuner.core.cli", "server", "--port", str(port)],
        cwd=workspace,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = [process.stdout.readline().strip() for _ in range(2)]
        assert lines[1] == f"open http://127.0.0.1:{port}/?token=from-the-environment"
        import urllib.request

        def get(path):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}{path}", headers={"X-Tuner-Token": "from-the-environment"}
            )
            return json.loads(urllib.request.urlopen(request, timeout=5).read())

        deadline = time.monotonic() + 20
        while True:
            try:
                assert get("/api/runs") == {"runs": [], "queued": []}
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_without_the_extra_the_command_names_it(monkeypatch):
    from typer.testing import CliRunner

    from tuner.core.cli import app, register_plugin_commands

    register_plugin_commands()
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if `pip install tuner` without [webui]
    result = CliRunner().invoke(app, ["server"])
    assert str(result.exception) == "tuner server needs the webui extra: pip install 'tuner[webui]'"


def test_the_form_is_built_from_the_key_records_not_from_key_names():
    """forms.py reads a run's values where it needs them (where the run goes, which data) but keeps
    no table of keys: a key's group, place and meaning to the form come from its ConfigKey."""
    import ast

    names = {name for family in ("chroma", "flux", "sd3") for name in PluginHost(family).config_keys()}
    tree = ast.parse((REPO / "plugins" / "webui" / "forms.py").read_text())
    used = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    reads = {"output_dir", "data_dir", "datasets", "cache_dir", "caption_strategy", "model_family", "train_batch_size"}
    assert used & names <= reads


def test_a_plugin_key_lands_in_the_form_where_its_record_says():
    from tuner.core.api import ConfigKey, PluginError, hookimpl
    from tuner.plugins.webui import forms

    class Keys:
        def __init__(self, **fields):
            self.fields = fields

        @hookimpl
        def register_config_keys(self, register):
            register(ConfigKey("my_crop_margin", "int", 0, "Pixels kept around a crop.", **self.fields))

    host = PluginHost("chroma", extra_plugins=[("mine", Keys(group="data", central=True, memory=True))])
    data = next(g for g in forms.form_schema(host)["groups"] if g["name"] == "data")
    field = next(f for f in data["central"] if f["name"] == "my_crop_margin")
    assert field["memory"] and field["owner"] == "mine"
    hidden = PluginHost("chroma", extra_plugins=[("mine", Keys(in_form=False))])
    assert all(f["name"] != "my_crop_margin" for g in forms.form_schema(hidden)["groups"] for f in g["advanced"])
    with pytest.raises(PluginError, match=r"plugin 'mine'.*my_crop_margin.*group 'extras'; use one of model, data"):
        PluginHost("chroma", extra_plugins=[("mine", Keys(group="extras"))]).config_keys()


def test_saved_config_names_are_clean_and_never_replace_another_runs_config(client, workspace):
    first = client.post("/api/config", json={"family": "chroma", "values": VALUES}).json()
    assert first["message"] == "wrote configs/ui.yaml"
    again = client.post("/api/config", json={"family": "chroma", "values": VALUES}).json()
    assert again["message"] == "wrote configs/ui.yaml"  # the same run's config: saved over itself
    # another output folder with the same last name: its own file beside the first
    other = client.post("/api/config", json={"family": "chroma", "values": {**VALUES, "output_dir": "elsewhere/ui"}})
    assert other.json()["message"] == "wrote configs/ui-2.yaml"
    assert "elsewhere/ui" not in (workspace / "configs" / "ui.yaml").read_text()
    # a name with a newline cannot add lines to the file's header or leave the folder
    odd = client.post("/api/config", json={"family": "chroma", "values": {**VALUES, "output_dir": "output/a\nb: 1"}})
    assert odd.json()["message"] == "wrote configs/a-b-1.yaml"
    text = (workspace / "configs" / "a-b-1.yaml").read_text()
    assert text.splitlines()[0].startswith("# written by tuner server") and "\nb: 1" not in text


def test_a_second_server_on_a_busy_port_says_the_port_is_busy(workspace):
    import socket

    from tuner.plugins.webui.plugin import port_problem

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert port_problem("127.0.0.1", port) == f"127.0.0.1:{port} is in use (another tuner server?)"
        out = subprocess.run(
            [sys.executable, "-m", "tuner.core.cli", "server", "--port", str(port), "--workspace", str(workspace)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: --port {port}: 127.0.0.1:{port} is in use (another tuner server?); stop the other server or "
        "choose another --port"
    ]
    assert port_problem("127.0.0.1", port) is None  # free again


def test_no_request_body_or_path_makes_the_server_fail(workspace, monkeypatch):
    """Random JSON and paths at every endpoint: always an answer (4xx or 2xx), never a 5xx; jobs are
    stubbed so nothing is ever started."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from starlette.testclient import TestClient

    from tuner.plugins.webui.app import create_app
    from tuner.plugins.webui.jobs import Jobs

    monkeypatch.setattr(Jobs, "_launch", lambda self, job: None)
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=40)
    )
    json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)  # fmt: skip
    keys = st.sampled_from([*VALUES, "family", "values", "prompt", "seed", "steps", "guidance", "max_train_steps"])
    form_values = st.dictionaries(st.sampled_from(list(VALUES)), json_values, max_size=5).map(lambda v: {**VALUES, **v})
    forms_ = st.fixed_dictionaries({"family": st.sampled_from(["chroma", "flux"]), "values": form_values | json_values})
    bodies = forms_ | st.dictionaries(keys, json_values, max_size=6) | json_values
    paths = st.text(max_size=300) | st.sampled_from(["..", "../..", "output/ui", "data/shapes", "x" * 5000])
    app = create_app(workspace, TOKEN, port=PORT)
    with TestClient(app, base_url=BASE, follow_redirects=False, raise_server_exceptions=False) as client:
        client.cookies.set(f"tuner_token_{PORT}", TOKEN)
        client.headers["x-tuner-token"] = TOKEN

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(body=bodies, path=paths, family=st.sampled_from(["chroma", "flux", "nope"]))
        def poke(body, path, family):
            from urllib.parse import quote

            path = quote(path, safe="/")  # what a browser sends for any text
            for endpoint in ("/api/validate", "/api/buckets", "/api/config", "/api/start"):
                response = client.post(endpoint, json=body)
                assert response.status_code < 500, (endpoint, body, response.text[:300])
            for action in ("stop", "resume", "sample", "lora"):
                response = client.post(f"/api/run/{path}/{action}", json=body)
                assert response.status_code < 500, (action, path, body, response.text[:300])
            for url in (f"/api/run/{path}", f"/api/browse?path={path}", f"/files/{path}", f"/api/form/{family}"):
                response = client.get(url)
                assert response.status_code < 500, (url, response.text[:300])

        poke()
        too_big = client.post("/api/validate", content=b"{" + b" " * (2 << 20) + b"}")
        assert too_big.status_code == 413 and "refused" in too_big.json()["error"]
        # the cases that once answered 500, kept as examples
        for endpoint, body in [
            ("/api/validate", {"family": "chroma", "values": [1, 2]}),
            ("/api/start", {"family": "chroma", "values": 1}),
            ("/api/run/output/ui/resume", {"max_train_steps": 1e308}),
            ("/api/run/output/ui/sample", {"prompt": "a cat", "guidance": "nan"}),
            ("/api/run/" + "x" * 5000 + "/resume", {}),
        ]:
            response = client.post(endpoint, json=body)
            assert response.status_code < 500 and response.json().get("error"), (endpoint, response.text[:200])


def test_a_run_folder_with_damaged_files_shows_its_problem_and_never_breaks_the_others(client, workspace):
    bad = workspace / "output" / "bad"
    bad.mkdir(parents=True)
    (bad / "run.json").write_text('{"status": "train')  # cut off by a full disk
    (bad / "train_log.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n[1, 2]\n"x"\n')
    good = workspace / "output" / "good"
    good.mkdir(parents=True)
    (good / "run.json").write_text(json.dumps({"status": "finished", "started": "2026-12-04T10:00:00"}))
    runs = {row["name"]: row for row in client.get("/api/runs").json()["runs"]}
    assert runs["good"]["status"] == "finished"
    assert runs["bad"]["status"] == "damaged" and "run.json cannot be read" in runs["bad"]["reason"]
    detail = client.get("/api/run/output/bad").json()
    assert detail["status"] == "damaged" and detail["records"] == [{"step": 1, "loss": 0.5}]
    assert client.get("/").status_code == 200 and client.get("/run/output/bad").status_code == 200
    (bad / "run.json").write_text('{"status": 5}')
    assert client.get("/api/runs").json()["runs"][0]["status"] in ("damaged", "finished")
    assert {row["name"]: row for row in client.get("/api/runs").json()["runs"]}["bad"]["status"] == "damaged"


def test_a_job_refused_before_it_begins_leaves_no_folder_and_shows_its_error(client, workspace, monkeypatch):
    """A run the CLI refuses (a config error, missing data) keeps its log in the server's state
    folder, not in an output_dir it would create: the runs list shows it with the error, and a
    resume the CLI refuses shows its reason on the run's page while the run stays as it was."""
    import tuner.plugins.webui.form_api as form_api
    import tuner.plugins.webui.runs_api as runs_api

    def refusing(line):  # stands for `tuner`: says one line and exits 1 before any run begins
        return lambda: [sys.executable, "-c", f"import sys; print({line!r}); sys.exit(1)"]

    monkeypatch.setattr(form_api, "tuner_command", refusing("error: configs/ui.yaml: data_dir: no images"))
    assert client.post("/api/start", json={"family": "chroma", "values": VALUES}).status_code == 200

    def refused_row():
        rows = {row["path"]: row for row in client.get("/api/runs").json()["runs"]}
        return rows.get("output/ui")

    wait_for(lambda: refused_row() is not None)
    assert refused_row()["status"] == "failed"
    assert refused_row()["reason"] == "error: configs/ui.yaml: data_dir: no images"
    assert not (workspace / "output" / "ui").exists()
    assert list((workspace / ".tuner-server" / "logs").glob("*.log"))
    page = client.get("/api/run/output/ui").json()
    assert page["status"] == "failed" and "data_dir: no images" in page["log_tail"]

    done = workspace / "output" / "done"  # a finished run, resumed with a change the CLI refuses
    done.mkdir(parents=True)
    (done / "run.json").write_text(json.dumps({"status": "finished", "started": "2026-01-01T00:00:00+0000"}))
    (done / "config.yaml").write_text("model_family: chroma\n")
    (done / "checkpoint-4").mkdir()
    time.sleep(0.05)  # the refusal ends after the run's last update
    monkeypatch.setattr(runs_api, "tuner_command", refusing("error: resume: network_rank 32 differs from 16"))
    assert "queued" in client.post("/api/run/output/done/resume", json={}).json()["message"]
    wait_for(lambda: "job_error" in client.get("/api/run/output/done").json())
    detail = client.get("/api/run/output/done").json()
    assert detail["status"] == "finished" and detail["job_error"] == "error: resume: network_rank 32 differs from 16"
