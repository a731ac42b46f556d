"""The Dense layer: ``Y = f(X·W + b)`` forward, ``dW = Xᵀ·δ, db = Σδ, dX = δ·Wᵀ`` backward.

A layer's structure (widths, activation) is fixed when it is made: the compiled
kernels size their buffers from it, so it is read-only. Its parameters live in
the owning :class:`~cprop.Sequential`'s flat arrays; ``layer.W`` and friends are
fresh views of them on every access, and the kernels are always handed the
network's own arrays, never an object a user holds (and may have reshaped).
"""
from __future__ import annotations

import numpy as np

from ._lazy import core as _core
from ._threads import single_threaded_blas
from ._validation import check_parameter_values, check_positive_int
from .activations import NAMES, activation_code


def structure_setter(name, advice):
    """A property setter that refuses with a message saying why and what to do instead."""
    def refuse(self, value):
        raise AttributeError(f"{type(self).__name__}.{name} is fixed once built (the compiled "
                             f"kernels rely on it); {advice}")
    return refuse


_NEW_LAYER = "create a new layer (and network) instead"


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
    n_in, n_out, activation : read-only
        The layer's structure; make a new layer to change it.
    W, b : ndarray
        The live parameters: views into the owning :class:`Sequential`'s flat
        parameter array (None until the layer joins a network). ``layer.W = A``
        copies A in, after checking its shape and values.
    dW, db : ndarray
        The gradients of the last :meth:`Sequential.backward`, views into the
        network's flat gradient array.
    """

    def __init__(self, n_in: int, n_out: int, activation: str | None = None) -> None:
        self._n_in = check_positive_int(n_in, "n_in")
        self._n_out = check_positive_int(n_out, "n_out")
        self._activation_code = activation_code(activation)
        self._params = self._grads = None   # the owning network's flat arrays, once bound
        self._offset = 0                    # where this layer's W starts in them

    def __repr__(self):
        return f"Dense({self.n_in}, {self.n_out}, activation={self.activation!r})"

    # -- structure (read-only) ----------------------------------------------
    @property
    def n_in(self) -> int:
        """Input width (read-only)."""
        return self._n_in

    n_in = n_in.setter(structure_setter("n_in", _NEW_LAYER))

    @property
    def n_out(self) -> int:
        """Output width (read-only)."""
        return self._n_out

    n_out = n_out.setter(structure_setter("n_out", _NEW_LAYER))

    @property
    def activation(self) -> str:
        """Name of the activation f (read-only)."""
        return NAMES[self._activation_code]

    activation = activation.setter(structure_setter("activation", _NEW_LAYER))

    @property
    def activation_code(self) -> int:
        """The compiled kernels' code of the activation (read-only)."""
        return self._activation_code

    activation_code = activation_code.setter(structure_setter("activation_code", _NEW_LAYER))

    @property
    def n_params(self) -> int:
        """Number of parameters: n_in·n_out weights and n_out biases."""
        return self._n_in * self._n_out + self._n_out

    # -- parameters: views into the network's flat arrays ---------------------
    def _bind(self, params, grads, offset):
        """Join a network: this layer's W and b are params[offset:offset + n_params]."""
        if self._params is not None:
            raise ValueError(f"{self!r} already belongs to a network; create a new Dense")
        self._params, self._grads, self._offset = params, grads, offset

    def _views(self, flat):
        """(W, b) as fresh views of this layer's slice of `flat` (the network's params or grads)."""
        n_W = self._n_in * self._n_out
        start = self._offset
        return (flat[start:start + n_W].reshape(self._n_in, self._n_out),
                flat[start + n_W:start + n_W + self._n_out])

    @property
    def W(self) -> np.ndarray:
        """Weights, shape (n_in, n_out): a live view; ``layer.W = A`` copies A in."""
        return None if self._params is None else self._views(self._params)[0]

    @W.setter
    def W(self, value):
        self._assign(0, value, "W")

    @property
    def b(self) -> np.ndarray:
        """Biases, shape (n_out,): a live view; ``layer.b = v`` copies v in."""
        return None if self._params is None else self._views(self._params)[1]

    @b.setter
    def b(self, value):
        self._assign(1, value, "b")

    @property
    def dW(self) -> np.ndarray:
        """∂loss/∂W from the last backward pass (read-only attribute; a view)."""
        return None if self._grads is None else self._views(self._grads)[0]

    @property
    def db(self) -> np.ndarray:
        """∂loss/∂b from the last backward pass (read-only attribute; a view)."""
        return None if self._grads is None else self._views(self._grads)[1]

    def _assign(self, which, value, name):
        if self._params is None:
            raise RuntimeError("this Dense has no parameters yet: put it in a cprop.Sequential first")
        target = self._views(self._params)[which]
        target[...] = check_parameter_values(value, target.shape, f"{name} of {self!r}")

    # -- the two passes, on the network's arrays -------------------------------
    def _forward(self, params, X, n_threads):
        """Y = f(X·W + b) for a validated C-contiguous X, W and b taken from `params`."""
        W, b = self._views(params)
        Y = np.empty((X.shape[0], self._n_out), dtype=params.dtype)
        with single_threaded_blas():
            _core.dense_forward(X, W, b, Y, self._activation_code, n_threads)
        return Y

    def _backward(self, params, grads, X, Y, G, n_threads, input_grad=True):
        """From G = ∂L/∂Y: δ = G ⊙ f'(Y); dW = Xᵀ·δ; db = Σδ into `grads`; returns dX = δ·Wᵀ
        (or None). X and Y are this layer's input and output of the matching forward."""
        W, _ = self._views(params)
        dW, db = self._views(grads)
        delta = np.empty_like(G)
        _core.activation_grad(G, Y, delta, self._activation_code)
        dX = np.empty_like(X) if input_grad else None
        with single_threaded_blas():
            _core.dense_backward(X, W, delta, dW, db, dX, n_threads)
        return dX

    def init_params(self, rng: np.random.Generator) -> None:
        """He-normal W for the relu family, Glorot-uniform otherwise; b = 0."""
        if self._params is None:
            raise RuntimeError("this Dense has no parameters yet: put it in a cprop.Sequential first")
        W, b = self._views(self._params)
        if self.activation in ("relu", "leaky_relu"):
            W[...] = rng.standard_normal((self._n_in, self._n_out)) * np.sqrt(2.0 / self._n_in)
        else:
            limit = np.sqrt(6.0 / (self._n_in + self._n_out))
            W[...] = rng.uniform(-limit, limit, (self._n_in, self._n_out))
        b[...] = 0
