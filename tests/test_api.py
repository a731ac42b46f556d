"""The public surface: docstrings, version, show_config, thread settings, import cost, py.typed."""
import importlib.machinery
import importlib.metadata
import inspect
import io
import json
import os
import subprocess
import sys

import pytest

import cprop
from cprop import callbacks, schedules

pytest.importorskip("sklearn")
import cprop.sklearn  # noqa: E402


def documented(obj):
    return bool((inspect.getdoc(obj) or "").strip())


def public_classes():
    """The classes whose methods users call: cprop's own, and those of callbacks, schedules
    and cprop.sklearn."""
    classes = [cprop.Sequential, cprop.Dense, cprop.Trainer, cprop.History, cprop.SGD, cprop.Adam,
               cprop.AdamW, cprop.sklearn.MLPClassifier, cprop.sklearn.MLPRegressor]
    for module in (callbacks, schedules):
        classes += [c for name, c in inspect.getmembers(module, inspect.isclass)
                    if c.__module__ == module.__name__ and not name.startswith("_")]
    return classes


def public_members(cls, kind):
    """(name, object) of `cls`'s public methods (kind "method") or properties (kind "property"),
    inherited ones included, defined anywhere but `object`."""
    members = []
    for name, _ in inspect.getmembers(cls):
        if name.startswith("_"):
            continue
        static = inspect.getattr_static(cls, name)
        if kind == "property" and isinstance(static, property):
            members.append((name, static))
        elif kind == "method" and not isinstance(static, property) and callable(getattr(cls, name)):
            if not inspect.isclass(getattr(cls, name)):
                members.append((name, getattr(cls, name)))
    return members


@pytest.mark.parametrize("name", [n for n in cprop.__all__ if n != "__version__"])
def test_every_public_name_has_a_docstring(name):
    assert documented(getattr(cprop, name)), f"cprop.{name} has no docstring"


@pytest.mark.parametrize("cls", public_classes(), ids=lambda c: c.__name__)
def test_every_public_class_and_method_has_a_docstring(cls):
    assert documented(cls), f"{cls.__name__} has no docstring"
    missing = [f"{cls.__name__}.{name}" for name, member in public_members(cls, "method") if not documented(member)]
    assert not missing, f"public methods without a docstring: {missing}"


@pytest.mark.parametrize("cls", [c for c in public_classes() if public_members(c, "property")],
                         ids=lambda c: c.__name__)
def test_every_public_property_has_a_docstring(cls):
    missing = [f"{cls.__name__}.{name}" for name, prop in public_members(cls, "property") if not documented(prop)]
    assert not missing, f"public properties without a docstring: {missing}"


@pytest.mark.parametrize("module", [callbacks, schedules, cprop.datasets, cprop.sklearn],
                         ids=lambda m: m.__name__)
def test_public_modules_and_their_functions_have_docstrings(module):
    assert documented(module)
    functions = [name for name, f in inspect.getmembers(module, inspect.isfunction)
                 if f.__module__ == module.__name__ and not name.startswith("_")]
    assert not [name for name in functions if not documented(getattr(module, name))]


def test_all_lists_only_names_that_exist():
    assert len(set(cprop.__all__)) == len(cprop.__all__)
    for name in cprop.__all__:
        assert hasattr(cprop, name), name


# -- version and configuration -------------------------------------------------------------------

def test_version_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")
    # the tests' own checkout: the package tested may be installed elsewhere
    pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    if not os.path.exists(pyproject):
        pytest.skip("the tests are not in a source tree")
    with open(pyproject, "rb") as f:
        version = tomllib.load(f)["project"]["version"]

    assert isinstance(cprop.__version__, str)
    assert cprop.__version__ == version
    assert importlib.metadata.version("cprop") == version


def test_show_config_prints_and_returns_the_configuration():
    out = io.StringIO()

    info = cprop.show_config(file=out)

    assert isinstance(info, dict)
    assert {"cprop", "openmp", "threads", "blas"} <= set(info)
    assert info["cprop"] == cprop.__version__
    assert isinstance(info["openmp"], bool)
    assert info["threads"] == cprop.get_num_threads() and info["threads"] >= 1
    assert info["blas"] is None or os.path.exists(info["blas"])
    text = out.getvalue()
    for key in ("openmp", "threads", "blas"):
        assert f"{key}:" in text


