"""Trainer(comm=...) in the ordinary suite: a communicator of one rank trains bit for bit as
comm=None does; the checks that need no MPI; and, where Open MPI's mpiexec is installed, an
exception on one rank outside the points where the ranks agree takes the job down instead of
leaving the others waiting. The multi-rank tests live in tests/distributed (run under mpiexec)."""
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cprop

from test_safety import signal_handler_calling

HAS_MPI4PY = importlib.util.find_spec("mpi4py") is not None


def data(n=150, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6))
    return X, (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5)


def trainer(comm, **kw):
    layers = [cprop.Dense(6, 16, "relu"), cprop.Dropout(0.2), cprop.Dense(16, 3)]
    net = cprop.Sequential(layers, seed=0)
    return cprop.Trainer(net, loss="cross_entropy", optimizer=cprop.Adam(lr=0.01), batch_size=20,
                         seed=0, comm=comm, **kw)


def test_sharded_needs_a_communicator():
    with pytest.raises(ValueError, match="sharded=True needs comm"):
        trainer(None).fit(*data(), sharded=True)


def test_rank_and_size_without_a_communicator():
    t = trainer(None)
    assert (t.comm, t.rank, t.n_ranks) == (None, 0, 1)


def test_comm_without_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)      # as if it were not installed
    with pytest.raises(ImportError, match=r"cprop\[mpi\]"):
        trainer(object())


@pytest.mark.skipif(not HAS_MPI4PY, reason="needs mpi4py")
def test_comm_must_be_an_mpi4py_communicator():
    with pytest.raises(TypeError, match="intra-communicator"):
        trainer(object())
    t = trainer(None)
    t.comm = "world"
    with pytest.raises(TypeError, match="intra-communicator"):
        t.fit(*data())


@pytest.mark.skipif(not HAS_MPI4PY, reason="needs mpi4py")
def test_comm_self_trains_bit_for_bit_as_no_comm(tmp_path):
    from mpi4py import MPI
    X, y = data()
    Xv, yv = data(40, seed=1)
    ours, alone = trainer(MPI.COMM_SELF), trainer(None)
    assert (ours.rank, ours.n_ranks) == (0, 1)
    for t in (ours, alone):
        t.fit(X, y, epochs=3, validation_data=(Xv, yv))
        t.fit(X, y, epochs=1, validation_split=0.2, sharded=t.comm is not None)
    np.testing.assert_array_equal(ours.net.params, alone.net.params)
    for key in ("loss", "val_loss", "val_accuracy", "lr"):
        assert getattr(ours.history, key) == getattr(alone.history, key)
    assert ours.evaluate(Xv, yv) == alone.evaluate(Xv, yv)
    np.testing.assert_array_equal(ours.predict_proba(Xv), alone.predict_proba(Xv))
    ours.save(tmp_path / "t.npz")
    loaded = cprop.Trainer.load(tmp_path / "t.npz", comm=MPI.COMM_SELF)
    assert loaded.comm is MPI.COMM_SELF
    loaded.fit(X, y, epochs=1)
    alone.fit(X, y, epochs=1)
    np.testing.assert_array_equal(loaded.net.params, alone.net.params)


def _open_mpi_launcher():
    """mpiexec's path when it is Open MPI's (the flags below are its own), else None: the one
    beside this Python first (the openmpi package installs it into the venv)."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if not HAS_MPI4PY or mpiexec is None:
        return None
    try:
        version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return mpiexec if ("Open MPI" in version or "OpenRTE" in version or "prterun" in version) else None


def _run_two_ranks(script, cwd):
    """`mpiexec -n 2 python script` with this cprop importable: the CompletedProcess."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(cprop.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    return subprocess.run([_open_mpi_launcher(), "--oversubscribe", "-n", "2", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


