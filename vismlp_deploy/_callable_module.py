"""Let a subpackage double as the public function of the same name.

``vismlp_deploy.verify`` must be both the ``verify/`` subpackage and the ``verify(...)``
function of the API contract. Importing a submodule (``vismlp_deploy.verify.stats``) makes
Python bind the subpackage as that attribute, so a plain function of the same name would be
replaced. Giving the subpackage a module class with ``__call__`` keeps both working.
"""
from __future__ import annotations

import importlib
import sys
import types


def make_callable(package: str, module: str, function: str) -> None:
    """Calling ``package`` calls ``package.module.function`` (imported on first call)."""

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(importlib.import_module(f"{package}.{module}"), function)(*args, **kwargs)

    sys.modules[package].__class__ = _CallableModule
