"""Layer kinds: Dense, Dropout, BatchNorm, LayerNorm.

Each kind is a small class: its structure (widths, activation, hyper-parameters),
how many parameters and running statistics it owns, its row of the network's
compiled plan, its initialisation, and its PyTorch counterpart. The kernels live
in src/ (``_dense.pxd``, ``_dropout.pxd``, ``_norm.pxd``) and the passes that walk
the plan in ``_core.pyx``.

A layer's structure is fixed when it is made: the compiled kernels size their
buffers from it, so it is read-only. Its parameters live in the owning
:class:`~cprop.Sequential`'s flat arrays; ``layer.W`` and friends are fresh
views of them on every access, and the kernels are always handed the network's
own arrays, never an object a user holds (and may have reshaped).
"""
from __future__ import annotations

from typing import NoReturn

import numpy as np

from ._lazy import core as _core
from ._validation import check_parameter_values, check_positive_int, check_real
from .activations import activation_code, activation_name, needs_pre_activation, to_torch_module


def refuse_change(obj: object, name: str, advice: str) -> NoReturn:
    """What a structure property's setter does: refuse, saying why and what to do instead."""
    raise AttributeError(f"{type(obj).__name__}.{name} is fixed once built (the compiled "
                         f"kernels rely on it); {advice}")


def structure_setter(name, advice):
    """A property setter that refuses with :func:`refuse_change`."""
    def refuse(self, value):
        refuse_change(self, name, advice)
    return refuse


_NEW_LAYER = "create a new layer (and network) instead"


def _fixed(name, doc):
    """A read-only property over the private attribute _name."""
    return property(lambda self: getattr(self, "_" + name), structure_setter(name, _NEW_LAYER), doc=doc)


class Layer:
    """Base of cprop's layer kinds: structure, parameter views, the plan row.

    Subclasses set ``kind`` (the core's LAYER_KINDS name) and ``param_names`` (the
    names of their parameter blocks, in flat-array order, with each block's shape).
    """

    kind: str | None = None
    param_names = ()
    buffer_names = ()

    def __init__(self, n_in, n_out, activation=None, alpha=0.0):
        self._n_in = None if n_in is None else check_positive_int(n_in, "n_in")
        self._n_out = None if n_out is None else check_positive_int(n_out, "n_out")
        self._activation_code = activation_code(activation)
        self._alpha = float(alpha)
        self._params = self._grads = self._buffers = None   # the owning network's arrays
        self._offset = self._buffer_offset = 0

    n_in = _fixed("n_in", "Input width (read-only).")
    n_out = _fixed("n_out", "Output width (read-only).")
    activation_code = _fixed("activation_code", "The compiled kernels' code of the activation (read-only).")

    @property
    def activation(self) -> str:
        """Name of the activation applied to the layer's output (read-only)."""
        return activation_name(self._activation_code)

    @activation.setter
    def activation(self, value):
        refuse_change(self, "activation", _NEW_LAYER)

    # -- sizes ----------------------------------------------------------------------
    def _param_shapes(self):
        """[(name, shape)] of the parameter blocks, in flat order."""
        return []

    @property
    def n_params(self) -> int:
        """Number of trainable parameters."""
        return sum(int(np.prod(shape)) for _, shape in self._param_shapes())

    @property
    def n_buffers(self) -> int:
        """Number of non-trainable running values (BatchNorm's statistics)."""
        return 0

    # -- joining a network ------------------------------------------------------------
    def _set_width(self, n):
        """Width-agnostic kinds (Dropout) take their width from their neighbours here."""

    def _bind(self, params, grads, buffers, offset, buffer_offset):
        """Join a network: this layer's parameters are params[offset:offset + n_params]."""
        if self._params is not None:
            raise ValueError(f"{self!r} already belongs to a network; create a new layer")
        self._params, self._grads, self._buffers = params, grads, buffers
        self._offset, self._buffer_offset = offset, buffer_offset

    def _views(self, flat):
        """The parameter blocks as fresh views of this layer's slice of `flat`."""
        views, start = [], self._offset
        for _, shape in self._param_shapes():
            size = int(np.prod(shape))
            views.append(flat[start:start + size].reshape(shape))
            start += size
        return views

    def _param(self, index, flat=None):
        flat = self._params if flat is None else flat
        return None if flat is None else self._views(flat)[index]

    def _assign(self, index, value):
        if self._params is None:
            raise RuntimeError(f"this {type(self).__name__} has no parameters yet: put it in a "
                               "cprop.Sequential first")
        name = self._param_shapes()[index][0]
        target = self._views(self._params)[index]
        target[...] = check_parameter_values(value, target.shape, f"{name} of {self!r}", target.dtype)

    def plan(self, row, hyper, columns, bstats, codes):
        """Fill this layer's row of the compiled plan (see src/_plan.pxd): `columns(width)`
        hands out columns of the per-row workspace, `bstats(size)` batch-statistics space."""
        row[:] = -1
        row[codes["kind"]] = _core.LAYER_KINDS[self.kind]
        row[codes["act"]] = self._activation_code
        row[codes["n_in"]] = self._n_in
        row[codes["n_out"]] = self._n_out
        row[codes["param"]] = self._offset
        row[codes["n_param"]] = self.n_params
        row[codes["y"]] = columns(self._n_out)
        row[codes["g"]] = columns(self._n_out)
        if needs_pre_activation(self.activation):
            row[codes["z"]] = columns(self._n_out)
        hyper[:] = 0
        hyper[_core.PLAN_FLOAT["alpha"]] = self._alpha

    def init_params(self, rng: np.random.Generator) -> None:
        """Initialise the parameters (nothing for parameter-free kinds)."""

    def config(self) -> dict:
        """The layer as saved in files: its kind and constructor arguments."""
        raise NotImplementedError

    def _torch_activation(self):
        module = to_torch_module(self.activation, self._alpha)
        return [] if module is None else [module]


