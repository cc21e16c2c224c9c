"""Pretraining methods: LightningModules whose step maps a batch to {"loss": total, **parts}."""
