"""The Lion optimizer as a tuner plugin (an example of a third-party optimizer package)."""
