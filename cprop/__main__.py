"""The ``cprop`` command line: demo, info, bench, train, predict.

A mistake a user can make ends the command with one line on stderr,
``cprop COMMAND: error: ...``, and exit status 2 when the command line is wrong
(an option's value, a missing option) or 1 when the data, a file or the training
run is at fault (an unreadable file, text in a feature column, divergence, too
little memory). A traceback means a bug in cprop.
"""
import argparse
import math
import os
import re
import sys
import time

from ._cli_data import Failure, UsageError
from .activations import names as activation_names

DEFAULT_LR = {"sgd": 0.01, "adam": 0.003}
# the losses of real-valued targets (cprop.losses.TABLE's "values"), which train standardises
REGRESSION_LOSSES = ("mse", "l1", "huber")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in the command line's one-line form."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# -- option types: argparse turns their ArgumentTypeError into "argument --x: must be ..." --------

def _ascii_int(text):
    """int(text) for ASCII digits only: int() also takes '٣', '1_000' and '+5'."""
    if not isinstance(text, str) or not re.fullmatch(r"\s*-?[0-9]+\s*", text, re.ASCII):
        raise ValueError(f"not an integer: {text!r}")
    return int(text)


def _ascii_float(text):
    """float(text) for ASCII decimal numbers only: float() also takes '1_0', digits of other
    scripts and 'infinity'."""
    if not isinstance(text, str) or not re.fullmatch(r"\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*",
                                                     text, re.ASCII):
        raise ValueError(f"not a number: {text!r}")
    return float(text)


def _option(text, kind, fits, expected):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not fits(value):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def _count(text):
    return _option(text, _ascii_int, lambda v: v >= 1, "an integer >= 1")


def _seed(text):
    return _option(text, _ascii_int, lambda v: v >= 0, "an integer >= 0")


def _positive(text):
    return _option(text, _ascii_float, lambda v: math.isfinite(v) and v > 0, "a number > 0")


def _fraction(text):
    return _option(text, _ascii_float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def _hidden_sizes(text):
    try:
        sizes = [_ascii_int(h) for h in text.split(",")]
    except ValueError:
        raise UsageError(f"--hidden must be comma-separated integers like 128,64 (at least one, "
                         f"none empty), got {text!r}") from None
    if any(h <= 0 for h in sizes):
        raise UsageError(f"--hidden sizes must be positive, got {text!r}")
    return sizes


def _check_threads(n_threads):
    from ._threads import MAX_THREADS
    if n_threads is not None and n_threads > MAX_THREADS:
        raise UsageError(f"--threads must be <= {MAX_THREADS}, got {n_threads}")


def _check_network_size(sizes, dtype, n_state, batch_size, option, batch_option="--batch-size"):
    """UsageError, before anything is allocated, for a network too large for this machine's
    memory: its parameters, gradients and `n_state` optimizer arrays, and the activations.
    It blames `option` (the widths) unless the network fits with the default batch size,
    and then `batch_option`."""
    import numpy as np

    from ._cli_data import available_memory
    from ._validation import MAX_SIZE
    if max(sizes) > MAX_SIZE:
        raise UsageError(f"{option}: layer widths must be <= {MAX_SIZE:,}, got {max(sizes):,}")
    if batch_size > MAX_SIZE:
        raise UsageError(f"{batch_option} must be <= {MAX_SIZE:,}, got {batch_size:,}")
    n_params = sum((n_in + 1) * n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))
    itemsize = np.dtype(dtype).itemsize
    # activations: a training batch plus the inference chunks of predict/evaluate (both threads' worth)
    network = (n_params * (2 + n_state) + 4 * 4096 * sum(sizes)) * itemsize
    needed = (n_params * (2 + n_state) + 4 * max(batch_size, 4096) * sum(sizes)) * itemsize
    available = available_memory()
    if available is None or needed <= available:
        return
    if network > available:
        raise UsageError(f"{option} makes a {'-'.join(map(str, sizes))} network of {n_params:,} parameters, "
                         f"which needs about {_gib(network)} of memory; {_gib(available)} is available")
    raise UsageError(f"{batch_option} {batch_size:,}: batches that large through a "
                     f"{'-'.join(map(str, sizes))} network need about {_gib(needed)} of memory; "
                     f"{_gib(available)} is available")


def _gib(n_bytes):
    return f"{n_bytes / 2**30:,.1f} GiB"


