"""The compiled core, chosen for this CPU and imported on first use.

Loading ``cprop._core`` binds the BLAS its products call (scipy's, see
``_bind_blas`` in src/_core.pyx) and starts OpenMP; ``import cprop`` does not
pay for either until a kernel is actually called.

On x86-64 the core is built twice (see setup.py): ``_core`` for any CPU and
``_core_avx2`` for CPUs with AVX2 and FMA, which is used when this CPU has
them. ``CPROP_CORE=baseline`` (or ``avx2``) in the environment overrides the
choice, e.g. to test both builds on one machine.
"""
import importlib
import importlib.util
import os

VARIANTS = {"baseline": "cprop._core", "avx2": "cprop._core_avx2"}


def cpu_has_avx2():
    """Whether this CPU (and OS) runs AVX2 and FMA code, as NumPy's own dispatch detects it."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features  # type: ignore[import-not-found]
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return False
    return bool(features.get("AVX2")) and bool(features.get("FMA3"))


def choose_variant():
    """'avx2' or 'baseline': the CPROP_CORE override, else the best this CPU runs."""
    requested = os.environ.get("CPROP_CORE", "").strip().lower()
    if requested and requested not in VARIANTS:
        raise ImportError(f"CPROP_CORE must be one of {sorted(VARIANTS)}, got {requested!r}")
    if requested:
        return requested
    return "avx2" if cpu_has_avx2() and importlib.util.find_spec(VARIANTS["avx2"]) else "baseline"


def check_built():
    """Raise ImportError saying what to run when this cprop folder has no compiled core:
    typically Python started in a source checkout whose ``cprop/`` shadows the install."""
    if importlib.util.find_spec(VARIANTS["baseline"]) is not None:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if os.path.exists(os.path.join(root, "setup.py")):
        raise ImportError(
            f"cprop's compiled core is not built in this source checkout ({here}), which Python "
            "imported instead of any installed cprop because the current directory comes first "
            f"on sys.path. Build it here: run `pip install .` in {root} (it builds the core in "
            "place as well), or `python setup.py build_ext --inplace`; or start Python from "
            "another directory to use the installed package.")
    raise ImportError(f"cprop's compiled core (cprop._core) is missing from {here}: this "
                      "installation is broken; reinstall cprop (pip install --force-reinstall cprop)")


class _LazyCore:
    """Stands in for the compiled core: the first access to each name imports it and caches it."""

    def __init__(self):
        self._module = None

    def module(self):
        """The compiled module itself (imported now if it was not yet)."""
        if self._module is None:
            from ._threads import openmp_environment  # OpenMP reads it as the core loads
            with openmp_environment():
                self._module = importlib.import_module(VARIANTS[choose_variant()])
        return self._module

    def variant(self):
        """Which build is in use: 'avx2' or 'baseline'."""
        name = self.module().__name__
        return next(key for key, module in VARIANTS.items() if module == name)

    def __getattr__(self, name):
        value = getattr(self.module(), name)
        setattr(self, name, value)
        return value


core = _LazyCore()