def _activation_args(activation, negative_slope):
    """(activation, alpha) checked: leaky_relu's slope (>= 0, torch's default 0.01)."""
    code = activation_code(activation)
    name = activation_name(code)
    if name == "leaky_relu":
        return name, check_real(negative_slope, "negative_slope", low=0)
    if negative_slope != 0.01:
        raise ValueError(f"negative_slope is a parameter of leaky_relu, not of {name}")
    return name, 0.0


class Dense(Layer):
    """A fully connected layer ``Y = f(X·W + b)`` with W of shape (n_in, n_out).

    Parameters
    ----------
    n_in, n_out : int
        Input and output width.
    activation : str or None
        The activation f: identity (None), relu, leaky_relu, sigmoid, tanh, elu, softplus,
        gelu, gelu_tanh or silu.
    negative_slope : float, default 0.01
        leaky_relu's slope for negative inputs (>= 0).

    Attributes
    ----------
    n_in, n_out, activation : read-only
        The layer's structure; make a new layer to change it.
    W, b : ndarray
        The live parameters: views into the owning :class:`Sequential`'s flat
        parameter array (None until the layer joins a network). ``layer.W = A``
        copies A in, after checking its shape and values.
    dW, db : ndarray
        The gradients of the last :meth:`Sequential.backward`.
    """

    kind = "dense"

    def __init__(self, n_in: int, n_out: int, activation: str | None = None,
                 negative_slope: float = 0.01) -> None:
        activation, alpha = _activation_args(activation, negative_slope)
        super().__init__(check_positive_int(n_in, "n_in"), check_positive_int(n_out, "n_out"),
                         activation, alpha)

    def __repr__(self):
        slope = f", negative_slope={self._alpha}" if self.activation == "leaky_relu" and self._alpha != 0.01 else ""
        return f"Dense({self.n_in}, {self.n_out}, activation={self.activation!r}{slope})"

    def _param_shapes(self):
        return [("W", (self._n_in, self._n_out)), ("b", (self._n_out,))]

    W = property(lambda self: self._param(0), lambda self, v: self._assign(0, v),
                 doc="Weights, shape (n_in, n_out): a live view; ``layer.W = A`` copies A in.")
    b = property(lambda self: self._param(1), lambda self, v: self._assign(1, v),
                 doc="Biases, shape (n_out,): a live view; ``layer.b = v`` copies v in.")
    dW = property(lambda self: self._param(0, self._grads), doc="∂loss/∂W of the last backward pass.")
    db = property(lambda self: self._param(1, self._grads), doc="∂loss/∂b of the last backward pass.")

    def init_params(self, rng: np.random.Generator) -> None:
        """He-normal W for the relu family, Glorot-uniform otherwise; b = 0."""
        W, b = self._views(self._params)
        if self.activation in ("relu", "leaky_relu"):
            W[...] = rng.standard_normal((self._n_in, self._n_out)) * np.sqrt(2.0 / self._n_in)
        else:
            limit = np.sqrt(6.0 / (self._n_in + self._n_out))
            W[...] = rng.uniform(-limit, limit, (self._n_in, self._n_out))
        b[...] = 0

    def config(self):
        return {"kind": "dense", "n_in": self.n_in, "n_out": self.n_out, "activation": self.activation,
                "negative_slope": self._alpha if self.activation == "leaky_relu" else 0.01}

    def _to_torch(self, dtype):
        import torch
        linear = torch.nn.Linear(self.n_in, self.n_out, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(self.W.T)))
            linear.bias.copy_(torch.from_numpy(self.b.copy()))
        return [linear] + self._torch_activation()


