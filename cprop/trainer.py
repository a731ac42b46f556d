"""Trainer: minibatch training where each epoch is one compiled call without the GIL."""
from __future__ import annotations

import math
import os
import threading
import time
import warnings

import numpy as np
from numpy.typing import ArrayLike

from . import distributed as _distributed
from . import io as _io
from . import losses
from ._lazy import core as _core
from ._threads import MAX_THREADS, ThreadFallback, compiled_epoch, resolve_threads, single_threaded_blas
from ._validation import (
    CSRInput,
    DataGuard,
    check_bool,
    check_positive_int,
    check_real,
    check_same_network,
    check_sample_weight,
    check_X,
    hold_memory,
    network_arrays,
)
from .callbacks import Checkpoint, as_callbacks
from .losses import loss_code, prepare_targets
from .network import Sequential, network_from_archive, plan_widths
from .optim import MAX_STEP_COUNT, OPTIMIZERS, SGD, Adam, Optimizer, check_eps_survives_flushing


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or parameter; the model keeps its last finite parameters."""


class History:
    """Per-epoch records of a fit: ``loss``, ``val_loss``, ``val_accuracy``, ``lr``, ``time``,
    ``samples_per_second`` (lists of floats, one per completed epoch)."""

    FIELDS = ("loss", "val_loss", "val_accuracy", "lr", "time", "samples_per_second")
    loss: list[float]
    val_loss: list[float]
    val_accuracy: list[float]
    lr: list[float]
    time: list[float]
    samples_per_second: list[float]

    def __init__(self) -> None:
        for name in self.FIELDS:
            setattr(self, name, [])

    def __len__(self):
        return len(self.loss)

    def __repr__(self):
        last = {k: getattr(self, k)[-1] for k in self.FIELDS if getattr(self, k)}
        return f"History(epochs={len(self)}, last={last})"

    def append(self, **values):
        """Record one epoch: the keyword arguments named in FIELDS (others are ignored)."""
        for name in self.FIELDS:
            if name in values and values[name] is not None:
                getattr(self, name).append(float(values[name]))

    def as_dict(self) -> dict:
        """The records as a dict of lists (JSON-serialisable; saved with the trainer)."""
        return {k: list(getattr(self, k)) for k in self.FIELDS}

    def plot(self, path: str | os.PathLike | None = None):
        """Draw loss (and validation loss) and, when logged, validation accuracy per epoch.

        Needs matplotlib (``pip install "cprop[plot]"``). Saves a PNG to `path`
        when given; returns the matplotlib Figure.
        """
        try:
            import matplotlib
            if path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError('History.plot needs matplotlib: pip install "cprop[plot]"') from None
        epochs = np.arange(1, len(self) + 1)
        panels = 2 if self.val_accuracy else 1
        fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5), squeeze=False)
        ax = axes[0, 0]
        ax.plot(epochs, self.loss, label="loss")
        if self.val_loss:
            ax.plot(epochs[:len(self.val_loss)], self.val_loss, label="val_loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_yscale("log" if min(self.loss, default=1) > 0 else "linear")
        ax.legend()
        if self.val_accuracy:
            ax = axes[0, 1]
            ax.plot(epochs[:len(self.val_accuracy)], self.val_accuracy, label="val_accuracy", color="C2")
            ax.set_xlabel("epoch")
            ax.set_ylabel("accuracy")
            ax.legend()
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=100)
        return fig

    @classmethod
    def from_dict(cls, d: dict) -> History:
        """A History from :meth:`as_dict`'s output."""
        h = cls()
        for k in cls.FIELDS:
            getattr(h, k).extend(float(v) for v in d.get(k, []))
        return h