def _check_out(path, option="--out"):
    """Failure when `path` cannot be written: checked before any training, not after."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise Failure(f"cannot write {option} {path!r}: directory {directory!r} does not exist")
    if os.path.isdir(path):
        raise Failure(f"cannot write {option} {path!r}: it is a directory")
    if not os.access(directory, os.W_OK):
        raise Failure(f"cannot write {option} {path!r}: directory {directory!r} is not writable")


def _say(args, *text):
    if not args.quiet:
        print(*text, flush=True)


# -- commands ----------------------------------------------------------------------------------

def _demo(args):
    import numpy as np

    import cprop

    _check_threads(args.threads)
    _check_network_size([64, args.hidden, 10], "float32", 1, 32, f"--hidden {args.hidden}")
    X, y = cprop.datasets.load_digits()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(X))
    n_test = len(X) // 5
    test, train = order[:n_test], order[n_test:]
    net = cprop.Sequential([cprop.Dense(64, args.hidden, "relu"), cprop.Dense(args.hidden, 10)],
                           seed=args.seed)
    trainer = cprop.Trainer(net, loss="cross_entropy",
                            optimizer=cprop.SGD(lr=0.05, momentum=0.9),
                            batch_size=32, seed=args.seed, n_threads=args.threads)
    _say(args, f"cprop {cprop.__version__}: training a 64-{args.hidden}-10 relu network on the bundled "
               f"UCI digits ({len(train)} train / {len(test)} held-out samples)")
    start = time.perf_counter()
    history = trainer.fit(X[train], y[train], epochs=args.epochs,
                          validation_data=(X[test], y[test]), verbose=not args.quiet)
    seconds = time.perf_counter() - start
    result = trainer.evaluate(X[test], y[test])
    _say(args, f"held-out accuracy {result['accuracy']:.2%}  loss {result['loss']:.4f}")
    _say(args, f"training speed {np.median(history.samples_per_second):,.0f} samples/s (median epoch); "
               f"{args.epochs} epochs took {sum(history.time):.3f} s, {seconds:.3f} s with validation "
               f"and start-up")
    return 0


def _info(args):
    from threadpoolctl import threadpool_info

    import cprop

    from ._lazy import core

    cprop.show_config()
    for pool in threadpool_info():
        version = pool.get("version")
        if version is None and pool.get("user_api") == "openmp":
            # libgomp does not report its version; the OpenMP API cprop was compiled for
            version = _openmp_api(getattr(core, "OPENMP_VERSION", 0))
        version = f" {version}" if version else ""
        print(f"    pool: {pool.get('internal_api')}{version} "
              f"threads={pool.get('num_threads')} {pool.get('filepath')}")
    return 0


# the _OPENMP macro's value (yyyymm of the specification) and the version it names
OPENMP_API = {200505: "2.5", 200805: "3.0", 201107: "3.1", 201307: "4.0", 201511: "4.5",
              201811: "5.0", 202011: "5.1", 202111: "5.2", 202411: "6.0"}


def _openmp_api(macro):
    if not macro:
        return None
    return f"(OpenMP {OPENMP_API.get(macro, macro)} API, _OPENMP={macro})"


# environment variables that MPI launchers (Open MPI, MPICH/Hydra, PMIx, Slurm's srun) set
_LAUNCHER_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def _launched_ranks():
    """How many processes an MPI launcher started with this one (1 when none did)."""
    for name in _LAUNCHER_SIZE:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    # Slurm's `srun --mpi=pmix` wires PMIx (PMIX_RANK) but sets no size of PMIx's own: take the
    # step's task count then, and only then (a shell inside an allocation has it as well)
    value = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    if "PMIX_RANK" in os.environ and value.isdigit():
        return int(value)
    return 1


def _cli_comm(mode):
    """The communicator `cprop train` trains over: COMM_WORLD when launched by mpiexec/srun with
    more than one process (--mpi auto) or asked to (--mpi yes), else None."""
    if mode == "no" or (mode == "auto" and _launched_ranks() <= 1):
        return None
    try:
        MPI = _import_mpi()
    except ImportError:
        raise UsageError(
            f"{'--mpi yes' if mode == 'yes' else f'launched as {_launched_ranks()} MPI processes'} needs "
            "mpi4py (pip install 'cprop[mpi]'); --mpi no trains each process on its own") from None
    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def _import_mpi():
    """mpi4py.MPI, imported (MPI_Init) with Ctrl-C held back until the import is over: an
    interrupt inside it would leave MPI started and no module to abort the job with."""
    import signal
    held = []
    # held only over Python's own handlers (an ignored SIGINT stays ignored; a handler
    # installed outside Python, which signal.getsignal reports as None, stays as it is)
    previous = signal.getsignal(signal.SIGINT) if _in_main_thread() else None
    hold = previous is not None and previous is not signal.SIG_IGN
    if hold:
        signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        from mpi4py import MPI
    finally:
        if hold:
            signal.signal(signal.SIGINT, previous)
    if held:
        _abort_mpi_job(130)
        raise KeyboardInterrupt
    return MPI


def _in_main_thread():
    import threading
    return threading.current_thread() is threading.main_thread()


def _abort_mpi_job(status):
    """MPI_Abort, when this process started MPI: its exit alone would leave the other ranks
    waiting (in their next collective, or in MPI_Finalize) forever."""
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized():
        print(f"cprop: rank {MPI.COMM_WORLD.Get_rank()} interrupted while MPI started: "
              "aborting the MPI job (MPI_Abort)", file=sys.stderr, flush=True)
        MPI.COMM_WORLD.Abort(status)


def _as_cli_error(exc):
    """An anticipated exception as the UsageError (exit status 2) or Failure (1) whose message
    main() prints; None for a bug."""
    from .io import CpropFileError
    from .trainer import DivergenceError
    if isinstance(exc, (UsageError, Failure)):
        return exc
    if isinstance(exc, (CpropFileError, DivergenceError)):
        return Failure(str(exc))
    if isinstance(exc, OSError):
        return Failure(_describe_os_error(exc))
    if isinstance(exc, MemoryError):
        return Failure(f"out of memory ({exc})" if str(exc) else "out of memory")
    return None


def _agree(comm, error):
    """Raise on every rank the first error any rank had (every rank calls this at the same
    point: an error on one rank alone would leave the others waiting in the next collective)."""
    if comm is not None:
        gathered = comm.allgather(None if error is None else (isinstance(error, UsageError), str(error)))
        first = next(((r, g) for r, g in enumerate(gathered) if g is not None), None)
        if first is not None and error is None:
            rank, (usage, message) = first
            error = (UsageError if usage else Failure)(f"(rank {rank}) {message}")
    if error is not None:
        from .distributed import _every_rank
        raise _every_rank(error)       # agreed: every rank raises it


def _train(args):
    """`cprop train`; under MPI (mpiexec/srun, or --mpi yes) one training over every rank,
    rank 0 printing and writing the model."""
    try:
        comm = _cli_comm(args.mpi)
    except KeyboardInterrupt:
        _abort_mpi_job(130)      # Ctrl-C on this rank while MPI started: the others would wait
        raise
    if comm is None:
        return _run_training(args, None)
    from . import distributed
    args.mpi_rank = comm.Get_rank()
    args.quiet = args.quiet or args.mpi_rank != 0
    # what every rank raises alike ends the command on every rank; anything one rank raises
    # alone (Ctrl-C reaching one process, a bug) ends the MPI job, or the others would wait
    with distributed.abort_on_error(distributed.Ranks(comm), "cprop train"):
        return _run_training(args, comm)


def _run_training(args, comm):
    from .distributed import _every_rank
    from .trainer import DivergenceError
    prepared, error = None, None
    try:
        prepared = _prepare_training(args, comm)
    except Exception as exc:
        error = _as_cli_error(exc)
        if error is None:
            raise
    _agree(comm, error)
    trainer, X, y, loss, lr, scaled = prepared
    held_out = None
    if args.validation_split:
        # the rows fit(validation_split=...) would hold out (the same draw of the trainer's
        # generator), split here so that the last line can score them
        import numpy as np
        perm = trainer.rng.permutation(len(X))
        n_val = int(round(args.validation_split * len(X)))
        rows, held = np.sort(perm[n_val:]), np.sort(perm[:n_val])
        X, y, held_out = X[rows], y[rows], (X[held], y[held])
    try:
        trainer.fit(X, y, epochs=args.epochs, validation_data=held_out, verbose=not args.quiet)
    except DivergenceError as exc:   # under MPI every rank raises it together
        raise _every_rank(Failure(
            f"training diverged in epoch {trainer.epochs_done + 1}: the loss or an update became "
            f"infinite or NaN, and nothing was saved. The {scaled} are already standardised; "
            f"lower the learning rate: --lr {lr / 10:g} (it was {lr:g})")) from exc
    error = None
    if trainer.rank == 0:          # one writer; the other ranks learn whether it worked
        try:
            trainer.save(args.out)
        except Exception as exc:
            error = _as_cli_error(exc)
            if error is None:
                raise
    _agree(comm, error)
    score = _training_score(trainer, X, y, loss)      # collective under MPI
    if held_out is not None:
        score += f", held-out {_training_score(trainer, *held_out, loss)}"
    _say(args, f"training-set {score}; saved {args.out}"
               + (f" (trained over {comm.Get_size()} MPI ranks)" if comm is not None else ""))
    return 0


def _prepare_training(args, comm):
    """Everything before the fit: options checked, data read and scaled, the trainer made;
    (trainer, X, y, loss, lr, what was scaled)."""
    import numpy as np

    import cprop

    from . import _cli_data as data

    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    sizes_hidden = _hidden_sizes(args.hidden)
    _check_threads(args.threads)
    _check_out(args.out)
    needs_target = UsageError("train needs a target: --target COLUMN (CSV) or an array 'y' (NPZ)")
    if args.target is None and os.path.isfile(args.data) and data.is_csv(args.data):
        raise needs_target       # a CSV has no default target column
    table = data.read_table(args.data, args.target)
    if table.y is None:
        raise needs_target
    X, y = table.X, table.y
    if y.dtype.kind != "U":
        data.check_finite_target(table)
    loss = _choose_loss(args.loss, table)
    extra = {"features": table.names, "target": table.target}
    if loss == "cross_entropy":
        classes, y = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise Failure(f"{args.data!r}: the target {table.target!r} has a single class "
                          f"({classes.tolist()[0]!r}); nothing to learn")
        # whole-number labels print as integers; beyond 2**53 a float is not an exact integer
        if classes.dtype.kind == "f" and np.all(classes == np.round(classes)) and np.abs(classes).max() < 2**53:
            classes = classes.astype(np.int64)
        extra["classes"] = classes.tolist()
        n_out = len(classes)
    else:
        y = y.astype(np.float64)
        n_out = 1 if y.ndim == 1 else y.shape[1]
    if args.validation_split:
        n_val = int(round(args.validation_split * X.shape[0]))
        if not 1 <= n_val < X.shape[0]:
            raise UsageError(f"--validation-split {args.validation_split} holds out {n_val} of "
                             f"{X.shape[0]} rows; it must hold out at least one and leave at least one")

    sizes = [X.shape[1]] + sizes_hidden + [n_out]
    optimizer = (cprop.SGD(lr=lr, momentum=0.9, clip_norm=args.clip_norm) if args.optimizer == "sgd"
                 else cprop.Adam(lr=lr, clip_norm=args.clip_norm))
    _check_network_size(sizes, args.dtype, optimizer.n_state, args.batch_size, f"--hidden {args.hidden}")

    # standardise the features, and the targets of a regression (mse, l1, huber), so that one default
    # learning rate fits data on any scale; the model keeps both scalings for predict
    mean, std = data.column_scaling(X)
    extra["mean"], extra["std"] = mean.tolist(), std.tolist()
    X = data.standardize(X, mean, std)
    scaled = "features"
    if loss in REGRESSION_LOSSES:
        columns = y.reshape(len(y), -1)
        y_mean, y_std = data.column_scaling(columns)
        extra["target_mean"], extra["target_std"] = y_mean.tolist(), y_std.tolist()
        y = data.standardize(columns, y_mean, y_std).reshape(y.shape)
        scaled = "features and targets"

    layers = [cprop.Dense(sizes[i], sizes[i + 1], args.activation if i < len(sizes) - 2 else None)
              for i in range(len(sizes) - 1)]
    net = cprop.Sequential(layers, dtype=args.dtype, seed=args.seed)
    trainer = cprop.Trainer(net, loss, optimizer, batch_size=args.batch_size, seed=args.seed,
                            n_threads=args.threads, comm=comm)
    trainer.extra = extra
    _say(args, f"training {'-'.join(map(str, sizes))} ({args.activation}) on {X.shape[0]} samples, "
               f"loss {loss}, {args.optimizer} lr {lr:g}")
    if args.loss == "auto" and loss == "cross_entropy" and table.y.dtype.kind != "U":
        _say(args, f"  (--loss auto: {n_out} classes, as {table.target!r} holds at most 100 distinct "
                   "whole numbers; pass --loss mse, or poisson for counts, to treat it as a number)")
    return trainer, X, y, loss, lr, scaled


def _training_score(trainer, X, y, loss):
    """Accuracy for the classification losses; R² for mse, l1 and huber (unchanged by the
    target's scaling);
    for poisson the deviance explained, D² = 1 - D(y, μ) / D(y, ȳ), with the Poisson deviance
    D(y, μ) = 2 Σ (y·log(y/μ) - (y - μ)) (y·log(y/μ) = 0 where y = 0)."""
    import numpy as np
    if loss == "poisson":
        def deviance(mu):
            with np.errstate(divide="ignore", invalid="ignore"):
                ylog = np.where(y > 0, y * np.log(y / mu), 0.0)
            return 2 * np.sum(ylog - (y - mu))
        null = deviance(np.full(y.shape, y.mean()))
        rate = trainer.predict(X).reshape(y.shape).astype(np.float64)
        return f"D² {1 - deviance(rate) / null:.4f}" if null > 0 else "D² undefined (constant target)"
    if loss not in REGRESSION_LOSSES:
        return f"accuracy {trainer.evaluate(X, y)['accuracy']:.4f}"
    columns = y.reshape(len(y), -1)
    residual = trainer.predict(X).reshape(columns.shape) - columns
    total = np.sum((columns - columns.mean(axis=0)) ** 2)
    return f"R² {1 - np.sum(residual ** 2) / total:.4f}" if total > 0 else "R² undefined (constant target)"


def _choose_loss(loss, table):
    """The loss for --loss (auto: cross_entropy for text labels and whole numbers with
    at most 100 distinct values, mse otherwise); UsageError when the target cannot be used with it."""
    import numpy as np
    y, name = table.y, table.target
    text = y.dtype.kind == "U"
    if loss == "auto":
        if text:
            return "cross_entropy"
        whole = y.dtype.kind in "iub" or bool(np.all(y == np.round(y)))
        return "cross_entropy" if y.ndim == 1 and whole and len(np.unique(y)) <= 100 else "mse"
    if text and loss != "cross_entropy":
        raise UsageError(f"--loss {loss} needs a numeric target; {name!r} holds text labels "
                         f"such as {str(y[0])!r}")
    if loss == "cross_entropy" and y.ndim != 1:
        raise UsageError(f"--loss cross_entropy needs one label per row; {name!r} has shape {y.shape}")
    if loss == "binary_cross_entropy" and not np.all((y == 0) | (y == 1)):
        raise UsageError(f"--loss binary_cross_entropy needs 0/1 targets; {name!r} has other values")
    if loss == "poisson" and not np.all(y >= 0):
        raise UsageError(f"--loss poisson needs counts (targets >= 0); {name!r} holds {float(y.min())!r}")
    return loss


def _positional(names):
    """Whether `names` are the x0, x1, … an NPZ's unnamed columns get (matched by position)."""
    return list(names) == [f"x{i}" for i in range(len(names))]


def _listed(names, most=6):
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _predict(args):
    import numpy as np

    import cprop

    from . import _cli_data as data

    if args.out:
        _check_out(args.out)
    if not os.path.exists(args.model):
        raise Failure(f"{args.model!r}: no such file")
    if os.path.isdir(args.model):
        raise Failure(f"{args.model!r} is a directory, not a model file")
    if _saved_kind(args.model) == "network":
        raise Failure(f"{args.model!r} holds a network saved by Sequential.save, without the "
                      "loss and scalings `cprop predict` needs: predict with a model `cprop train` "
                      "wrote, or load this one in Python (cprop.load) and call predict_raw")
    trainer = cprop.Trainer.load(args.model)
    notes = _model_notes(trainer, args.model)
    # the model's own target column, when the data still holds it, is left out without --target
    table = data.read_table(args.data, args.target, drop=notes["target"])
    X, features = table.X, notes["features"]
    n_features = trainer.net.n_inputs if features is None else len(features)
    if X.shape[1] != n_features:
        if args.target is None and X.shape[1] == n_features + 1:
            raise UsageError("the data has one column more than the model's features: "
                             "name the target column to drop with --target")
        raise Failure(f"the model expects {n_features} features, {args.data!r} has {X.shape[1]}")
    if features is not None and table.names != features and not (
            _positional(features) or _positional(table.names)):
        # columns are matched by name (an NPZ's X, whose columns have none, by position)
        unknown = [n for n in table.names if n not in features]
        missing = [f for f in features if f not in table.names]
        if unknown or missing or len(set(table.names)) != len(table.names):
            raise Failure(f"the columns of {args.data!r} are not the model's features: "
                          + "; ".join(part for part in [
                              f"not in the model: {_listed(unknown)}" if unknown else "",
                              f"missing: {_listed(missing)}" if missing else "",
                              "" if unknown or missing else "a column name repeats"] if part)
                          + " (names are compared exactly, case included)")
        X = X[:, [table.names.index(f) for f in features]]          # same columns, another order
    if notes["mean"] is not None:
        X = data.standardize(X, notes["mean"], notes["std"])
    _check_in_range(X, trainer.net.dtype, table, features or table.names)
    pred = trainer.predict(X)
    if notes["classes"] is not None:
        pred = notes["classes"][pred]
    elif notes["target_mean"] is not None:
        with np.errstate(over="ignore"):
            pred = pred.astype(np.float64).reshape(len(pred), -1) * notes["target_std"] + notes["target_mean"]
        pred = pred[:, 0] if pred.shape[1] == 1 else pred
    lines = [" ".join(str(v) for v in np.atleast_1d(row)) for row in pred]
    if args.out:
        from .io import write_atomically
        text = ("\n".join(lines) + "\n").encode("utf-8")
        try:     # atomically: a failed write leaves any previous file as it was
            write_atomically(args.out, lambda f: f.write(text))
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise Failure(f"cannot write --out {args.out!r}: {reason}") from None
        _say(args, f"wrote {len(lines)} predictions to {args.out}")
    else:
        print("\n".join(lines))
    return 0


# the head that turns each loss's raw outputs into probabilities; other losses take none
_EXPORT_HEADS = {"cross_entropy": "softmax", "binary_cross_entropy": "sigmoid"}


def _saved_kind(path):
    """'network' (Sequential.save) or 'trainer' (Trainer.save, `cprop train`), from the file's
    metadata alone (no array is read); CpropFileError for anything else."""
    from . import io as _io
    with _io.Archive(path, ("network", "trainer")) as archive:
        return archive.meta["kind"]


def _export(args):
    """The network of a saved model as an ONNX file. A `cprop train` model's feature scaling
    goes into the graph, and so does its target scaling (regression): the graph takes the raw
    features and answers what `cprop predict` prints (classes aside: their probabilities)."""
    import cprop

    from . import onnx as cprop_onnx

    _check_out(args.out, "the ONNX file")
    try:
        opset = cprop_onnx.check_opset(args.opset)
    except ValueError as exc:
        raise UsageError(f"--opset: {exc}") from None
    except ImportError as exc:     # onnx not installed: the message says what to install
        raise Failure(str(exc)) from None
    kind = _saved_kind(args.model)
    head = None if args.head == "none" else args.head
    scaling = target_scaling = notes = None
    if kind == "trainer":
        trainer = cprop.Trainer.load(args.model)
        net, notes = trainer.net, _model_notes(trainer, args.model)
        if head is not None and _EXPORT_HEADS.get(trainer.loss) != head:
            fits = _EXPORT_HEADS.get(trainer.loss)
            raise UsageError(f"--head {head} does not fit a model trained with {trainer.loss}: "
                             + (f"its probabilities are --head {fits}" if fits else "it has no head"))
        if notes["mean"] is not None:
            scaling = (notes["mean"], notes["std"])
        if notes["target_mean"] is not None:
            target_scaling = (notes["target_mean"], notes["target_std"])
    else:
        net = cprop.load(args.model)
    try:
        cprop_onnx.export(net, args.out, head=head, opset=opset, standardize=scaling,
                          unstandardize=target_scaling)
    except ValueError as exc:      # what the model holds (a layer ONNX has no form for), or the file
        raise Failure(str(exc)) from None
    output = (cprop_onnx.PROBABILITIES if head is not None
              else cprop_onnx.PREDICTIONS if target_scaling else cprop_onnx.LOGITS)
    dtype = net.architecture()["dtype"]
    said = ["standardises the features as `cprop predict` does"] if scaling else []
    if target_scaling:
        said.append("answers in the target's own units, as `cprop predict` does")
    if notes is not None and notes["classes"] is not None:
        said.append(f"columns are the classes {' '.join(map(str, notes['classes']))}")
    print(f"wrote {args.out}: input {cprop_onnx.INPUT} (N, {net.n_inputs}) {dtype} -> "
          f"{output} (N, {net.n_outputs})" + "".join(f"; {note}" for note in said))
    return 0


def _model_notes(trainer, path):
    """What `cprop train` saved with the model (features, scalings, classes), checked against the
    network; None for what a model written by the Python API lacks."""
    import numpy as np
    extra, net = trainer.extra, trainer.net
    notes = {}
    try:
        features = extra.get("features")
        notes["features"] = None if features is None else [str(f) for f in features]
        notes["target"] = extra.get("target") if isinstance(extra.get("target"), str) else None
        for key, n in [("mean", net.n_inputs), ("std", net.n_inputs),
                       ("target_mean", net.n_outputs), ("target_std", net.n_outputs)]:
            value = extra.get(key)
            notes[key] = None if value is None else np.asarray(value, dtype=np.float64).reshape(n)
        for mean, std in [("mean", "std"), ("target_mean", "target_std")]:
            if (notes[mean] is None) != (notes[std] is None):
                raise ValueError(f"{mean} and {std} come together")
            if notes[mean] is not None and not (np.isfinite(notes[mean]).all() and np.isfinite(notes[std]).all()
                                                and (notes[std] > 0).all()):
                raise ValueError(f"{mean} and {std} must be finite, every {std} > 0")
        if notes["target_mean"] is not None and trainer.loss not in REGRESSION_LOSSES:
            raise ValueError(f"a target scaling on a {trainer.loss} model (`cprop train` scales the "
                             f"targets of {', '.join(REGRESSION_LOSSES)} only)")
        classes = extra.get("classes")
        notes["classes"] = None if classes is None else np.asarray(classes)
        if notes["classes"] is not None and (notes["classes"].shape != (net.n_outputs,)
                                             or trainer.loss != "cross_entropy"):
            raise ValueError(f"{len(classes)} classes for {net.n_outputs} outputs")
        if notes["features"] is not None and len(notes["features"]) != net.n_inputs:
            raise ValueError(f"{len(features)} feature names for {net.n_inputs} inputs")
    except (TypeError, ValueError) as exc:
        raise Failure(f"{path!r}: the notes `cprop train` keeps with a model are damaged ({exc})") from None
    return notes


def _check_in_range(X, dtype, table, names):
    """Failure when standardised features are beyond what the network's dtype holds:
    values far outside anything seen in training."""
    import numpy as np
    limit = np.finfo(dtype).max
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(X) <= limit)
    if bad.any():
        row, j = np.argwhere(bad)[0]
        raise Failure(f"{table.path!r}: feature {names[j]!r} on {table.where(row)} is so far from the values "
                      f"the model was trained on that it is beyond {np.dtype(dtype).name} once standardised")