class Dropout(Layer):
    """Inverted dropout: in training each value is zeroed with probability p and the
    survivors scaled by 1/(1 - p); in evaluation the identity (as torch.nn.Dropout).

    The masks come from a counter-based generator keyed by the trainer's seed, the
    epoch and each row's position in it: a fit is the same with any thread count and
    resumes bit for bit. The width is taken from the neighbouring layers.

    Parameters
    ----------
    p : float in [0, 1), default 0.5
    """

    kind = "dropout"

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(None, None)
        self._p = check_real(p, "p", low=0, high=1, high_open=True)

    p = _fixed("p", "The drop probability (read-only).")

    def __repr__(self):
        return f"Dropout(p={self._p})"

    def _set_width(self, n):
        self._n_in = self._n_out = n

    def plan(self, row, hyper, columns, bstats, codes):
        super().plan(row, hyper, columns, bstats, codes)
        hyper[_core.PLAN_FLOAT["p"]] = self._p

    def config(self):
        return {"kind": "dropout", "p": self._p}

    def _to_torch(self, dtype):
        import torch
        return [torch.nn.Dropout(self._p)]


class _Norm(Layer):
    """What BatchNorm and LayerNorm share: x̂ = (x - μ)·rstd, y = f(γ ⊙ x̂ + β)."""

    def __init__(self, n, eps, affine, activation, negative_slope):
        activation, alpha = _activation_args(activation, negative_slope)
        n = check_positive_int(n, "n")
        super().__init__(n, n, activation, alpha)
        self._eps = check_real(eps, "eps", low=0, low_open=True)
        if not isinstance(affine, (bool, np.bool_)):
            raise TypeError(f"affine must be True or False, got {affine!r}")
        self._affine = bool(affine)

    eps = _fixed("eps", "ε added to the variance (read-only).")

    def _param_shapes(self):
        return [("gamma", (self._n_out,)), ("beta", (self._n_out,))] if self._affine else []

    gamma = property(lambda self: self._param(0) if self._affine else None,
                     lambda self, v: self._assign(0, v), doc="Scale γ, shape (n,): a live view.")
    beta = property(lambda self: self._param(1) if self._affine else None,
                    lambda self, v: self._assign(1, v), doc="Shift β, shape (n,): a live view.")
    dgamma = property(lambda self: self._param(0, self._grads) if self._affine else None,
                      doc="∂loss/∂γ of the last backward pass.")
    dbeta = property(lambda self: self._param(1, self._grads) if self._affine else None,
                     doc="∂loss/∂β of the last backward pass.")

    def init_params(self, rng):
        """γ = 1, β = 0 (as torch)."""
        if self._affine:
            gamma, beta = self._views(self._params)
            gamma[...] = 1
            beta[...] = 0

    def plan(self, row, hyper, columns, bstats, codes):
        super().plan(row, hyper, columns, bstats, codes)
        row[codes["xhat"]] = columns(self._n_out)
        hyper[_core.PLAN_FLOAT["eps"]] = self._eps

    def _activation_config(self):
        return {"activation": self.activation,
                "negative_slope": self._alpha if self.activation == "leaky_relu" else 0.01}

    def _copy_affine_to(self, module):
        import torch
        if self._affine:
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(self.gamma.copy()))
                module.bias.copy_(torch.from_numpy(self.beta.copy()))


