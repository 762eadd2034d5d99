"""The plugin host and its records: the hook specifications (the contract, in one module), the
records plugins register (families, precisions, optimizers, formats, config keys), the training
events observers receive, and the manager that builds one pluggy host per run."""
