"""The bottom layer: user errors, registries, configuration, the run folder and content fingerprints."""
