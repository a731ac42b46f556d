"""The frameworks: one runner per framework, each training a workload by its own textbook recipe.

Every runner follows the recipe of :mod:`cprop.bench.workloads`: per epoch a
fresh permutation of the samples from the runner's own generator, consecutive
minibatches of it (the last one partial), relu hidden layers, the workload's
mean loss, SGD with momentum. All but scikit-learn start from the same
parameters, :meth:`Workload.initial_parameters`.

A runner builds everything in ``__init__``, outside the timed region;
``epoch()`` is the one thing timed, always inside ``limits()`` (thread
settings); its first call is a warm-up that is not timed (compilation, caches).
Frameworks are imported inside the runners, so this module imports without
torch, JAX or scikit-learn.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import warnings

import numpy as np

from .machine import available_cores, blas_limits
from .workloads import LEARNING_RATE, MOMENTUM, SEED


class PeerUnavailable(Exception):
    """A peer that is installed but cannot run here (say, torch.compile without a working
    C++ compiler): ``cprop bench`` reports it as unavailable, with this reason, and goes on."""


class Runner:
    """One framework training one workload on given data."""

    name: str | None = None
    module: str | None = None      # what must be importable for this runner to run
    package: str | None = None     # the distribution that brings it, for `pip install`
    same_start = True  # starts from Workload.initial_parameters (False: the framework's own initialisation)

    def __init__(self, workload, X, y, n_threads, seed=SEED):
        self.workload = workload
        self.X, self.y = X, y
        self.n_threads = n_threads
        self.seed = seed

    def limits(self):
        """Context holding the framework at `n_threads` threads (entered outside the timer)."""
        return contextlib.nullcontext()

    def epoch(self):
        """Train one epoch over (X, y)."""
        raise NotImplementedError

    def outputs(self, X):
        """The network's raw outputs (logits) for X, as a NumPy array: for checking, not timed."""
        raise NotImplementedError

    def inference(self, X):
        """[(label, zero-argument callable computing the raw outputs for X)]; empty if not offered."""
        return []


class CpropRunner(Runner):
    """cprop: ``Trainer.fit(X, y, epochs=1)``."""

    name = "cprop"

    def __init__(self, workload, X, y, n_threads, seed=SEED):
        super().__init__(workload, X, y, n_threads, seed)
        import cprop
        self.net = workload.network(X.dtype, seed)
        self.trainer = cprop.Trainer(self.net, workload.loss, cprop.SGD(lr=LEARNING_RATE, momentum=MOMENTUM),
                                     workload.batch_size, seed=seed, n_threads=n_threads)

    def epoch(self):
        """``trainer.fit(X, y, epochs=1)``: validation, shuffling and the compiled epoch."""
        self.trainer.fit(self.X, self.y, epochs=1)

    def outputs(self, X):
        """``net.predict_raw(X)``."""
        return self.net.predict_raw(X, n_threads=self.n_threads)

    def inference(self, X):
        """``net.predict_raw(X)`` (chunked, nothing kept) and ``net.forward(X)`` (keeps activations)."""
        n = self.n_threads
        return [("cprop predict_raw", lambda: self.net.predict_raw(X, n_threads=n)),
                ("cprop forward", lambda: self.net.forward(X, n_threads=n))]


