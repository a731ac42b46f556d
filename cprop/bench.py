"""``cprop bench``: training speed of cprop against PyTorch, scikit-learn and NumPy.

Every framework trains the same network on the same random data with the same
recipe: one epoch of shuffled minibatches, relu hidden layers, identity last
layer, SGD with lr 0.01 and momentum 0.9. In each round every framework runs
one epoch, in an order rotated from round to round so that a slow spell of a
shared machine does not always fall on the same one; the report is the median
over rounds. Achieved GFLOP/s are set against this machine's own GEMM peak,
measured in the same run.

This module is also the one home of the workloads and the peer runners: the
pytest-benchmark suite in ``benchmarks/`` imports them from here. Peers are
imported lazily, so the module imports without torch, scikit-learn or
matplotlib.
"""
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np

LEARNING_RATE = 0.01
MOMENTUM = 0.9
SEED = 0

# After each call OpenBLAS's worker threads keep spinning for about 2**28
# cycles (~0.1 s), and OpenMP pools for a while too: on a small machine they
# take the cores from whichever framework runs next (cprop's 2-thread epochs
# ran 2-5x slower right after a numpy matmul). So every timed call starts
# after this pause.
SETTLE_SECONDS = 0.15


@dataclass(frozen=True)
class Workload:
    """A benchmark network: layer widths, minibatch size, loss and default epoch length."""

    name: str
    sizes: tuple
    batch_size: int
    loss: str
    n_samples: int

    @property
    def layers(self):
        """``"784-128-10"``: the widths as one string."""
        return "-".join(str(s) for s in self.sizes)

    @property
    def shapes(self):
        """(n_in, n_out) of every Dense layer, input to output."""
        return list(zip(self.sizes[:-1], self.sizes[1:]))

    @property
    def flops_per_sample(self):
        """Training FLOPs per sample: forward 2, dW 2 and dX 2 per weight, no dX for the first layer."""
        return sum(6 * n_in * n_out for n_in, n_out in self.shapes) - 2 * self.sizes[0] * self.sizes[1]

    @property
    def forward_flops_per_sample(self):
        """Inference FLOPs per sample: 2 per weight."""
        return sum(2 * n_in * n_out for n_in, n_out in self.shapes)

    def epoch_samples(self, scale=1.0):
        """Samples in one benchmark epoch: the default times `scale`, at least two batches."""
        return max(2 * self.batch_size, int(round(self.n_samples * scale)))

    def make_data(self, n_samples, dtype="float32", seed=SEED):
        """Random inputs and targets: (X, y), y integer labels for cross_entropy, (n, 1) floats for mse."""
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((n_samples, self.sizes[0]), dtype=np.dtype(dtype).type)
        if self.loss == "cross_entropy":
            y = rng.integers(0, self.sizes[-1], n_samples).astype(np.intp)
        else:
            y = rng.standard_normal((n_samples, self.sizes[-1])).astype(dtype)
        return X, y


# n_samples: one cprop epoch takes roughly 0.1-0.5 s on a small (2-core) machine
WORKLOADS = {w.name: w for w in [
    Workload("tiny", (2, 32, 32, 1), 32, "mse", 400_000),
    Workload("mnist", (784, 128, 10), 64, "cross_entropy", 40_000),
    Workload("deep", (784, 256, 256, 256, 10), 128, "cross_entropy", 15_000),
    Workload("wide", (784, 1024, 1024, 10), 256, "cross_entropy", 4_000),
]}


# -- the frameworks ---------------------------------------------------------
class Runner:
    """One framework training one workload on given data.

    Everything is built in ``__init__``, outside the timed region; ``epoch()``
    is the one thing timed, always inside ``limits()`` (thread settings).
    """

    name = None

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


def blas_limits(n_threads):
    """threadpoolctl's BLAS limit at `n_threads`, or a no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n_threads, user_api="blas")


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
_PEER_MODULES = {"torch": "torch", "sklearn": "sklearn", "numpy": "numpy"}
_PEER_PACKAGES = {"torch": "torch", "sklearn": "scikit-learn", "numpy": "numpy"}


def peer_installed(name):
    """Whether peer `name` can be imported (without importing it)."""
    return importlib.util.find_spec(_PEER_MODULES[name]) is not None


def installed_peers():
    """The peers importable here, in the standard order."""
    return [p for p in PEERS if peer_installed(p)]


# -- measuring --------------------------------------------------------------
def settle():
    """Wait until the thread pools of whatever ran before have gone to sleep."""
    time.sleep(SETTLE_SECONDS)


def timed(fn):
    """Seconds one call of fn() takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def seconds_per_call(fn, seconds=0.01):
    """Mean seconds of fn() over at least 3 calls and about `seconds` (a first call that
    wakes sleeping threads averages out): for choosing repetitions, not for reporting."""
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


