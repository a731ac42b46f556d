"""N ranks train as one process does: same seed and global batch, same weights up to float
rounding (sums over a batch's rows are taken in another order), for every optimizer, shuffled
or not, with ragged last batches and shares of uneven or no rows; and the ranks stay bitwise
identical."""
import numpy as np
import pytest

import cprop
from cprop import schedules
from cprop.callbacks import EarlyStopping

from mpi_helpers import OVERSUBSCRIBED, assert_same_on_every_rank, comm, shared_dir  # noqa: F401 (fixtures)

pytestmark = OVERSUBSCRIBED

# one process against N ranks: only the order of the sums over a batch's rows differs
RTOL = {np.float64: 1e-12, np.float32: 1e-5}

OPTIMIZERS = {
    "sgd": lambda: cprop.SGD(lr=0.1),
    "momentum": lambda: cprop.SGD(lr=0.05, momentum=0.9),
    "nesterov_wd": lambda: cprop.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda: cprop.Adam(lr=0.01, weight_decay=1e-4),
    "adamw": lambda: cprop.AdamW(lr=0.01),
    # clipped by the norm of the summed gradient: every rank computes the same factor
    "momentum_clipped": lambda: cprop.SGD(lr=0.05, momentum=0.9, clip_norm=0.05),
    "adam_clipped": lambda: cprop.Adam(lr=0.01, clip_norm=0.02),
}


def data(n, n_in=8, n_classes=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_in)).astype(dtype)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int) + (X[:, 2] > 1)
    return X, y % n_classes


def make(comm, dtype=np.float64, optimizer="momentum", layers=None, loss="cross_entropy", **kw):
    layers = layers or [cprop.Dense(8, 16, "tanh"), cprop.Dense(16, 3)]
    net = cprop.Sequential(layers() if callable(layers) else layers, dtype=dtype, seed=0)
    kw.setdefault("batch_size", 32)
    return cprop.Trainer(net, loss=loss, optimizer=OPTIMIZERS[optimizer](), seed=0, n_threads=1,
                         comm=comm, **kw)


def assert_close(a, b, dtype):
    """Within the dtype's relative tolerance of the larger values (parameters near 0 get the
    same absolute tolerance as the others)."""
    b = np.asarray(b)
    rtol = RTOL[dtype]
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(np.max(np.abs(b)))))


def both(comm, fit_kwargs, X, y, **make_kwargs):
    """(trainer over comm, the same trained in this process alone), each fitted alike."""
    ours = make(comm, **make_kwargs)
    ours.fit(X, y, **fit_kwargs)
    alone = make(None, **make_kwargs)
    alone.fit(X, y, **fit_kwargs)
    return ours, alone


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "in_order"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_same_training_as_one_process(comm, optimizer, shuffle, dtype):
    # 301 rows, batches of 32: a ragged last batch of 13, shares uneven over 2 or 3 ranks
    X, y = data(301, dtype=dtype)
    ours, alone = both(comm, dict(epochs=3), X, y, dtype=dtype, optimizer=optimizer, shuffle=shuffle)
    assert_same_on_every_rank(comm, ours)
    assert_close(ours.net.params, alone.net.params, dtype)
    for a, b in zip(ours.optimizer.state, alone.optimizer.state):
        assert_close(a, b, dtype)
    assert ours.optimizer.step_count == alone.optimizer.step_count
    assert ours.epochs_done == alone.epochs_done == 3
    np.testing.assert_allclose(ours.history.loss, alone.history.loss, rtol=10 * RTOL[dtype])
    # the last batch's whole gradient, as the one-process epoch leaves it
    assert_close(ours.net.grads, alone.net.grads, dtype)
    assert ours.net._grad_rows == alone.net._grad_rows == 301 - 9 * 32