class TorchRunner(Runner):
    """PyTorch eager: nn.Sequential of Linear/ReLU, optim.SGD, the textbook per-batch loop."""

    name = "torch"
    module = package = "torch"

    def __init__(self, workload, X, y, n_threads, seed=SEED):
        super().__init__(workload, X, y, n_threads, seed)
        import torch
        self.torch = torch
        dtype = torch.float64 if X.dtype == np.float64 else torch.float32
        modules = []
        for i, (W, b) in enumerate(workload.initial_parameters(X.dtype, seed)):
            linear = torch.nn.Linear(*W.shape, dtype=dtype)
            with torch.no_grad():      # torch keeps W as (n_out, n_in)
                linear.weight.copy_(torch.from_numpy(W.T))
                linear.bias.copy_(torch.from_numpy(b))
            modules.append(linear)
            if i < len(workload.shapes) - 1:
                modules.append(torch.nn.ReLU())
        self.model = torch.nn.Sequential(*modules)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
        if workload.loss == "cross_entropy":
            self.loss_fn = torch.nn.CrossEntropyLoss()
            self.Xt, self.yt = torch.from_numpy(X), torch.from_numpy(y.astype(np.int64))
        else:
            self.loss_fn = torch.nn.MSELoss()
            self.Xt, self.yt = torch.from_numpy(X), torch.from_numpy(y)
        self.generator = torch.Generator().manual_seed(seed)

    def limits(self):
        """``torch.set_num_threads(n_threads)``."""
        self.torch.set_num_threads(self.n_threads)
        return contextlib.nullcontext()

    def step(self, X, y, idx):
        """zero_grad, forward, loss, backward, optimizer step on the minibatch ``X[idx]``."""
        self.optimizer.zero_grad()
        loss = self.loss_fn(self.model(X[idx]), y[idx])
        loss.backward()
        self.optimizer.step()

    def epoch(self):
        """A fresh ``randperm``, then :meth:`step` per minibatch."""
        X, y, batch_size = self.Xt, self.yt, self.workload.batch_size
        order = self.torch.randperm(X.shape[0], generator=self.generator)
        for start in range(0, X.shape[0], batch_size):
            self.step(X, y, order[start:start + batch_size])

    def outputs(self, X):
        """``model(X)`` under ``torch.no_grad()``."""
        with self.torch.no_grad():
            return self.model(self.torch.from_numpy(X)).numpy()

    def inference(self, X):
        """``model(X)`` under ``torch.no_grad()``."""
        torch = self.torch
        Xt = torch.from_numpy(X)

        def forward():
            """The model's raw outputs, no autograd graph."""
            with torch.no_grad():
                return self.model(Xt)
        return [("torch no_grad", forward)]


class TorchCompileRunner(TorchRunner):
    """PyTorch with ``torch.compile``: :meth:`TorchRunner.step` (forward, loss, backward and
    the optimizer step) compiled by TorchInductor, one static-shape graph per batch size.

    Compilation happens in the first (warm-up) epoch; Inductor needs a working
    C++ compiler, and where it fails the peer is reported unavailable. One
    such runner at a time: a new one empties Dynamo's cache, and an older
    one's next epoch would then fail rather than recompile inside the timing.
    """

    name = "torch-compile"

    def __init__(self, workload, X, y, n_threads, seed=SEED):
        super().__init__(workload, X, y, n_threads, seed)
        # Dynamo caches compiled code per code object, guarded on this runner's model and
        # optimizer; the runners of earlier workloads would fill its recompile limit, past which
        # it silently runs eager. So each runner starts from an empty cache.
        self.torch._dynamo.reset()
        # dynamic=False: the full and the last, partial minibatch each get a graph of their own shape
        self.step = self.torch.compile(super().step, dynamic=False)
        self.compiled = False

    def epoch(self):
        """:meth:`TorchRunner.epoch` with the compiled step; the first call compiles.

        Afterwards a recompilation (which would be timed) is an error, and so is
        reaching Dynamo's recompile limit in the first call, rather than running eager.
        """
        config = self.torch._dynamo.config
        if self.compiled:
            with config.patch(error_on_recompile=True):
                return super().epoch()
        # Dynamo's notes on what it traces (torch.optim's profiler hooks, "will be ignored")
        # are not the benchmark's output: its errors still show
        dynamo_log = logging.getLogger("torch._dynamo")
        level = dynamo_log.level
        dynamo_log.setLevel(logging.ERROR)
        try:
            with config.patch(fail_on_recompile_limit_hit=True):
                super().epoch()
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PeerUnavailable(f"torch.compile failed here ({type(exc).__name__}: {reason[:200]})") from exc
        finally:
            dynamo_log.setLevel(level)
        self.compiled = True

    def inference(self, X):
        """None: the compiled step is for training (inference would be another compilation)."""
        return []


_jax_threads = None   # the JAX CPU client's thread count, fixed when it starts


