"""Sequential: a stack of Dense layers over one flat parameter array.

All parameters live in one contiguous array ``params`` laid out W0 b0 W1 b1 …
(and their gradients likewise in ``grads``): each layer's W, b, dW, db are
views into them, the optimizer updates them in one pass, and a saved model is
that one array plus its architecture.
"""
from __future__ import annotations

import contextlib
import os
import re
import threading

from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import io as _io
from ._lazy import core as _core
from ._threads import resolve_threads, single_threaded_blas
from ._validation import as_dtype, check_X, check_parameter_values, check_positive_int
from .activations import activation_code
from .layers import Dense, structure_setter


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

    def __init__(self, layers: Sequence[Dense], dtype: DTypeLike = "float32",
                 seed: int | np.random.Generator | None = None) -> None:
        layers = list(layers) if not isinstance(layers, Dense) else [layers]
        if not layers:
            raise ValueError("Sequential needs at least one Dense layer")
        seen = set()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Dense):
                raise TypeError(f"layers[{i}] must be a cprop.Dense, got {type(layer).__name__}")
            if layer._params is not None:
                raise ValueError(f"layers[{i}] already belongs to a network; create a new Dense")
            if id(layer) in seen:
                raise ValueError(f"layers[{i}] is the same Dense object as an earlier layer; "
                                 "a layer can appear in a network once (create a new Dense)")
            seen.add(id(layer))
        for i in range(len(layers) - 1):
            if layers[i].n_out != layers[i + 1].n_in:
                raise ValueError(
                    f"layer sizes do not chain: layers[{i}] outputs {layers[i].n_out} features "
                    f"but layers[{i + 1}] expects {layers[i + 1].n_in}")
        if len(layers) > 64:
            raise ValueError(f"cprop supports up to 64 layers, got {len(layers)}")
        # structure, fixed from here on: the kernels read these, so users get read-only views
        self._layers = tuple(layers)
        self._dtype = as_dtype(dtype)
        self.seed = seed
        self._sizes = _frozen(np.array([layers[0].n_in] + [l.n_out for l in layers], dtype=np.intp))
        self._activations = _frozen(np.array([l.activation_code for l in layers], dtype=np.intc))
        n_params = sum(l.n_params for l in layers)
        self._params = np.zeros(n_params, dtype=self._dtype)
        self._grads = np.zeros(n_params, dtype=self._dtype)
        self._has_grads = False     # grads hold a backward pass's result
        self._grad_rows = 0         # ... computed over this many samples
        self._local = threading.local()     # per thread: forward's tape, inference workspace
        # held (without waiting) by whatever writes grads or params from a compiled
        # call: backward, an optimizer step, Trainer.fit; a second thread gets an error
        self._training_lock = threading.RLock()
        offset = 0
        for layer in layers:
            layer._bind(self._params, self._grads, offset)
            offset += layer.n_params
        self.init_params(seed)

    # -- structure (read-only) -----------------------------------------------
    @property
    def layers(self) -> tuple:
        """The layers, in order (a tuple: the structure is fixed once built)."""
        return self._layers

    layers = layers.setter(structure_setter("layers", "build a new Sequential instead"))

    @property
    def dtype(self) -> type:
        """np.float32 or np.float64 (read-only; see :meth:`astype`)."""
        return self._dtype

    dtype = dtype.setter(structure_setter("dtype", "use net.astype(dtype) for a copy"))

    @property
    def sizes(self) -> np.ndarray:
        """Layer widths ``[n_inputs, n_out of each layer...]`` (a read-only array)."""
        return self._sizes.view()

    sizes = sizes.setter(structure_setter("sizes", "build a new Sequential instead"))

    @property
    def activations(self) -> np.ndarray:
        """Kernel codes of the layers' activations (a read-only array)."""
        return self._activations.view()

    activations = activations.setter(structure_setter("activations", "build a new Sequential instead"))

    @property
    def params(self) -> np.ndarray:
        """All parameters, one flat array laid out W0 b0 W1 b1 … (each layer's W, b are views).

        Modify it in place (``net.params[...] = p`` or :meth:`set_params`). Each access
        is a fresh view of the network's own array, which the compiled kernels use.
        """
        return self._params.view()

    params = params.setter(structure_setter("params", "copy values in with net.params[...] = p or net.set_params(p)"))

    @property
    def grads(self) -> np.ndarray:
        """All gradients of the last backward pass, laid out like :attr:`params`."""
        return self._grads.view()

    grads = grads.setter(structure_setter("grads", "gradients are written by backward()"))

    @property
    def n_inputs(self) -> int:
        """Features per input sample (the first layer's n_in)."""
        return int(self._sizes[0])

    @property
    def n_outputs(self) -> int:
        """Width of the raw output (the last layer's n_out)."""
        return int(self._sizes[-1])

    @property
    def n_params(self) -> int:
        """Number of trainable parameters (weights and biases)."""
        return self._params.size

    @contextlib.contextmanager
    def _training(self, what):
        """Hold the network for a call that writes its gradients or parameters; another
        thread doing the same meanwhile gets a RuntimeError instead of corrupting them."""
        if not self._training_lock.acquire(blocking=False):
            raise RuntimeError(f"{what}: another thread is training this network (backward, an "
                               "optimizer step or Trainer.fit); train one network from one thread "
                               "at a time (inference may run from many)")
        try:
            yield
        finally:
            self._training_lock.release()

    def __repr__(self):
        inner = ",\n    ".join(repr(l) for l in self.layers)
        return f"Sequential([\n    {inner},\n], dtype={np.dtype(self.dtype).name!r})"

    def init_params(self, seed: int | np.random.Generator | None = None) -> None:
        """Re-initialise every layer's weights from `seed` (int, None or a numpy Generator)."""
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        for layer in self._layers:
            layer.init_params(rng)
        self._grads[...] = 0
        self._has_grads = False

    def architecture(self) -> dict:
        """The layer widths and activation names, as saved in files."""
        return {"sizes": [int(s) for s in self.sizes],
                "activations": [l.activation for l in self.layers],
                "dtype": np.dtype(self.dtype).name}

    @classmethod
    def from_architecture(cls, arch: dict, params: ArrayLike | None = None) -> Sequential:
        """A network from :meth:`architecture`'s dict, with `params` (flat) copied in when given."""
        sizes, acts = arch["sizes"], arch["activations"]
        net = cls([Dense(sizes[i], sizes[i + 1], acts[i]) for i in range(len(acts))],
                  dtype=arch["dtype"], seed=0)
        if params is not None:
            net.set_params(params)
        return net

    def set_params(self, params: ArrayLike) -> None:
        """Copy a flat parameter array (layout W0 b0 W1 b1 …) into the network."""
        self._params[...] = check_parameter_values(params, self._params.shape, "params")

    def copy(self) -> Sequential:
        """An independent network with the same architecture and parameters."""
        return Sequential.from_architecture(self.architecture(), self.params)

    def astype(self, dtype: DTypeLike) -> Sequential:
        """A copy of the network with parameters in `dtype`."""
        arch = dict(self.architecture(), dtype=np.dtype(as_dtype(dtype)).name)
        return Sequential.from_architecture(arch, self.params)

    # -- the two passes ----------------------------------------------------
    def forward(self, X: ArrayLike, n_threads: int | None = None) -> np.ndarray:
        """Raw output of the last layer (logits for the classification losses).

        Keeps each layer's input and output for :meth:`backward` (per thread: a
        thread's backward uses that thread's last forward).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_inputs)
            Any real dtype, any memory layout; converted to the network's dtype
            (no copy when it is already C-contiguous in that dtype).
        n_threads : int, optional
            Threads for the kernels (default: :func:`cprop.get_num_threads`).

        Returns
        -------
        ndarray of shape (n_samples, n_outputs), the network's dtype
        """
        self._local.tape = None     # a forward that fails halfway leaves nothing for backward
        X = check_X(X, self._dtype, self.n_inputs)
        n_threads = resolve_threads(n_threads)
        tape = [X]                  # the input of each layer, then the output
        for layer in self._layers:
            tape.append(layer._forward(self._params, tape[-1], n_threads))
        self._local.tape = tape
        return tape[-1]

    def backward(self, grad_out: np.ndarray, n_threads: int | None = None) -> Sequential:
        """Backpropagate ∂L/∂output through every layer, last layer first.

        Per layer: ``δ = G ⊙ f'(Y)``, ``dW = Xᵀ·δ``, ``db = Σ δ``, and ``G = δ·Wᵀ``
        for the layer below.

        Parameters
        ----------
        grad_out : ndarray of shape (n_samples, n_outputs)
            ∂loss/∂output for this thread's last :meth:`forward`, as returned by a
            ``cprop.losses`` function.
        n_threads : int, optional

        Returns
        -------
        self — with ``layer.dW`` and ``layer.db`` of every layer (views of
        :attr:`grads`) filled in.

        Raises
        ------
        RuntimeError — no completed forward() in this thread, or another thread
            is training this network at the same time.
        """
        tape = getattr(self._local, "tape", None)
        if tape is None:
            raise RuntimeError("backward() needs the activations of a completed forward() call in "
                               "this thread: call net.forward(X) first")
        rows = tape[0].shape[0]
        if not isinstance(grad_out, np.ndarray) or grad_out.dtype.kind not in "biuf":
            raise TypeError(f"grad_out must be a numeric array, got {type(grad_out).__name__}")
        G = grad_out.view()   # ours: another thread may reshape the caller's object
        if G.shape != (rows, self.n_outputs):
            raise ValueError(f"grad_out must have the shape of the last forward output, "
                             f"({rows}, {self.n_outputs}), got {G.shape}")
        G = np.ascontiguousarray(G, dtype=self._dtype)
        if not np.isfinite(G).all():
            raise ValueError("grad_out contains NaN or infinite values")
        n_threads = resolve_threads(n_threads)
        with self._training("backward"):
            for i in range(len(self._layers) - 1, -1, -1):
                G = self._layers[i]._backward(self._params, self._grads, tape[i], tape[i + 1], G,
                                              n_threads, input_grad=i > 0)
            self._has_grads = True
            self._grad_rows = rows
        return self

    def predict_raw(self, X: ArrayLike, n_threads: int | None = None,
                    chunk_size: int | None = None) -> np.ndarray:
        """Raw outputs for X, nothing kept for backward: the inference path.

        One compiled call: each thread takes a share of the rows and runs it
        through every layer in chunks of `chunk_size` rows; the intermediate
        buffers are kept per thread and reused by the next call. The default
        makes a layer's output about 1 MB (512 to 4096 rows): every chunk
        re-packs each W for BLAS, and on this project's 2-core machine chunks
        of 1024-2048 rows ran 784-128-10 and 784-256-256-256-10 networks 3-4%
        faster than chunks of 256 rows sized for L2.
        """
        X = check_X(X, self._dtype, self.n_inputs)
        n_threads = resolve_threads(n_threads)
        widest = int(self._sizes[1:].max())
        if chunk_size is None:
            chunk_size = min(4096, max(512, (1 << 20) // (widest * np.dtype(self.dtype).itemsize)))
        chunk_size = min(check_positive_int(chunk_size, "chunk_size"), X.shape[0])
        work = self._inference_workspace(n_threads * 2 * chunk_size * widest)
        out = np.empty((X.shape[0], self.n_outputs), dtype=self._dtype)
        with single_threaded_blas():
            _core.forward(X, self._params, self._sizes, self._activations, work, out, chunk_size, n_threads)
        return out

    def _inference_workspace(self, size):
        """A float buffer of `size` for this thread, reused across calls (fresh pages cost
        more than the arithmetic of a small network's forward pass)."""
        work = getattr(self._local, "work", None)
        if work is None or work.size < size:
            work = self._local.work = np.empty(size, dtype=self._dtype)
        return work

    # -- PyTorch interop -----------------------------------------------------
    _TORCH_ACTIVATIONS = {"ReLU": "relu", "LeakyReLU": "leaky_relu", "Sigmoid": "sigmoid",
                          "Tanh": "tanh", "Identity": "identity"}

    @classmethod
    def from_torch(cls, module) -> Sequential:
        """A Sequential with the weights of a ``torch.nn.Sequential`` of Linear layers, each
        optionally followed by ReLU, LeakyReLU(0.01), Sigmoid, Tanh or Identity.

        The weights are copied exactly (cprop's W is torch's ``weight.T``); the dtype
        follows the module's (float32 or float64).
        """
        import torch
        if not isinstance(module, torch.nn.Sequential):
            raise TypeError(f"from_torch needs a torch.nn.Sequential, got {type(module).__name__}")
        specs, dtype = [], None
        for i, m in enumerate(module):
            kind = type(m).__name__
            if isinstance(m, torch.nn.Linear):
                if m.bias is None:
                    raise ValueError(f"module[{i}]: Linear layers need a bias (bias=True)")
                specs.append([m, "identity"])
                dtype = m.weight.dtype
            elif kind in cls._TORCH_ACTIVATIONS and specs and specs[-1][1] == "identity":
                if kind == "LeakyReLU" and m.negative_slope != 0.01:
                    raise ValueError(f"module[{i}]: cprop's leaky_relu has slope 0.01, got {m.negative_slope}")
                specs[-1][1] = cls._TORCH_ACTIVATIONS[kind]
            else:
                raise ValueError(f"module[{i}] ({kind}) cannot be converted: expected Linear layers, each "
                                 f"optionally followed by one of {sorted(cls._TORCH_ACTIVATIONS)}")
        if not specs:
            raise ValueError("the module has no Linear layer")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"weights must be float32 or float64, got {dtype}")
        net = cls([Dense(m.in_features, m.out_features, act) for m, act in specs],
                  dtype="float64" if dtype == torch.float64 else "float32", seed=0)
        with torch.no_grad():
            for layer, (m, _) in zip(net.layers, specs):
                layer.W[...] = m.weight.detach().cpu().numpy().T
                layer.b[...] = m.bias.detach().cpu().numpy()
        return net

    def to_torch(self):
        """A ``torch.nn.Sequential`` (Linear + activation modules) with exactly these weights."""
        import torch
        dtype = torch.float64 if self.dtype == np.float64 else torch.float32
        modules = []
        for layer in self.layers:
            linear = torch.nn.Linear(layer.n_in, layer.n_out, dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(layer.W.T)))
                linear.bias.copy_(torch.from_numpy(layer.b.copy()))
            modules.append(linear)
            act = {"relu": torch.nn.ReLU, "leaky_relu": lambda: torch.nn.LeakyReLU(0.01),
                   "sigmoid": torch.nn.Sigmoid, "tanh": torch.nn.Tanh}.get(layer.activation)
            if act is not None:
                modules.append(act())
        return torch.nn.Sequential(*modules)

    def to_onnx(self, path: str | os.PathLike, **kw):
        """Write the network as an ONNX model: :func:`cprop.onnx.export` (head=, opset=)."""
        from . import onnx
        return onnx.export(self, path, **kw)

    # -- files -------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the architecture and parameters to `path`.

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
        _io.save_archive(path, {"kind": "network", "architecture": self.architecture()},
                         {"params": self.params})

    def __getstate__(self):
        return {"architecture": self.architecture(), "params": self._params.copy()}

    def __setstate__(self, state):
        net = Sequential.from_architecture(state["architecture"], state["params"])
        self.__dict__.update(net.__dict__)