@pytest.fixture
def restore_threads():
    default = cprop.get_num_threads()
    yield default
    cprop.set_num_threads(None)
    assert cprop.get_num_threads() == default


def test_set_num_threads_round_trip(restore_threads):
    for n in (1, 2, 3):
        cprop.set_num_threads(n)
        assert cprop.get_num_threads() == n
        assert cprop.show_config(file=io.StringIO())["threads"] == n
    cprop.set_num_threads(None)
    assert cprop.get_num_threads() == restore_threads


@pytest.mark.parametrize("value, error", [(0, ValueError), (-2, ValueError), (2.5, TypeError), ("4", TypeError)],
                         ids=repr)
def test_set_num_threads_refuses_bad_values_and_keeps_the_setting(value, error, restore_threads):
    cprop.set_num_threads(1)
    with pytest.raises(error, match="n_threads"):
        cprop.set_num_threads(value)
    assert cprop.get_num_threads() == 1


# -- what `import cprop` costs -------------------------------------------------------------------

IMPORT_PROBE = """
import json, sys
import cprop
loaded = {name: name in sys.modules for name in ("scipy.linalg", "cprop._core", "cprop._core_avx2", "sklearn",
                                                 "cprop.sklearn", "threadpoolctl", "torch", "matplotlib", "tqdm")}
mlp = cprop.sklearn.MLPClassifier
print(json.dumps({"loaded": loaded, "estimator": mlp.__name__, "module": mlp.__module__}))
"""


def test_import_cprop_is_light_and_cprop_sklearn_comes_on_demand():
    proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, timeout=120)

    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not any(result["loaded"].values()), result["loaded"]
    assert result["estimator"] == "MLPClassifier" and result["module"] == "cprop.sklearn"


def test_unknown_attributes_raise_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        cprop.no_such_thing  # noqa: B018
    assert cprop.sklearn is sys.modules["cprop.sklearn"]


def test_the_package_ships_py_typed():
    assert os.path.isfile(os.path.join(os.path.dirname(cprop.__file__), "py.typed"))


# -- the BLAS the core binds ----------------------------------------------------------------------

BLAS_PROBE = """
import hashlib, json, sys
import numpy as np
import cprop
X = np.random.default_rng(0).standard_normal((300, 20))
y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
digests = {}
for dtype in (np.float32, np.float64):
    net = cprop.Sequential([cprop.Dense(20, 64, "relu"), cprop.Dense(64, 2)], seed=0, dtype=dtype)
    cprop.Trainer(net, loss="cross_entropy", optimizer=cprop.SGD(lr=0.1, momentum=0.9), batch_size=32,
                  seed=0, n_threads=1).fit(X.astype(dtype), y, epochs=2, verbose=0)
    digests[np.dtype(dtype).name] = hashlib.sha256(net.params.tobytes()).hexdigest()
print(json.dumps({"blas": cprop.show_config(file=open("/dev/null", "w"))["gemm"], "digests": digests,
                  "scipy.linalg": "scipy.linalg" in sys.modules}))
"""


def _blas_probe(**env):
    proc = subprocess.run([sys.executable, "-c", BLAS_PROBE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_binds_scipys_gemm_without_importing_scipy_linalg_and_trains_the_same_either_way():
    bound = _blas_probe(CPROP_BLAS="")
    imported = _blas_probe(CPROP_BLAS="cython_blas")

    assert imported["blas"] == "scipy.linalg.cython_blas" and imported["scipy.linalg"]
    if sys.platform.startswith("linux"):   # the dlsym path is for ELF platforms; others fall back
        assert bound["blas"].endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)) and "cython_blas" in bound["blas"]
        assert not bound["scipy.linalg"], "a fit through the core API imported scipy.linalg"
    # the same library's sgemm/dgemm either way: the same products, bit for bit
    assert bound["digests"] == imported["digests"]


def test_an_unknown_cprop_blas_value_is_refused_when_the_core_loads():
    proc = subprocess.run([sys.executable, "-c", "import cprop; cprop.show_config()"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CPROP_BLAS": "mkl"})
    assert proc.returncode != 0 and "CPROP_BLAS must be 'cython_blas' or unset, got 'mkl'" in proc.stderr