def _import_jax(dtype, n_threads):
    """JAX, set up for `dtype` (float64 switches on jax_enable_x64) and `n_threads`.

    XLA's CPU client has no thread setting: its Eigen pool takes as many
    threads as the process may use cores when the client starts, and keeps
    them (the XLA flags once used for this no longer limit it). So the client
    is started with this thread's cores narrowed to `n_threads`; its pool
    threads keep that mask, the calling thread gets all its cores back. That
    happens once per process; a later, different `n_threads` is unavailable.
    """
    global _jax_threads
    cores = available_cores()
    if not 1 <= n_threads <= cores:
        raise PeerUnavailable(f"JAX can run on 1 to {cores} threads here, not {n_threads}")
    if _jax_threads is None:
        if n_threads == cores:
            import jax
            jax.devices("cpu")
        elif "jax" in sys.modules or not hasattr(os, "sched_setaffinity"):
            raise PeerUnavailable(f"JAX's threads could not be limited to {n_threads} here "
                                  "(JAX started before, or no sched_setaffinity)")
        else:
            allowed = os.sched_getaffinity(0)
            os.sched_setaffinity(0, sorted(allowed)[:n_threads])
            try:
                import jax
                jax.devices("cpu")
            finally:
                os.sched_setaffinity(0, allowed)
        _jax_threads = n_threads
    elif _jax_threads != n_threads:
        raise PeerUnavailable(f"JAX's threads are fixed when it starts: {_jax_threads} in this process")
    import jax
    if np.dtype(dtype) == np.float64:
        jax.config.update("jax_enable_x64", True)
    return jax


def jax_functions(jax, workload):
    """(forward, loss, step) of `workload` in JAX, pure functions for ``jax.jit``.

    ``step((params, velocity), X, y, idx)`` trains on the minibatch ``X[idx]``:
    the gradient of the mean loss by ``jax.grad``, then ``v = μ·v + g; p -= lr·v``.
    """
    jnp = jax.numpy
    tree_map = jax.tree_util.tree_map
    n_layers = len(workload.shapes)

    def forward(params, X):
        """Raw outputs: relu(X·W + b) through the hidden layers, X·W + b at the last."""
        for i, (W, b) in enumerate(params):
            X = X @ W + b
            if i < n_layers - 1:
                X = jax.nn.relu(X)
        return X

    def loss(params, X, y):
        """Mean cross-entropy (softmax fused) over samples, or mean squared error over elements."""
        out = forward(params, X)
        if workload.loss == "cross_entropy":
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], axis=1))
        return jnp.mean((out - y) ** 2)

    def step(state, X, y, idx):
        """One SGD-momentum step on ``X[idx]``; returns the new (params, velocity)."""
        params, velocity = state
        grads = jax.grad(loss)(params, X[idx], y[idx])
        velocity = tree_map(lambda v, g: MOMENTUM * v + g, velocity, grads)
        params = tree_map(lambda p, v: p - LEARNING_RATE * v, params, velocity)
        return params, velocity

    return forward, loss, step


class JaxRunner(Runner):
    """JAX: the whole epoch as one XLA program, ``jax.lax.scan`` of the step over the minibatches.

    The epoch's permutation is drawn inside the program (``jax.random``); the
    full minibatches are scanned and the last, partial one stepped after them.
    Compiled in the warm-up epoch; every epoch ends in ``block_until_ready``.
    """

    name = "jax"
    module = package = "jax"

    def __init__(self, workload, X, y, n_threads, seed=SEED):
        super().__init__(workload, X, y, n_threads, seed)
        jax = self.jax = _import_jax(X.dtype, n_threads)
        jnp = jax.numpy
        self.forward, _, self.step = jax_functions(jax, workload)
        params = [(jnp.asarray(W), jnp.asarray(b)) for W, b in workload.initial_parameters(X.dtype, seed)]
        self.state = (params, jax.tree_util.tree_map(jnp.zeros_like, params))
        self.Xj = jnp.asarray(X)
        self.yj = jnp.asarray(y.astype(np.int32) if workload.loss == "cross_entropy" else y)
        self.key = jax.random.PRNGKey(seed)
        self.jit_forward = jax.jit(self.forward)
        self._epoch = jax.jit(self._scan_epoch)

    def _scan_epoch(self, state, X, y, key):
        jax = self.jax
        batch_size = self.workload.batch_size
        n_full = X.shape[0] // batch_size
        key, subkey = jax.random.split(key)
        order = jax.random.permutation(subkey, X.shape[0])

        def body(state, idx):
            return self.step(state, X, y, idx), None

        state, _ = jax.lax.scan(body, state, order[:n_full * batch_size].reshape(n_full, batch_size))
        if X.shape[0] > n_full * batch_size:
            state = self.step(state, X, y, order[n_full * batch_size:])
        return state, key

    def epoch(self):
        """The compiled epoch, waited for."""
        self.state, self.key = self._epoch(self.state, self.Xj, self.yj, self.key)
        self.jax.block_until_ready(self.state)

    def outputs(self, X):
        """The forward pass on the current parameters."""
        return np.asarray(self.jit_forward(self.state[0], X))

    def inference(self, X):
        """The jitted forward pass, waited for."""
        Xj = self.jax.numpy.asarray(X)
        return [("jax jit", lambda: self.jit_forward(self.state[0], Xj).block_until_ready())]