MAX_LAYERS = 64
_STATE_MEMBER = re.compile(r"state_[0-9]{1,2}")


def architecture_from_meta(meta):
    """(architecture dict, number of parameters) from a file's metadata, every field checked
    and nothing allocated: the parameter count is what the file's params member must hold.
    TypeError / ValueError otherwise."""
    arch = meta.get("architecture")
    if not isinstance(arch, dict):
        raise TypeError(f"architecture must be a mapping, got {type(arch).__name__}")
    sizes, acts, dtype = arch.get("sizes"), arch.get("activations"), arch.get("dtype")
    if not isinstance(sizes, list) or not isinstance(acts, list):
        raise TypeError("architecture needs lists 'sizes' and 'activations'")
    if not 1 <= len(acts) <= MAX_LAYERS or len(sizes) != len(acts) + 1:
        raise ValueError(f"{len(sizes)} sizes and {len(acts)} activations do not describe 1 to "
                         f"{MAX_LAYERS} layers")
    sizes = [check_positive_int(s, "size") for s in sizes]
    for a in acts:
        activation_code(a)
    if not isinstance(dtype, str) or dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    n_params = sum(sizes[i] * sizes[i + 1] + sizes[i + 1] for i in range(len(acts)))
    return {"sizes": sizes, "activations": acts, "dtype": dtype}, n_params


