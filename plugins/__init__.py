"""Plugins bundled with tuner. Each is registered through the ``tuner`` entry-point group, exactly
like a third-party package, and can be copied as a template."""