@pytest.mark.skipif(_open_mpi_launcher() is None, reason="needs mpi4py and Open MPI's mpiexec")
def test_an_unagreed_exception_on_one_rank_aborts_the_job(tmp_path):
    # rank 1 fails inside fit where the ranks do not compare notes: rank 0 is already waiting
    # in the next allreduce, so only MPI_Abort can end the job
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import numpy as np
        from mpi4py import MPI
        import cprop
        from cprop import distributed

        comm = MPI.COMM_WORLD
        if comm.rank == 1:
            def broken(self):
                raise RuntimeError("broken on rank 1")
            distributed._Fit.epoch = broken
        X = np.random.default_rng(0).normal(size=(64, 4))
        net = cprop.Sequential([cprop.Dense(4, 2)], seed=0)
        trainer = cprop.Trainer(net, loss="cross_entropy", n_threads=1, comm=comm)
        trainer.fit(X, (X[:, 0] > 0).astype(int), epochs=1000)
        print("finished", flush=True)
    """))
    result = _run_two_ranks(script, tmp_path)
    assert result.returncode != 0
    assert "finished" not in result.stdout
    assert "rank 1 of 2 raised RuntimeError: broken on rank 1 during Trainer.fit" in result.stderr
    assert "aborting the MPI job (MPI_Abort)" in result.stderr


@pytest.mark.skipif(_open_mpi_launcher() is None, reason="needs mpi4py and Open MPI's mpiexec")
def test_cli_interrupted_on_one_rank_outside_the_fit_aborts_the_job(tmp_path):
    # Ctrl-C reaching rank 1 alone while it reads the data: rank 0 is waiting for it in the
    # ranks' agreement after reading, so the job must end by MPI_Abort, not hang
    data = tmp_path / "data.csv"
    rows = np.random.default_rng(0).normal(size=(50, 3))
    data.write_text("a,b,c,y\n" + "".join(f"{a},{b},{c},{int(a > 0)}\n" for a, b, c in rows))
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from cprop import _cli_data
        from cprop.__main__ import main
        if os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
            def interrupted(*args, **kwargs):
                raise KeyboardInterrupt
            _cli_data.read_table = interrupted
        sys.exit(main(["train", {str(data)!r}, "--target", "y", "--epochs", "1", "--out", "m.npz"]))
    """))
    result = _run_two_ranks(script, tmp_path)
    assert result.returncode != 0
    assert "rank 1 of 2 raised KeyboardInterrupt" in result.stderr and "MPI_Abort" in result.stderr
    assert not (tmp_path / "m.npz").exists()


@pytest.mark.skipif(_open_mpi_launcher() is None, reason="needs mpi4py and Open MPI's mpiexec")
@pytest.mark.parametrize("call", ["predict_raw", "fit_other", "backward_same", "step_same"])
def test_cprop_from_a_signal_handler_inside_a_compiled_distributed_epoch(tmp_path, call):
    # as test_safety's test for one process: the distributed epoch (a team of 2 threads on
    # each rank) runs signal handlers from inside its parallel region; cprop called there
    # runs on one thread (a nested team once left the epoch's threads waiting: the job hung)
    # and the network being trained refuses to be trained from there
    script = tmp_path / "job.py"
    script.write_text(signal_handler_calling(call) + textwrap.dedent(f"""
        import warnings
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        warnings.filterwarnings("ignore", ".*Oversubscribed threads", RuntimeWarning)
        trainer = cprop.Trainer(net, batch_size=512, n_threads=2, comm=comm)
        try:
            trainer.fit(X[:6000], y[:6000], epochs=100, callbacks=[
                lambda tr, epoch, logs: comm.allreduce(seen["in_epoch"], op=MPI.MIN) >= 3])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
        assert seen["in_epoch"] >= 3 and np.isfinite(net.params).all(), seen
        assert (seen["refused"] == seen["in_epoch"]) == ("{call}".endswith("same")), seen
        print("ok", flush=True)
    """))
    result = _run_two_ranks(script, tmp_path)
    assert result.returncode == 0 and result.stdout.split() == ["ok", "ok"], result.stderr[-3000:]


def test_cli_ctrl_c_while_mpi_starts_is_held_until_mpi_can_abort_the_job(tmp_path):
    # a stand-in mpi4py whose import (MPI_Init) is interrupted: cprop train must hold the
    # interrupt until the module exists, then abort the job through it
    package = tmp_path / "mpi4py"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "MPI.py").write_text(textwrap.dedent("""
        import os, signal, sys
        os.kill(os.getpid(), signal.SIGINT)      # Ctrl-C in the middle of MPI_Init
        class _World:
            def Get_rank(self):
                return 1
            def Get_size(self):
                return 2
            def Abort(self, status):
                print(f"Abort({status})", flush=True)
                os._exit(status)
        COMM_WORLD = _World()
        def Is_initialized():
            return True
        def Is_finalized():
            return False
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               OMPI_COMM_WORLD_SIZE="2")
    result = subprocess.run([sys.executable, "-m", "cprop", "train", "no-such.csv", "--target", "y"],
                            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 130 and "Abort(130)" in result.stdout, (result.stdout, result.stderr)
    assert "rank 1 interrupted while MPI started" in result.stderr
