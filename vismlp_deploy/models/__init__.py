"""Train-time model families. Each family module registers its formats and named configs.

Every module in this package other than the shared helpers below is a family and is
imported here, so dropping a new family file in is enough to register it.
"""
import importlib
import pkgutil

_SHARED = {"registry", "layers", "init", "footprint", "cost"}

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _SHARED and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
