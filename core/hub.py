"""The model hub, asked only when it can answer: a hub id that is not in the local cache while the
hub cannot be reached is said in one line at once, not after the hub client's retries (~25 s)."""

from __future__ import annotations

import os
import socket
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