class GemmProbe:
    """This machine's practical GEMM peak: numpy size×size matmuls at n_threads, timed one per call.

    ``cprop bench`` calls it a few times up front and once more in every
    round, in the rotation with the frameworks, so the peak is measured under
    the same load as they are (a busy shared machine otherwise gives
    percentages of a peak it never reached).
    """

    def __init__(self, n_threads, dtype="float32", size=2048):
        rng = np.random.default_rng(SEED)
        self.A = rng.standard_normal((size, size), dtype=np.dtype(dtype).type)
        self.B = rng.standard_normal((size, size), dtype=np.dtype(dtype).type)
        self.C = np.empty_like(self.A)
        self.n_threads, self.size = n_threads, size
        self.seconds = []
        with blas_limits(n_threads):
            np.matmul(self.A, self.B, out=self.C)  # warm-up: page in, start the BLAS threads

    def __call__(self):
        """Time one more matmul."""
        with blas_limits(self.n_threads):
            settle()
            self.seconds.append(timed(lambda: np.matmul(self.A, self.B, out=self.C)))

    @property
    def gflops(self):
        """GFLOP/s of the median matmul so far."""
        return 2.0 * self.size ** 3 / statistics.median(self.seconds) / 1e9


def gemm_peak(n_threads, dtype="float32", size=2048, repeats=5):
    """GEMM GFLOP/s: the median of `repeats` numpy size×size matmuls at n_threads."""
    probe = GemmProbe(n_threads, dtype, size)
    for _ in range(repeats):
        probe()
    return probe.gflops


def rotated(items, k):
    """`items` rotated left by k: round k's running order."""
    k %= len(items)
    return list(items[k:]) + list(items[:k])


def bench_training(workload, frameworks, n_threads, rounds, dtype="float32", scale=1.0, seed=SEED,
                   probe=None):
    """Time one-epoch training of `workload` for every framework, alternating within each round.

    Returns the epoch length, ``{name: {"seconds": [...], "error": str or None}}``
    and the runners (for the inference timing that follows). A framework that
    raises is dropped from later rounds and its error kept. `probe`, when
    given, is called once per round in the rotation (see :class:`GemmProbe`).
    """
    n_samples = workload.epoch_samples(scale)
    X, y = workload.make_data(n_samples, dtype, seed)
    results = {name: {"seconds": [], "error": None} for name in frameworks}
    runners = {}
    for name in frameworks:
        try:
            runners[name] = RUNNERS[name](workload, X, y, n_threads, seed)
            with runners[name].limits():
                runners[name].epoch()  # warm-up epoch
        except Exception as exc:  # a peer failing must not stop the others
            results[name]["error"] = f"{type(exc).__name__}: {exc}"
            runners.pop(name, None)
    slots = list(frameworks) + ([probe] if probe else [])
    for r in range(rounds):
        for name in rotated(slots, r):
            if name is probe:
                probe()
                continue
            if name not in runners:
                continue
            runner = runners[name]
            try:
                with runner.limits():
                    settle()
                    results[name]["seconds"].append(timed(runner.epoch))
            except Exception as exc:
                results[name]["error"] = f"{type(exc).__name__}: {exc}"
                del runners[name]
    return n_samples, results, runners


def bench_inference(runners, X, rounds, min_seconds=0.05):
    """Time every runner's forward pass over X, alternating; per label the seconds per pass of each round.

    Each round repeats a call enough times to last `min_seconds` (calibrated
    by :func:`seconds_per_call`), so small networks are not timed at clock resolution.
    """
    calls = []
    for runner in runners.values():
        with runner.limits():
            for label, fn in runner.inference(X):
                reps = max(1, math.ceil(min_seconds / max(seconds_per_call(fn), 1e-7)))
                calls.append((label, runner, fn, reps))
    seconds = {label: [] for label, *_ in calls}
    for r in range(rounds):
        for label, runner, fn, reps in rotated(calls, r):
            with runner.limits():
                settle()
                start = time.perf_counter()
                for _ in range(reps):
                    fn()
                seconds[label].append((time.perf_counter() - start) / reps)
    return seconds


def summarise(seconds, n_samples):
    """Median samples/s and relative spread (max - min) / median of the per-round rates."""
    rates = [n_samples / s for s in seconds]
    median = statistics.median(rates)
    return median, (max(rates) - min(rates)) / median


