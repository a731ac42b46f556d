"""cprop: fast CPU training of multi-layer perceptrons.

Backpropagation in two steps, both compiled: the backward pass applies the
chain rule layer by layer (``dW = Xᵀ·δ``, ``db = Σδ``, ``dX = δ·Wᵀ``), then
gradient descent moves every parameter against its gradient. Each training
epoch is one call into Cython that runs without the GIL.
"""
__version__ = "0.1.0"

from ._lazy import check_built as _check_built

_check_built()   # an uncompiled source checkout says so here, not at the first kernel call
del _check_built

from . import callbacks, datasets, losses, schedules
from ._fpenv import get_flush_denormals, set_flush_denormals
from ._threads import get_num_threads, set_num_threads
from .callbacks import Callback, Checkpoint, EarlyStopping
from .gradcheck import gradient_check
from .io import CpropFileError
from .layers import BatchNorm, Dense, Dropout, LayerNorm
from .network import Sequential, load
from .optim import LBFGS, SGD, Adam, AdamW
from .trainer import DivergenceError, History, Trainer


def show_config(file=None):
    """Print (and return as a dict) how this cprop was built and what it will use."""
    import sys

    import numpy
    import scipy

    from . import _threads
    from ._lazy import core as _core
    info = {
        "cprop": __version__,
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "openmp": bool(_core.OPENMP),
        "simd": _core.variant(),
        "threads": get_num_threads(),
        "blas": _threads.blas_info(),
        "gemm": _core.BLAS,
        "omp_wait": _threads.openmp_wait_info(),
        "denormals": "flushed to zero in compiled passes" if get_flush_denormals() else "IEEE",
    }
    for key, value in info.items():
        if key == "openmp" and not value:
            value = "False (built without OpenMP: single-threaded)"
        print(f"{key:>8}: {value}", file=file)
    return info


__all__ = [
    "Dense", "Dropout", "BatchNorm", "LayerNorm", "Sequential", "Trainer", "History",
    "SGD", "Adam", "AdamW", "LBFGS", "losses", "datasets", "callbacks", "schedules",
    "Callback", "Checkpoint", "EarlyStopping", "gradient_check", "load",
    "set_num_threads", "get_num_threads", "set_flush_denormals", "get_flush_denormals",
    "show_config",
    "DivergenceError", "CpropFileError", "__version__",
]


def __getattr__(name):
    # cprop.sklearn needs scikit-learn, so it is imported on first use only
    if name == "sklearn":
        import importlib
        return importlib.import_module("cprop.sklearn")
    raise AttributeError(f"module 'cprop' has no attribute {name!r}")