class Trainer:
    """Trains a :class:`Sequential` by minibatch gradient descent.

    Parameters
    ----------
    net : Sequential
    loss : {"mse", "cross_entropy", "binary_cross_entropy", "poisson", "l1", "huber"}
    optimizer : cprop.SGD, cprop.Adam, cprop.AdamW or cprop.LBFGS (full-batch: one
        L-BFGS run per epoch); default SGD(lr=0.01)
    batch_size : int, default 32
    shuffle : bool, default True — reshuffle the sample order every epoch
    seed : int or None — seed of the shuffling
    n_threads : int or None — threads for the kernels (default: cprop.get_num_threads(),
        and a fit whose threads stall each other on a busy machine goes on with one)
    on_divergence : {"raise", "warn"} — what fit does when the loss or an update
        becomes non-finite; either way it stops at that batch and the network
        keeps its last finite parameters.
    loss_scale : float > 0, default 1 — multiplies the loss and its gradient
        (cprop.sklearn uses it to reproduce scikit-learn's loss conventions).
    comm : mpi4py communicator, optional — train over MPI, synchronously data-parallel
        (``comm=MPI.COMM_WORLD``, launched with ``mpiexec -n N``): `batch_size` is the
        global batch, each rank computes the gradient of its share of every batch, one
        allreduce sums them and every rank takes the same step, so N ranks train as one
        process would, up to float rounding. fit, evaluate, predict and
        ``Trainer.load(path, comm=...)`` are then collective: every rank calls them
        (see cprop.distributed and the README). A communicator of one rank
        (``MPI.COMM_SELF``) trains exactly as comm=None.
    average_every : int >= 1 or None, default None — under comm, local SGD: instead of
        allreducing every batch's gradient, each rank steps on its own share of every
        global batch (its gradient weighted so that the ranks' mean is the global
        batch's gradient) and the ranks average their parameters, running statistics
        and optimizer state every `average_every` steps and at the end of every epoch.
        Cheaper communication for slow networks; with SGD (momentum, Nesterov, weight
        decay: all linear in the gradient) ``average_every=1`` is synchronous training,
        up to rounding (BatchNorm's running statistics aside: every rank's count alike in
        the average, where synchronous training weighs them by their rows); larger values,
        and Adam, train differently. None: synchronous (the gradient allreduced every
        step). Ignored without comm (one process).
    """

    # what a running fit was started with: changing them from a callback (or another
    # thread) mid-fit raises instead of reaching the compiled epoch half-changed
    _FIXED_DURING_FIT = frozenset({"net", "loss", "optimizer", "batch_size", "shuffle", "seed", "rng",
                                   "n_threads", "on_divergence", "loss_scale", "dropout_seed", "comm",
                                   "average_every"})

    def __setattr__(self, name, value):
        if name in self._FIXED_DURING_FIT and self.__dict__.get("_fitting"):
            raise RuntimeError(f"cannot change trainer.{name} while fit() is running (from a callback "
                               "or another thread); change it before the next fit()")
        object.__setattr__(self, name, value)

    def __init__(self, net: Sequential, loss: str = "mse", optimizer: Optimizer | None = None,
                 batch_size: int = 32, shuffle: bool = True, seed: int | None = None,
                 n_threads: int | None = None, on_divergence: str = "raise",
                 loss_scale: float = 1.0, comm=None, average_every: int | None = None) -> None:
        self.net = net
        self.loss = loss
        self.optimizer = optimizer if optimizer is not None else SGD(lr=0.01)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.n_threads = n_threads
        self.on_divergence = on_divergence
        self.loss_scale = loss_scale
        self.comm = comm
        self.average_every = average_every
        self._check_settings()
        self._fitting = False
        self._fit_lock = threading.Lock()
        # the dropout masks' key: from the seed, or fresh entropy (saved with the trainer)
        self.dropout_seed = int(np.random.default_rng(seed).integers(2**63))
        self.epochs_done = 0
        self.history = History()
        self.extra: dict = {}   # JSON-serialisable notes saved with the trainer (the CLI keeps classes, scaling)

    def __getstate__(self):
        # pickle and copy.deepcopy: everything but the fit's lock (the network refuses to be
        # copied while a fit in another thread trains it)
        return {k: v for k, v in self.__dict__.items() if k != "_fit_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fitting = False
        self._fit_lock = threading.Lock()

    def _check_settings(self):
        """Validate the settings (again at each fit: they are plain attributes users may change)."""
        if not isinstance(self.net, Sequential):
            raise TypeError(f"net must be a cprop.Sequential, got {type(self.net).__name__}")
        loss_code(self.loss)
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(f"optimizer must be a cprop optimizer such as cprop.SGD(...), got {self.optimizer!r}")
        if self.on_divergence not in ("raise", "warn"):
            raise ValueError(f"on_divergence must be 'raise' or 'warn', got {self.on_divergence!r}")
        n_outputs = plan_widths(self.net)[1]
        if losses.get(self.loss).targets == "labels" and n_outputs < 2:
            raise ValueError(f"cross_entropy needs a network with >= 2 outputs, this one has {n_outputs}")
        self.batch_size = check_positive_int(self.batch_size, "batch_size")
        self.shuffle = check_bool(self.shuffle, "shuffle")
        if self.n_threads is not None:
            self.n_threads = check_positive_int(self.n_threads, "n_threads", maximum=MAX_THREADS)
        self.loss_scale = check_real(self.loss_scale, "loss_scale", low=0, low_open=True)
        self.optimizer.config()
        check_eps_survives_flushing(self.optimizer, self.net._dtype)
        self.comm = _distributed.check_comm(self.comm)
        if self.average_every is not None:
            self.average_every = check_positive_int(self.average_every, "average_every")
        if not isinstance(self.rng, np.random.Generator):
            raise TypeError(f"trainer.rng must be a numpy Generator (np.random.default_rng(seed)), "
                            f"got {type(self.rng).__name__}")

    @property
    def rank(self) -> int:
        """This process's rank in `comm` (0 without one)."""
        return 0 if self.comm is None else self.comm.Get_rank()

    @property
    def n_ranks(self) -> int:
        """How many processes train together: the size of `comm` (1 without one)."""
        return 1 if self.comm is None else self.comm.Get_size()

    @property
    def _parallel(self):
        # a communicator of one rank takes the ordinary paths: bitwise the result of comm=None
        return self.comm is not None and _distributed.check_comm(self.comm).Get_size() > 1

    # -- training ----------------------------------------------------------
    def _prepare(self, X, y, name="X", accept_sparse=True):
        n_inputs, n_outputs = plan_widths(self.net)
        X = check_X(X, self.net._dtype, n_inputs, name=name, accept_sparse=accept_sparse)
        T, labels = prepare_targets(self.loss, y, X.shape[0], n_outputs, self.net._dtype)
        return X, T, labels

    def fit(self, X: ArrayLike, y: ArrayLike, epochs: int = 1,
            validation_data: tuple[ArrayLike, ArrayLike] | None = None,
            validation_split: float | None = None, callbacks=(), verbose: bool = False,
            checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 1,
            sample_weight: ArrayLike | None = None, sharded: bool = False) -> History:
        """Train for `epochs` passes over (X, y); returns the History (also ``self.history``).

        Each epoch runs in one compiled call without the GIL: shuffle by index,
        gather each minibatch, forward, loss, backward and update for every
        batch (including a ragged last one), with every buffer allocated once
        here. X is not copied when it is already C-contiguous in the network's dtype.
        For the whole fit, callbacks and validation included, the BLAS behind
        ``scipy.linalg`` is held at one thread (cprop's threads call it).

        Parameters
        ----------
        X : array-like (n_samples, n_features), or a scipy.sparse matrix or array of
            any format (taken as CSR, its arrays copied and checked once): a Dense first
            layer multiplies each minibatch's rows in place (sparse × dense, and
            dW = Xᵀ·δ sparse), any other first layer gets them gathered densely; not
            under comm
        y : labels (n_samples,) for cross_entropy; targets (n_samples, n_outputs)
            (or (n_samples,) for one output) for mse and binary_cross_entropy
        epochs : int >= 0
        validation_data : (X_val, y_val), optional — logs val_loss (and val_accuracy)
        validation_split : float in (0, 1), optional — hold out this fraction of
            (X, y), chosen at random with the trainer's seed, as validation data
        callbacks : Callback or callables ``f(trainer, epoch, logs)`` run after
            each epoch; returning True stops training (see cprop.callbacks,
            cprop.schedules)
        verbose : bool — show progress (a tqdm bar when tqdm is installed,
            else one line per epoch)
        checkpoint : path, optional — save the trainer there (atomically) every
            `checkpoint_every` epochs and at the end (under comm, rank 0 writes it);
            ``Trainer.load`` resumes it
        sample_weight : array-like (n_samples,), optional — one weight >= 0 per
            sample, not all 0: each batch's loss is the weighted mean Σ w·l / Σ w, so
            weight 0 drops a sample and weight k counts it k times; a batch of weight 0
            is skipped. Only the weights' ratios matter (they are divided by their mean
            first, so all 1e-30 trains as all 1), except for an optimizer's
            ``decay_per_sample``, which divides its weight decay by the batch's Σ w of
            the weights as given. The logged loss averages the batches' losses by their
            sizes; validation is unweighted.
        sharded : bool, default False — under comm, each rank passes only its own
            shard of the data (and of validation_data; validation_split holds out part
            of each shard). Every global batch then takes from every shard in
            proportion to its size and shuffling stays within shards, so training is
            not bit for bit that of one process. Without it, every rank passes the
            same X, y and takes its rows of every global batch.

        Under comm, fit is collective: every rank calls it with the same settings
        (checked), rank 0's parameters, optimizer state and generator are first
        broadcast to the others, and every decision to stop is taken together.

        Raises
        ------
        DivergenceError — the loss or an update became non-finite (with
            ``on_divergence="raise"``); the network keeps its last finite parameters.
        KeyboardInterrupt — Ctrl-C takes effect between batches; the network keeps
            the parameters of the last completed step, the history its completed epochs.
        """
        self._check_counters()
        if self._parallel:     # every check there is agreed between the ranks
            return _distributed.fit(self, X, y, epochs, validation_data, validation_split, callbacks,
                                    verbose, checkpoint, checkpoint_every, sharded, sample_weight)
        if check_bool(sharded, "sharded") and self.comm is None:
            raise ValueError("sharded=True needs comm= (each MPI rank passing its own shard)")
        if not self._fit_lock.acquire(blocking=False):
            raise RuntimeError("this Trainer is already running fit() (in another thread, or fit() "
                               "was called from one of its callbacks); one fit at a time")
        try:
            with self.net._training("Trainer.fit"):
                self._check_settings()
                self._fitting = True
                try:
                    return self._fit(X, y, epochs, validation_data, validation_split, callbacks,
                                     verbose, checkpoint, checkpoint_every, sample_weight)
                finally:
                    self._fitting = False
        finally:
            self._fit_lock.release()

    def _callback_epoch_end(self, callback, logs):
        """callback.on_epoch_end, with the counters an earlier callback may have set checked."""
        self._check_counters()
        return callback.on_epoch_end(self, self.epochs_done, logs)

    def _check_counters(self):
        """The plain attributes a fit counts and records on (a user or a callback may set them),
        checked before the fit and before each epoch."""
        self.epochs_done = check_positive_int(self.epochs_done, "epochs_done", minimum=0, maximum=None)
        if not isinstance(self.history, History):
            raise TypeError(f"trainer.history must be a cprop.History, got {type(self.history).__name__}")

    def _fit(self, X, y, epochs, validation_data, validation_split, callbacks, verbose, checkpoint,
             checkpoint_every, sample_weight=None):
        """fit's body, run with the settings fixed and the network held."""
        epochs = check_positive_int(epochs, "epochs", minimum=0, maximum=None)
        X, T, labels = self._prepare(X, y)
        weights, weight_scale = (None, 1.0) if sample_weight is None else check_sample_weight(
            sample_weight, X.shape[0], self.net._dtype)
        if validation_split is not None:
            if validation_data is not None:
                raise ValueError("pass validation_data or validation_split, not both")
            (X, T, labels, weights), (Xv, Tv, labels_v, _) = self._split(X, T, labels, validation_split,
                                                                         weights)
            if weights is not None and not weights.any():
                raise ValueError("the samples left for training all have weight 0")
        elif validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data must be a pair (X_val, y_val)")
            Xv, Tv, labels_v = self._prepare(*validation_data, name="validation X")
        has_validation = validation_split is not None or validation_data is not None
        callbacks = as_callbacks(callbacks)
        if checkpoint is not None:
            checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every")
            directory = os.path.dirname(os.path.abspath(os.fspath(checkpoint)))
            if not os.path.isdir(directory):
                raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
            callbacks.append(Checkpoint(checkpoint, checkpoint_every))

        buffers = self._buffers(X.shape[0], sparse=isinstance(X, CSRInput))
        buffers["weights"] = weights
        # what the epochs and the validation read, checked before every epoch and, by the
        # compiled epoch, after Python's signal handlers have run within one
        watched = (X, T, labels, weights, *((Xv, Tv, labels_v) if has_validation else ()))
        buffers["guard"] = DataGuard(watched)
        # the weights arrive divided by their mean; a decay per sample still divides by their sum
        buffers["settings"]["weight_scale"] = weight_scale
        progress = _Progress(epochs, verbose)
        # the caller's arrays stay where they are until fit returns (X.resize from a callback
        # would free what the epochs read)
        held = hold_memory(X, T, labels, weights, *((Xv, Tv, labels_v) if has_validation else ()))
        # BLAS is held at one thread for the whole fit, not set and restored
        # around every epoch: an epoch that starts right after a restore finds
        # OpenBLAS's pool awake on the cores it needs (benchmarks/README.md)
        try:
            for cb in callbacks:
                cb.on_train_begin(self)
            with single_threaded_blas():
                for _ in range(epochs):
                    logs = self._epoch(X, T, labels, buffers)
                    if logs is None:          # diverged, with on_divergence="warn"
                        break
                    if has_validation:
                        buffers["guard"]()
                        logs.update(self._evaluate_prepared(Xv, Tv, labels_v, prefix="val_"))
                    self.history.append(**logs)
                    progress.update(self.epochs_done, logs)
                    # every callback sees every epoch, even when an earlier one asks to stop
                    stop = [_is_true(self._callback_epoch_end(cb, logs)) for cb in callbacks]
                    if any(stop):
                        break
        finally:
            progress.close()
            del held          # not kept by a traceback: the caller may resize X afterwards
        for cb in callbacks:
            cb.on_train_end(self)
        return self.history

    def _buffers(self, n, sparse=False):
        """What every epoch of a fit over n samples reuses: the fit's settings, workspace, label
        buffer, sample order (shuffled in place of the identity when shuffling). `sparse`: X is
        a CSRInput (a Dense first layer reads it in place: no dense minibatch)."""
        batch_size = min(self.batch_size, n)
        net = self.net
        _, _, row_width, n_bstats = net._plan
        settings = {"loss": losses.get(self.loss).code, "loss_scale": self.loss_scale, "batch_size": batch_size,
                    "gather": self.shuffle, "n_threads": resolve_threads(self.n_threads), "seed": 0}
        size = _core.workspace_size(row_width, n_bstats, *plan_widths(net), batch_size,
                                    sparse, int(net._plan[0][0, _core.PLAN_INT["kind"]]))
        return {"settings": settings, "work": np.empty(size, dtype=net._dtype),
                "network": network_arrays(net),
                "label_buf": np.empty(batch_size, dtype=np.intp), "order": np.arange(n, dtype=np.intp),
                "shuffled": np.empty(n, dtype=np.intp),
                "weights": None, "weight_buf": np.empty(batch_size, dtype=net._dtype),
                "threads": ThreadFallback(self.n_threads)}

    def _epoch(self, X, T, labels, buffers):
        """One compiled epoch over (X, T, labels): its logs, or None when it diverged and
        on_divergence is "warn" (with "raise", DivergenceError)."""
        net, n, settings = self.net, X.shape[0], buffers["settings"]
        check_same_network(net, buffers["network"])
        buffers["guard"]()
        self._check_counters()
        batch_size = settings["batch_size"]
        order = (self._shuffled_order(n, out=buffers["shuffled"], identity=buffers["order"]) if self.shuffle
                 else buffers["order"])
        settings["seed"] = self._epoch_seed()
        if self.optimizer.full_batch:
            return self._full_batch_epoch(X, T, labels, buffers)
        cfg = self.optimizer.config()     # a callback may have changed its hyper-parameters
        if buffers["weights"] is not None and cfg["decay_per_sample"]:
            cfg["weight_decay"] /= settings["weight_scale"]     # ÷ Σ w of the weights as given
        state_a, state_b = self.optimizer._kernel_state(net, cfg)
        table, hyper, row_width, n_bstats = net._plan
        settings["n_threads"] = buffers["threads"].n_threads   # one, once the threads stalled
        # a CSR X: its arrays, and a placeholder of its row count (the epoch gathers its rows)
        X_core, csr = X.core_args() if isinstance(X, CSRInput) else (X, {})
        start = time.perf_counter()
        try:
            with compiled_epoch(net):
                status, loss_sum, n_seen, step = _core.train_epoch(
                    table, hyper, row_width, n_bstats, settings, cfg, X_core, T, labels, order,
                    net._params, net._grads, state_a, state_b, net._buffers, buffers["work"],
                    buffers["label_buf"], buffers["weights"], buffers["weight_buf"], **csr,
                    guard=buffers["guard"])
        except BaseException:
            # Ctrl-C, or any exception a signal handler raised mid-epoch: the interrupted
            # epoch's completed steps are kept; Adam's count with them
            self.optimizer.step_count = cfg["step"]
            net._has_grads = False
            raise
        self.optimizer.step_count = step
        net._has_grads, net._grad_rows = True, n - (n - 1) // batch_size * batch_size
        elapsed = time.perf_counter() - start
        buffers["threads"].after_epoch(elapsed)   # one thread for the rest of the fit if they stall
        if status != _core.OK:
            self._diverged(status, n_seen)
            return None
        self.epochs_done += 1
        return {"loss": loss_sum / n_seen, "lr": self.optimizer.lr, "time": elapsed,
                "samples_per_second": n / elapsed if elapsed > 0 else math.inf}

    def _full_batch_epoch(self, X, T, labels, buffers):
        """An epoch of a full-batch optimizer (L-BFGS): one run of it over all of (X, T, labels)."""
        start = time.perf_counter()
        if isinstance(X, CSRInput) and not self.net._reads_sparse:
            # a first layer other than Dense takes dense rows: densified once for the whole run,
            # not at each of its evaluations
            if "dense_X" not in buffers:
                buffers["dense_X"] = X.toarray()
            X = buffers["dense_X"]
        result = self.optimizer.minimize(self.net, X, T, labels, buffers["settings"], buffers["weights"],
                                         guard=buffers["guard"])
        elapsed = time.perf_counter() - start
        if result.overflowed:
            self._diverged(_core.NONFINITE_LOSS, 0, stacklevel=6)
            return None
        self.epochs_done += 1
        return {"loss": result.data_loss, "time": elapsed,
                "samples_per_second": X.shape[0] * result.nfev / elapsed if elapsed > 0 else math.inf}

    def _shuffled_order(self, n, rng=None, out=None, identity=None):
        """A random permutation of range(n) (intp) drawn from `rng` (default: the trainer's
        generator): numpy's ``Generator.permutation(n)``, bit for bit. The compiled epoch
        indexes X with it unchecked.

        From a numpy Generator itself it is drawn in place, into `out` (intp, n) when given,
        starting from `identity` (range(n), kept by the caller): ``Generator.permutation`` is
        ``shuffle(arange(n))``, and the shuffle only swaps, so the result is a permutation
        whatever bits come out; a buffer reused every epoch spares an allocation of n indices.
        A subclass's methods could be overridden, so its order comes from numpy's own
        ``Generator.permutation`` and is checked to be a permutation of range(n)."""
        rng = self.rng if rng is None else rng
        if type(rng) is np.random.Generator:
            if out is None:
                order = np.arange(n, dtype=np.intp)
            else:
                order = out
                order[...] = np.arange(n, dtype=np.intp) if identity is None else identity
            np.random.Generator.shuffle(rng, order)
            return order
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"trainer.rng must be a numpy Generator (np.random.default_rng(seed)), "
                            f"got {type(rng).__name__}")
        order = np.asarray(np.random.Generator.permutation(rng, n))
        if order.dtype.kind not in "iu" or order.shape != (n,) or (n and not (
                0 <= order.min() and order.max() < n)):
            raise RuntimeError(f"the sample order drawn from trainer.rng is not a permutation of "
                               f"range({n}): dtype {order.dtype}, shape {order.shape}")
        seen = np.zeros(n, dtype=bool)
        seen[order] = True
        if not seen.all():
            raise RuntimeError(f"the sample order drawn from trainer.rng repeats samples: "
                               f"{n - np.count_nonzero(seen)} of {n} are missing")
        return np.ascontiguousarray(order, dtype=np.intp)

    def _epoch_seed(self):
        """The next epoch's dropout seed: keyed by the trainer's seed and the epoch, so a
        resumed fit draws the same masks."""
        return (self.dropout_seed + 0x9E3779B97F4A7C15 * (self.epochs_done + 1)) & (2**64 - 1)

    def _split(self, X, T, labels, fraction, weights=None, rng=None):
        """((X, T, labels, weights) to train on, the same held out): a random `fraction` of
        the samples, drawn with `rng` (default: the trainer's generator), held out for validation."""
        fraction = check_real(fraction, "validation_split", low=0, high=1, low_open=True, high_open=True)
        n_val = int(round(fraction * X.shape[0]))
        if n_val < 1 or n_val >= X.shape[0]:
            raise ValueError(f"validation_split={fraction} leaves {n_val} of {X.shape[0]} samples for "
                             "validation; need at least 1 and fewer than all")
        perm = (self.rng if rng is None else rng).permutation(X.shape[0])
        parts = np.sort(perm[n_val:]), np.sort(perm[:n_val])
        # T (float targets) or labels is an empty placeholder, depending on the loss
        return tuple(tuple(a[idx] if a.shape[0] else a for a in (X, T, labels)) +
                     (None if weights is None else weights[idx],) for idx in parts)

    def _diverged(self, status, n_seen, stacklevel=5):
        what = "loss" if status == _core.NONFINITE_LOSS else "update"
        msg = (f"training diverged in epoch {self.epochs_done + 1} after {n_seen} samples: "
               f"the {what} became non-finite. The network keeps its last finite parameters; "
               "lower the learning rate or scale the inputs.")
        if self.on_divergence == "raise":
            raise DivergenceError(msg)
        # by default: _diverged < _epoch < _fit < fit < the caller
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)

    # -- evaluation --------------------------------------------------------
    def _raw_output(self, X):
        """predict_raw's output, with a warning when some rows of it are not finite."""
        if self._parallel:
            return _distributed.raw_output(self, X)
        out = self.net.predict_raw(X, n_threads=self.n_threads)
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            warnings.warn(
                f"the network's output is NaN or infinite for {np.count_nonzero(~finite)} of "
                f"{out.shape[0]} rows (it overflowed on these inputs: check their scale); the "
                "predictions and loss for those rows are meaningless", RuntimeWarning, stacklevel=3)
        return out

    def _evaluate_prepared(self, X, T, labels, prefix=""):
        out = self._raw_output(X)
        grad = np.empty_like(out)
        loss = losses.get(self.loss)
        held = hold_memory(T, labels)     # the kernel reads them without the GIL
        result = {prefix + "loss": _core.loss(loss.code, out, T, labels, grad, self.loss_scale)}
        del held
        if loss.accuracy is not None:
            result[prefix + "accuracy"] = loss.accuracy(out, T, labels)
        return result

    def evaluate(self, X: ArrayLike, y: ArrayLike) -> dict[str, float]:
        """Mean loss on (X, y), and accuracy for the classification losses.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_inputs), or a scipy.sparse matrix (as for :meth:`fit`)
        y : targets, as for :meth:`fit`

        Returns
        -------
        dict — ``{"loss": float}``, plus ``"accuracy"`` for cross_entropy and
        binary_cross_entropy

        Under comm, collective: every rank passes the same (X, y), each evaluates a share
        of the rows and every rank gets the combined result.
        """
        if self._parallel:
            return _distributed.evaluate(self, X, y)
        return self._evaluate_prepared(*self._prepare(X, y))

    def predict(self, X: ArrayLike) -> np.ndarray:
        """Predictions for X (an array, or a scipy.sparse matrix as for :meth:`fit`).

        Returns
        -------
        ndarray — class labels of shape (n_samples,) for cross_entropy; 0/1 for
        binary_cross_entropy (shape (n_samples,) with one output, else
        (n_samples, n_outputs)); values for mse, rates exp(output) for poisson,
        likewise. Warns (RuntimeWarning)
        when the network's output is not finite for some rows.

        Under comm, collective: every rank passes the same X, each computes a share of
        the rows and every rank gets all the predictions.
        """
        return losses.get(self.loss).predict(self._raw_output(X))

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Class probabilities for X.

        Returns
        -------
        ndarray of shape (n_samples, n_outputs), float64 — softmax of the
        logits (cross_entropy) or their sigmoid (binary_cross_entropy).

        Raises
        ------
        ValueError — the trainer's loss is mse.
        """
        loss = losses.get(self.loss)
        if not loss.classification:
            raise ValueError(f"predict_proba needs a classification loss, the trainer's is {self.loss!r}")
        out = self._raw_output(X).astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):   # non-finite rows: warned about above
            return loss.proba(out)

    # -- files -------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write everything needed to continue training to `path`.

        The archive (npz, no pickle, written atomically) holds the network, the
        optimizer's hyper-parameters and state, the epoch count, the shuffling
        generator's state and the history: :meth:`load` then :meth:`fit`
        continues exactly as if training had never stopped.

        From a fit's callbacks (as :class:`~cprop.Checkpoint` does) it saves the state
        between two epochs; from another thread while a fit runs it raises RuntimeError
        (the file would mix parameters from the middle of an epoch with the count of
        epochs before it).
        """
        with self.net._training("Trainer.save"):
            self._save(path)

    def _save(self, path):
        opt = self.optimizer
        meta = {
            "kind": "trainer",
            "architecture": self.net.architecture(),
            "loss": self.loss,
            "optimizer": {"name": type(opt).__name__.lower(), "config": opt.config(),
                          "step_count": opt.step_count},
            "batch_size": self.batch_size, "shuffle": self.shuffle, "loss_scale": self.loss_scale,
            "epochs_done": self.epochs_done,
            "rng_state": self.rng.bit_generator.state,
            "dropout_seed": self.dropout_seed,
            "history": self.history.as_dict(),
            "extra": self.extra,
        }
        arrays = self.net._arrays()
        states = opt.state
        if states is not None and not opt.n_state:
            # plain SGD's placeholder carries nothing: written as it always was, when it is one
            if (isinstance(states, list) and len(states) == 1 and isinstance(states[0], np.ndarray)
                    and states[0].dtype == self.net._dtype):
                arrays["state_0"] = states[0]
        elif states is not None:
            # what load reads back: n_state finite arrays shaped like the parameters
            if not isinstance(states, list) or len(states) != opt.n_state or not all(
                    isinstance(a, np.ndarray) and a.shape == self.net._params.shape
                    and a.dtype == self.net._dtype and np.isfinite(a).all() for a in states):
                raise ValueError(f"cannot save to {os.fspath(path)!r}: the optimizer's state is not "
                                 f"{opt.n_state} finite array(s) shaped like the network's parameters "
                                 "(set by hand?); optimizer.reset() forgets it")
            arrays.update({f"state_{i}": a for i, a in enumerate(states)})
        _io.save_archive(path, meta, arrays, check_meta=_checked_trainer_meta)

    @classmethod
    def load(cls, path: str | os.PathLike, comm=None) -> Trainer:
        """A Trainer exactly as saved by :meth:`save`.

        Fitting 2 epochs, saving, loading and fitting 2 more gives the same
        weights, bit for bit, as fitting 4.

        With `comm` (an mpi4py communicator), collective: rank 0 reads the file and
        broadcasts the network, the optimizer with its state, the generator's state and
        the history, so every rank resumes alike (the other ranks need not see the file);
        a file rank 0 cannot read raises on every rank.

        Raises
        ------
        cprop.CpropFileError — not a valid cprop trainer file; among others, a file
            missing optimizer state (momentum, Adam's moments) that it lists or that
            its Adam's step count shows it had (resuming without it would silently
            train differently), and one whose booleans are not JSON true/false.
        """
        comm = _distributed.check_comm(comm)
        if comm is not None and comm.Get_size() > 1:
            return _distributed.load(cls, path, comm)
        with _io.open_archive(path, kinds=("trainer",)) as archive:
            net = network_from_archive(archive)
            meta = archive.meta
            try:
                fields = _checked_trainer_meta(meta)
                opt = fields["optimizer"]
                trainer = cls(net, loss=meta["loss"], optimizer=opt, batch_size=meta["batch_size"],
                              shuffle=fields["shuffle"], loss_scale=meta.get("loss_scale", 1.0))
                trainer.epochs_done = fields["epochs_done"]
                opt.state = _optimizer_state(archive, opt, net, trainer.epochs_done)
                trainer.rng.bit_generator.state = fields["rng_state"]
                trainer.dropout_seed = fields["dropout_seed"]
                trainer.history = fields["history"]
                trainer.extra = fields["extra"]
                trainer.comm = comm
            except _io.CpropFileError:
                raise
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                raise archive.error(f"invalid trainer in file ({type(exc).__name__}: {exc})") from None
        return trainer