# -- machine ----------------------------------------------------------------
def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_cores():
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info():
    """CPU, cores, load, and the versions of Python, cprop and every peer."""
    import cprop
    from cprop import _threads
    from cprop._lazy import core as _core
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "available_cores": available_cores(),
        "load_average_1min": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cprop": cprop.__version__,
        "cprop_openmp": bool(_core.OPENMP),
        "cprop_simd": _core.variant(),
        "cprop_blas": _threads.blas_info(),
        "numpy": np.__version__,
        "scipy": _version("scipy"),
        "torch": _version("torch"),
        "scikit-learn": _version("scikit-learn"),
        "threadpoolctl": _version("threadpoolctl"),
        "matplotlib": _version("matplotlib"),
    }


# -- the command ------------------------------------------------------------
def add_arguments(parser):
    """Add ``cprop bench``'s options to an argparse parser."""
    parser.add_argument("--workload", action="append", metavar="NAME",
                        help=f"workload(s) to run, repeatable or comma-separated: "
                             f"{', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="threads for every framework (default: all cores)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per workload, median reported (default 5; 1 with --quick)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="floating-point type of data and parameters (default float32)")
    parser.add_argument("--peers", default=None, metavar="LIST",
                        help="comma-separated peers among torch, sklearn, numpy, or 'none' "
                             "(default: all installed)")
    parser.add_argument("--samples-scale", type=float, default=None, metavar="S",
                        help="multiply every workload's epoch length by S (default 1; 0.05 with --quick)")
    parser.add_argument("--json", metavar="PATH", help="write every figure and the machine info to PATH")
    parser.add_argument("--plot", metavar="PATH", help="bar chart of samples/s (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="one round on short epochs: a smoke test")
    parser.add_argument("--estimators", action="store_true",
                        help="instead of the workloads, compare cprop.sklearn.MLPClassifier with "
                             "scikit-learn's on the same settings: fit time and held-out accuracy "
                             "(--samples-scale scales the epochs; --threads, --rounds, --quick and "
                             "--json apply)")


def _parse_workloads(values):
    names = [n.strip() for v in (values or [",".join(WORKLOADS)]) for n in v.split(",") if n.strip()]
    for name in names:
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; expected one of {', '.join(WORKLOADS)}")
    return list(dict.fromkeys(names))


def _parse_peers(value):
    if value is None:
        return installed_peers()
    names = [n.strip() for n in value.split(",") if n.strip()]
    if names == ["none"]:
        return []
    for name in names:
        if name not in PEERS:
            raise ValueError(f"unknown peer {name!r}; expected some of {', '.join(PEERS)} or 'none'")
        if not peer_installed(name):
            raise ValueError(f"peer {name!r} is not installed (pip install {_PEER_PACKAGES[name]})")
    return list(dict.fromkeys(names))


# (header, width, alignment) of the printed tables; fixed widths so rows print as they come
TRAIN_COLUMNS = [("workload", 8, "l"), ("layers", 18, "l"), ("batch", 5, "r"), ("samples", 9, "r"),
                 ("framework", 9, "l"), ("samples/s", 11, "r"), ("spread", 6, "r"),
                 ("cprop/peer", 10, "r"), ("GFLOP/s", 7, "r"), ("% peak", 6, "r")]
INFER_COLUMNS = [("workload", 8, "l"), ("method", 17, "l"), ("samples/s", 11, "r"), ("spread", 6, "r"),
                 ("cprop/this", 10, "r"), ("GFLOP/s", 7, "r")]


def _line(columns, cells):
    return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w)
                     for c, (_, w, a) in zip(cells, columns)).rstrip()


def _header(columns):
    return [_line(columns, [h for h, _, _ in columns]), _line(columns, ["-" * w for _, w, _ in columns])]


def _spread(figures):
    return f"{100 * figures['spread']:.0f}%" if len(figures["seconds"]) > 1 else "-"


def training_entry(workload, n_samples, results, peak):
    """The report of one workload's training: per framework its rounds, median, ratio and GFLOP/s."""
    entry = {"workload": workload.name, "layers": list(workload.sizes), "batch_size": workload.batch_size,
             "loss": workload.loss, "n_samples": n_samples, "flops_per_sample": workload.flops_per_sample,
             "frameworks": {}}
    cprop_seconds = results.get("cprop", {}).get("seconds")
    cprop_rate = summarise(cprop_seconds, n_samples)[0] if cprop_seconds else None
    for name, res in results.items():
        figures = {"seconds": res["seconds"], "error": res["error"]}
        if res["seconds"]:
            rate, spread = summarise(res["seconds"], n_samples)
            gflops = rate * workload.flops_per_sample / 1e9
            figures.update(samples_per_second=[n_samples / s for s in res["seconds"]],
                           median_samples_per_second=rate, spread=spread, gflops=gflops,
                           percent_of_peak=100 * gflops / peak,
                           cprop_over_this=cprop_rate / rate if cprop_rate else None)
        entry["frameworks"][name] = figures
    return entry


