"""Shared by the MPI tests, which run under a launcher:
``mpiexec -n 2 python -m pytest tests/distributed`` (and -n 3, so that shares are uneven);
.ci/run does, with a timeout. Outside a launcher, importing this skips the importing module.

Every rank runs every test in the same order; a test makes the same collective calls on every
rank and compares across ranks by gathering, so a failed assertion never leaves another rank
waiting in a collective. (No conftest.py here: the suite's tests import tests/conftest.py by
that name.)
"""
import os
import shutil
import tempfile
import zlib

import numpy as np
import pytest

if not any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")):
    pytest.skip("MPI tests: run under mpiexec (mpiexec -n 2 python -m pytest tests/distributed)",
                allow_module_level=True)

# -n 3 on a 2-core machine oversubscribes on purpose; the warning has a test of its own
OVERSUBSCRIBED = pytest.mark.filterwarnings("ignore:.*Oversubscribed threads:RuntimeWarning")


@pytest.fixture(scope="session")
def comm():
    MPI = pytest.importorskip("mpi4py.MPI")
    comm = MPI.COMM_WORLD
    if comm.Get_size() < 2:
        pytest.skip("needs at least 2 MPI ranks (mpiexec -n 2)")
    return comm


@pytest.fixture
def shared_dir(comm):
    """A directory every rank sees (on one machine): rank 0's, its name broadcast."""
    path = comm.bcast(tempfile.mkdtemp(prefix="cprop-mpi-") if comm.rank == 0 else None, root=0)
    yield path
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


def fingerprint(trainer):
    """A hash of everything that must be identical on every rank after training."""
    opt = trainer.optimizer
    arrays = [trainer.net.params, trainer.net.buffers] + list(opt.state or [])
    value = 0
    for a in arrays:
        value = zlib.crc32(np.ascontiguousarray(a).tobytes(), value)
    return value, opt.step_count, trainer.epochs_done, repr(trainer.rng.bit_generator.state)


def assert_same_on_every_rank(comm, trainer):
    """Parameters, running statistics, optimizer state and generator bitwise identical on every rank."""
    gathered = comm.allgather(fingerprint(trainer))
    assert all(g == gathered[0] for g in gathered), gathered
