"""Frozen feature sources: generative models (and a contrastive encoder) that turn images into
multi-level features. Every teacher kind registers itself in its module (`teachers/base.py`);
importing this package imports them all."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
