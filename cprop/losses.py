"""Loss functions: each returns ``(mean loss, gradient with respect to the raw output)``.

``mse``                   mean over all elements of (out - y)², as torch.nn.MSELoss
``cross_entropy``         softmax fused in, log-sum-exp stable, integer labels,
                          mean over samples, as torch.nn.CrossEntropyLoss
``binary_cross_entropy``  sigmoid fused in, on logits, mean over all elements,
                          as torch.nn.BCEWithLogitsLoss
``poisson``               Poisson negative log-likelihood of counts >= 0, the output
                          the log of the rate: mean(exp(out) - y·out), as
                          torch.nn.PoissonNLLLoss(log_input=True); predicts exp(out)
``l1``                    mean absolute error mean(|out - y|), as torch.nn.L1Loss
                          (Keras' "mae"); gradient sign(out - y), 0 where equal
``huber``                 ½(out - y)² within 1 of y, |out - y| - ½ beyond, mean over all
                          elements, as torch.nn.HuberLoss() and Keras' Huber() (δ = 1;
                          for another δ, train on y / δ: the loss scales by δ²)

The gradient is what :meth:`cprop.Sequential.backward` takes.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from ._lazy import core as _core
from ._validation import check_labels, check_targets, hold_memory


class Loss:
    """One loss, everything cprop does with it in one place: its kernel code (from the
    compiled enum), what its targets are, and how raw outputs become predictions,
    probabilities and an accuracy. Trainer, the CLI and the drop-ins read these."""

    def __init__(self, name, targets, predict, proba=None, accuracy=None):
        self.name = name
        self.targets = targets        # "labels" (integers), "values", "binary" (0/1) or "counts" (>= 0)
        self.predict = predict        # raw outputs -> predictions
        self.proba = proba            # raw outputs (float64) -> probabilities, or None
        self.accuracy = accuracy      # (raw outputs, T, labels) -> accuracy, or None

    @property
    def code(self):
        """The kernel's code (src/_losses.pxd), read from the compiled core."""
        return _core.LOSSES[self.name]

    @property
    def classification(self):
        return self.proba is not None

    def __repr__(self):
        return f"Loss({self.name!r})"


def _squeeze(a):
    return a[:, 0] if a.shape[1] == 1 else a


def _rate(out):
    """exp(out), the Poisson rate (inf where it overflows: the raw output says how far)."""
    with np.errstate(over="ignore"):
        return np.exp(out)


def _softmax(out):
    out = out - out.max(axis=1, keepdims=True)
    np.exp(out, out=out)
    return out / out.sum(axis=1, keepdims=True)


TABLE = {
    "mse": Loss("mse", "values", predict=_squeeze),
    "cross_entropy": Loss("cross_entropy", "labels", predict=lambda out: out.argmax(axis=1),
                          proba=_softmax,
                          accuracy=lambda out, T, labels: float(np.mean(out.argmax(axis=1) == labels))),
    "binary_cross_entropy": Loss("binary_cross_entropy", "binary",
                                 predict=lambda out: _squeeze((out > 0).astype(np.intp)),
                                 proba=lambda out: 1.0 / (1.0 + np.exp(-out)),
                                 accuracy=lambda out, T, labels: float(np.mean((out > 0) == (T > 0.5)))),
    "poisson": Loss("poisson", "counts", predict=lambda out: _squeeze(_rate(out))),
    "l1": Loss("l1", "values", predict=_squeeze),
    "huber": Loss("huber", "values", predict=_squeeze),
}


def __getattr__(name):
    # LOSSES (name -> kernel code) comes from the compiled core, imported on first use
    if name == "LOSSES":
        return {loss: _core.LOSSES[loss] for loss in TABLE}
    raise AttributeError(f"module 'cprop.losses' has no attribute {name!r}")


def loss_code(name):
    """The kernel code of a loss name; ValueError naming the choices otherwise."""
    return get(name).code


def get(name) -> Loss:
    """The Loss of a name; ValueError naming the choices otherwise."""
    if not isinstance(name, str) or name not in TABLE:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(TABLE)}")
    return TABLE[name]


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
    if get(name).targets == "labels":
        if n_outputs < 2:
            raise ValueError(f"cross_entropy needs a network with >= 2 outputs (one per class), got {n_outputs}")
        return np.empty((0, n_outputs), dtype), check_labels(y, n_samples, n_outputs)
    kind = get(name).targets
    T = check_targets(y, n_samples, n_outputs, dtype, binary=(kind == "binary"))
    if kind == "counts" and (T < 0).any():
        raise ValueError(f"{name} needs targets >= 0 (counts or rates), got a smallest target of {T.min()}")
    return T, np.empty(0, np.intp)


def compute(name: str, out: np.ndarray, y: ArrayLike) -> tuple[float, np.ndarray]:
    """Mean loss `name` of `out` against `y`, and its gradient with respect to `out`."""
    code = loss_code(name)
    held = hold_memory(out, y)    # not resized by another thread while we read them
    out = _check_output(out)
    T, labels = prepare_targets(name, y, out.shape[0], out.shape[1], out.dtype)
    grad = np.empty_like(out)
    value = _core.loss(code, out, T, labels, grad)
    del held
    return value, grad


def mse(out: np.ndarray, y: ArrayLike) -> tuple[float, np.ndarray]:
    """Mean squared error ``mean((out - y)²)`` and its gradient ``2(out - y)/out.size``."""
    return compute("mse", out, y)


def cross_entropy(out: np.ndarray, y: ArrayLike) -> tuple[float, np.ndarray]:
    """Softmax cross-entropy of logits `out` against integer labels `y`, and its gradient
    ``(softmax(out) - onehot(y)) / n_samples``."""
    return compute("cross_entropy", out, y)


def poisson(out: np.ndarray, y: ArrayLike) -> tuple[float, np.ndarray]:
    """Poisson negative log-likelihood ``mean(exp(out) - y·out)`` of targets `y` >= 0, `out`
    the log of the rate (torch.nn.PoissonNLLLoss(log_input=True)), and its gradient
    ``(exp(out) - y) / out.size``."""
    return compute("poisson", out, y)


def binary_cross_entropy(out: np.ndarray, y: ArrayLike) -> tuple[float, np.ndarray]:
    """Sigmoid binary cross-entropy of logits `out` against 0/1 targets `y`, and its
    gradient ``(sigmoid(out) - y) / out.size``."""
    return compute("binary_cross_entropy", out, y)


def l1(out: np.ndarray, y: ArrayLike) -> tuple[float, np.ndarray]:
    """Mean absolute error ``mean(|out - y|)`` (torch.nn.L1Loss) and its gradient
    ``sign(out - y) / out.size``."""
    return compute("l1", out, y)


def huber(out: np.ndarray, y: ArrayLike) -> tuple[float, np.ndarray]:
    """Huber loss with δ = 1 (torch.nn.HuberLoss()): the mean of ``½d²`` where ``|d| <= 1``
    and ``|d| - ½`` elsewhere, d = out - y, and its gradient ``clip(d, -1, 1) / out.size``."""
    return compute("huber", out, y)
