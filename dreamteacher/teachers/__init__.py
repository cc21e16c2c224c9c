"""Frozen feature sources: generative models that turn images into multi-level features."""

from dreamteacher.teachers.diffusion import DiffusionTeacher, FeatureSpec, load_diffusion_teacher

__all__ = ["DiffusionTeacher", "FeatureSpec", "load_diffusion_teacher"]
