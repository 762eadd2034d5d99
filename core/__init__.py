"""tuner core: hook specifications, plugin host, config, data, caches and the training loop.

Plugins import their markers from here::

    from tuner.core import hookimpl
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

PROJECT_NAME = "tuner"
ENTRY_POINT_GROUP = "tuner"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["ENTRY_POINT_GROUP", "PROJECT_NAME", "__version__", "hookimpl", "hookspec"]
