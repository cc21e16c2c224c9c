"""Training methods: the pretraining methods (`--method`) and the teacher trainers (`train-teacher
--kind`), each in its own module and registered there (`methods/base.py`). Importing this package
imports every module in it, so that a new method is one new module."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
