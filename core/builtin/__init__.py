"""The core's own plugins: its config keys and family-neutral defaults (:mod:`.defaults`) and its
training-event observers (:mod:`.logs`). The host loads them by name, first, like any installed
plugin; nothing in the core imports them."""
