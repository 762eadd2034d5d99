"""The model hub, asked only when it can answer: a hub id that is not in the local cache while the
hub cannot be reached is said in one line at once, not after the hub client's retries (~25 s)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tuner.core.errors import PluginError


def is_cached(repo_id: str, revision: str | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "model_index.json", revision=revision)
    return isinstance(found, str)


def reachable(timeout: float = 3.0) -> bool:
    """Whether the hub (``HF_ENDPOINT``, else huggingface.co) accepts a connection."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def check_hub_model(repo_id: str, revision: str | None, what: str) -> None:
    """Refuse at once a hub model that can be neither found in the cache nor downloaded."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        if not is_cached(repo_id, revision):
            raise PluginError(
                f"{what}: {repo_id} is not in the local hub cache and HF_HUB_OFFLINE is set; download it once "
                "with network, or give a local folder"
            )
        return
    if not is_cached(repo_id, revision) and not reachable():
        raise PluginError(
            f"{what}: {repo_id} is not in the local hub cache and the hub cannot be reached (no network?); "
            "give a local folder, or set HF_ENDPOINT to a mirror"
        )


def check_model_folder(host: Any, config: Any) -> None:
    """A local model folder must exist and be of the run's family, said in one line before anything
    loads: a path that is not there would be tried on the hub (and reported as a connection error),
    and another family's folder would load the wrong encoders and fail deep in torch. Hub ids pass."""
    import json

    from tuner.core.config.values import model_source

    family = host.family
    source = model_source(config, family.flavours)
    folder = Path(source).expanduser()
    key = "pretrained_model_name_or_path"
    if not folder.exists():
        hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~")) and "\\" not in source
        if not hub_id or Path(source.split("/")[0]).is_dir():  # models/typo: a local folder for sure
            raise config.error(key, f"{source}: no such folder (a hub id is namespace/name)")
        check_hub_model(source, config.revision, f"{config.source}: {key}")
        return
    try:
        found = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return  # not a pipeline folder: the loader says what is missing

    def pipelines(info: Any) -> list[str]:
        return [name.rsplit(".", 1)[-1] for name in (info.pipeline_class, *info.other_pipeline_classes) if name]

    wanted = pipelines(family)
    if found and wanted and found not in wanted:
        owners = [f.name for f in host.families.values() if found in pipelines(f)]
        hint = f"use --plugin {owners[0]}" if owners else "no installed family trains it"
        raise config.error(
            key,
            f"{source} holds a {found} (model_index.json), not {family.name}'s {' or '.join(wanted)}; "
            f"{hint} or a {family.name} model",
        )