class JaxStepRunner(JaxRunner):
    """JAX, one jitted step per minibatch from a Python loop over a NumPy permutation."""

    name = "jax-step"

    def __init__(self, workload, X, y, n_threads, seed=SEED):
        super().__init__(workload, X, y, n_threads, seed)
        self.jit_step = self.jax.jit(self.step)
        self.rng = np.random.default_rng(seed)

    def epoch(self):
        """A fresh permutation, the jitted step per minibatch, waited for at the end."""
        n, batch_size = self.X.shape[0], self.workload.batch_size
        order = self.rng.permutation(n)
        state = self.state
        for start in range(0, n, batch_size):
            state = self.jit_step(state, self.Xj, self.yj, order[start:start + batch_size])
        self.state = state
        self.jax.block_until_ready(self.state)

    def inference(self, X):
        """None: the same forward pass as the ``jax`` peer's."""
        return []


class SklearnRunner(Runner):
    """scikit-learn: MLPClassifier / MLPRegressor, solver="sgd", one ``partial_fit`` epoch.

    It initialises its parameters inside the first ``partial_fit`` (Glorot-uniform), not from
    :meth:`Workload.initial_parameters`.
    """

    name = "sklearn"
    module, package = "sklearn", "scikit-learn"
    same_start = False

    def __init__(self, workload, X, y, n_threads, seed=SEED):
        super().__init__(workload, X, y, n_threads, seed)
        from sklearn.neural_network import MLPClassifier, MLPRegressor
        params = dict(hidden_layer_sizes=workload.sizes[1:-1], activation="relu", solver="sgd",
                      learning_rate="constant", learning_rate_init=LEARNING_RATE, momentum=MOMENTUM,
                      nesterovs_momentum=False, alpha=0.0, batch_size=workload.batch_size,
                      max_iter=1, shuffle=True, random_state=seed)
        if workload.loss == "cross_entropy":
            self.model = MLPClassifier(**params)
            self.fit_kwargs = {"classes": np.arange(workload.sizes[-1])}
        else:
            self.model = MLPRegressor(**params)
            self.y = y.ravel() if y.shape[1] == 1 else y
            self.fit_kwargs = {}

    def limits(self):
        """BLAS held at n_threads by threadpoolctl."""
        return blas_limits(self.n_threads)

    def epoch(self):
        """One ``partial_fit`` pass: shuffled minibatches, the optimizer state kept across calls."""
        from sklearn.exceptions import ConvergenceWarning
        with warnings.catch_warnings():
            # max_iter=1 by design; tol and convergence are irrelevant to a speed test
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model.partial_fit(self.X, self.y, **self.fit_kwargs)
        self.fit_kwargs = {}

    def outputs(self, X):
        """The raw last-layer outputs from the fitted ``coefs_`` and ``intercepts_`` (after an epoch)."""
        if not hasattr(self.model, "coefs_"):
            raise RuntimeError("scikit-learn initialises its network in the first epoch: train one first")
        A = X
        for i, (W, b) in enumerate(zip(self.model.coefs_, self.model.intercepts_)):
            A = A @ W + b
            if i < len(self.model.coefs_) - 1:
                A = np.maximum(A, 0)
        return A


