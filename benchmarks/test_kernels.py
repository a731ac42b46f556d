"""Kernel level: cprop's compiled kernels against the NumPy a user would write, shape by shape.

The shapes are the layers of ``cprop bench``'s workloads at their batch
sizes. Each kernel writes into preallocated outputs on both sides, so what is
timed is the kernel, not allocation. pytest-benchmark groups the two
implementations of one kernel and shape together.
"""
import numpy as np
import pytest

import cprop
from cprop._lazy import core as _core  # the build this CPU uses
from cprop._threads import single_threaded_blas
from cprop.activations import activation_code
from cprop.bench import LEARNING_RATE, MOMENTUM, WORKLOADS, blas_limits
from cprop.losses import loss_code

IMPLS = ("cprop", "numpy")


def _layer_cases():
    """(n_in, n_out, batch_size, activation, needs dX) of every distinct layer in the workloads."""
    cases = {}
    for workload in WORKLOADS.values():
        shapes = workload.shapes
        for i, (n_in, n_out) in enumerate(shapes):
            activation = "relu" if i < len(shapes) - 1 else "identity"
            cases[(n_in, n_out, workload.batch_size, activation, i > 0)] = None
    return list(cases)


LAYERS = _layer_cases()
LAYER_IDS = [f"{n_in}x{n_out}-b{bs}-{act}" for n_in, n_out, bs, act, _ in LAYERS]


def _limits(impl, n_threads):
    """cprop holds BLAS at one thread (its own OpenMP threads split the work); NumPy gets n_threads."""
    return single_threaded_blas() if impl == "cprop" else blas_limits(n_threads)


def _random(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", LAYERS, ids=LAYER_IDS)
def test_dense_forward(benchmark, measure, case, impl, n_threads, dtype):
    """Y = f(X·W + b)."""
    n_in, n_out, n, activation, _ = case
    rng = np.random.default_rng(0)
    X, W = _random(rng, (n, n_in), dtype), _random(rng, (n_in, n_out), dtype, (2 / n_in) ** 0.5)
    b, Y = _random(rng, n_out, dtype), np.empty((n, n_out), dtype)
    code = activation_code(activation)
    if impl == "cprop":
        def fn():
            _core.dense_forward(X, W, b, Y, code, n_threads)
    else:
        def fn():
            np.dot(X, W, out=Y)
            np.add(Y, b, out=Y)
            if activation == "relu":
                np.maximum(Y, 0, out=Y)
    benchmark.group = f"dense_forward {n}x{n_in} . {n_in}x{n_out} {activation}"
    with _limits(impl, n_threads):
        measure(fn, flops=2 * n * n_in * n_out)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", LAYERS, ids=LAYER_IDS)
def test_dense_backward(benchmark, measure, case, impl, n_threads, dtype):
    """dW = Xᵀ·δ, db = Σδ and (except for a first layer) dX = δ·Wᵀ."""
    n_in, n_out, n, _, input_grad = case
    rng = np.random.default_rng(0)
    X, W = _random(rng, (n, n_in), dtype), _random(rng, (n_in, n_out), dtype, (2 / n_in) ** 0.5)
    delta = _random(rng, (n, n_out), dtype, 1 / n)
    dW, db = np.empty_like(W), np.empty(n_out, dtype)
    dX = np.empty_like(X) if input_grad else None
    if impl == "cprop":
        def fn():
            _core.dense_backward(X, W, delta, dW, db, dX, n_threads)
    else:
        def fn():
            np.dot(X.T, delta, out=dW)
            np.sum(delta, axis=0, out=db)
            if dX is not None:
                np.dot(delta, W.T, out=dX)
    benchmark.group = f"dense_backward {n}x{n_in} . {n_in}x{n_out}{'' if input_grad else ' no dX'}"
    with _limits(impl, n_threads):
        measure(fn, flops=(4 if input_grad else 2) * n * n_in * n_out)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("workload", list(WORKLOADS.values()), ids=list(WORKLOADS))
def test_loss(benchmark, measure, workload, impl, dtype):
    """Mean loss of the last layer's output and its gradient G = ∂loss/∂out (softmax fused in)."""
    n, n_out = workload.batch_size, workload.sizes[-1]
    rng = np.random.default_rng(0)
    out, G = _random(rng, (n, n_out), dtype), np.empty((n, n_out), dtype)
    if workload.loss == "cross_entropy":
        labels, T = rng.integers(0, n_out, n).astype(np.intp), np.empty((0, n_out), dtype)
    else:
        labels, T = np.empty(0, np.intp), _random(rng, (n, n_out), dtype)
    rows = np.arange(n)
    code = loss_code(workload.loss)
    if impl == "cprop":
        def fn():
            return _core.loss(code, out, T, labels, G)
    elif workload.loss == "cross_entropy":
        def fn():
            np.subtract(out, out.max(axis=1, keepdims=True), out=G)
            np.exp(G, out=G)
            total = G.sum(axis=1, keepdims=True)
            np.divide(G, total, out=G)
            value = np.mean(np.log(total[:, 0]) - (out[rows, labels] - out.max(axis=1)))
            G[rows, labels] -= 1
            np.divide(G, n, out=G)
            return value
    else:
        def fn():
            np.subtract(out, T, out=G)
            value = np.mean(G * G)
            np.multiply(G, 2.0 / G.size, out=G)
            return value
    benchmark.group = f"loss {workload.loss} {n}x{n_out}"
    measure(fn)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("workload", list(WORKLOADS.values()), ids=list(WORKLOADS))
def test_sgd_step(benchmark, measure, workload, impl, n_threads, dtype):
    """One momentum SGD step over all parameters: v = μ·v + g; p -= lr·v.

    cprop's side is the public ``SGD.step(net)`` (one fused compiled pass plus
    a few microseconds of Python), after one forward/backward to have gradients.
    """
    sizes = workload.sizes
    net = cprop.Sequential([cprop.Dense(sizes[i], sizes[i + 1], "relu" if i < len(sizes) - 2 else None)
                            for i in range(len(sizes) - 1)], dtype=dtype, seed=0)
    X, y = workload.make_data(workload.batch_size, dtype)
    net.backward(cprop.losses.compute(workload.loss, net.forward(X, n_threads), y)[1], n_threads)
    params, grads = net.params, net.grads.copy()
    if impl == "cprop":
        optimizer = cprop.SGD(lr=LEARNING_RATE, momentum=MOMENTUM)

        def fn():
            optimizer.step(net, n_threads)
    else:
        velocity, step = np.zeros_like(params), np.empty_like(params)

        def fn():
            np.multiply(velocity, MOMENTUM, out=velocity)
            np.add(velocity, grads, out=velocity)
            np.multiply(velocity, LEARNING_RATE, out=step)
            np.subtract(params, step, out=params)
    benchmark.group = f"sgd_step {workload.name} ({params.size:,} parameters)"
    measure(fn)
