"""Epoch level: one training epoch of each ``cprop bench`` workload, cprop and every installed peer.

Workloads and runners come from :mod:`cprop.bench`, so the suite and the
``cprop bench`` command always time the same thing. pytest-benchmark groups
the frameworks of one workload together.
"""
import functools

import pytest

from cprop import bench


@functools.cache
def _data(name, n_samples, dtype):
    return bench.WORKLOADS[name].make_data(n_samples, dtype)


@pytest.mark.parametrize("framework", list(bench.RUNNERS))
@pytest.mark.parametrize("workload", list(bench.WORKLOADS.values()), ids=list(bench.WORKLOADS))
def test_epoch(benchmark, measure, workload, framework, n_threads, dtype, samples_scale):
    """One shuffled epoch of SGD(lr=0.01, momentum=0.9), built outside the timer."""
    if bench.RUNNERS[framework].module:
        pytest.importorskip(bench.RUNNERS[framework].module)
    n_samples = workload.epoch_samples(samples_scale)
    X, y = _data(workload.name, n_samples, dtype)
    try:
        runner = bench.RUNNERS[framework](workload, X, y, n_threads)
        with runner.limits():
            runner.epoch()  # outside the timing: torch.compile and JAX compile here
    except bench.PeerUnavailable as exc:
        pytest.skip(str(exc))
    benchmark.group = f"epoch {workload.name} {workload.layers} batch {workload.batch_size}, {n_samples:,} samples"
    with runner.limits():
        measure(runner.epoch, rounds=3, samples=n_samples, flops=n_samples * workload.flops_per_sample,
                min_round_seconds=0)
