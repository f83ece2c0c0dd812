"""KD methods: one file per method. Importing this package imports every module in it, which registers
every method: adding a method is adding a file here (see ``kd.py``) plus an entry in a config."""

import pkgutil
from importlib import import_module

from kdbench.methods.base import METHODS, DistillMethod, create_method, register_method

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "base":
        import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "DistillMethod", "create_method", "register_method"]
