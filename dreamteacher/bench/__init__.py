"""Benchmarks: recipes, the stage cache, pretraining stages, fine-tuning cells, tables, and step timing."""
