"""Buffers belong to the fit, not to the batch: memory does not grow with epochs or batches."""
import tracemalloc

import numpy as np
import pytest

import cprop


def _peak_of(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_peak_memory_of_ten_epochs_equals_one_epoch(loss, shuffle):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3000, 100), dtype=np.float32)
    n_out = 10 if loss == "cross_entropy" else 3
    y = rng.integers(0, 10, 3000) if loss == "cross_entropy" else rng.standard_normal((3000, 3))
    y = y.astype(np.float32) if loss == "mse" else y
    net = cprop.Sequential([cprop.Dense(100, 64, "relu"), cprop.Dense(64, n_out)], seed=0)
    trainer = cprop.Trainer(net, loss, cprop.SGD(lr=0.01, momentum=0.9), batch_size=16,
                            shuffle=shuffle, seed=0)
    trainer.fit(X, y, epochs=1)                      # warm caches, optimizer state
    one = _peak_of(lambda: trainer.fit(X, y, epochs=1))
    ten = _peak_of(lambda: trainer.fit(X, y, epochs=10))
    # 188 batches per epoch: any per-batch allocation that survived would show
    assert ten <= 1.05 * one + 4096, (one, ten)
    # and X itself (1.2 MB) is never copied: the fit's whole peak stays well below it
    assert one < X.nbytes / 4, (one, X.nbytes)
