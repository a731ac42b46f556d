"""The peers of `cprop bench` really train the benchmark's network: each runner (cprop, numpy, and
torch, torch-compile, jax, jax-step, sklearn where installed) starts from the same parameters as
cprop, and its loss falls over a few epochs on data it can learn. Nothing here is timed."""
import numpy as np
import pytest

from cprop.bench.runners import RUNNERS, PeerUnavailable, peer_installed
from cprop.bench.workloads import Workload

# small networks of both losses; 200 samples do not divide into the batches, so every epoch
# ends on a partial minibatch
WORKLOADS = [Workload("test-classes", (8, 16, 16, 3), 16, "cross_entropy", 200),
             Workload("test-regression", (2, 16, 1), 16, "mse", 200)]


@pytest.fixture(autouse=True)
def _restore_openmp_threads():
    """The torch runner calls torch.set_num_threads, which (torch and cprop sharing one
    libgomp here) sets OpenMP's thread count for the process: put it back afterwards, so
    that later tests see the machine's default."""
    import os
    import sys
    yield
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(len(os.sched_getaffinity(0)))


def learnable_data(workload, n_samples=200, seed=1):
    """(X, y) in the runners' format, y a fixed function of X (labels: the argmax of a
    random projection; targets: a smooth function), so training has something to find."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_samples, workload.sizes[0])).astype(np.float32)
    if workload.loss == "cross_entropy":
        y = np.argmax(X @ rng.standard_normal((workload.sizes[0], workload.sizes[-1])), axis=1).astype(np.intp)
    else:
        y = (np.sin(2 * X[:, :1]) + 0.5 * X[:, 1:2] ** 2).astype(np.float32)
    return X, y


def mean_loss(loss, out, y):
    """The workloads' losses in NumPy (float64): mean cross-entropy over samples, mean squared error."""
    out = out.astype(np.float64)
    if loss == "cross_entropy":
        shifted = out - out.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return -log_p[np.arange(len(y)), y].mean()
    return ((out - y) ** 2).mean()


def make_runner(name, workload, X, y):
    """The runner, or a skip when its framework is missing or cannot run here."""
    if RUNNERS[name].module and not peer_installed(name):
        pytest.skip(f"{RUNNERS[name].module} is not installed")
    try:
        runner = RUNNERS[name](workload, X, y, n_threads=1)
        with runner.limits():
            runner.epoch()
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    return runner


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.loss)
@pytest.mark.parametrize("name", list(RUNNERS))
def test_runner_trains_and_its_loss_falls(name, workload):
    X, y = learnable_data(workload)
    runner = make_runner(name, workload, X, y)     # one epoch done
    after_one = mean_loss(workload.loss, runner.outputs(X), y)
    with runner.limits():
        for _ in range(5):
            runner.epoch()
    after_six = mean_loss(workload.loss, runner.outputs(X), y)
    assert np.isfinite(after_six)
    assert after_six < 0.9 * after_one, (after_one, after_six)


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.loss)
@pytest.mark.parametrize("name", [n for n in RUNNERS if RUNNERS[n].same_start and n != "cprop"])
def test_peer_starts_from_cprops_network(name, workload):
    """Before any training, a peer's outputs are cprop's: same widths, activations, weights."""
    if RUNNERS[name].module and not peer_installed(name):
        pytest.skip(f"{RUNNERS[name].module} is not installed")
    X, y = learnable_data(workload)
    try:
        peer = RUNNERS[name](workload, X, y, n_threads=1)
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    cprop = RUNNERS["cprop"](workload, X, y, n_threads=1)
    np.testing.assert_allclose(peer.outputs(X), cprop.outputs(X), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [n for n in RUNNERS if RUNNERS[n].same_start and n != "cprop"])
def test_peer_one_epoch_matches_cprop_in_loss(name):
    """After one epoch of the same recipe (each with its own shuffle), a peer's loss is near
    cprop's: a peer with another learning rate, momentum or loss scale would land elsewhere."""
    workload = WORKLOADS[0]
    X, y = learnable_data(workload)
    peer = make_runner(name, workload, X, y)
    cprop = make_runner("cprop", workload, X, y)
    losses = [mean_loss(workload.loss, r.outputs(X), y) for r in (peer, cprop)]
    start = mean_loss(workload.loss, RUNNERS["numpy"](workload, X, y, n_threads=1).outputs(X), y)
    assert losses[1] < start
    # both fell from the common start by a similar amount (shuffles differ, so not exactly)
    assert abs(losses[0] - losses[1]) < 0.35 * (start - losses[1]), (start, losses)


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.loss)
@pytest.mark.parametrize("name", ["numpy", "jax-step"])
def test_peer_with_cprops_sample_order_lands_on_cprops_network(name, workload):
    """numpy and jax-step draw each epoch's order as cprop's Trainer does
    (``np.random.default_rng(seed).permutation``), so after three epochs of the same recipe
    (partial last batch included) their outputs are cprop's, up to float32 rounding."""
    X, y = learnable_data(workload)
    peer = make_runner(name, workload, X, y)
    cprop = make_runner("cprop", workload, X, y)
    for runner in (peer, cprop):
        with runner.limits():
            runner.epoch()
            runner.epoch()
    np.testing.assert_allclose(peer.outputs(X), cprop.outputs(X), rtol=1e-4, atol=1e-4)
