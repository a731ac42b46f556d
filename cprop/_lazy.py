"""The compiled core, imported on first use.

``cprop._core`` cimports scipy's Cython BLAS, and importing that imports all of
scipy.linalg (about 0.15 s); ``import cprop`` should not pay for it until a
kernel is actually called.
"""
import importlib


class _LazyCore:
    """Stands in for ``cprop._core``: the first access to each name imports it and caches it."""

    def __getattr__(self, name):
        value = getattr(importlib.import_module("cprop._core"), name)
        setattr(self, name, value)
        return value


core = _LazyCore()
