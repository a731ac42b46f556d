"""The frameworks: one runner per framework, each training a workload by its own textbook recipe.

A runner builds everything in ``__init__``, outside the timed region;
``epoch()`` is the one thing timed, always inside ``limits()`` (thread
settings). Frameworks are imported inside the runners, so this module imports
without torch, scikit-learn or JAX.
"""
import contextlib
import importlib.util
import warnings

import numpy as np

from .machine import blas_limits
from .workloads import LEARNING_RATE, MOMENTUM, SEED


class Runner:
    """One framework training one workload on given data.

    Everything is built in ``__init__``, outside the timed region; ``epoch()``
    is the one thing timed, always inside ``limits()`` (thread settings).
    """

    name = None
    module = None      # what must be importable for this runner to run
    package = None     # the distribution that brings it, for `pip install`

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

    def inference(self, X):
        """[(label, zero-argument callable computing the raw outputs for X)]; empty if not offered."""
        return []


class CpropRunner(Runner):
    """cprop: ``Trainer.fit(X, y, epochs=1)``."""

    name = "cprop"

    def __init__(self, workload, X, y, n_threads, seed=SEED):
        super().__init__(workload, X, y, n_threads, seed)
        import cprop
        sizes = workload.sizes
        layers = [cprop.Dense(sizes[i], sizes[i + 1], "relu" if i < len(sizes) - 2 else None)
                  for i in range(len(sizes) - 1)]
        self.net = cprop.Sequential(layers, dtype=X.dtype, seed=seed)
        self.trainer = cprop.Trainer(self.net, workload.loss, cprop.SGD(lr=LEARNING_RATE, momentum=MOMENTUM),
                                     workload.batch_size, seed=seed, n_threads=n_threads)

    def epoch(self):
        """``trainer.fit(X, y, epochs=1)``: validation, shuffling and the compiled epoch."""
        self.trainer.fit(self.X, self.y, epochs=1)

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
        torch.manual_seed(seed)
        dtype = torch.float64 if X.dtype == np.float64 else torch.float32
        modules = []
        for i, (n_in, n_out) in enumerate(workload.shapes):
            modules.append(torch.nn.Linear(n_in, n_out, dtype=dtype))
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

    def epoch(self):
        """A fresh ``randperm``, then per batch ``X[idx]``, zero_grad, forward, loss, backward, step."""
        torch, model, optimizer, loss_fn = self.torch, self.model, self.optimizer, self.loss_fn
        X, y, batch_size = self.Xt, self.yt, self.workload.batch_size
        order = torch.randperm(X.shape[0], generator=self.generator)
        for start in range(0, X.shape[0], batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(X[idx]), y[idx])
            loss.backward()
            optimizer.step()

    def inference(self, X):
        """``model(X)`` under ``torch.no_grad()``."""
        torch = self.torch
        Xt = torch.from_numpy(X)

        def forward():
            """The model's raw outputs, no autograd graph."""
            with torch.no_grad():
                return self.model(Xt)
        return [("torch no_grad", forward)]


class SklearnRunner(Runner):
    """scikit-learn: MLPClassifier / MLPRegressor, solver="sgd", one ``partial_fit`` epoch."""

    name = "sklearn"
    module, package = "sklearn", "scikit-learn"

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


class NumpyMLP:
    """An MLP trained by hand in NumPy: the reference a vectorised Python user would write.

    Relu hidden layers, identity output, momentum SGD (``v = μ·v + g; p -= lr·v``,
    as torch). Minibatch buffers are allocated once; products go to BLAS:
    forward ``A[l+1] = f(A[l]·W + b)``, backward ``dW = A[l]ᵀ·δ``, ``db = Σδ``,
    ``δ_prev = (δ·Wᵀ) ⊙ f'(A[l])``.
    """

    def __init__(self, sizes, batch_size, loss, dtype="float32", seed=SEED):
        rng = np.random.default_rng(seed)
        dtype = np.dtype(dtype)
        shapes = list(zip(sizes[:-1], sizes[1:]))
        self.loss, self.batch_size = loss, batch_size
        # He-normal weights, zero biases (as cprop initialises relu layers)
        self.W = [(rng.standard_normal(s) * np.sqrt(2.0 / s[0])).astype(dtype) for s in shapes]
        self.b = [np.zeros(n_out, dtype) for _, n_out in shapes]
        self.params = self.W + self.b
        self.grads = [np.empty_like(p) for p in self.params]
        self.velocity = [np.zeros_like(p) for p in self.params]
        self.A = [np.empty((batch_size, n), dtype) for n in sizes]      # A[0] is the gathered batch
        self.delta = [np.empty((batch_size, n), dtype) for n in sizes[1:]]

    def forward(self, X):
        """Raw outputs for X (allocating; for inference)."""
        A = X
        for l, (W, b) in enumerate(zip(self.W, self.b)):
            A = A @ W
            A += b
            if l < len(self.W) - 1:
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
            for l in range(L):
                np.dot(A[l], self.W[l], out=A[l + 1])
                A[l + 1] += self.b[l]
                if l < L - 1:
                    np.maximum(A[l + 1], 0, out=A[l + 1])
            self._loss_grad(A[L], y[idx], delta[L - 1])
            for l in range(L - 1, -1, -1):
                np.dot(A[l].T, delta[l], out=dW[l])
                np.sum(delta[l], axis=0, out=db[l])
                if l > 0:
                    np.dot(delta[l], self.W[l].T, out=delta[l - 1])
                    delta[l - 1] *= A[l] > 0            # relu' through the layer's output
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
        self.model = NumpyMLP(workload.sizes, workload.batch_size, workload.loss, X.dtype, seed)
        self.rng = np.random.default_rng(seed)

    def limits(self):
        """BLAS held at n_threads by threadpoolctl."""
        return blas_limits(self.n_threads)

    def epoch(self):
        """:meth:`NumpyMLP.train_epoch`."""
        self.model.train_epoch(self.X, self.y, self.rng)

    def inference(self, X):
        """:meth:`NumpyMLP.forward`."""
        return [("numpy", lambda: self.model.forward(X))]


RUNNERS = {r.name: r for r in (CpropRunner, TorchRunner, SklearnRunner, NumpyRunner)}
PEERS = ("torch", "sklearn", "numpy")


def peer_installed(name):
    """Whether peer `name`'s framework can be imported (without importing it)."""
    return importlib.util.find_spec(RUNNERS[name].module) is not None


def installed_peers():
    """The peers importable here, in the standard order."""
    return [p for p in PEERS if peer_installed(p)]
