"""Write docs/hooks.md from the hookspec docstrings: python docs/gen_hook_reference.py

tests/test_docs.py fails when docs/hooks.md is out of date, so the reference cannot drift.
"""

from __future__ import annotations

import inspect
from pathlib import Path

OUT = Path(__file__).resolve().parent / "hooks.md"


def render() -> str:
    from tuner.core.host import hookspecs

    lines = [
        "# Hook reference",
        "",
        "Generated from `core/host/hookspecs.py` by `docs/gen_hook_reference.py`; do not edit by hand.",
        "",
        inspect.getdoc(hookspecs),
        "",
    ]
    for name, function in vars(hookspecs).items():  # definition order = the order a run meets them
        if not inspect.isfunction(function):
            continue
        opts = getattr(function, "tuner_spec", None)
        if opts is None:
            continue
        shape = "provide (firstresult)" if opts.get("firstresult") else "register/contribute (all plugins)"
        signature = str(inspect.signature(function)).replace("'", "")
        lines += [f"## `{name}`", "", f"`{name}{signature}`", "", f"*{shape}*", "", inspect.getdoc(function), ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
