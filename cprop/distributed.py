"""Synchronous data-parallel training over MPI, through mpi4py: ``Trainer(..., comm=MPI.COMM_WORLD)``.

Every rank holds the whole network. ``batch_size`` is the global batch: each
rank computes the gradient of its share of every global batch (with the loss
scaled by its share of the rows), one allreduce sums the shares together with
the loss and the status flags, and every rank applies the same optimizer step
to the same sum. The epoch's loop runs in one compiled call, calling
MPI_Allreduce itself (:func:`_core.train_epoch_mpi`, "phase 2"), or, for local
SGD or when that function cannot be bound, in Python around
:func:`_core.batch_gradient` and mpi4py's allreduce ("phase 1"; see
:func:`_compiled_allreduce`). So the parameters stay bitwise identical across
ranks, and N ranks train as one process with the same seed and batch size
does, up to the rounding of sums taken in another order.

No rank decides alone. Whatever ends or changes the loop (a non-finite loss or
step, Ctrl-C on any rank, a callback's stop, an error anywhere) is taken from
values every rank has received, so all ranks leave every loop together and
no configuration waits forever in a collective. The rare exception that
escapes outside those agreements takes the job down with ``MPI_Abort`` and a
message naming the rank.

This module does not import mpi4py until a communicator is given, so cprop
works without MPI installed.
"""
from __future__ import annotations

import contextlib
import math
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import warnings
import zlib

import numpy as np

from . import losses
from ._lazy import core as _core
from ._threads import compiled_epoch, resolve_threads, single_threaded_blas
from ._validation import (
    DataGuard,
    check_bool,
    check_positive_int,
    check_same_network,
    hold_memory,
    network_arrays,
)
from .callbacks import Checkpoint, as_callbacks
from .network import plan_widths

__all__ = ["DistributedError", "check_comm"]

# slots after the flat gradient (and running statistics) in a batch's allreduce buffer
_LOSS, _INTERRUPT, _FAILED, _REJECTED, _N_SLOTS = 0, 1, 2, 3, 4
# what check_X says a sparse X is refused by: under comm the ranks exchange dense rows only
_NO_SPARSE = "training over MPI (comm=)"
# rows of X and y compared across ranks at the start of a fit (they must pass the same data)
_SAMPLED_ROWS = 64


class DistributedError(RuntimeError):
    """Another rank failed (its exception is named in the message); this rank stops with it."""


def check_comm(comm):
    """`comm` if it is an mpi4py intra-communicator (None stays None); TypeError otherwise."""
    if comm is None:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise ImportError('comm= needs mpi4py: pip install "cprop[mpi]" (or pip install mpi4py '
                          'against the cluster\'s own MPI)') from None
    if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
        raise TypeError(f"comm must be an mpi4py intra-communicator such as MPI.COMM_WORLD, got {comm!r}")
    return comm


def _every_rank(exc):
    """Mark `exc` as raised on every rank alike: nothing waits for this rank, no abort needed."""
    try:
        exc._cprop_every_rank = True
    except AttributeError:        # an exception type without attributes: say what it was
        exc = _every_rank(DistributedError(_describe(exc)))
    return exc


def _describe(exc):
    return f"{type(exc).__name__}: {exc}"