class NumpyMLP:
    """An MLP trained by hand in NumPy: the reference a vectorised Python user would write.

    Relu hidden layers, identity output, momentum SGD (``v = μ·v + g; p -= lr·v``,
    as torch). Minibatch buffers are allocated once; products go to BLAS:
    forward ``A[l+1] = f(A[l]·W + b)``, backward ``dW = A[l]ᵀ·δ``, ``db = Σδ``,
    ``δ_prev = (δ·Wᵀ) ⊙ f'(A[l])``.
    """

    def __init__(self, params, batch_size, loss):
        """`params`: [(W (n_in, n_out), b)] per layer, copied; the dtype is theirs."""
        self.loss, self.batch_size = loss, batch_size
        self.W = [np.array(W) for W, _ in params]
        self.b = [np.array(b) for _, b in params]
        sizes = [self.W[0].shape[0]] + [W.shape[1] for W in self.W]
        dtype = self.W[0].dtype
        self.params = self.W + self.b
        self.grads = [np.empty_like(p) for p in self.params]
        self.velocity = [np.zeros_like(p) for p in self.params]
        self.A = [np.empty((batch_size, n), dtype) for n in sizes]      # A[0] is the gathered batch
        self.delta = [np.empty((batch_size, n), dtype) for n in sizes[1:]]

    def forward(self, X):
        """Raw outputs for X (allocating; for inference)."""
        A = X
        for i, (W, b) in enumerate(zip(self.W, self.b)):
            A = A @ W
            A += b
            if i < len(self.W) - 1:
                np.maximum(A, 0, out=A)
        return A

    def train_epoch(self, X, y, rng):
        """One epoch of shuffled minibatch momentum SGD over (X, y)."""
        n, L = X.shape[0], len(self.W)
        dW, db = self.grads[:L], self.grads[L:]
        order = rng.permutation(n)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            m = idx.shape[0]
            A = [a[:m] for a in self.A]
            delta = [d[:m] for d in self.delta]
            np.take(X, idx, axis=0, out=A[0])
            for i in range(L):
                np.dot(A[i], self.W[i], out=A[i + 1])
                A[i + 1] += self.b[i]
                if i < L - 1:
                    np.maximum(A[i + 1], 0, out=A[i + 1])
            self._loss_grad(A[L], y[idx], delta[L - 1])
            for i in range(L - 1, -1, -1):
                np.dot(A[i].T, delta[i], out=dW[i])
                np.sum(delta[i], axis=0, out=db[i])
                if i > 0:
                    np.dot(delta[i], self.W[i].T, out=delta[i - 1])
                    delta[i - 1] *= A[i] > 0            # relu' through the layer's output
            for p, g, v in zip(self.params, self.grads, self.velocity):
                v *= MOMENTUM
                v += g
                p -= LEARNING_RATE * v

    def _loss_grad(self, out, target, G):
        """G = ∂loss/∂out for the mean loss over the batch (softmax fused into cross_entropy)."""
        if self.loss == "cross_entropy":
            np.subtract(out, out.max(axis=1, keepdims=True), out=G)
            np.exp(G, out=G)
            G /= G.sum(axis=1, keepdims=True)
            G[np.arange(G.shape[0]), target] -= 1
            G /= G.shape[0]
        else:
            np.subtract(out, target, out=G)
            G *= 2.0 / G.size


class NumpyRunner(Runner):
    """NumPy by hand: :class:`NumpyMLP`, BLAS limited to n_threads by threadpoolctl."""

    name = "numpy"
    module = package = "numpy"

    def __init__(self, workload, X, y, n_threads, seed=SEED):
        super().__init__(workload, X, y, n_threads, seed)
        self.model = NumpyMLP(workload.initial_parameters(X.dtype, seed), workload.batch_size, workload.loss)
        self.rng = np.random.default_rng(seed)

    def limits(self):
        """BLAS held at n_threads by threadpoolctl."""
        return blas_limits(self.n_threads)

    def epoch(self):
        """:meth:`NumpyMLP.train_epoch`."""
        self.model.train_epoch(self.X, self.y, self.rng)

    def outputs(self, X):
        """:meth:`NumpyMLP.forward`."""
        return self.model.forward(X)

    def inference(self, X):
        """:meth:`NumpyMLP.forward`."""
        return [("numpy", lambda: self.model.forward(X))]


RUNNERS = {r.name: r for r in (CpropRunner, TorchRunner, TorchCompileRunner, JaxRunner, JaxStepRunner,
                               SklearnRunner, NumpyRunner)}
PEERS = tuple(name for name in RUNNERS if name != "cprop")


def peer_installed(name):
    """Whether peer `name`'s framework can be imported (without importing it)."""
    return importlib.util.find_spec(RUNNERS[name].module) is not None


def installed_peers():
    """The peers importable here, in the standard order."""
    return [p for p in PEERS if peer_installed(p)]
