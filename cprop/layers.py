"""The Dense layer: ``Y = f(X·W + b)`` forward, ``dW = Xᵀ·δ, db = Σδ, dX = δ·Wᵀ`` backward."""
from __future__ import annotations

import numpy as np

from ._lazy import core as _core
from ._threads import single_threaded_blas
from ._validation import check_parameter_values, check_positive_int
from .activations import NAMES, activation_code


class Dense:
    """A fully connected layer ``Y = f(X·W + b)`` with W of shape (n_in, n_out).

    Parameters
    ----------
    n_in, n_out : int
        Input and output width.
    activation : {"identity", "relu", "leaky_relu", "sigmoid", "tanh"} or None
        The activation f; None is identity.

    Attributes
    ----------
    W, b : ndarray
        The live parameters, views into the owning :class:`Sequential`'s flat
        parameter array (None until the layer joins a network).
    dW, db : ndarray
        The gradients of the last :meth:`Sequential.backward`, views into the
        network's flat gradient array.
    """

    def __init__(self, n_in: int, n_out: int, activation: str | None = None) -> None:
        self.n_in = check_positive_int(n_in, "n_in")
        self.n_out = check_positive_int(n_out, "n_out")
        self.activation_code = activation_code(activation)
        self.activation = NAMES[self.activation_code]
        self._W = self._b = self._dW = self._db = None
        self._X = self._Y = None

    def __repr__(self):
        return f"Dense({self.n_in}, {self.n_out}, activation={self.activation!r})"

    def _bind(self, W, b, dW, db):
        """Point the layer at its slices of the network's flat parameters and gradients."""
        self._W, self._b, self._dW, self._db = W, b, dW, db

    # The parameters are views into the network's flat arrays, whose layout the
    # kernels rely on: assigning copies the values in, after checking them.
    @property
    def W(self) -> np.ndarray:
        """Weights, shape (n_in, n_out): a live view; ``layer.W = A`` copies A in."""
        return self._W

    @W.setter
    def W(self, value):
        self._assign(self._W, value, "W")

    @property
    def b(self) -> np.ndarray:
        """Biases, shape (n_out,): a live view; ``layer.b = v`` copies v in."""
        return self._b

    @b.setter
    def b(self, value):
        self._assign(self._b, value, "b")

    @property
    def dW(self) -> np.ndarray:
        """∂loss/∂W from the last backward pass (read-only attribute; a view)."""
        return self._dW

    @property
    def db(self) -> np.ndarray:
        """∂loss/∂b from the last backward pass (read-only attribute; a view)."""
        return self._db

    def _assign(self, target, value, name):
        if target is None:
            raise RuntimeError("this Dense has no parameters yet: put it in a cprop.Sequential first")
        target[...] = check_parameter_values(value, target.shape, f"{name} of {self!r}")

    def _forward(self, X, n_threads):
        """Y = f(X·W + b) for a validated C-contiguous X; keeps X and Y for backward."""
        Y = np.empty((X.shape[0], self.n_out), dtype=self.W.dtype)
        with single_threaded_blas():
            _core.dense_forward(X, self.W, self.b, Y, self.activation_code, n_threads)
        self._X, self._Y = X, Y
        return Y

    def _backward(self, G, n_threads, input_grad=True):
        """From G = ∂L/∂Y: δ = G ⊙ f'(Y); dW = Xᵀ·δ; db = Σδ; returns dX = δ·Wᵀ (or None)."""
        delta = np.empty_like(G)
        _core.activation_grad(G, self._Y, delta, self.activation_code)
        dX = np.empty_like(self._X) if input_grad else None
        with single_threaded_blas():
            _core.dense_backward(self._X, self.W, delta, self.dW, self.db, dX, n_threads)
        return dX

    def init_params(self, rng: np.random.Generator) -> None:
        """He-normal W for the relu family, Glorot-uniform otherwise; b = 0."""
        if self.activation in ("relu", "leaky_relu"):
            W = rng.standard_normal((self.n_in, self.n_out)) * np.sqrt(2.0 / self.n_in)
        else:
            limit = np.sqrt(6.0 / (self.n_in + self.n_out))
            W = rng.uniform(-limit, limit, (self.n_in, self.n_out))
        self._W[...] = W
        self._b[...] = 0