class Ranks:
    """A communicator with more than one rank, and the agreements cprop takes over it."""

    def __init__(self, comm):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def share(self, n):
        """[r0, r1): this rank's rows of n rows split as evenly as possible (ranks in order)."""
        return n * self.rank // self.size, n * (self.rank + 1) // self.size

    def agree(self, error=None, **values):
        """Every rank's outcome of a step that may fail (an exception or None) and its `values`,
        gathered on every rank: the list of every rank's values, in rank order. When any rank
        failed, every rank raises: the failed ones their own exception, the others a
        DistributedError naming the first rank that failed."""
        outcome = self.comm.allgather((None if error is None else _describe(error), values))
        failed = [(r, message) for r, (message, _) in enumerate(outcome) if message is not None]
        if failed:
            if error is not None:
                raise _every_rank(error)
            r, message = failed[0]
            raise _every_rank(DistributedError(
                f"rank {r} of {self.size} failed ({message}); every rank stops"))
        return [v for _, v in outcome]

    def sum(self, values, error=None):
        """The sum over ranks of `values` (float64, one allreduce), raising on every rank as
        :meth:`agree` does when any rank passes an error."""
        buf = np.array([*values, error is not None], dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        if buf[-1]:
            self.agree(error)
        return buf[:-1]

    def check_same(self, gathered, what, hint=""):
        """`gathered`: every rank's dict of values; ValueError on every rank when a rank's
        value differs from rank 0's."""
        reference = gathered[0]
        for r, theirs in enumerate(gathered[1:], start=1):
            for key in reference:
                if theirs.get(key) != reference[key]:
                    where, mine, ours = _first_difference(key, theirs.get(key), reference[key])
                    raise _every_rank(ValueError(
                        f"the ranks disagree on {what}: rank {r} has {where}={mine!r:.200}, "
                        f"rank 0 has {ours!r:.200}{hint}"))


def _first_difference(where, a, b):
    """(path, a's part, b's part) of the first place where a and b differ, descending into
    dicts with the same keys and sequences of the same length: a long value (an
    architecture) is then shown where it differs, not cut off before."""
    step = None
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        step = next((k for k in a if a[k] != b[k]), None)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        step = next((i for i in range(len(a)) if a[i] != b[i]), None)
    if step is None:
        return where, a, b
    return _first_difference(f"{where}[{step!r}]", a[step], b[step])


@contextlib.contextmanager
def abort_on_error(ranks, what):
    """Run a collective operation; an exception that the ranks did not agree on (one rank
    raised alone) takes the whole job down with MPI_Abort, since the other ranks would
    otherwise wait for this one forever in their next collective call."""
    try:
        yield
    except BaseException as exc:
        if getattr(exc, "_cprop_every_rank", False):
            raise
        try:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
            sys.stderr.write(
                f"cprop: rank {ranks.rank} of {ranks.size} raised {_describe(exc)} during {what}, "
                "where the other ranks cannot learn of it; they would wait for this rank forever: "
                "aborting the MPI job (MPI_Abort)\n")
            sys.stderr.flush()
        finally:
            ranks.comm.Abort(1)


@contextlib.contextmanager
def _deferred_interrupt():
    """While a distributed fit runs, Ctrl-C (SIGINT) on this rank sets a flag that the next
    allreduce carries to every rank, instead of raising at some point of this rank only.
    Only in the main thread and over Python's default handler; the flag is a list [bool]."""
    flag = [False]
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield flag
        return

    def handler(signum, frame):
        flag[0] = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _crc(*arrays):
    value = 0
    for a in arrays:
        value = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1), value)
    return value


def _data_fingerprint(*arrays):
    """(rows, a checksum of up to _SAMPLED_ROWS rows spread over them) of each non-empty array:
    cheap, and enough to tell ranks that were given different data."""
    out = []
    for a in arrays:
        if a.shape[0] == 0:
            continue
        idx = np.unique(np.linspace(0, a.shape[0] - 1, min(a.shape[0], _SAMPLED_ROWS)).astype(np.intp))
        out.append((a.shape[0], _crc(a[idx])))
    return out


def _state_fingerprint(trainer):
    """What must be identical on every rank between epochs: parameters, running statistics,
    optimizer state and hyper-parameters, the generator."""
    opt = trainer.optimizer
    state = opt.state if isinstance(opt.state, (list, tuple)) else []
    cfg = dict(opt.config())
    return {"parameters": _crc(trainer.net._params), "running statistics": _crc(trainer.net._buffers),
            "optimizer state": _crc(*[s for s in state if isinstance(s, np.ndarray)]),
            "optimizer settings": repr(sorted(cfg.items())), "optimizer": type(opt).__name__,
            "generator": repr(trainer.rng.bit_generator.state)}


# -- threads --------------------------------------------------------------------------------

def check_threads(ranks, n_threads):
    """Warn (on each node's first rank) when the ranks on one node run more threads than the
    cores they may use: oversubscribed threads make training several times slower."""
    MPI = ranks.MPI
    node = ranks.comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
            range(os.cpu_count() or 1))
        gathered = node.allgather((ranks.rank, n_threads, cores))
        first = node.Get_rank() == 0
    finally:
        node.Free()
    if not first:
        return
    total = sum(t for _, t, _ in gathered)
    union = set().union(*(set(c) for _, _, c in gathered))
    crowded = [(r, t, len(c)) for r, t, c in gathered if t > len(c)]
    if total <= len(union) and not crowded:
        return
    detail = "; ".join(f"rank {r}: {t} thread(s) on {c} core(s)" for r, t, c in crowded)
    warnings.warn(
        f"{len(gathered)} rank(s) on this node run {total} cprop threads in all on {len(union)} core(s) "
        f"they may use (os.sched_getaffinity){': ' + detail if detail else ''}. Oversubscribed threads "
        "make training several times slower. Give each rank its own cores and as many threads: "
        "n_threads=k (`cprop train --threads k`, or OMP_NUM_THREADS=k) with Open MPI's "
        "`mpiexec --map-by slot:PE=k` (k cores per rank) or `--map-by ppr:1:node:PE=k` (one rank "
        "per node), or `--bind-to none` with "
        "k = cores / ranks per node; under Slurm, `srun --cpus-per-task=k`.",
        RuntimeWarning, stacklevel=6)   # < _buffers < prepare < fit < Trainer.fit < the caller


# -- phase 2: the allreduce called from the compiled epoch ------------------------------------

