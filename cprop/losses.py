"""Loss functions: each returns ``(mean loss, gradient with respect to the raw output)``.

``mse``                   mean over all elements of (out - y)², as torch.nn.MSELoss
``cross_entropy``         softmax fused in, log-sum-exp stable, integer labels,
                          mean over samples, as torch.nn.CrossEntropyLoss
``binary_cross_entropy``  sigmoid fused in, on logits, mean over all elements,
                          as torch.nn.BCEWithLogitsLoss

The gradient is what :meth:`cprop.Sequential.backward` takes.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from ._lazy import core as _core
from ._validation import check_labels, check_targets

# name -> kernel code (src/_losses.pxd)
LOSSES = {"mse": 0, "cross_entropy": 1, "binary_cross_entropy": 2}


def loss_code(name):
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[name]


def _check_output(out):
    if not isinstance(out, np.ndarray) or out.dtype not in (np.float32, np.float64):
        raise TypeError(
            "out must be the float32 or float64 array returned by net.forward, "
            f"got {type(out).__name__}{' of dtype ' + str(out.dtype) if isinstance(out, np.ndarray) else ''}"
        )
    if out.ndim != 2 or out.shape[0] == 0 or out.shape[1] == 0:
        raise ValueError(f"out must be a non-empty 2-D array (n_samples, n_outputs), got shape {out.shape}")
    out = np.ascontiguousarray(out)
    if not np.isfinite(out).all():
        raise ValueError("out contains NaN or infinite values")
    return out


def prepare_targets(name, y, n_samples, n_outputs, dtype):
    """Validated targets for loss `name`: (T, labels), one of them empty."""
    if name == "cross_entropy":
        if n_outputs < 2:
            raise ValueError(f"cross_entropy needs a network with >= 2 outputs (one per class), got {n_outputs}")
        return np.empty((0, n_outputs), dtype), check_labels(y, n_samples, n_outputs)
    T = check_targets(y, n_samples, n_outputs, dtype, binary=(name == "binary_cross_entropy"))
    return T, np.empty(0, np.intp)


def compute(name: str, out: np.ndarray, y: ArrayLike) -> tuple[float, np.ndarray]:
    """Mean loss `name` of `out` against `y`, and its gradient with respect to `out`."""
    code = loss_code(name)
    out = _check_output(out)
    T, labels = prepare_targets(name, y, out.shape[0], out.shape[1], out.dtype)
    grad = np.empty_like(out)
    value = _core.loss(code, out, T, labels, grad)
    return value, grad


def mse(out: np.ndarray, y: ArrayLike) -> tuple[float, np.ndarray]:
    """Mean squared error ``mean((out - y)²)`` and its gradient ``2(out - y)/out.size``."""
    return compute("mse", out, y)


def cross_entropy(out: np.ndarray, y: ArrayLike) -> tuple[float, np.ndarray]:
    """Softmax cross-entropy of logits `out` against integer labels `y`, and its gradient
    ``(softmax(out) - onehot(y)) / n_samples``."""
    return compute("cross_entropy", out, y)


def binary_cross_entropy(out: np.ndarray, y: ArrayLike) -> tuple[float, np.ndarray]:
    """Sigmoid binary cross-entropy of logits `out` against 0/1 targets `y`, and its
    gradient ``(sigmoid(out) - y) / out.size``."""
    return compute("binary_cross_entropy", out, y)