def _bench(args):
    from . import bench
    try:
        return bench.run(args)
    except (ValueError, ImportError) as exc:
        # bench validates its options as it goes (unknown workload, peer not installed)
        raise UsageError(str(exc)) from None


# -- the parser --------------------------------------------------------------------------------

def build_parser():
    parser = _Parser(prog="cprop", description="Fast CPU training of multi-layer perceptrons.",
                     epilog="Errors print one line; exit status 2 for a wrong command line, "
                            "1 for unusable data or files or a diverged training run.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"cprop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="train on the bundled digits; print accuracy and speed",
                       description="Train a 64-H-10 relu network on the bundled UCI digits, "
                                   "print held-out accuracy and samples/s.")
    p.add_argument("--epochs", type=_count, default=30, help="training epochs (default 30)")
    p.add_argument("--hidden", type=_count, default=64, help="hidden width H (default 64)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=_count, default=None, help="kernel threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=_demo)

    p = sub.add_parser("train", help="train a network on a CSV or NPZ file and save it",
                       description="Train an MLP on tabular data (CSV with a header row, or NPZ with "
                                   "arrays X and y). Features are standardised, and so are the targets "
                                   "of a regression; the model file keeps the scalings and the class "
                                   "labels (numbers or text) for `cprop predict`.")
    p.add_argument("data", help="CSV (header row; numeric features, the target may be text labels) or NPZ")
    p.add_argument("--target", help="target column name or index (CSV), or array name (NPZ, default y)")
    p.add_argument("--hidden", default="64", help="hidden layer widths, comma-separated (default 64)")
    p.add_argument("--activation", default="relu", choices=activation_names(),
                   help="the hidden layers' activation (default relu)")
    p.add_argument("--loss", default="auto", choices=["auto", "cross_entropy", "mse", "binary_cross_entropy",
                                                      "poisson", "l1", "huber"],
                   help="default: cross_entropy for text labels and for whole numbers with at most 100 "
                        "distinct values, mse otherwise")
    p.add_argument("--epochs", type=_count, default=50, help="training epochs (default 50)")
    p.add_argument("--batch-size", type=_count, default=32, help="minibatch size (default 32)")
    p.add_argument("--optimizer", default="adam", choices=["sgd", "adam"],
                   help="adam (default, lr 0.003) or sgd (momentum 0.9, lr 0.01)")
    p.add_argument("--lr", type=_positive, default=None, help="learning rate (default per optimizer)")
    p.add_argument("--clip-norm", type=_positive, default=None,
                   help="clip each step's gradient to this global norm (default: no clipping)")
    p.add_argument("--validation-split", type=_fraction, default=0.0,
                   help="fraction held out to report val_loss (default 0: none)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="floating-point type of the network and data (default float32)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed of the initial weights, shuffling and split (default 0)")
    p.add_argument("--threads", type=_count, default=None, help="kernel threads (default: all cores)")
    p.add_argument("--out", default="model.npz", help="where to save the trained model (default model.npz)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--mpi", default="auto", choices=["auto", "yes", "no"],
                   help="train over MPI, every process reading the same data, rank 0 printing and "
                        "writing (needs mpi4py): auto (default) when launched by mpiexec or srun with "
                        "more than one process")
    p.set_defaults(func=_train)

    p = sub.add_parser("predict", help="predict with a model saved by `cprop train`",
                       description="Print (or write) one prediction per row of DATA: class labels "
                                   "as given in training, or values in the target's own units.")
    p.add_argument("model", help="a model file written by `cprop train`")
    p.add_argument("data", help="CSV (header row) or NPZ file with the same feature columns")
    p.add_argument("--target", help="a target column to ignore, if DATA has one")
    p.add_argument("--out", help="write predictions here instead of printing them")
    p.add_argument("--quiet", action="store_true",
                   help="print nothing but errors (and the predictions, without --out)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("export", help="write a saved model as an ONNX file (needs cprop[onnx])",
                       description="Write the network of a model saved by `cprop train` (feature scaling "
                                   "included) or Sequential.save as an ONNX model, for ONNX Runtime.")
    p.add_argument("model", help="a model file written by `cprop train` or Sequential.save")
    p.add_argument("out", help="the ONNX file to write")
    p.add_argument("--head", default="none", choices=["none", "softmax", "sigmoid"],
                   help="append softmax or sigmoid: output probabilities instead of logits (default none)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset version, 13 and up (default 17, cprop.onnx.DEFAULT_OPSET)")
    p.set_defaults(func=_export)

    p = sub.add_parser("info", help="version, OpenMP, SIMD build, threads and BLAS in use",
                       description="Show how cprop was built and which threads and BLAS it uses.")
    p.set_defaults(func=_info)

    p = sub.add_parser("bench", help="compare training speed against PyTorch, JAX, scikit-learn and NumPy",
                       description="Time one-epoch training of the standard workloads for cprop and "
                                   "every installed peer, in alternation, and print median samples/s.")
    try:
        from . import bench
        bench.add_arguments(p)
    except ImportError:
        pass
    p.set_defaults(func=_bench)
    return parser


def _describe_os_error(exc):
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename!r}: {exc.strerror}"
    return str(exc)


def main(argv=None):
    """Run the command line on `argv` (default sys.argv[1:]); the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except BrokenPipeError:
        # the reader of stdout went away (`cprop predict ... | head`): not an error to report;
        # stdout goes to devnull so that the interpreter's final flush does not complain either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"cprop {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        error = _as_cli_error(exc)
        if error is None:          # not anticipated: a bug, with its traceback
            raise
        message, status = str(error), 2 if isinstance(error, UsageError) else 1
    if getattr(args, "mpi_rank", 0) == 0:       # under MPI every rank fails alike; rank 0 says why
        print(f"cprop {args.command}: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