def _training_lines(entry):
    lines = []
    for i, (name, fw) in enumerate(entry["frameworks"].items()):
        lead = [entry["workload"], "-".join(map(str, entry["layers"])), entry["batch_size"],
                f"{entry['n_samples']:,}"] if i == 0 else [""] * 4
        if not fw["seconds"]:
            lines.append(_line(TRAIN_COLUMNS, lead + [name, "failed"]))
            continue
        ratio = fw["cprop_over_this"]
        lines.append(_line(TRAIN_COLUMNS, lead + [
            name, f"{fw['median_samples_per_second']:,.0f}", _spread(fw),
            "" if name == "cprop" or ratio is None else f"{ratio:.2f}x",
            f"{fw['gflops']:.1f}", f"{fw['percent_of_peak']:.0f}%"]))
    return lines


def inference_entry(workload, n_samples, seconds):
    """The report of one workload's inference: per method its rounds, median and GFLOP/s."""
    entry = {"workload": workload.name, "n_samples": n_samples,
             "forward_flops_per_sample": workload.forward_flops_per_sample, "methods": {}}
    ref = summarise(seconds["cprop predict_raw"], n_samples)[0] if "cprop predict_raw" in seconds else None
    for label, secs in seconds.items():
        rate, spread = summarise(secs, n_samples)
        entry["methods"][label] = {"seconds": secs, "median_samples_per_second": rate, "spread": spread,
                                   "gflops": rate * workload.forward_flops_per_sample / 1e9,
                                   "cprop_predict_raw_over_this": ref / rate if ref else None}
    return entry


def _inference_lines(entry):
    lines = []
    for i, (label, m) in enumerate(entry["methods"].items()):
        ratio = m["cprop_predict_raw_over_this"]
        lines.append(_line(INFER_COLUMNS, [
            entry["workload"] if i == 0 else "", label, f"{m['median_samples_per_second']:,.0f}", _spread(m),
            "" if label == "cprop predict_raw" or ratio is None else f"{ratio:.2f}x", f"{m['gflops']:.1f}"]))
    return lines


def run(args):
    """Run ``cprop bench`` with parsed arguments; print the tables; returns the exit code."""
    n_threads = args.threads if args.threads is not None else available_cores()
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    scale = args.samples_scale if args.samples_scale is not None else (0.05 if args.quick else 1.0)
    if n_threads < 1:
        raise ValueError(f"--threads must be >= 1, got {n_threads}")
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    if not scale > 0:
        raise ValueError(f"--samples-scale must be > 0, got {scale}")
    if getattr(args, "estimators", False):
        return _run_estimators(args, n_threads, rounds, scale)
    workloads = [WORKLOADS[n] for n in _parse_workloads(args.workload)]
    peers = _parse_peers(args.peers)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("cprop bench: error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    frameworks = ["cprop"] + peers
    dtype = args.dtype
    n_infer = 2_000 if args.quick else 10_000

    info = machine_info()
    probe = GemmProbe(n_threads, dtype)
    for _ in range(2 if args.quick else 5):
        probe()
    report = {"machine": info,
              "settings": {"threads": n_threads, "rounds": rounds, "dtype": dtype, "samples_scale": scale,
                           "frameworks": frameworks, "quick": bool(args.quick),
                           "lr": LEARNING_RATE, "momentum": MOMENTUM},
              "training": [], "inference": []}
    measured = []
    for workload in workloads:
        if sys.stderr.isatty():
            print(f"cprop bench: {workload.name} ...", file=sys.stderr, flush=True)
        n_samples, results, runners = bench_training(workload, frameworks, n_threads, rounds, dtype, scale,
                                                     probe=probe)
        X_infer, _ = workload.make_data(n_infer, dtype, SEED + 1)
        inference = bench_inference(runners, X_infer, rounds if args.quick else max(rounds, 5))
        measured.append((workload, n_samples, results, inference))
    peak = probe.gflops
    report["gemm"] = {"size": probe.size, "seconds": probe.seconds, "gflops": peak}
    for workload, n_samples, results, inference in measured:
        report["training"].append(training_entry(workload, n_samples, results, peak))
        report["inference"].append(inference_entry(workload, n_infer, inference))

    print(format_report(report))
    try:
        report["machine"]["load_average_1min_end"] = os.getloadavg()[0]
    except OSError:
        pass
    _write_json(report, args.json)
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _run_estimators(args, n_threads, rounds, scale):
    """``cprop bench --estimators``: see :mod:`cprop.bench_estimators`."""
    for option, given in (("--plot", args.plot), ("--workload", args.workload), ("--peers", args.peers),
                          ("--dtype float64", args.dtype != "float32")):
        if given:
            raise ValueError(f"{option} is for the workloads; --estimators compares float32 "
                             "MLPClassifier fits of its own cases")
    for module, package in (("sklearn", "scikit-learn"), ("threadpoolctl", "threadpoolctl")):
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"--estimators needs {package} (pip install {package})")
    from .bench_estimators import run_estimators
    report = run_estimators(n_threads, rounds, scale)
    _write_json(report, args.json)
    return 0


