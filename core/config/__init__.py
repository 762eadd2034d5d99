"""Configuration and keys: reading config files, checking every value against the key that
declares it, building a run's config (every check in one place), the core's keys by concern,
several datasets as views of one config, and SimpleTuner's configs."""