def network_from_archive(archive):
    """The Sequential in an open :class:`cprop.io.Archive` (a network's or a trainer's),
    its architecture checked before its parameters are read."""
    try:
        arch, n_params = architecture_from_meta(archive.meta)
    except (TypeError, ValueError) as exc:
        raise archive.error(f"invalid network in file ({exc})") from None
    others = archive.names - {"params"}
    if (archive.meta.get("kind") == "network" and others) or not all(_STATE_MEMBER.fullmatch(n) for n in others):
        raise archive.error(f"unexpected member(s) {sorted(others)} in a {archive.meta.get('kind')} file")
    params = archive.read("params", arch["dtype"], (n_params,))
    if not np.isfinite(params).all():
        raise archive.error("params contains non-finite values")
    return Sequential.from_architecture(arch, params)


def network_from_meta(meta, arrays, path):
    """Rebuild a Sequential from metadata and arrays already in memory, checking everything first."""
    try:
        arch, n_params = architecture_from_meta(meta)
        params = arrays["params"]
        if params.dtype != arch["dtype"] or params.shape != (n_params,):
            raise ValueError(f"params has dtype {params.dtype} and shape {params.shape}, "
                             f"expected {arch['dtype']} ({n_params},)")
        if not np.isfinite(params).all():
            raise ValueError("params contains non-finite values")
        return Sequential.from_architecture(arch, params)
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
