"""`mpiexec -n N cprop train ...`: one training over every rank, rank 0 printing and writing the
model, the same model as one process trains; an error on any rank ends every rank alike."""
import os

import numpy as np

import cprop
from cprop.__main__ import main

from mpi_helpers import OVERSUBSCRIBED, comm, shared_dir  # noqa: F401 (fixtures)

pytestmark = OVERSUBSCRIBED


def write_csv(path, n=301, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    y = np.where(X[:, 0] + X[:, 1] > 0, "yes", "no")
    with open(path, "w") as f:
        f.write("a,b,c,d,label\n")
        for row, label in zip(X, y):
            f.write(",".join(f"{v:.6f}" for v in row) + f",{label}\n")


TRAIN = ["--target", "label", "--epochs", "3", "--batch-size", "32", "--dtype", "float64", "--threads", "1"]


def test_train_under_mpi_writes_on_rank_0_the_model_one_process_trains(comm, shared_dir, capsys):
    data = os.path.join(shared_dir, "data.csv")
    if comm.rank == 0:
        write_csv(data)
    comm.Barrier()
    out = os.path.join(shared_dir, "mpi.npz")

    status = main(["train", data, *TRAIN, "--out", out])
    printed = capsys.readouterr()

    assert comm.allgather(status) == [0] * comm.Get_size()
    if comm.rank:
        assert printed.out == "" and printed.err == ""
        return
    assert f"over {comm.Get_size()} MPI ranks" in printed.out
    alone = os.path.join(shared_dir, "alone.npz")
    assert main(["train", data, *TRAIN, "--out", alone, "--mpi", "no", "--quiet"]) == 0
    ours, reference = cprop.Trainer.load(out), cprop.Trainer.load(alone)
    np.testing.assert_allclose(ours.net.params, reference.net.params, rtol=1e-12, atol=1e-12)
    assert ours.extra["classes"] == reference.extra["classes"] == ["no", "yes"]


def test_an_error_on_one_rank_fails_every_rank_and_rank_0_says_which(comm, shared_dir, capsys):
    data = os.path.join(shared_dir, "data.csv")
    if comm.rank == 0:
        write_csv(data)
    comm.Barrier()
    last = comm.Get_size() - 1
    mine = data if comm.rank != last else os.path.join(shared_dir, "missing.csv")

    status = main(["train", mine, *TRAIN, "--out", os.path.join(shared_dir, "m.npz")])
    err = capsys.readouterr().err

    assert comm.allgather(status) == [1] * comm.Get_size()
    if comm.rank == 0:
        assert err.startswith("cprop train: error: ") and f"(rank {last})" in err and "missing.csv" in err
    else:
        assert err == ""
    assert not os.path.exists(os.path.join(shared_dir, "m.npz"))


def test_a_model_file_rank_0_cannot_write_fails_every_rank(comm, shared_dir, capsys, monkeypatch):
    data = os.path.join(shared_dir, "data.csv")
    out = os.path.join(shared_dir, "sub", "m.npz")
    if comm.rank == 0:
        write_csv(data)
        os.makedirs(os.path.dirname(out))
    comm.Barrier()
    # the directory is there when the command checks it, and gone on rank 0 by the time it
    # writes: after the last epoch, a callback removes it
    fit = cprop.Trainer.fit

    def fit_then_lose_the_directory(self, *args, **kwargs):
        history = fit(self, *args, **kwargs)
        if comm.rank == 0:
            os.rmdir(os.path.dirname(out))
        return history

    monkeypatch.setattr(cprop.Trainer, "fit", fit_then_lose_the_directory)
    status = main(["train", data, *TRAIN, "--out", out])
    err = capsys.readouterr().err

    assert comm.allgather(status) == [1] * comm.Get_size()
    if comm.rank == 0:
        assert err.startswith("cprop train: error: ") and "sub" in err, err
    else:
        assert err == ""
