"""Training machinery above the methods: the Lightning trainer, loaders, checkpoints and the run lifecycle."""