class BatchNorm(_Norm):
    """Batch normalization over the features (torch.nn.BatchNorm1d), then an activation.

    Training normalizes with the batch's mean and (biased) variance, a reduction
    across all the threads' rows, and moves the running estimates towards them
    (the variance unbiased, as torch); evaluation uses the running estimates.

    Parameters
    ----------
    n : int — the number of features
    momentum : float in (0, 1], default 0.1 — ``running = (1 - momentum)·running + momentum·batch``
    eps : float > 0, default 1e-5
    affine : bool, default True — learnable γ (1) and β (0)
    activation : str or None — applied after the normalization (e.g. Linear → BatchNorm → GELU)
    negative_slope : float — leaky_relu's slope

    Attributes
    ----------
    gamma, beta, running_mean, running_var : ndarray views into the network's arrays
    """

    kind = "batchnorm"

    def __init__(self, n: int, momentum: float = 0.1, eps: float = 1e-5, affine: bool = True,
                 activation: str | None = None, negative_slope: float = 0.01) -> None:
        super().__init__(n, eps, affine, activation, negative_slope)
        self._momentum = check_real(momentum, "momentum", low=0, high=1, low_open=True)

    momentum = _fixed("momentum", "Running-statistics momentum (read-only).")

    def __repr__(self):
        return (f"BatchNorm({self.n_out}, momentum={self._momentum}, eps={self._eps}, "
                f"affine={self._affine}, activation={self.activation!r})")

    @property
    def n_buffers(self):
        return 2 * self._n_out

    running_mean = property(
        lambda self: None if self._buffers is None else
        self._buffers[self._buffer_offset:self._buffer_offset + self._n_out],
        doc="Running mean (used in evaluation): a live view.")
    running_var = property(
        lambda self: None if self._buffers is None else
        self._buffers[self._buffer_offset + self._n_out:self._buffer_offset + 2 * self._n_out],
        doc="Running (unbiased) variance (used in evaluation): a live view.")

    def init_params(self, rng):
        super().init_params(rng)
        self.running_mean[...] = 0
        self.running_var[...] = 1

    def plan(self, row, hyper, columns, bstats, codes):
        super().plan(row, hyper, columns, bstats, codes)
        row[codes["buffer"]] = self._buffer_offset
        row[codes["bstat"]] = bstats(4 * self._n_out)     # mean, rstd, Σdx̂, Σdx̂⊙x̂
        hyper[_core.PLAN_FLOAT["momentum"]] = self._momentum

    def config(self):
        return {"kind": "batchnorm", "n": self.n_out, "momentum": self._momentum, "eps": self._eps,
                "affine": self._affine, **self._activation_config()}

    def _to_torch(self, dtype):
        import torch
        module = torch.nn.BatchNorm1d(self.n_out, eps=self._eps, momentum=self._momentum,
                                      affine=self._affine, dtype=dtype)
        self._copy_affine_to(module)
        with torch.no_grad():
            module.running_mean.copy_(torch.from_numpy(self.running_mean.copy()))
            module.running_var.copy_(torch.from_numpy(self.running_var.copy()))
        return [module] + self._torch_activation()


class LayerNorm(_Norm):
    """Layer normalization over each sample's features (torch.nn.LayerNorm(n)), then an
    activation; the same in training and evaluation.

    Parameters
    ----------
    n : int — the number of features
    eps : float > 0, default 1e-5
    elementwise_affine : bool, default True — learnable γ (1) and β (0)
    activation : str or None
    negative_slope : float — leaky_relu's slope
    """

    kind = "layernorm"

    def __init__(self, n: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 activation: str | None = None, negative_slope: float = 0.01) -> None:
        super().__init__(n, eps, elementwise_affine, activation, negative_slope)

    def __repr__(self):
        return (f"LayerNorm({self.n_out}, eps={self._eps}, elementwise_affine={self._affine}, "
                f"activation={self.activation!r})")

    def plan(self, row, hyper, columns, bstats, codes):
        super().plan(row, hyper, columns, bstats, codes)
        row[codes["stat"]] = columns(1)

    def config(self):
        return {"kind": "layernorm", "n": self.n_out, "eps": self._eps,
                "elementwise_affine": self._affine, **self._activation_config()}

    def _to_torch(self, dtype):
        import torch
        module = torch.nn.LayerNorm(self.n_out, eps=self._eps, elementwise_affine=self._affine, dtype=dtype)
        self._copy_affine_to(module)
        return [module] + self._torch_activation()


# kind name -> class, for files and conversions
LAYERS = {cls.kind: cls for cls in (Dense, Dropout, BatchNorm, LayerNorm)}


def layer_from_config(config: dict) -> Layer:
    """A layer from :meth:`Layer.config`'s dict (as read from a file; checked by the constructors)."""
    if not isinstance(config, dict) or config.get("kind") not in LAYERS:
        raise ValueError(f"unknown layer {config!r}; expected a kind among {sorted(LAYERS)}")
    args = {k: v for k, v in config.items() if k != "kind"}
    return LAYERS[config["kind"]](**args)
