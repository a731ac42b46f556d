"""Shared helpers: small random networks and data, dtype parametrisation, tolerances per dtype."""
import numpy as np
import pytest

import cprop

ACTIVATIONS = ["identity", "relu", "leaky_relu", "sigmoid", "tanh"]
LOSSES = ["mse", "cross_entropy", "binary_cross_entropy", "poisson", "l1", "huber"]

# float32 kernels against a float64 oracle: a few ulps of float32 per term;
# float64 against float64: only summation order differs
TOLERANCES = {np.float32: {"rtol": 1e-4, "atol": 1e-5},
              np.float64: {"rtol": 1e-10, "atol": 1e-10}}


@pytest.fixture(autouse=True, scope="session")
def no_thread_fallback():
    """A fit on a busy machine may go on with one thread (cprop._threads.ThreadFallback),
    which changes its results in the last bits: tests that compare results bit for bit must
    not depend on the machine's load. tests/test_threads.py tests the fall-back itself."""
    saved = cprop._threads.STALL_WINDOW_SECONDS
    cprop._threads.STALL_WINDOW_SECONDS = float("inf")
    yield
    cprop._threads.STALL_WINDOW_SECONDS = saved


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture
def tol(dtype):
    return TOLERANCES[dtype]


@pytest.fixture
def rng():
    return np.random.default_rng(20240501)


def make_net(sizes, hidden="tanh", output="identity", dtype=np.float64, seed=0):
    """A Sequential of Dense layers with widths `sizes`, `hidden` activation on every layer
    but the last, `output` on the last; biases drawn non-zero so that bias bugs show."""
    n_layers = len(sizes) - 1
    acts = [hidden] * (n_layers - 1) + [output]
    net = cprop.Sequential([cprop.Dense(sizes[i], sizes[i + 1], acts[i]) for i in range(n_layers)],
                           dtype=dtype, seed=seed)
    bias_rng = np.random.default_rng(seed + 1)
    for layer in net.layers:
        layer.b[...] = bias_rng.normal(0, 0.2, layer.n_out)
    return net


def layers_of(net):
    """The network's (W, b) pairs as float64 copies, for the reference."""
    return [(layer.W.astype(np.float64), layer.b.astype(np.float64)) for layer in net.layers]


def flat(pairs):
    """(W, b) pairs (parameters or gradients) in cprop's flat layout W0 b0 W1 b1 …"""
    return np.concatenate([a.ravel() for pair in pairs for a in pair])


def activations_of(net):
    return [layer.activation for layer in net.layers]


def make_targets(loss, n_samples, n_outputs, rng):
    """Targets for `loss`: integer labels (cross_entropy), 0/1 (binary_cross_entropy), counts
    (poisson) or reals (mse, l1, huber: standard normal, so that huber's differences fall on
    both sides of its δ = 1)."""
    if loss == "cross_entropy":
        return rng.integers(0, n_outputs, n_samples)
    if loss == "binary_cross_entropy":
        return rng.integers(0, 2, (n_samples, n_outputs)).astype(np.float64)
    if loss == "poisson":
        return rng.poisson(1.5, (n_samples, n_outputs)).astype(np.float64)
    return rng.normal(size=(n_samples, n_outputs))
