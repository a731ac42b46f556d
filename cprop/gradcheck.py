"""Backprop checked against central finite differences."""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from ._validation import check_positive_int, check_real
from .losses import compute, loss_code
from .network import Sequential


class GradientCheck(float):
    """The largest relative error (a float), knowing whether it is below its tolerance.

    ``bool(result.passed)``; ``result.tol`` is the tolerance it was held to.
    """

    tol: float

    def __new__(cls, error: float, tol: float):
        self = super().__new__(cls, error)
        self.tol = tol
        return self

    @property
    def passed(self) -> bool:
        """Whether backprop agrees with the finite differences: error <= tol."""
        return float(self) <= self.tol

    def __repr__(self):
        verdict = "passed" if self.passed else "FAILED"
        return f"GradientCheck(max_rel_error={float(self):.3g}, tol={self.tol:g}, {verdict})"

    def __reduce__(self):
        return (GradientCheck, (float(self), self.tol))


def gradient_check(net: Sequential, X: ArrayLike, y: ArrayLike, loss: str = "mse", eps: float = 3e-5,
                   max_params: int | None = None, seed: int = 0, tol: float = 1e-6) -> GradientCheck:
    """Largest relative error between backprop's gradients and central finite differences.

    Works on a float64 copy of `net` (the network itself is not changed), in the
    training pass (BatchNorm with the batch's statistics, Dropout with one fixed
    mask). For each
    parameter p, the numerical gradient is ``(L(p + eps) - L(p - eps)) / (2·eps)``;
    the error of an entry is ``|analytic - numeric| / max(|analytic|, |numeric|, floor)``
    where ``floor`` is 1e-2 of the largest gradient, so entries far below the
    gradient's scale are compared with that scale rather than with zero (where the
    differences' rounding, not backprop, would decide).

    Parameters
    ----------
    net : Sequential
    X, y : a batch of inputs and targets for `loss`
    loss : {"mse", "cross_entropy", "binary_cross_entropy", "poisson", "l1", "huber"}
    eps : float, the finite-difference step. The differences' error is about
        eps²·|f'''| (truncation) plus δ/eps (rounding: δ, the loss's own rounding error,
        grows with the logits, since the cross-entropy's log-sum-exp cancels). On a relu
        network trained on digits until confident, six batches: at 1e-5 and a floor of
        1e-3 the errors were 1.2e-6 to 3.4e-6 (rounding); at 3e-5 (the default) and
        the floor of 1e-2, 5e-8 to 1.5e-7
    max_params : int or None — check only this many randomly chosen parameters
    seed : int — the dropout masks (one fixed mask for every evaluation) and the
        choice of parameters
    tol : float, the error below which the check passes (default 1e-6)

    Returns
    -------
    GradientCheck — a float, the maximum relative error (below 1e-6 when backprop
    is right; the finite differences' own error is about eps² · |f'''| plus
    1e-16 / eps), with ``.passed`` (error <= tol) and ``.tol``.

    Examples
    --------
    >>> result = gradient_check(net, X, y, loss="cross_entropy")   # doctest: +SKIP
    >>> result.passed, float(result)                                 # doctest: +SKIP
    (True, 3.1e-09)
    """
    if not isinstance(net, Sequential):
        raise TypeError(f"net must be a cprop.Sequential, got {type(net).__name__}")
    loss_code(loss)
    eps = check_real(eps, "eps", low=0, low_open=True)
    tol = check_real(tol, "tol", low=0)
    if max_params is not None:
        max_params = check_positive_int(max_params, "max_params")
    net64 = net.astype("float64")
    # the training pass, with one fixed dropout mask and the batch's statistics, for
    # the analytic gradient and every finite difference alike
    seed = check_positive_int(seed, "seed", minimum=0, maximum=None)
    out = net64.forward(X, training=True, seed=seed)
    _, grad = compute(loss, out, y)
    net64.backward(grad)
    analytic = net64.grads.copy()

    def loss_at(params_index, value):
        net64._params[params_index] = value
        return compute(loss, net64.forward(X, training=True, seed=seed), y)[0]

    idx = np.arange(net64.n_params)
    if max_params is not None and max_params < idx.size:
        idx = np.random.default_rng(seed).choice(idx, size=max_params, replace=False)
    numeric = np.empty(idx.size)
    for k, i in enumerate(idx):
        saved = net64._params[i]
        plus = loss_at(i, saved + eps)
        minus = loss_at(i, saved - eps)
        net64._params[i] = saved
        numeric[k] = (plus - minus) / (2 * eps)
    a = analytic[idx]
    floor = max(1e-2 * max(np.abs(a).max(), np.abs(numeric).max()), 1e-12)
    error = float(np.max(np.abs(a - numeric) / np.maximum(np.maximum(np.abs(a), np.abs(numeric)), floor)))
    return GradientCheck(error, tol)
