"""Sequential: a stack of Dense layers over one flat parameter array.

All parameters live in one contiguous array ``params`` laid out W0 b0 W1 b1 …
(and their gradients likewise in ``grads``): each layer's W, b, dW, db are
views into them, the optimizer updates them in one pass, and a saved model is
that one array plus its architecture.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import threading
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import io as _io
from ._lazy import core as _core
from ._threads import epoch_network, resolve_threads, single_threaded_blas
from ._validation import (
    CSRInput,
    as_dtype,
    check_bool,
    check_finite,
    check_parameter_values,
    check_positive_int,
    check_X,
    hold_memory,
    pinned_zeros,
)
from .activations import from_torch_module
from .layers import BatchNorm, Dense, Dropout, Layer, LayerNorm, layer_from_config, refuse_change


def _resolve_widths(layers):
    """Width-agnostic layers (Dropout) take the width of the layer before them, or after."""
    for i, layer in enumerate(layers):
        if layer.n_in is None:
            neighbour = next((layer.n_out for layer in reversed(layers[:i]) if layer.n_out is not None), None)
            if neighbour is None:
                neighbour = next((layer.n_in for layer in layers[i + 1:] if layer.n_in is not None), None)
            if neighbour is None:
                raise ValueError("a network of Dropout layers alone has no width: add a Dense layer")
            layer._set_width(neighbour)


class _Columns:
    """Hands out consecutive offsets: columns of the per-row workspace, or batch statistics."""

    def __init__(self):
        self.total = 0

    def __call__(self, width):
        start = self.total
        self.total += width
        return start


def _build_plan(layers, n_params, n_buffers):
    """The compiled description of the network (src/_plan.pxd): an integer and a float table,
    one row per layer, the per-row workspace width and the batch-statistics size; frozen.

    Each layer fills its own row, so the table is checked against the arrays it indexes
    (`n_params` parameters, `n_buffers` running statistics) before any kernel sees it: a
    subclass whose declarations disagree with each other gets a ValueError."""
    table = np.full((len(layers), _core.N_PLAN_INT), -1, dtype=np.int64)
    hyper = np.zeros((len(layers), _core.N_PLAN_FLOAT), dtype=np.float64)
    columns, bstats = _Columns(), _Columns()
    for i, (layer, row, h) in enumerate(zip(layers, table, hyper)):
        if layer.kind not in _core.LAYER_KINDS:
            raise ValueError(f"layers[{i}] ({type(layer).__name__}) has kind {layer.kind!r}; expected "
                             f"one of {sorted(_core.LAYER_KINDS)}")
        layer.plan(row, h, columns, bstats, _core.PLAN_INT)
    plan = _frozen(table), _frozen(hyper), columns.total, bstats.total
    _check_plan(layers, *plan, n_params, n_buffers)
    return plan


def _check_plan(layers, table, hyper, row_width, n_bstats, n_params, n_buffers):
    """ValueError unless the plan describes `layers` as the kernels read them: known kinds and
    activations, widths that chain, parameters and running statistics laid out one after the
    other filling exactly the network's arrays, and workspace columns and batch statistics
    each in range and none overlapping another."""
    c, f, kinds = _core.PLAN_INT, _core.PLAN_FLOAT, _core.LAYER_KINDS
    codes = set(_core.ACTIVATIONS.values())
    param_end = buffer_end = 0
    spans, bstat_spans = [], []
    for i, (layer, row, h) in enumerate(zip(layers, table, hyper)):
        where = f"layers[{i}] ({type(layer).__name__})"

        def need(ok, what, where=where, row=row):
            if not ok:
                raise ValueError(f"{where} made an inconsistent plan row: {what} "
                                 f"(row {dict(zip(c, (int(row[v]) for v in c.values())))})")

        kind, n_in, n_out, n_param = (int(row[c[k]]) for k in ("kind", "n_in", "n_out", "n_param"))
        need(kind in kinds.values(), f"kind code {kind} is not one of {sorted(kinds.values())}")
        need(row[c["act"]] in codes, f"activation code {row[c['act']]} is unknown")
        need(n_in >= 1 and n_out >= 1, "widths must be >= 1")
        need(i == 0 or n_in == table[i - 1, c["n_out"]], f"n_in {n_in} is not the previous layer's "
             f"n_out {table[i - 1, c['n_out']] if i else None}")
        need(kind == kinds["dense"] or n_in == n_out, "n_in and n_out differ in a kind that keeps the width")
        expected_params = {kinds["dense"]: (n_in * n_out + n_out,), kinds["dropout"]: (0,)}.get(
            kind, (0, 2 * n_out))
        need(n_param in expected_params, f"{n_param} parameters, expected one of {expected_params}")
        need(row[c["param"]] == param_end, f"parameters at {row[c['param']]}, expected {param_end}")
        param_end += n_param
        if kind == kinds["batchnorm"]:
            need(row[c["buffer"]] == buffer_end, f"running statistics at {row[c['buffer']]}, "
                 f"expected {buffer_end}")
            buffer_end += 2 * n_out
            bstat_spans.append((row[c["bstat"]], 4 * n_out))
        else:
            need(row[c["buffer"]] == -1 and row[c["bstat"]] == -1, "running statistics in a kind without them")
        need(kind != kinds["dropout"] or row[c["act"]] == _core.ACTIVATIONS["identity"],
             "a Dropout row with an activation")
        needs_z = row[c["act"]] in {_core.ACTIVATIONS[name] for name in _core.NEEDS_Z}
        need((row[c["z"]] >= 0) == needs_z, "a pre-activation column "
             f"{'missing' if needs_z else 'for an activation without one'}")
        need(row[c["y"]] >= 0 and row[c["g"]] >= 0, "output and gradient columns are required")
        norm = kind in (kinds["batchnorm"], kinds["layernorm"])
        need((row[c["xhat"]] >= 0) == norm, "an x̂ column exactly for the normalization kinds")
        need((row[c["stat"]] >= 0) == (kind == kinds["layernorm"]), "a statistics column exactly for LayerNorm")
        spans += [(row[c[name]], n_out) for name in ("y", "g", "z", "xhat") if row[c[name]] >= 0]
        spans += [(row[c["stat"]], 1)] if row[c["stat"]] >= 0 else []
        need(math.isfinite(h[f["alpha"]]) and h[f["alpha"]] >= 0, "alpha must be finite and >= 0")
        need(kind != kinds["dropout"] or 0 <= h[f["p"]] < 1, "Dropout's p must be in [0, 1)")
        need(not norm or (math.isfinite(h[f["eps"]]) and h[f["eps"]] > 0), "eps must be finite and > 0")
        need(kind != kinds["batchnorm"] or 0 < h[f["momentum"]] <= 1, "momentum must be in (0, 1]")
    if param_end != n_params or buffer_end != n_buffers:
        raise ValueError(f"the layers' plan rows hold {param_end} parameters and {buffer_end} running "
                         f"statistics, the network's arrays {n_params} and {n_buffers}: a layer's "
                         "n_params / n_buffers disagree with its plan")
    for what, found, total in (("workspace column", spans, row_width), ("batch statistic", bstat_spans, n_bstats)):
        end = 0
        for start, width in sorted(found):
            if start < end or start + width > total:
                raise ValueError(f"the layers' plan rows give overlapping or out-of-range {what}s "
                                 f"({start}..{start + width} of {total})")
            end = start + width


def plan_widths(net):
    """(n_inputs, n_outputs) of `net` as its frozen plan states them: what the kernels
    read, so what every check at the boundary uses (a subclass's n_inputs / n_outputs
    properties may say otherwise)."""
    table, codes = net._plan[0], _core.PLAN_INT
    return int(table[0, codes["n_in"]]), int(table[-1, codes["n_out"]])


def check_running_statistics(table, buffers, name="buffers"):
    """ValueError unless every BatchNorm running variance in `buffers` (laid out as the plan
    `table` says) is >= 0: one check for what is loaded, converted, assigned and saved."""
    c = _core.PLAN_INT
    for row in table[table[:, c["kind"]] == _core.LAYER_KINDS["batchnorm"]]:
        start, n = int(row[c["buffer"]]) + int(row[c["n_out"]]), int(row[c["n_out"]])
        var = np.asarray(buffers[start:start + n])
        if (var < 0).any():
            raise ValueError(f"{name}: a BatchNorm running variance is negative ({var.min():.3g}); "
                             "variances are >= 0")


def _frozen(array):
    """`array`, made read-only for good: views of it cannot be made writeable again."""
    array.flags.writeable = False
    return array


class Sequential:
    """A multi-layer perceptron: Dense layers applied in order.

    Parameters
    ----------
    layers : list of Dense
        Consecutive widths must chain: ``layers[i].n_out == layers[i+1].n_in``.
    dtype : {"float32", "float64"}, default "float32"
    seed : int or None
        Seed of the weight initialisation (He-normal for relu/leaky_relu layers,
        Glorot-uniform otherwise; biases 0). The same seed gives the same weights.

    Examples
    --------
    >>> net = Sequential([Dense(4, 8, "relu"), Dense(8, 3)], seed=0)
    >>> net.forward(np.ones((2, 4))).shape
    (2, 3)
    """

    def __init__(self, layers: Sequence[Layer], dtype: DTypeLike = "float32",
                 seed: int | np.random.Generator | None = None) -> None:
        self._refuse_rebuild()
        layers = list(layers) if not isinstance(layers, Layer) else [layers]
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        seen = set()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layers[{i}] must be a cprop layer (Dense, Dropout, BatchNorm, "
                                f"LayerNorm), got {type(layer).__name__}")
            if layer._params is not None:
                raise ValueError(f"layers[{i}] already belongs to a network; create a new layer")
            if id(layer) in seen:
                raise ValueError(f"layers[{i}] is the same {type(layer).__name__} object as an earlier "
                                 "layer; a layer can appear in a network once (create a new one)")
            seen.add(id(layer))
        _resolve_widths(layers)
        for i in range(len(layers) - 1):
            if layers[i].n_out != layers[i + 1].n_in:
                raise ValueError(
                    f"layer sizes do not chain: layers[{i}] outputs {layers[i].n_out} features "
                    f"but layers[{i + 1}] expects {layers[i + 1].n_in}")
        # structure, fixed from here on: the kernels read these, so users get read-only views
        self._layers = tuple(layers)
        self._dtype = as_dtype(dtype)
        self.seed = seed
        self._sizes = _frozen(np.array([layers[0].n_in] + [layer.n_out for layer in layers], dtype=np.intp))
        self._activations = _frozen(np.array([layer.activation_code for layer in layers], dtype=np.intc))
        # memory no Python code can free or move while the network lives: compiled calls
        # (a fit's epochs among them) read it without the GIL (see pinned_zeros)
        n_params = sum(layer.n_params for layer in layers)
        self._params, pin_p = pinned_zeros(n_params, self._dtype)
        self._grads, pin_g = pinned_zeros(n_params, self._dtype)
        self._buffers, pin_b = pinned_zeros(sum(layer.n_buffers for layer in layers), self._dtype)
        self._pins = (pin_p, pin_g, pin_b)
        offset = buffer_offset = 0
        for layer in layers:
            layer._bind(self._params, self._grads, self._buffers, offset, buffer_offset)
            offset += layer.n_params
            buffer_offset += layer.n_buffers
        try:
            self._plan = _build_plan(layers, self._params.size, self._buffers.size)
        except ValueError:
            for layer in layers:      # free to join a network again
                layer._params = layer._grads = layer._buffers = None
            raise
        # what users read of the structure comes from the checked plan, not the layers' claims
        table = self._plan[0]
        self._sizes = _frozen(np.concatenate([table[:1, _core.PLAN_INT["n_in"]],
                                              table[:, _core.PLAN_INT["n_out"]]]).astype(np.intp))
        self._activations = _frozen(table[:, _core.PLAN_INT["act"]].astype(np.intc))
        self._has_grads = False     # grads hold a backward pass's result
        self._grad_rows = 0         # ... computed over this many samples
        self._local = threading.local()     # per thread: forward's tape, inference workspace
        # held (without waiting) by whatever writes grads or params from a compiled
        # call: backward, an optimizer step, Trainer.fit; a second thread gets an error
        self._training_lock = threading.RLock()
        rng = np.random.default_rng(seed) if not isinstance(seed, np.random.Generator) else seed
        self.init_params(rng)
        self._dropout_seed = int(rng.integers(2**63))     # masks of forward(training=True)
        self._training_calls = 0

    # -- structure (read-only) -----------------------------------------------
    @property
    def layers(self) -> tuple:
        """The layers, in order (a tuple: the structure is fixed once built)."""
        return self._layers

    @layers.setter
    def layers(self, value):
        refuse_change(self, "layers", "build a new Sequential instead")

    @property
    def dtype(self) -> type:
        """np.float32 or np.float64 (read-only; see :meth:`astype`)."""
        return self._dtype

    @dtype.setter
    def dtype(self, value):
        refuse_change(self, "dtype", "use net.astype(dtype) for a copy")

    @property
    def sizes(self) -> np.ndarray:
        """Layer widths ``[n_inputs, n_out of each layer...]`` (a read-only array)."""
        return self._sizes.view()

    @sizes.setter
    def sizes(self, value):
        refuse_change(self, "sizes", "build a new Sequential instead")

    @property
    def activations(self) -> np.ndarray:
        """Kernel codes of the layers' activations (a read-only array)."""
        return self._activations.view()

    @activations.setter
    def activations(self, value):
        refuse_change(self, "activations", "build a new Sequential instead")

    @property
    def params(self) -> np.ndarray:
        """All parameters, one flat array laid out W0 b0 W1 b1 … (each layer's W, b are views).

        Modify it in place (``net.params[...] = p`` or :meth:`set_params`). Each access
        is a fresh view of the network's own array, which the compiled kernels use.
        """
        return self._params.view()

    @params.setter
    def params(self, value):
        refuse_change(self, "params", "copy values in with net.params[...] = p or net.set_params(p)")

    @property
    def grads(self) -> np.ndarray:
        """All gradients of the last backward pass, laid out like :attr:`params`."""
        return self._grads.view()

    @grads.setter
    def grads(self, value):
        refuse_change(self, "grads", "gradients are written by backward()")

    @property
    def n_inputs(self) -> int:
        """Features per input sample (the first layer's n_in)."""
        return plan_widths(self)[0]

    @property
    def n_outputs(self) -> int:
        """Width of the raw output (the last layer's n_out)."""
        return plan_widths(self)[1]

    @property
    def n_params(self) -> int:
        """Number of trainable parameters."""
        return self._params.size

    @property
    def buffers(self) -> np.ndarray:
        """The running statistics of the BatchNorm layers, one flat array (a view)."""
        return self._buffers.view()

    @buffers.setter
    def buffers(self, value):
        refuse_change(self, "buffers", "copy values in with net.buffers[...] = b")

    @property
    def has_training_behaviour(self) -> bool:
        """Whether training and evaluation differ (Dropout or BatchNorm layers)."""
        return any(isinstance(layer, (Dropout, BatchNorm)) for layer in self._layers)

    @contextlib.contextmanager
    def _training(self, what):
        """Hold the network for a call that writes its gradients or parameters; another
        thread doing the same meanwhile gets a RuntimeError instead of corrupting them."""
        if epoch_network() is self:
            # a signal handler run by this network's compiled epoch, mid-step: the lock is
            # re-entrant, so this thread would otherwise get in
            raise RuntimeError(f"{what}: called from a signal handler while this thread runs a "
                               "training epoch of this network; train it after fit() returns")
        if not self._training_lock.acquire(blocking=False):
            raise RuntimeError(f"{what}: another thread is training this network (backward, an "
                               "optimizer step or Trainer.fit); train, change or save one network "
                               "from one thread at a time, or from the fit's callbacks (inference "
                               "may run from many)")
        try:
            yield
        finally:
            self._training_lock.release()

    def __repr__(self):
        inner = ",\n    ".join(repr(layer) for layer in self.layers)
        return f"Sequential([\n    {inner},\n], dtype={np.dtype(self.dtype).name!r})"

    def init_params(self, seed: int | np.random.Generator | None = None) -> None:
        """Re-initialise every layer's weights from `seed` (int, None or a numpy Generator)."""
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        with self._training("init_params"):
            for layer in self._layers:
                layer.init_params(rng)
            self._grads[...] = 0
            self._has_grads = False

    def architecture(self) -> dict:
        """The layers' kinds and settings, and the dtype, as saved in files."""
        return {"layers": [layer.config() for layer in self._layers], "dtype": np.dtype(self._dtype).name}

    @classmethod
    def from_architecture(cls, arch: dict, params: ArrayLike | None = None,
                          buffers: ArrayLike | None = None) -> Sequential:
        """A network from :meth:`architecture`'s dict (or the older form of Dense widths
        ``sizes`` and ``activations``), with flat `params` and `buffers` copied in when given."""
        if "layers" in arch:
            if not isinstance(arch["layers"], list) or not arch["layers"]:
                raise ValueError("architecture 'layers' must be a non-empty list")
            layers = [layer_from_config(c) for c in arch["layers"]]
        else:
            sizes, acts = arch["sizes"], arch["activations"]
            if not isinstance(sizes, list) or not isinstance(acts, list) or len(acts) != len(sizes) - 1:
                raise ValueError("sizes and activations do not match")
            layers = [Dense(sizes[i], sizes[i + 1], acts[i]) for i in range(len(acts))]
        net = cls(layers, dtype=arch["dtype"], seed=0)
        if params is not None:
            net.set_params(params)
        if buffers is not None:
            net._set_buffers(buffers)
        return net

    def _set_buffers(self, values, name="buffers"):
        """Copy in running statistics: finite values of the buffers' shape, every BatchNorm
        running variance >= 0 (evaluation divides by its square root)."""
        values = check_parameter_values(values, self._buffers.shape, name, self._dtype)
        check_running_statistics(self._plan[0], values, name)
        with self._training(f"setting {name}"):
            self._buffers[...] = values

    def set_params(self, params: ArrayLike) -> None:
        """Copy a flat parameter array (layout W0 b0 W1 b1 …) into the network."""
        values = check_parameter_values(params, self._params.shape, "params", self._dtype)
        with self._training("set_params"):
            self._params[...] = values

    def copy(self) -> Sequential:
        """An independent network with the same architecture, parameters and running statistics."""
        with self._training("copy"):     # not torn by a fit in another thread
            return Sequential.from_architecture(self.architecture(), self._params, self._buffers)

    def astype(self, dtype: DTypeLike) -> Sequential:
        """A copy of the network with parameters in `dtype`."""
        arch = dict(self.architecture(), dtype=np.dtype(as_dtype(dtype)).name)
        with self._training("astype"):     # not torn by a fit in another thread
            return Sequential.from_architecture(arch, self._params, self._buffers)

    # -- the two passes ----------------------------------------------------
    def forward(self, X: ArrayLike, n_threads: int | None = None, training: bool = False,
                seed: int | None = None) -> np.ndarray:
        """Raw output of the last layer (logits for the classification losses).

        Keeps every layer's output for :meth:`backward` (per thread: a thread's
        backward uses that thread's last forward).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_inputs)
            Any real dtype, any memory layout; converted to the network's dtype
            (no copy when it is already C-contiguous in that dtype). Not sparse
            (TypeError): :meth:`predict_raw` and :class:`cprop.Trainer` take
            scipy.sparse input, or pass ``X.toarray()`` here.
        n_threads : int, optional
            Threads for the kernels (default: :func:`cprop.get_num_threads`).
        training : bool, default False
            The training pass: Dropout drops, BatchNorm normalizes with the batch's
            statistics and updates its running ones. False: the evaluation pass
            (what :meth:`predict_raw` computes). Networks without Dropout and
            BatchNorm compute the same either way.
        seed : int, optional
            The dropout masks' seed for a training pass (default: a new one each
            call); the same seed gives the same masks.

        Returns
        -------
        ndarray of shape (n_samples, n_outputs), the network's dtype
        """
        self._local.tape = None     # a forward that fails halfway leaves nothing for backward
        n_inputs, n_outputs = plan_widths(self)
        checked = check_X(X, self._dtype, n_inputs,
                          accept_sparse="Sequential.forward (predict_raw and Trainer take it)")
        # the tape's X must be ours: the caller may resize or free theirs before backward. A
        # view is copied; an array of its own (a conversion, or what an object's __array__
        # handed over) is pinned for as long as the tape keeps it
        X = checked if checked.flags.owndata else checked.copy()
        held = hold_memory(X)
        training = check_bool(training, "training")
        n_threads = resolve_threads(n_threads)
        if seed is None:
            self._training_calls += 1
            seed = self._dropout_seed + 0x9E3779B97F4A7C15 * self._training_calls
        else:
            seed = check_positive_int(seed, "seed", minimum=0, maximum=None)
        seed &= (1 << 64) - 1
        n = X.shape[0]
        table, hyper, row_width, n_bstats = self._plan
        work = np.empty(n * row_width + n_bstats, dtype=self._dtype)
        last = table[-1]
        with single_threaded_blas():
            if training and any(isinstance(layer, BatchNorm) for layer in self._layers):
                with self._training("forward(training=True) with BatchNorm"):   # writes running stats
                    _core.forward_train(table, hyper, row_width, n_bstats, X, self._params,
                                        self._buffers, work, training, seed, n_threads)
            else:
                _core.forward_train(table, hyper, row_width, n_bstats, X, self._params,
                                    self._buffers, work, training, seed, n_threads)
        y = _core.PLAN_INT["y"]
        self._local.tape = (X, work, training, seed, held)
        return work[n * last[y]:n * (last[y] + n_outputs)].reshape(n, n_outputs).copy()

    def backward(self, grad_out: np.ndarray, n_threads: int | None = None) -> Sequential:
        """Backpropagate ∂L/∂output through every layer, last layer first.

        Per Dense layer: ``δ = G ⊙ f'(z)``, ``dW = Xᵀ·δ``, ``db = Σ δ``, and ``G = δ·Wᵀ``
        for the layer below; normalization and dropout layers likewise by their own
        rules (src/_norm.pxd, src/_dropout.pxd), in the mode of the forward pass.

        Parameters
        ----------
        grad_out : ndarray of shape (n_samples, n_outputs)
            ∂loss/∂output for this thread's last :meth:`forward`, as returned by a
            ``cprop.losses`` function.
        n_threads : int, optional

        Returns
        -------
        self — with the gradients of every layer (views of :attr:`grads`) filled in.

        Raises
        ------
        RuntimeError — no completed forward() in this thread, or another thread
            is training this network at the same time.
        """
        tape = getattr(self._local, "tape", None)
        if tape is None:
            raise RuntimeError("backward() needs the activations of a completed forward() call in "
                               "this thread: call net.forward(X) first")
        X, work, training, seed, _ = tape
        rows = X.shape[0]
        if not isinstance(grad_out, np.ndarray) or grad_out.dtype.kind not in "biuf":
            raise TypeError(f"grad_out must be a numeric array, got {type(grad_out).__name__}")
        held = hold_memory(grad_out)   # not resized by another thread while we read it
        G = grad_out.view()   # ours: another thread may reshape the caller's object
        n_outputs = plan_widths(self)[1]
        if G.shape != (rows, n_outputs):
            raise ValueError(f"grad_out must have the shape of the last forward output, "
                             f"({rows}, {n_outputs}), got {G.shape}")
        G = np.ascontiguousarray(G, dtype=self._dtype)
        if not np.isfinite(G).all():
            raise ValueError("grad_out contains NaN or infinite values")
        n_threads = resolve_threads(n_threads)
        table, hyper, row_width, n_bstats = self._plan
        with self._training("backward"), single_threaded_blas():
            _core.backward(table, hyper, row_width, n_bstats, X, G, self._params, self._grads, work,
                           training, seed, n_threads)
            self._has_grads = True
            self._grad_rows = rows
        del held
        return self

    def _batch_gradient(self, X, T, labels, loss_code, loss_scale=1.0, seed=0, n_threads=1, row_base=0,
                        work=None, weights=None, guard=None):
        """loss_scale × the mean loss over validated (X, T or labels), and its gradient into
        grads, in one compiled training pass (the full batch of L-BFGS, a rank's share of a
        global batch). Dropout masks are those of rows row_base… of an epoch keyed by seed.
        `work`: a workspace from :meth:`_gradient_workspace` for X's rows, reused by callers
        that evaluate many times (else a new one). `weights`: validated sample weights (the
        mean is then the weighted one). `guard`: see _core.batch_gradient."""
        table, hyper, row_width, n_bstats = self._plan
        X, csr = self._core_input(X, whole=True)
        if work is None:
            work = self._gradient_workspace(X.shape[0])
        elif work.dtype != self._dtype or work.shape != (X.shape[0] * row_width + n_bstats,):
            raise ValueError(f"the workspace has dtype {work.dtype} and shape {work.shape}, expected "
                             f"{np.dtype(self._dtype)} ({X.shape[0] * row_width + n_bstats},)")
        settings = {"loss": loss_code, "loss_scale": loss_scale, "seed": seed & (2**64 - 1),
                    "n_threads": n_threads}
        with self._training("a gradient pass"), single_threaded_blas():
            value = _core.batch_gradient(table, hyper, row_width, n_bstats, settings, X, T, labels,
                                         self._params, self._grads, self._buffers, work, row_base,
                                         weights, **csr, guard=guard)
            self._has_grads, self._grad_rows = True, X.shape[0]
        return value

    @property
    def _reads_sparse(self):
        """Whether the first layer reads a CSR input in place (it is Dense); else a sparse
        input is made dense for it."""
        return int(self._plan[0][0, _core.PLAN_INT["kind"]]) == _core.LAYER_KINDS["dense"]

    def _core_input(self, X, whole=False):
        """(X, keyword arguments) for the compiled core: a dense X as it is; a CSRInput as
        a (n, 0) placeholder and its arrays when the first layer reads it in place, else
        (whole=True: for the full-batch gradient) densified."""
        if not isinstance(X, CSRInput):
            return X, {}
        if self._reads_sparse:
            return X.core_args()
        if whole:
            return X.toarray(), {}
        raise TypeError("the first layer is not Dense: its sparse batches are gathered densely")

    def _gradient_workspace(self, n_rows):
        """The workspace :meth:`_batch_gradient` needs for n_rows rows."""
        _, _, row_width, n_bstats = self._plan
        return np.empty(n_rows * row_width + n_bstats, dtype=self._dtype)

    def predict_raw(self, X: ArrayLike, n_threads: int | None = None,
                    chunk_size: int | None = None) -> np.ndarray:
        """Raw outputs for X, nothing kept for backward: the inference path.

        One compiled call: each thread takes a share of the rows and runs it
        through every layer in chunks of `chunk_size` rows; the intermediate
        buffers are kept per thread and reused by the next call. The default is
        1024 rows (fewer when a thread's buffers would pass 32 MB, a very wide
        network): against chunks sized to a 1 MB layer output (512 to 4096 rows)
        it ran the benchmark networks 1.0-1.3× as fast (benchmarks/README.md).

        X may be a scipy.sparse matrix or array of any format (validated and taken as
        CSR): a Dense first layer multiplies its rows in place (sparse × dense), any
        other first layer gets them densified a block of rows at a time.
        """
        held = hold_memory(X)   # another thread cannot resize the caller's X while we read it
        n_inputs, n_outputs = plan_widths(self)
        # a sparse X: copied, validated; a dense one is checked for NaN/inf by the compiled forward
        X = check_X(X, self._dtype, n_inputs, accept_sparse=True, finite=False)
        n_threads = resolve_threads(n_threads)
        table, hyper, row_width, n_bstats = self._plan
        if chunk_size is None:
            chunk_size = max(64, min(1024, (32 << 20) // (row_width * np.dtype(self._dtype).itemsize)))
        chunk_size = min(check_positive_int(chunk_size, "chunk_size"), X.shape[0])
        work = self._inference_workspace(n_threads * (chunk_size * row_width + n_bstats))
        out = np.empty((X.shape[0], n_outputs), dtype=self._dtype)
        with single_threaded_blas():
            if isinstance(X, CSRInput) and not self._reads_sparse:
                # a first layer that is not Dense takes dense rows: one block of them at a time
                block = max(chunk_size * n_threads, 4096)
                for start in range(0, X.shape[0], block):
                    stop = min(start + block, X.shape[0])
                    _core.forward(table, hyper, row_width, n_bstats, X.dense_rows(start, stop),
                                  self._params, self._buffers, work, out[start:stop],
                                  min(chunk_size, stop - start), n_threads)
            else:
                X_core, csr = self._core_input(X)
                if not _core.forward(table, hyper, row_width, n_bstats, X_core, self._params, self._buffers,
                                     work, out, chunk_size, n_threads, **csr):
                    check_finite(X_core, "X")   # raises, counting the bad values
                    raise ValueError("X held NaN or infinite values while cprop read it (changed meanwhile)")
        del held
        return out

    def _inference_workspace(self, size):
        """A float buffer of `size` for this thread, reused across calls (fresh pages cost
        more than the arithmetic of a small network's forward pass)."""
        work = getattr(self._local, "work", None)
        if work is None or work.size < size:
            work = self._local.work = np.empty(size, dtype=self._dtype)
        return work

    # -- PyTorch interop -----------------------------------------------------
    @classmethod
    def from_torch(cls, module) -> Sequential:
        """A Sequential with the weights (and running statistics) of a ``torch.nn.Sequential``.

        Modules: Linear (with bias), Dropout, BatchNorm1d (with running statistics),
        LayerNorm (over the last dimension), each optionally followed by one activation:
        ReLU, LeakyReLU(slope), Sigmoid, Tanh, ELU (alpha 1), Softplus (beta 1), GELU
        (exact or tanh), SiLU or Identity. The values are copied exactly (cprop's W is
        torch's ``weight.T``); the dtype follows the module's (float32 or float64), and
        :meth:`to_torch` gives back the same modules in the same order.
        """
        import torch
        nn = torch.nn
        if not isinstance(module, nn.Sequential):
            raise TypeError(f"from_torch needs a torch.nn.Sequential, got {type(module).__name__}")
        specs: list = []               # [kind, torch module, activation, alpha]
        dtype = None
        for i, m in enumerate(module):
            kind = type(m).__name__
            try:
                act = from_torch_module(m)
            except ValueError as exc:
                raise ValueError(f"module[{i}] ({kind}): {exc}") from None
            if act is not None:
                if not specs or specs[-1][0] == "dropout" or specs[-1][2] != "identity":
                    raise ValueError(
                        f"module[{i}] ({kind}) cannot be converted: cprop applies an activation to the "
                        "output of a Linear, BatchNorm1d or LayerNorm, once")
                if act[0] != "identity" or kind != "Identity":
                    specs[-1][2], specs[-1][3] = act
                continue
            if isinstance(m, nn.Linear):
                if m.bias is None:
                    raise ValueError(f"module[{i}]: Linear layers need a bias (bias=True)")
                specs.append(["dense", m, "identity", 0.0])
                dtype = m.weight.dtype
            elif isinstance(m, nn.Dropout):
                specs.append(["dropout", m, "identity", 0.0])
            elif isinstance(m, nn.BatchNorm1d):
                if not m.track_running_stats or m.momentum is None:
                    raise ValueError(f"module[{i}]: BatchNorm1d needs running statistics with a momentum")
                specs.append(["batchnorm", m, "identity", 0.0])
                dtype = m.running_mean.dtype
            elif isinstance(m, nn.LayerNorm):
                if len(m.normalized_shape) != 1:
                    raise ValueError(f"module[{i}]: LayerNorm must normalize one dimension, "
                                     f"got normalized_shape={tuple(m.normalized_shape)}")
                if getattr(m, "bias", None) is None and m.elementwise_affine:
                    raise ValueError(f"module[{i}]: LayerNorm without bias is not supported")
                specs.append(["layernorm", m, "identity", 0.0])
            else:
                raise ValueError(f"module[{i}] ({kind}) cannot be converted: expected Linear, Dropout, "
                                 "BatchNorm1d, LayerNorm and activation modules")
        if not any(spec[0] == "dense" for spec in specs):
            raise ValueError("the module has no Linear layer")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"weights must be float32 or float64, got {dtype}")
        layers: list[Layer] = []
        for kind, m, act, alpha in specs:
            slope = alpha if act == "leaky_relu" else 0.01
            if kind == "dense":
                layers.append(Dense(m.in_features, m.out_features, act, negative_slope=slope))
            elif kind == "dropout":
                layers.append(Dropout(m.p))
            elif kind == "batchnorm":
                layers.append(BatchNorm(m.num_features, momentum=m.momentum, eps=m.eps, affine=m.affine,
                                        activation=act, negative_slope=slope))
            else:
                layers.append(LayerNorm(m.normalized_shape[0], eps=m.eps,
                                        elementwise_affine=m.elementwise_affine, activation=act,
                                        negative_slope=slope))
        net = cls(layers, dtype="float64" if dtype == torch.float64 else "float32", seed=0)

        def numpy(t):
            return t.detach().cpu().numpy()

        buffers = net._buffers.copy()
        with torch.no_grad():
            for layer, (kind, m, _, _) in zip(net.layers, specs):
                if kind == "dense":
                    layer.W = numpy(m.weight).T
                    layer.b = numpy(m.bias)
                elif kind in ("batchnorm", "layernorm") and layer.gamma is not None:
                    layer.gamma = numpy(m.weight)
                    layer.beta = numpy(m.bias)
                if kind == "batchnorm":
                    n, start = layer.n_out, layer._buffer_offset
                    for j, stat in enumerate((m.running_mean, m.running_var)):
                        values = numpy(stat)
                        if values.shape != (n,):
                            raise ValueError(f"BatchNorm1d({n}) has running statistics of shape {values.shape}")
                        buffers[start + j * n:start + (j + 1) * n] = values
        net._set_buffers(buffers, "the BatchNorm1d modules' running statistics")
        return net

    def to_torch(self):
        """A ``torch.nn.Sequential`` with exactly these weights and running statistics: per
        layer its module (Linear, Dropout, BatchNorm1d, LayerNorm), then its activation's.
        In training mode, as torch makes every module: call ``.eval()`` before comparing its
        outputs with :meth:`forward`'s (Dropout and BatchNorm differ between the modes)."""
        import torch
        dtype = torch.float64 if self._dtype == np.float64 else torch.float32
        modules = []
        for layer in self._layers:
            modules.extend(layer._to_torch(dtype))
        return torch.nn.Sequential(*modules)

    def to_onnx(self, path: str | os.PathLike, **kw):
        """Write the network as an ONNX model: :func:`cprop.onnx.export` (head=, opset=)."""
        from . import onnx
        with self._training("to_onnx"):     # not torn by a fit in another thread
            return onnx.export(self, path, **kw)

    # -- files -------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the architecture, parameters and running statistics to `path`.

        The format is an .npz archive without pickles (see :mod:`cprop.io`),
        written to a temporary file in the same directory and renamed over
        `path`, so an interrupted save never destroys a previous file. A new
        file gets the umask's mode, an existing one keeps its mode, and a
        symbolic link is written through to its target. Read it back with
        :func:`cprop.load`.

        Raises
        ------
        ValueError — empty path. IsADirectoryError — `path` is a directory.
        """
        with self._training("Sequential.save"):     # not torn by a fit in another thread
            _io.save_archive(path, {"kind": "network", "architecture": self.architecture()},
                             self._arrays())

    def _arrays(self):
        """The arrays a file holds: params, and buffers when there are running statistics,
        checked as loading checks them (a user may have written any value into them)."""
        if epoch_network() is self:
            # a signal handler mid-epoch: the parameters are half-way through a step
            raise RuntimeError("cannot save a network from a signal handler while this thread runs a "
                               "training epoch of it; save it from a callback or after fit() returns")
        if not (np.isfinite(self._params).all() and np.isfinite(self._buffers).all()):
            raise ValueError("cannot save a network whose parameters or running statistics are "
                             "not finite: cprop would refuse to load the file")
        check_running_statistics(self._plan[0], self._buffers, "cannot save: buffers")
        arrays = {"params": self._params}
        if self._buffers.size:
            arrays["buffers"] = self._buffers
        return arrays

    def __getstate__(self):
        with self._training("pickling a network"):    # not torn by a fit in another thread
            return {"architecture": self.architecture(), "params": self._params.copy(),
                    "buffers": self._buffers.copy()}

    def __setstate__(self, state):
        self._refuse_rebuild()
        net = Sequential.from_architecture(state["architecture"], state["params"], state.get("buffers"))
        self.__dict__.update(net.__dict__)

    def _refuse_rebuild(self):
        """A Sequential is built once: __init__ or __setstate__ again on a built one would swap
        the arrays and plan under a fit, a trainer or a layer that holds them."""
        if "_plan" in self.__dict__:
            raise RuntimeError("this Sequential is already built; create a new one (its layers, "
                               "trainers and fits hold its arrays)")


MAX_LAYERS = 10_000          # in a file: far beyond any real network, so a bad count is refused cheaply
_STATE_MEMBER = re.compile(r"state_[0-9]{1,2}")


def architecture_from_meta(meta):
    """(architecture dict, parameter count, running-statistics count) from a file's metadata,
    every field checked and nothing allocated: the counts are what the file's params and
    buffers members must hold. Reads the layer list of format 2 and the Dense widths and
    activations of format 1. TypeError / ValueError otherwise."""
    arch = meta.get("architecture")
    if not isinstance(arch, dict):
        raise TypeError(f"architecture must be a mapping, got {type(arch).__name__}")
    dtype = arch.get("dtype")
    if not isinstance(dtype, str) or dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if "layers" in arch:
        configs = arch["layers"]
        if not isinstance(configs, list) or not 1 <= len(configs) <= MAX_LAYERS:
            raise ValueError(f"architecture 'layers' must be a list of 1 to {MAX_LAYERS} layers")
        layers = [layer_from_config(c) for c in configs]
        arch = {"layers": [layer.config() for layer in layers], "dtype": dtype}
    else:
        sizes, acts = arch.get("sizes"), arch.get("activations")
        if not isinstance(sizes, list) or not isinstance(acts, list):
            raise TypeError("architecture needs a list 'layers', or lists 'sizes' and 'activations'")
        if not 1 <= len(acts) <= MAX_LAYERS or len(sizes) != len(acts) + 1:
            raise ValueError(f"{len(sizes)} sizes and {len(acts)} activations do not describe 1 to "
                             f"{MAX_LAYERS} layers")
        layers = [Dense(sizes[i], sizes[i + 1], acts[i]) for i in range(len(acts))]
        arch = {"sizes": [layer.n_in for layer in layers[:1]] + [layer.n_out for layer in layers],
                "activations": [layer.activation for layer in layers], "dtype": dtype}
    _resolve_widths(layers)
    for i in range(len(layers) - 1):
        if layers[i].n_out != layers[i + 1].n_in:
            raise ValueError(f"layers[{i}] outputs {layers[i].n_out} features, layers[{i + 1}] "
                             f"expects {layers[i + 1].n_in}")
    return arch, sum(layer.n_params for layer in layers), sum(layer.n_buffers for layer in layers)


def network_from_archive(archive):
    """The Sequential in an open :class:`cprop.io.Archive` (a network's or a trainer's),
    its architecture checked before its parameters and running statistics are read."""
    try:
        arch, n_params, n_buffers = architecture_from_meta(archive.meta)
    except (TypeError, ValueError) as exc:
        raise archive.error(f"invalid network in file ({exc})") from None
    expected = {"params"} | ({"buffers"} if n_buffers else set())
    others = archive.names - expected
    if (archive.meta.get("kind") == "network" and others) or not all(_STATE_MEMBER.fullmatch(n) for n in others):
        raise archive.error(f"unexpected member(s) {sorted(others)} in a {archive.meta.get('kind')} file")
    params = archive.read("params", arch["dtype"], (n_params,))
    if not np.isfinite(params).all():
        raise archive.error("params contains non-finite values")
    buffers = None
    if n_buffers:
        buffers = archive.read("buffers", arch["dtype"], (n_buffers,))
        if not np.isfinite(buffers).all():
            raise archive.error("buffers contains non-finite values")
    try:
        return Sequential.from_architecture(arch, params, buffers)
    except ValueError as exc:
        raise archive.error(f"invalid network in file ({exc})") from None


def network_from_meta(meta, arrays, path):
    """Rebuild a Sequential from metadata and arrays already in memory, checking everything first."""
    try:
        arch, n_params, n_buffers = architecture_from_meta(meta)
        params = arrays["params"]
        if params.dtype != arch["dtype"] or params.shape != (n_params,):
            raise ValueError(f"params has dtype {params.dtype} and shape {params.shape}, "
                             f"expected {arch['dtype']} ({n_params},)")
        if not np.isfinite(params).all():
            raise ValueError("params contains non-finite values")
        buffers = arrays.get("buffers") if n_buffers else None
        if n_buffers and (buffers is None or buffers.shape != (n_buffers,) or not np.isfinite(buffers).all()):
            raise ValueError(f"buffers must be {n_buffers} finite values")
        return Sequential.from_architecture(arch, params, buffers)
    except (TypeError, KeyError, ValueError) as exc:
        raise _io.CpropFileError(f"{path!r}: invalid network in file ({exc})") from None


def load(path: str | os.PathLike) -> Sequential:
    """Load a network saved by :meth:`Sequential.save` (or the network of a saved Trainer).

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    Sequential

    Raises
    ------
    cprop.CpropFileError
        The file is not a regular file, or is truncated, corrupted, foreign or of
        a newer format, or describes more data than it holds; nothing in it is
        unpickled or executed, and no more is read than its architecture needs.
    """
    with _io.open_archive(path, kinds=("network", "trainer")) as archive:
        return network_from_archive(archive)