@pytest.mark.parametrize("n, batch_size", [(11, 2), (7, 1), (37, 64), (64, 64), (100, 7)])
def test_ragged_batches_and_empty_shares(comm, n, batch_size):
    # a batch of 1 or 2 rows leaves some ranks without rows: their share is a zero gradient
    X, y = data(n)
    ours, alone = both(comm, dict(epochs=2), X, y, batch_size=batch_size, optimizer="adam")
    assert_same_on_every_rank(comm, ours)
    assert_close(ours.net.params, alone.net.params, np.float64)
    assert ours.optimizer.step_count == alone.optimizer.step_count == 2 * -(-n // batch_size)


@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy", "cross_entropy"])
def test_dropout_layernorm_and_every_loss(comm, loss):
    # dropout masks follow the row's place in the epoch, whichever rank computes it
    def layers():
        return [cprop.Dense(8, 32, "relu"), cprop.Dropout(0.3), cprop.LayerNorm(32, activation="gelu"),
                cprop.Dense(32, 3)]
    X, y = data(150)
    if loss == "mse":
        y = np.eye(3)[y] * 2.0 - 1
    elif loss == "binary_cross_entropy":
        y = np.eye(3)[y]
    ours, alone = both(comm, dict(epochs=3), X, y, layers=layers, loss=loss, batch_size=20,
                       optimizer="nesterov_wd")
    assert_same_on_every_rank(comm, ours)
    assert_close(ours.net.params, alone.net.params, np.float64)


def test_validation_metrics_and_split(comm):
    X, y = data(400)
    Xv, yv = data(97, seed=1)
    ours, alone = both(comm, dict(epochs=3, validation_data=(Xv, yv)), X, y)
    for key in ("loss", "val_loss", "val_accuracy", "lr"):
        np.testing.assert_allclose(getattr(ours.history, key), getattr(alone.history, key), rtol=1e-12)
    ours, alone = both(comm, dict(epochs=2, validation_split=0.2), X, y)
    assert_same_on_every_rank(comm, ours)
    np.testing.assert_allclose(ours.history.val_loss, alone.history.val_loss, rtol=1e-12)
    assert_close(ours.net.params, alone.net.params, np.float64)


def test_weight_decay_per_sample_counts_the_global_batch(comm):
    # scikit-learn's alpha: decay divided by the batch's rows, the global batch's, not a share's
    X, y = data(90)
    ours, alone = make(comm), make(None)
    for t in (ours, alone):
        t.optimizer.weight_decay = 0.5
        t.optimizer.decay_per_sample = True
        t.fit(X, y, epochs=2)
    assert_close(ours.net.params, alone.net.params, np.float64)


def test_schedules_and_early_stopping_as_one_process(comm):
    X, y = data(300)
    Xv, yv = data(100, seed=3)

    def callbacks():
        return [schedules.StepLR(2, gamma=0.5), EarlyStopping("val_loss", patience=1)]
    ours, alone = make(comm, optimizer="sgd"), make(None, optimizer="sgd")
    for t in (ours, alone):
        t.optimizer.lr = 3.0        # too large: the validation loss soon stops improving
        t.fit(X, y, epochs=30, validation_data=(Xv, yv), callbacks=callbacks())
    assert len(ours.history) == len(alone.history) < 30
    assert ours.history.lr == alone.history.lr
    assert_same_on_every_rank(comm, ours)
    assert_close(ours.net.params, alone.net.params, np.float64)


def test_networks_built_without_a_seed_start_from_rank_0(comm):
    # seed=None draws other weights and another shuffling on every rank: fit starts from rank 0's
    X, y = data(100)

    def fresh():
        return cprop.Sequential([cprop.Dense(8, 16, "tanh"), cprop.Dense(16, 3)])
    trainer = cprop.Trainer(fresh(), loss="cross_entropy", comm=comm, n_threads=1)
    params, rng_state, dropout_seed = comm.bcast(
        (trainer.net.params.copy(), trainer.rng.bit_generator.state, trainer.dropout_seed), root=0)
    differed = len(set(comm.allgather(trainer.net.params.tobytes()))) > 1
    trainer.fit(X, y, epochs=2)
    assert_same_on_every_rank(comm, trainer)
    alone = cprop.Trainer(fresh(), loss="cross_entropy", n_threads=1)
    alone.net.params[...] = params
    alone.rng.bit_generator.state = rng_state
    alone.dropout_seed = dropout_seed
    alone.fit(X, y, epochs=2)
    assert differed
    assert_close(trainer.net.params, alone.net.params, np.float32)


def test_second_fit_continues_alike(comm):
    X, y = data(120)
    ours, alone = make(comm, optimizer="adam"), make(None, optimizer="adam")
    for t in (ours, alone):
        t.fit(X, y, epochs=1)
        t.fit(X, y, epochs=2, validation_split=0.25)
    assert_same_on_every_rank(comm, ours)
    assert_close(ours.net.params, alone.net.params, np.float64)
    assert ours.epochs_done == 3