def _checked_trainer_meta(meta):
    """The fields of a trainer file's metadata that its constructor does not check, checked:
    by load as it reads a file, and by save on what it is about to write (so a trainer
    whose epochs_done, dropout_seed or extra a user set out of range is not written to a
    file load would refuse). TypeError / ValueError / KeyError otherwise."""
    extra = meta.get("extra", {})
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a mapping, got {type(extra).__name__}")
    return {"optimizer": _optimizer_from_meta(meta.get("optimizer")),
            "shuffle": _flag(meta, "shuffle"),
            "epochs_done": check_positive_int(meta["epochs_done"], "epochs_done", minimum=0),
            "rng_state": _rng_state(meta["rng_state"]),
            "dropout_seed": check_positive_int(meta.get("dropout_seed", 0), "dropout_seed", minimum=0,
                                               maximum=2**63),
            "history": _history_from_meta(meta["history"]),
            "extra": extra}


def _flag(mapping, key, default=None):
    """mapping[key], which must be a JSON boolean: "false" is a non-empty string, not False."""
    if key not in mapping and default is not None:
        return default
    value = mapping[key]
    if type(value) is not bool:
        raise TypeError(f"{key} must be true or false, got {value!r}")
    return value


def _optimizer_from_meta(o):
    """The optimizer a trainer file describes, hyper-parameters and step count checked."""
    if not isinstance(o, dict) or not isinstance(o.get("config"), dict):
        raise TypeError(f"optimizer must be a mapping with a 'config' mapping, got {o!r:.200}")
    cfg, name = o["config"], o.get("name")
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(OPTIMIZERS)}")
    for key in ("nesterov", "decoupled", "sklearn_style"):
        if key in cfg:
            _flag(cfg, key)
    opt = OPTIMIZERS[name].from_config(cfg)
    opt.decay_bias = _flag(cfg, "decay_bias", True)
    opt.decay_per_sample = _flag(cfg, "decay_per_sample", False)
    opt.step_count = check_positive_int(o["step_count"], "step_count", minimum=0, maximum=MAX_STEP_COUNT)
    return opt