def _write_json(report, path):
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {path}")


def format_report(report):
    """The printed form of a ``cprop bench`` report (as run() builds it, or as read back from --json)."""
    info, settings, gemm = report["machine"], report["settings"], report["gemm"]
    rounds, load = settings["rounds"], info["load_average_1min"]
    n_infer = report["inference"][0]["n_samples"] if report["inference"] else 0
    used = ["python", "numpy"] + [_PEER_PACKAGES[p] for p in settings["frameworks"] if p in PEERS and p != "numpy"]
    threads = f"{settings['threads']} thread{'s' * (settings['threads'] != 1)}"
    lines = [
        f"cprop {info['cprop']} ({info['cprop_simd']} build) bench: {info['cpu']}, {info['available_cores']} cores"
        + (f" (load average {load:.2f} at start)" if load is not None else "")
        + f"; {threads}, {settings['dtype']}, {rounds} round{'s' * (rounds != 1)}",
        f"GEMM peak {gemm['gflops']:.1f} GFLOP/s: median of {len(gemm['seconds'])} numpy {settings['dtype']} "
        f"{gemm['size']}x{gemm['size']} matmuls on {threads}, interleaved with the rounds",
        "versions: " + ", ".join(f"{k} {info[k]}" for k in used),
        "",
        f"Training: one epoch of SGD(lr={settings['lr']}, momentum={settings['momentum']}), median samples/s "
        "over rounds; spread = (max-min)/median;",
        "cprop/peer > 1 means cprop is faster; % peak = achieved GFLOP/s / GEMM peak",
    ]
    lines += _header(TRAIN_COLUMNS) + [line for entry in report["training"] for line in _training_lines(entry)]
    lines += ["", f"Inference: forward pass over {n_infer:,} samples, median samples/s; "
                  "cprop/this compares cprop predict_raw"]
    lines += _header(INFER_COLUMNS) + [line for entry in report["inference"] for line in _inference_lines(entry)]
    for entry in report["training"]:
        for name, fw in entry["frameworks"].items():
            if fw["error"]:
                lines.append(f"error: {entry['workload']} / {name}: {fw['error']}")
    return "\n".join(lines)


def _short(x):
    """1234 -> "1,234", 56789 -> "57k", 4355000 -> "4.4M"."""
    return f"{x / 1e6:.1f}M" if x >= 1e6 else f"{x / 1e3:.0f}k" if x >= 1e4 else f"{x:,.0f}"


def plot(report, path):
    """Bar chart of median training samples/s per workload and framework (log scale) to `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frameworks = report["settings"]["frameworks"]
    entries = report["training"]
    width = 0.8 / len(frameworks)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + 1.6 * len(entries)), 4.5))
    for i, name in enumerate(frameworks):
        xs, heights = [], []
        for j, entry in enumerate(entries):
            fw = entry["frameworks"].get(name, {})
            if fw.get("median_samples_per_second"):
                xs.append(j + (i - (len(frameworks) - 1) / 2) * width)
                heights.append(fw["median_samples_per_second"])
        bars = ax.bar(xs, heights, width, label=name)
        for bar, h in zip(bars, heights):
            ax.annotate(_short(h), (bar.get_x() + bar.get_width() / 2, h),
                        ha="center", va="bottom", fontsize=7, rotation=90, xytext=(0, 2),
                        textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xticks(range(len(entries)))
    ax.set_xticklabels([f"{e['workload']}\n{'-'.join(map(str, e['layers']))}\nbatch {e['batch_size']}"
                        for e in entries], fontsize=8)
    ax.set_ylabel("training samples/s (log scale)")
    settings, machine = report["settings"], report["machine"]
    ax.set_title(f"cprop bench: one training epoch, median of {settings['rounds']} "
                 f"round{'s' * (settings['rounds'] != 1)}\n{machine['cpu']}, {settings['threads']} "
                 f"threads, {settings['dtype']}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
