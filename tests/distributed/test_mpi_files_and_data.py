"""Checkpoints and resuming under MPI, evaluate and predict split across ranks, sharded data,
and BatchNorm (per-rank batch statistics)."""
import os

import numpy as np
import pytest

import cprop

from mpi_helpers import OVERSUBSCRIBED, assert_same_on_every_rank, comm, fingerprint, shared_dir  # noqa: F401 (fixtures)
from test_mpi_failures import outcome
from test_mpi_training import data, make

pytestmark = OVERSUBSCRIBED


def test_checkpoint_and_resume_give_the_weights_of_one_fit(comm, shared_dir):
    X, y = data(150)
    path = os.path.join(shared_dir, "run.npz")
    first = make(comm, optimizer="adam")
    first.fit(X, y, epochs=2, checkpoint=path)      # rank 0 writes, the others wait for it
    assert os.path.exists(path)
    resumed = cprop.Trainer.load(path, comm=comm)
    assert resumed.comm is comm and resumed.rank == comm.rank and resumed.n_ranks == comm.Get_size()
    assert fingerprint(resumed) == fingerprint(first)
    resumed.n_threads = 1
    resumed.fit(X, y, epochs=2)
    straight = make(comm, optimizer="adam")
    straight.fit(X, y, epochs=4)
    assert_same_on_every_rank(comm, resumed)
    assert fingerprint(resumed) == fingerprint(straight)
    assert resumed.history.loss == straight.history.loss


def test_load_reads_on_rank_0_only(comm, shared_dir):
    # a file only rank 0 can read (the others find garbage at that path) loads everywhere
    X, y = data(60)
    trainer = make(comm)
    trainer.fit(X, y, epochs=1)
    path = os.path.join(shared_dir, f"rank{comm.rank}.npz")
    if comm.rank == 0:
        trainer.save(path)
    else:
        with open(path, "wb") as f:
            f.write(b"not a trainer")
    loaded = cprop.Trainer.load(os.path.join(shared_dir, f"rank{comm.rank}.npz") if comm.rank
                                else path, comm=comm)
    assert fingerprint(loaded) == fingerprint(trainer)


def test_a_file_rank_0_cannot_read_raises_on_every_rank(comm, shared_dir):
    path = os.path.join(shared_dir, "bad.npz")
    if comm.rank == 0:
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 not really")
    got = outcome(comm, lambda: cprop.Trainer.load(path, comm=comm))
    assert [kind for kind, _ in got] == ["CpropFileError"] * comm.Get_size()
    assert len({message for _, message in got}) == 1


def test_checkpoint_directory_missing_on_rank_0_raises_everywhere(comm, shared_dir):
    trainer = make(comm)
    got = outcome(comm, lambda: trainer.fit(*data(40), checkpoint=os.path.join(shared_dir, "no", "x.npz")))
    assert got[0][0] == "FileNotFoundError"
    assert all(kind == "DistributedError" for kind, _ in got[1:])


def test_evaluate_and_predict_split_rows_and_gather(comm):
    X, y = data(200)
    Xt, yt = data(101, seed=5)
    ours, alone = make(comm), make(None)
    for t in (ours, alone):
        t.fit(X, y, epochs=2)
    got, expected = ours.evaluate(Xt, yt), alone.evaluate(Xt, yt)
    assert got.keys() == expected.keys()
    for key in got:
        assert got[key] == pytest.approx(expected[key], rel=1e-12)
    assert comm.allgather(got) == [got] * comm.Get_size()
    np.testing.assert_array_equal(ours.predict(Xt), alone.predict(Xt))
    np.testing.assert_allclose(ours.predict_proba(Xt), alone.predict_proba(Xt), rtol=1e-12, atol=1e-15)
    # fewer rows than ranks: some ranks compute nothing
    np.testing.assert_array_equal(ours.predict(Xt[:1]), alone.predict(Xt[:1]))
    # a row whose output overflows is warned about on every rank, counted over all the rows
    relu = cprop.Sequential([cprop.Dense(8, 16, "relu"), cprop.Dense(16, 3)], dtype="float64", seed=0)
    relu.layers[0].W[...] = np.abs(relu.layers[0].W) + 10      # 8 features of 1e307 overflow
    relu_trainer = cprop.Trainer(relu, loss="cross_entropy", comm=comm, n_threads=1)
    Xbad = Xt.copy()
    Xbad[7] = 1e307
    with pytest.warns(RuntimeWarning, match="NaN or infinite for 1 of 101 rows"):
        relu_trainer.predict(Xbad)
    with pytest.warns(RuntimeWarning, match="NaN or infinite for 1 of 101 rows"):
        relu_trainer.evaluate(Xbad, yt)


def test_sharded_training_reaches_the_accuracy_of_one_process(comm):
    X, y = cprop.datasets.load_digits()
    X = X / 16.0
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(X))
    train, test = idx[:1400], idx[1400:]
    shard = train[comm.rank::comm.Get_size()]      # each rank loads only its own rows

    def trainer(c):
        net = cprop.Sequential([cprop.Dense(64, 64, "relu"), cprop.Dense(64, 10)], seed=0)
        return cprop.Trainer(net, loss="cross_entropy", optimizer=cprop.Adam(lr=0.01), batch_size=64,
                             seed=0, n_threads=1, comm=c)
    ours = trainer(comm)
    test_shard = test[comm.rank::comm.Get_size()]
    history = ours.fit(X[shard], y[shard], epochs=20, sharded=True,
                       validation_data=(X[test_shard], y[test_shard]))
    alone = trainer(None)
    alone.fit(X[train], y[train], epochs=20)
    assert_same_on_every_rank(comm, ours)
    accuracy = ours.evaluate(X[test], y[test])["accuracy"]
    assert accuracy == pytest.approx(alone.evaluate(X[test], y[test])["accuracy"], abs=0.03)
    assert accuracy > 0.95
    # the validation shards together are the test set
    assert history.val_accuracy[-1] == pytest.approx(accuracy, abs=1e-12)
    # every shard's rows are used once per epoch: as many steps as one process takes
    assert ours.optimizer.step_count == alone.optimizer.step_count == 20 * -(-1400 // 64)


def test_sharded_steps_take_every_shard_at_the_same_pace(comm):
    # shards of 3, 9, 15 rows; global batches of 4 take from each in proportion, none empty
    X, y = data(3 + 6 * comm.rank, seed=comm.rank)
    trainer = make(comm, batch_size=4, optimizer="adam")
    trainer.fit(X, y, epochs=2, sharded=True, validation_split=0.3)
    total = sum(comm.allgather(X.shape[0] - int(round(0.3 * X.shape[0]))))
    assert_same_on_every_rank(comm, trainer)
    assert trainer.optimizer.step_count == 2 * -(-total // 4)


def test_batchnorm_keeps_ranks_identical_and_trains(comm):
    # per-rank batch statistics (as DDP without SyncBatchNorm), running statistics averaged
    # over the ranks' rows: not one process's result, but the same on every rank
    X, y = data(300)

    def layers():
        return [cprop.Dense(8, 32), cprop.BatchNorm(32, activation="relu"), cprop.Dense(32, 3)]
    trainer = make(comm, layers=layers, optimizer="adam")
    history = trainer.fit(X, y, epochs=5, validation_data=data(100, seed=9))
    assert_same_on_every_rank(comm, trainer)
    assert history.loss[-1] < history.loss[0]
    assert history.val_accuracy[-1] > 0.7