def _compiled_allreduce(ranks, dtype, count, wanted):
    """mpi4py's handles (communicator, datatype, SUM, IN_PLACE, as integers) for
    :func:`_core.train_epoch_mpi`, which runs an epoch's global batches in one compiled call
    without the GIL, or None when the epoch stays in Python (phase 1: one
    ``comm.Allreduce`` per batch between compiled calls). Agreed on every rank.

    Phase 2 serves every fit under comm except local SGD (``average_every``, which
    allreduces flags and averages parameters on a schedule of its own). It needs
    MPI_Allreduce from the library mpi4py loaded (``_core._bind_mpi``, no MPI at build
    time), checked once per fit on a tiny allreduce against mpi4py's own; when anything
    fails on any rank, every rank stays on phase 1 and rank 0 warns.
    ``CPROP_MPI_EPOCH=python`` forces phase 1: a diagnostic, for comparing the two."""
    MPI, comm = ranks.MPI, ranks.comm
    forced = os.environ.get("CPROP_MPI_EPOCH", "").strip().lower() == "python"
    # one rank's setting (the environment differs between ranks) decides for all
    if not comm.allreduce(wanted and not forced and count < 2**31, op=MPI.LAND):
        return None
    handles, reason = None, "on another rank"
    try:
        if not _core._bind_mpi(MPI.__file__):
            raise RuntimeError(f"MPI_Allreduce not found through {MPI.__file__}")
        in_place = int(MPI.IN_PLACE)        # MPI_IN_PLACE's value: 1 in Open MPI, -1 in MPICH
        handles = (MPI._handleof(comm), MPI._handleof(MPI.FLOAT if dtype == np.float32 else MPI.DOUBLE),
                   MPI._handleof(MPI.SUM), in_place - 2**64 if in_place >= 2**63 else in_place)
    except Exception as exc:
        handles, reason = None, _describe(exc)
    bound = comm.allreduce(handles is not None, op=MPI.LAND)
    if bound:
        # every rank calls the bound function: a collective, checked against mpi4py's sum
        probe = np.array([ranks.rank + 1, 0.5 ** (ranks.rank + 1), -3.0, 1e30], dtype=dtype)
        expected = np.empty_like(probe)
        comm.Allreduce(probe, expected, op=MPI.SUM)
        code = _core.mpi_allreduce(handles, probe)
        ok = code == 0 and np.array_equal(probe, expected)
        if not ok:
            reason = f"the bound MPI_Allreduce returned {code} and {probe}, mpi4py's {expected}"
        bound = comm.allreduce(ok, op=MPI.LAND)
    if bound:
        return handles
    error = None
    try:     # raised where rank 0's warning filters make it an error
        if ranks.rank == 0:
            warnings.warn(f"cprop could not call MPI_Allreduce from its compiled epoch ({reason}); each "
                          "global batch's allreduce goes through mpi4py instead (same results, slower)",
                          RuntimeWarning, stacklevel=6)
    except Exception as exc:
        error = exc
    ranks.agree(error)
    return None


# -- the fit ----------------------------------------------------------------------------------

def fit(trainer, X, y, epochs, validation_data, validation_split, callbacks, verbose, checkpoint,
        checkpoint_every, sharded, sample_weight=None):
    """Trainer.fit over trainer.comm (more than one rank); see Trainer.fit."""
    ranks = Ranks(trainer.comm)
    with abort_on_error(ranks, "Trainer.fit"):
        if not trainer._fit_lock.acquire(blocking=False):
            raise RuntimeError("this Trainer is already running fit() (in another thread, or fit() "
                               "was called from one of its callbacks); one fit at a time")
        try:
            with trainer.net._training("Trainer.fit"), single_threaded_blas(), \
                    _deferred_interrupt() as interrupted:
                run = _Fit(trainer, ranks, interrupted)
                run.prepare(X, y, epochs, validation_data, validation_split, callbacks, checkpoint,
                            checkpoint_every, sharded, sample_weight)
                trainer._fitting = True
                try:
                    return run.loop(verbose)
                finally:
                    trainer._fitting = False
        finally:
            trainer._fit_lock.release()