def _optimizer_state(archive, opt, net, epochs_done):
    """The optimizer's state arrays from the archive, or None when it has none to carry.

    An optimizer that keeps state (momentum; Adam's moments) and has taken a step
    must find it in the file, else a resumed fit would silently differ. The file's
    list of members (written by every save since it was introduced) says which
    state arrays it holds; a member gone missing is refused by that list. Adam
    counts its steps, so an Adam file without state is refused whenever its step
    count is not 0. SGD does not count them: a listed file without momentum was
    saved without it (say, the optimizer was replaced after a fit), and an older
    unlisted one, which cannot tell, is loaded with a warning when it has trained.
    """
    present = {n for n in archive.names if n.startswith("state_")}
    if not opt.n_state:
        # plain SGD keeps one placeholder array, recreated at its next step: nothing to carry
        if len(present) > 1:
            raise ValueError(f"plain SGD keeps no state, the file holds {sorted(present)}")
        return None
    expected = [f"state_{i}" for i in range(opt.n_state)]
    if not present:
        if opt.step_count:
            raise ValueError(f"the optimizer has taken {opt.step_count} step(s) but its state "
                             f"{expected} is missing from the file")
        if not archive.listed and epochs_done:
            warnings.warn(f"{archive.path!r} predates cprop's member lists and holds no momentum for "
                          f"its SGD after {epochs_done} epoch(s); resuming starts the momentum from zero",
                          UserWarning, stacklevel=3)
        return None
    if present != set(expected):
        raise ValueError(f"optimizer state members {sorted(present)}, expected {expected}")
    states = [archive.read(n, net.dtype, net.params.shape) for n in expected]
    if not all(np.isfinite(s).all() for s in states):
        raise ValueError("optimizer state contains non-finite values")
    if isinstance(opt, Adam) and (states[1] < 0).any():
        # a mean of squared gradients: √v of a negative one is NaN at the first step
        raise ValueError("Adam's second moment (state_1) holds negative values")
    return states


