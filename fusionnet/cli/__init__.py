"""The ``fusionnet`` command: the entry point, its flags (derived from the configs) and the handlers."""