class _Fit:
    """One distributed fit: its data, buffers and loop."""

    def __init__(self, trainer, ranks, interrupted):
        self.trainer, self.ranks, self.interrupted = trainer, ranks, interrupted

    # -- before the first epoch: every rank checks, then rank 0's state is everyone's ---------
    def prepare(self, X, y, epochs, validation_data, validation_split, callbacks, checkpoint,
                checkpoint_every, sharded, sample_weight=None):
        trainer, ranks = self.trainer, self.ranks
        # the generator first: validation_split draws from it
        self._broadcast_state(early=True)
        error, signature = None, {}
        try:
            trainer._check_settings()
            if sample_weight is not None or trainer.optimizer.full_batch:
                raise ValueError("under comm, sample_weight and full-batch optimizers (LBFGS) are not "
                                 "supported yet; train them in one process")
            self.sharded = check_bool(sharded, "sharded")
            self.epochs = check_positive_int(epochs, "epochs", minimum=0, maximum=None)
            X, T, labels = trainer._prepare(X, y, name="X_shard" if self.sharded else "X",
                                            accept_sparse=_NO_SPARSE)
            data = (X, T, labels)
            val = None
            if validation_split is not None:
                if validation_data is not None:
                    raise ValueError("pass validation_data or validation_split, not both")
                # sharded: each rank holds out part of its own shard, drawn from a generator
                # of its own (the shared one advances alike on every rank)
                rng = (np.random.default_rng([int(trainer.rng.integers(2**63)), ranks.rank])
                       if self.sharded else None)
                data, val = (part[:3] for part in trainer._split(X, T, labels, validation_split, rng=rng))
            elif validation_data is not None:
                if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                    raise ValueError("validation_data must be a pair (X_val, y_val)")
                val = trainer._prepare(*validation_data, name="validation X", accept_sparse=_NO_SPARSE)
            self.data, self.val = data, val
            # the caller's arrays stay where they are for the fit (X.resize from a callback)
            self.held = hold_memory(*data, *(val or ()))
            # and their memory is checked before every epoch and inside it (DataGuard)
            self.guard = DataGuard((*data, *(val or ())))
            self.network = network_arrays(trainer.net)
            self.callbacks = as_callbacks(callbacks)
            if checkpoint is not None:
                checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every")
                directory = os.path.dirname(os.path.abspath(os.fspath(checkpoint)))
                if ranks.rank == 0 and not os.path.isdir(directory):   # only rank 0 writes
                    raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
                self.callbacks.append(Checkpoint(checkpoint, checkpoint_every))
            opt = trainer.optimizer
            cfg = {k: v for k, v in opt.config().items() if k != "step"}
            signature = {
                "architecture": trainer.net.architecture(), "loss": trainer.loss,
                "batch_size": trainer.batch_size, "shuffle": trainer.shuffle,
                "loss_scale": trainer.loss_scale, "on_divergence": trainer.on_divergence,
                "optimizer": (type(opt).__name__, sorted(cfg.items())), "epochs": self.epochs,
                "sharded": self.sharded, "average_every": trainer.average_every,
                "validation": None if val is None else (
                    "split" if validation_split is not None else "data"),
                "checkpoint": checkpoint is not None,
                "callbacks": [type(cb).__name__ for cb in self.callbacks],
            }
            if not self.sharded:
                signature["data"] = _data_fingerprint(*data)
                signature["validation data"] = None if val is None else _data_fingerprint(*val)
            rows = data[0].shape[0]
        except Exception as exc:
            error, rows = exc, 0
        gathered = ranks.agree(error, signature=signature, rows=rows)
        ranks.check_same([g["signature"] for g in gathered], "fit's settings and data",
                         hint="" if self.sharded else
                         " (every rank must pass the same X, y: each takes its rows of every global "
                         "batch; pass sharded=True to give each rank its own shard)")
        self.counts = [g["rows"] for g in gathered]
        self._broadcast_state(early=False)
        self._buffers()

    def _broadcast_state(self, early):
        """Rank 0's state, on every rank: before anything else its generator, dropout seed, epoch
        count and history; once the settings agree, its parameters, running statistics and
        optimizer state. (DDP broadcasts rank 0's parameters likewise: a network built with
        seed=None starts the same everywhere.)"""
        trainer, comm, rank = self.trainer, self.ranks.comm, self.ranks.rank
        if early:
            state = comm.bcast({"rng": trainer.rng.bit_generator.state, "dropout_seed": trainer.dropout_seed,
                                "epochs_done": trainer.epochs_done, "history": trainer.history.as_dict(),
                                "extra": trainer.extra} if rank == 0 else None, root=0)
            if rank:
                from .trainer import History
                trainer.rng.bit_generator.state = state["rng"]
                trainer.dropout_seed = state["dropout_seed"]
                trainer.epochs_done = state["epochs_done"]
                trainer.history = History.from_dict(state["history"])
                trainer.extra = state["extra"]
            return
        net, opt = trainer.net, trainer.optimizer
        comm.Bcast(net._params, root=0)
        if net._buffers.size:
            comm.Bcast(net._buffers, root=0)
        if rank == 0:
            opt._kernel_state(net, opt.config())     # valid state arrays (zeros when it had none)
        step, shapes = comm.bcast((opt.step_count, [s.shape for s in opt.state]) if rank == 0 else None,
                                  root=0)
        if rank:
            opt.step_count = step
            opt.state = [np.empty(shape, dtype=net._dtype) for shape in shapes]
        for s in opt.state:
            comm.Bcast(s, root=0)

    def _buffers(self):
        """Everything the epochs reuse: the allreduce buffer (flat gradient, running statistics,
        loss and flags), the workspace and the gather buffers for this rank's largest share."""
        trainer, net = self.trainer, self.trainer.net
        n_local = self.data[0].shape[0]
        self.n = sum(self.counts) if self.sharded else n_local
        self.batch_size = min(trainer.batch_size, self.n)
        self.steps = list(self._steps(self.ranks.rank))     # the same in every epoch of the fit
        most = max((b - a for _, _, a, b in self.steps), default=0)
        n_params, n_buf = net._params.size, net._buffers.size
        self.pack = np.zeros(n_params + n_buf + _N_SLOTS, dtype=net._dtype)
        self.grads = self.pack[:n_params]
        self.running = self.pack[n_params:n_params + n_buf] if n_buf else net._buffers
        self.slots = self.pack[n_params + n_buf:]
        _, _, row_width, n_bstats = net._plan
        self.work = np.empty(max(most, 1) * row_width + n_bstats, dtype=net._dtype)
        X, T, labels = self.data
        self.Xb = np.empty((most, X.shape[1]), dtype=net._dtype)
        self.Tb = np.empty((most, T.shape[1]), dtype=net._dtype) if T.shape[0] else T
        self.Lb = np.empty(most, dtype=np.intp) if labels.shape[0] else labels
        self.n_threads = resolve_threads(trainer.n_threads)
        self.settings = {"loss": losses.get(trainer.loss).code, "loss_scale": trainer.loss_scale,
                         "seed": 0, "n_threads": self.n_threads}
        error = None
        try:      # its warning, raised where a rank's warning filters make it an error
            check_threads(self.ranks, self.n_threads)
        except Exception as exc:
            error = exc
        self.ranks.agree(error)
        self.step_table = np.array(self.steps, dtype=np.int64).reshape(-1, 4)
        self.handles = _compiled_allreduce(self.ranks, net._dtype, self.pack.size,
                                           wanted=trainer.average_every is None)

    def _steps(self, rank):
        """(global rows of the step, global row index of this rank's first row, local start,
        local end) of each optimizer step of an epoch.

        Replicated data: the global batches are consecutive slices of the epoch's order, as in
        one process; rank r takes rows [bs·r/R, bs·(r+1)/R) of each. Sharded: the shards are
        laid end to end and cut into global batches of batch_size rows; each batch takes from
        every shard in proportion to its size (rank r: local rows [⌊a·n_r/N⌋, ⌊b·n_r/N⌋) of
        global rows [a, b)), so every shard is used up at the same pace."""
        n, B, size = self.n, self.batch_size, self.ranks.size
        offset = sum(self.counts[:rank])      # sharded: this shard's first row, shards end to end
        start = 0
        while start < n:
            end = min(start + B, n)
            if not self.sharded:
                bs = end - start
                r0, r1 = bs * rank // size, bs * (rank + 1) // size
                yield bs, start + r0, start + r0, start + r1
            else:
                cuts = [(start * c // n, end * c // n) for c in self.counts]
                bs = sum(b - a for a, b in cuts)
                if bs:                      # fewer rows than ranks can leave a step empty
                    a, b = cuts[rank]
                    yield bs, offset + a, a, b
            start = end

    # -- the epochs ---------------------------------------------------------------------------
    def loop(self, verbose):
        from .trainer import _is_true, _Progress
        trainer, ranks, epochs = self.trainer, self.ranks, self.epochs
        progress = _Progress(epochs, verbose and ranks.rank == 0)
        try:
            error = None
            try:
                for cb in self.callbacks:
                    cb.on_train_begin(trainer)
            except Exception as exc:
                error = exc
            ranks.agree(error)
            for _ in range(epochs):
                logs = self.epoch()
                if logs is None:          # diverged, with on_divergence="warn"
                    break
                error, stop = None, False
                if self.val is not None:
                    logs.update(self.evaluate(*self.val))
                try:
                    trainer.history.append(**logs)
                    progress.update(trainer.epochs_done, logs)
                    # every callback sees every epoch, even when an earlier one asks to stop
                    stop = any([_is_true(trainer._callback_epoch_end(cb, logs)) for cb in self.callbacks])
                except Exception as exc:
                    error = exc
                if self._after_epoch(error, stop):
                    break
        finally:
            progress.close()
        error = None
        try:
            for cb in self.callbacks:
                cb.on_train_end(trainer)
        except Exception as exc:
            error = exc
        self._after_epoch(error, False, when="at the end of training")
        return trainer.history

    def _after_epoch(self, error, stop, when=None):
        """The agreement after an epoch's callbacks: any rank's error is raised on every rank,
        any rank's stop stops every rank, Ctrl-C on any rank interrupts every rank, and the
        ranks must still hold the same parameters, optimizer and generator (a callback that
        changed them on some ranks only would otherwise split the run silently)."""
        trainer, ranks = self.trainer, self.ranks
        state = None
        try:
            state = _state_fingerprint(trainer)
        except Exception as exc:
            error = error or exc
        gathered = ranks.agree(error, stop=stop, interrupted=self.interrupted[0], state=state)
        when = when or f"after epoch {trainer.epochs_done}"
        states = [g["state"] for g in gathered]
        for r, theirs in enumerate(states[1:], start=1):
            for key, value in states[0].items():
                if theirs[key] != value:
                    raise _every_rank(RuntimeError(
                        f"{when} rank {r} holds other {key} than rank 0: a callback (or other code "
                        "between epochs) changed them on some ranks only. Under comm every rank "
                        "must make the same changes; training stops on every rank"))
        if any(g["interrupted"] for g in gathered):
            raise _every_rank(KeyboardInterrupt())
        return any(g["stop"] for g in gathered)

    def epoch(self):
        """One epoch: its logs (identical on every rank), or None when it diverged and
        on_divergence is "warn" (with "raise", DivergenceError on every rank)."""
        trainer, ranks, net, MPI = self.trainer, self.ranks, self.trainer.net, self.ranks.MPI
        error = None
        try:    # a callback may have replaced the network's arrays or the data's memory
            check_same_network(net, self.network)
            self.guard()
            trainer._check_counters()
        except Exception as exc:
            error = exc
        ranks.agree(error)
        X, T, labels = self.data
        n_local = X.shape[0]
        if self.sharded:
            order = (trainer._shuffled_order(n_local, np.random.default_rng(
                [int(trainer.rng.integers(2**63)), ranks.rank])) if trainer.shuffle else None)
        else:
            # the one-process epoch's order, the same on every rank
            order = trainer._shuffled_order(n_local) if trainer.shuffle else None
        settings = self.settings
        settings["seed"] = trainer._epoch_seed()
        cfg = trainer.optimizer.config()     # a callback may have changed its hyper-parameters
        state_a, state_b = trainer.optimizer._kernel_state(net, cfg)
        table, hyper, row_width, n_bstats = net._plan
        pack, grads, running, slots = self.pack, self.grads, self.running, self.slots
        weighted_running = running is not net._buffers
        if weighted_running:
            running[...] = net._buffers
        loss_scale = trainer.loss_scale
        # local SGD: each rank's share weighs R·rows/bs, so the ranks' mean is the batch's gradient
        local = trainer.average_every is not None
        share_weight = ranks.size if local else 1
        if local:
            averaging = _Averaging(ranks, net, running, state_a, state_b, cfg)
        status, loss_sum, n_seen, last_bs = _core.OK, 0.0, 0, 0
        start_time = time.perf_counter()
        # phase 2 (see _compiled_allreduce): the whole loop below in one compiled call
        steps = self.steps if self.handles is None else ()
        try:
            if self.handles is not None:
                settings["loss_scale"] = loss_scale
                try:
                    # signal handlers run inside its parallel region: see compiled_epoch
                    with compiled_epoch(net):
                        status, loss_sum, n_seen, last_bs, cfg["step"] = _core.train_epoch_mpi(
                            table, hyper, row_width, n_bstats, settings, cfg, self.handles, self.step_table,
                            X, T, labels, order, net._params, pack, running.size if weighted_running else 0,
                            state_a, state_b, self.work, self.Xb, self.Tb, self.Lb, self.interrupted,
                            self.guard)
                except KeyboardInterrupt:     # raised by a handler not the fit's: all ranks stopped
                    status = _core.INTERRUPTED
                if status == _core.MPI_ERROR:
                    raise DistributedError("MPI_Allreduce failed inside the compiled epoch")
            for step, (bs, row_base, a, b) in enumerate(steps, start=1):
                rows = b - a
                failed = None
                slots[...] = 0
                try:
                    if rows:
                        if order is None:
                            Xr, Tr, Lr = X[a:b], T[a:b], labels[a:b]
                        else:
                            idx = order[a:b]
                            Xr = np.take(X, idx, axis=0, out=self.Xb[:rows], mode="clip")
                            # one of T (targets) and labels is an empty placeholder
                            Tr = (np.take(T, idx, axis=0, out=self.Tb[:rows], mode="clip")
                                  if T.shape[0] else T)
                            Lr = (np.take(labels, idx, out=self.Lb[:rows], mode="clip")
                                  if labels.shape[0] else labels)
                        # this rank's rows count as rows/bs of the global batch's mean loss
                        settings["loss_scale"] = loss_scale * share_weight * rows / bs
                        slots[_LOSS] = _core.batch_gradient(table, hyper, row_width, n_bstats, settings,
                                                            Xr, Tr, Lr, net._params, grads, running,
                                                            self.work, row_base, guard=self.guard
                                                            ) / share_weight
                        if weighted_running and not local:
                            running *= rows / bs    # the sum over ranks: running stats of the whole batch
                    else:
                        grads[...] = 0
                        if weighted_running and not local:
                            running[...] = 0
                except Exception as exc:
                    failed = exc
                    slots[_FAILED] = 1
                slots[_INTERRUPT] = self.interrupted[0]
                if local:
                    # this rank's own step first; then the flags (not the gradient) are summed
                    if not slots[_FAILED] and math.isfinite(slots[_LOSS]):
                        rejected, cfg["step"] = _core.optimizer_step(cfg, table, net._params, grads, state_a,
                                                                     state_b, bs, self.n_threads)
                        slots[_REJECTED] = rejected
                    ranks.comm.Allreduce(MPI.IN_PLACE, slots, op=MPI.SUM)
                else:
                    ranks.comm.Allreduce(MPI.IN_PLACE, pack, op=MPI.SUM)
                if slots[_FAILED]:
                    if local:
                        averaging.restore()   # the other ranks have stepped: all back to the average
                    ranks.agree(failed)
                batch_loss = float(slots[_LOSS])
                last_bs = bs
                if not math.isfinite(batch_loss) or (local and slots[_REJECTED]):
                    if local:
                        averaging.restore()   # every rank back to the last average
                    status = _core.NONFINITE_STEP if slots[_REJECTED] else _core.NONFINITE_LOSS
                    break
                if not local:
                    rejected, cfg["step"] = _core.optimizer_step(cfg, table, net._params, grads, state_a,
                                                                 state_b, bs, self.n_threads)
                    if rejected:
                        status = _core.NONFINITE_STEP
                        break
                loss_sum += batch_loss * bs
                n_seen += bs
                if local and (step % trainer.average_every == 0 or step == len(self.steps)
                              or slots[_INTERRUPT]):
                    averaging.average()
                if slots[_INTERRUPT]:
                    status = _core.INTERRUPTED
                    break
        finally:
            trainer.optimizer.step_count = cfg["step"]
            net._grads[...] = grads
            # local SGD: each rank holds its own share's gradient only, not the batch's
            net._has_grads, net._grad_rows = status != _core.INTERRUPTED and not local, last_bs
            if weighted_running:
                net._buffers[...] = running
        if status == _core.INTERRUPTED:
            raise _every_rank(KeyboardInterrupt())
        elapsed = ranks.comm.allreduce(time.perf_counter() - start_time, op=MPI.MAX)
        if status != _core.OK:
            error = None
            try:     # DivergenceError, or the warning where a rank's filters make it an error
                trainer._diverged(status, n_seen, stacklevel=6)
            except Exception as exc:
                error = exc
            ranks.agree(error)
            return None
        trainer.epochs_done += 1
        return {"loss": loss_sum / n_seen, "lr": trainer.optimizer.lr, "time": elapsed,
                "samples_per_second": self.n / elapsed if elapsed > 0 else float("inf")}

    def evaluate(self, X, T, labels):
        """val_loss (and val_accuracy) over the validation rows: split across the ranks
        (replicated data) or each rank's own shard, combined."""
        rows = (0, X.shape[0]) if self.sharded else self.ranks.share(X.shape[0])
        # the warning's stack: _metrics < evaluate < loop < fit < Trainer.fit < the caller
        return _metrics(self.trainer, self.ranks, X, T, labels, rows, "val_", stacklevel=7)


class _Averaging:
    """Local SGD's averages (Trainer(average_every=H)): every rank's parameters, running
    statistics and optimizer state replaced by their mean over the ranks, and a copy of the
    last average for every rank to go back to when a step fails on any rank."""

    def __init__(self, ranks, net, running, state_a, state_b, cfg):
        self.ranks, self.cfg = ranks, cfg
        # the running statistics the epoch updates (its allreduce buffer's or the network's)
        # and the optimizer's state: none (a placeholder), one array (momentum, passed twice) or two
        arrays = [net._params, running, state_a] + ([state_b] if state_b is not state_a else [])
        self.arrays = [a for a in arrays
                       if a.size and (a is net._params or a is running or a.shape == net._params.shape)]
        self.saved = [a.copy() for a in self.arrays]
        self.saved_step = cfg["step"]

    def average(self):
        MPI = self.ranks.MPI
        for a, saved in zip(self.arrays, self.saved):
            # scaled before the sum: finite values near the dtype's largest would overflow
            # when summed first (and a power-of-2 rank count rounds the same either way)
            a *= a.dtype.type(1.0 / self.ranks.size)
            self.ranks.comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
            saved[...] = a
        self.saved_step = self.cfg["step"]

    def restore(self):
        for a, saved in zip(self.arrays, self.saved):
            a[...] = saved
        self.cfg["step"] = self.saved_step


# -- evaluation and prediction under comm ---------------------------------------------------

def _metrics(trainer, ranks, X, T, labels, rows, prefix, stacklevel):
    """Mean loss (and accuracy) of rows [r0, r1) of (X, T, labels) on each rank, combined over
    the ranks by one allreduce; identical on every rank."""
    r0, r1 = rows
    loss = losses.get(trainer.loss)
    values, error = [0.0, 0.0, 0.0, 0.0], None
    try:
        if r1 > r0:
            out = trainer.net.predict_raw(X[r0:r1], n_threads=trainer.n_threads)
            Tr, Lr = T[r0:r1], labels[r0:r1]
            value = _core.loss(loss.code, out, Tr, Lr, np.empty_like(out), trainer.loss_scale)
            accuracy = loss.accuracy(out, Tr, Lr) if loss.accuracy is not None else 0.0
            bad = out.shape[0] - np.count_nonzero(np.isfinite(out).all(axis=1))
            values = [value * (r1 - r0), accuracy * (r1 - r0), r1 - r0, bad]
    except Exception as exc:
        error = exc
    loss_sum, correct, n, bad = ranks.sum(values, error)
    if bad:
        _warn_nonfinite(int(bad), int(n), stacklevel)
    result = {prefix + "loss": float(loss_sum / n)}
    if loss.accuracy is not None:
        result[prefix + "accuracy"] = float(correct / n)
    return result


def _warn_nonfinite(bad, n, stacklevel):
    warnings.warn(
        f"the network's output is NaN or infinite for {bad} of {n} rows (it overflowed on these "
        "inputs: check their scale); the predictions and loss for those rows are meaningless",
        RuntimeWarning, stacklevel=stacklevel)


def _prepared(trainer, ranks, prepare):
    """`prepare()` on every rank, checked together: every rank must pass the same data."""
    error, result, fingerprint = None, None, None
    try:
        result = prepare()
        fingerprint = _data_fingerprint(*result)
    except Exception as exc:
        error = exc
    gathered = ranks.agree(error, data=fingerprint)
    ranks.check_same(gathered, "the data", hint=" (under comm every rank passes the same rows; "
                     "each computes its share and the results are gathered)")
    return result


def evaluate(trainer, X, y):
    """Trainer.evaluate under comm: each rank takes a share of the rows, results combined."""
    ranks = Ranks(trainer.comm)
    with abort_on_error(ranks, "Trainer.evaluate"):
        X, T, labels = _prepared(trainer, ranks, lambda: trainer._prepare(X, y, accept_sparse=_NO_SPARSE))
        return _metrics(trainer, ranks, X, T, labels, ranks.share(X.shape[0]), "", stacklevel=5)


def raw_output(trainer, X):
    """The raw outputs for X under comm: each rank computes a share of the rows, every rank
    gets them all (one allgather); warns when some rows are not finite."""
    from ._validation import check_X
    ranks = Ranks(trainer.comm)
    net = trainer.net
    with abort_on_error(ranks, "Trainer.predict"):
        n_inputs, m = plan_widths(net)
        (X,) = _prepared(trainer, ranks, lambda: (check_X(X, net._dtype, n_inputs, accept_sparse=_NO_SPARSE),))
        n = X.shape[0]
        r0, r1 = ranks.share(n)
        error, mine = None, np.zeros((r1 - r0, m), dtype=net._dtype)
        try:
            if r1 > r0:
                mine = net.predict_raw(X[r0:r1], n_threads=trainer.n_threads)
        except Exception as exc:
            error = exc
        ranks.sum([], error)
        out = np.empty((n, m), dtype=net._dtype)
        counts = [(n * (r + 1) // ranks.size - n * r // ranks.size) * m for r in range(ranks.size)]
        ranks.comm.Allgatherv(mine, [out, counts])
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            _warn_nonfinite(int(np.count_nonzero(~finite)), n, stacklevel=5)
        return out


# -- files -------------------------------------------------------------------------------------

def load(cls, path, comm):
    """Trainer.load under comm: rank 0 reads the file, every rank gets its trainer (network,
    optimizer and its state, generator, history); a file rank 0 cannot read raises on every
    rank."""
    ranks = Ranks(comm)
    with abort_on_error(ranks, "Trainer.load"):
        payload, error = None, None
        if ranks.rank == 0:
            try:
                trainer = cls.load(path)
                payload = {"net": trainer.net, "loss": trainer.loss, "optimizer": trainer.optimizer,
                           "batch_size": trainer.batch_size, "shuffle": trainer.shuffle,
                           "loss_scale": trainer.loss_scale, "epochs_done": trainer.epochs_done,
                           "rng": trainer.rng.bit_generator.state, "dropout_seed": trainer.dropout_seed,
                           "history": trainer.history.as_dict(), "extra": trainer.extra}
            except Exception as exc:
                error = exc
                try:   # sent as it is when it survives pickling, so every rank raises its type
                    pickle.loads(pickle.dumps(exc))
                except Exception:
                    error = DistributedError(f"rank 0 could not load {path!r}: {_describe(exc)}")
        error, payload = comm.bcast((error, payload), root=0)
        if error is not None:
            raise _every_rank(error)
        if ranks.rank == 0:
            trainer.comm = comm
            return trainer
        from .trainer import History
        trainer = cls(payload["net"], loss=payload["loss"], optimizer=payload["optimizer"],
                      batch_size=payload["batch_size"], shuffle=payload["shuffle"],
                      loss_scale=payload["loss_scale"], comm=comm)
        trainer.epochs_done = payload["epochs_done"]
        trainer.rng.bit_generator.state = payload["rng"]
        trainer.dropout_seed = payload["dropout_seed"]
        trainer.history = History.from_dict(payload["history"])
        trainer.extra = payload["extra"]
        return trainer