def _rng_state(state):
    """A bit generator's state as saved: a mapping whose leaves are names and
    non-negative integers below 2**128 (numpy itself accepts 1.5 for an integer)."""
    stack = [state]
    if not isinstance(state, dict):
        raise TypeError(f"rng_state must be a mapping, got {state!r:.100}")
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, bool) or not isinstance(item, (str, int)) or (
                isinstance(item, int) and not 0 <= item < 2**128):
            raise ValueError(f"rng_state holds {item!r:.100}; expected names and integers in [0, 2**128)")
    return state


def _history_from_meta(d):
    """History from a file: each field a list of numbers (strings such as "1.5" refused)."""
    if not isinstance(d, dict):
        raise TypeError(f"history must be a mapping, got {type(d).__name__}")
    for k in History.FIELDS:
        values = d.get(k, [])
        if not isinstance(values, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise TypeError(f"history[{k!r}] must be a list of numbers, got {values!r:.100}")
    return History.from_dict(d)


def _is_true(value):
    """A callback's "stop": True or numpy's True; None (no return) and anything else go on."""
    return isinstance(value, (bool, np.bool_)) and bool(value)


class _Progress:
    """Per-epoch progress for fit(verbose=True): a tqdm bar when tqdm is installed, else lines."""

    def __init__(self, epochs, verbose):
        self.bar = None
        self.verbose = bool(verbose)
        if self.verbose:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=epochs, unit="epoch", desc="fit")

    @staticmethod
    def _describe(logs):
        parts = [f"loss {logs['loss']:.4f}"]
        parts += [f"{k} {v:.4f}" for k, v in logs.items() if k.startswith("val_")]
        parts.append(f"{logs['samples_per_second']:,.0f} samples/s")
        return parts

    def update(self, epoch, logs):
        if not self.verbose:
            return
        if self.bar is not None:
            self.bar.set_postfix_str("  ".join(self._describe(logs)), refresh=False)
            self.bar.update(1)
        else:
            print(f"epoch {epoch:4d}  " + "  ".join(self._describe(logs)), flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


