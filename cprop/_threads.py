"""Thread control: cprop's own OpenMP threads, and keeping BLAS to one thread.

cprop splits every large matrix product between its own OpenMP threads and
calls BLAS single-threaded inside each: two thread pools spinning on the same
cores (OpenBLAS's and OpenMP's) make training many times slower. So while a
kernel runs, the BLAS the core's products call (scipy's) is held at one
thread through threadpoolctl, and put back afterwards.

Thread counts: an explicit ``n_threads``, else :func:`set_num_threads`'s value,
else OpenMP's default (``OMP_NUM_THREADS``, or the cores this process may run
on); an OpenMP limit lowered at run time (threadpoolctl's ``threadpool_limits``)
caps the last two. None of them goes beyond :func:`thread_cap` (4 threads per
usable core): more threads only wait for each other, and thousands exhaust
memory or make OpenMP end the process.

On a busy machine a fit's threads can stall each other: see
:class:`ThreadFallback` and :func:`openmp_environment`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings

from ._lazy import core as _core
from ._validation import check_positive_int

_num_threads = None
# the largest thread count accepted as a setting at all (larger ones are refused as
# mistakes); counts up to it are then capped at thread_cap()
MAX_THREADS = 4096
THREADS_PER_CORE = 4
_lock = threading.Lock()
_blas_users = 0
_blas_limit = None       # threadpoolctl's limit of the BLAS at one thread, from the first user to the last
_blas = None             # (threadpoolctl's controller of the BLAS the core calls, release), made once


def _scipy_folders():
    """Folders of scipy's install (the package and its wheel's ``scipy.libs``), found without
    importing scipy."""
    spec = importlib.util.find_spec("scipy")
    packages = [os.path.realpath(folder) for folder in (spec.submodule_search_locations or [])] if spec else []
    return [folder for package in packages for folder in (package, package + ".libs")]


def _blas_controller():
    """threadpoolctl's ThreadpoolController over the BLAS the core's products call.

    Made once, after the core loaded (binding its sgemm/dgemm loads scipy's BLAS;
    threadpoolctl only sees libraries already loaded): listing the loaded
    libraries anew costs about a millisecond. That is the library scipy ships
    when threadpoolctl finds one inside scipy's install (numpy's own copy of
    OpenBLAS is left alone, as the products never call it), else every BLAS
    threadpoolctl finds (a scipy linked to a system BLAS).
    """
    global _blas
    if _blas is None:
        _core.module()   # binding the core's BLAS loads the library (without importing scipy.linalg)
        from threadpoolctl import OpenBLASController, ThreadpoolController

        blas = ThreadpoolController().select(user_api="blas")
        scipy = tuple(os.path.join(folder, "") for folder in _scipy_folders())
        own = [lib.filepath for lib in blas.lib_controllers
               if os.path.realpath(lib.filepath).startswith(scipy)]
        if own:
            blas = blas.select(filepath=own)
        # threadpoolctl 3.7 and later let only the thread that last set a process-wide
        # OpenBLAS limit set it again, until that thread clears its claim; cprop's first
        # user sets the limit and its last user, maybe in another thread, restores it
        release = getattr(OpenBLASController, "clear_controlling_thread", lambda: None)
        _blas = blas, release
    return _blas[0]


def blas_info():
    """Path of the BLAS library cprop holds at one thread, or None when threadpoolctl finds none."""
    libraries = _blas_controller().lib_controllers
    return libraries[0].filepath if libraries else None


@contextlib.contextmanager
def single_threaded_blas():
    """Hold BLAS at one thread for the duration (re-entrant and thread-safe).

    The first of overlapping users (nested, or fits in several threads) sets the
    limit and the last puts the previous thread counts back: a fit that ends
    while another runs leaves it single-threaded BLAS. A Python thread inside
    the user's own ``threadpool_limits`` block keeps threadpoolctl's claim on
    OpenBLAS, and a fit in another thread meanwhile leaves BLAS as that block set it.
    """
    global _blas_users, _blas_limit
    controller = _blas_controller()
    release = _blas[1]
    with _lock:
        if _blas_users == 0:
            _blas_limit = controller.limit(limits=1)
            release()
        _blas_users += 1
    try:
        yield
    finally:
        with _lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limit.restore_original_limits()
                _blas_limit = None
                release()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells, else all)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def thread_cap() -> int:
    """The most threads cprop runs: THREADS_PER_CORE per usable core."""
    return THREADS_PER_CORE * usable_cores()


def _capped(n, source):
    """n, or thread_cap() with a warning naming `source` when n is larger."""
    cap = thread_cap()
    if n <= cap:
        return n
    warnings.warn(f"cprop: {source} asks for {n} threads, more than {THREADS_PER_CORE} per usable "
                  f"core ({usable_cores()}): using {cap}", RuntimeWarning, stacklevel=3)
    return cap


# omp_get_max_threads() when cprop's core was loaded: OMP_NUM_THREADS or the cores
_openmp_default = None


def _openmp_threads():
    """OpenMP's thread count for this thread now, and whether it was lowered at run time
    (omp_set_num_threads, as threadpoolctl does) below its value when the core loaded."""
    n = max(1, _core.max_threads())
    default = _openmp_default if _openmp_default is not None else n
    return n, n < default


def get_num_threads() -> int:
    """Threads cprop's kernels use when no ``n_threads`` is given.

    :func:`set_num_threads`'s value, else OpenMP's default (``OMP_NUM_THREADS``,
    or the usable cores); a lower OpenMP limit set at run time, such as
    threadpoolctl's ``threadpool_limits(1)``, caps either. At most
    :func:`thread_cap`; a larger ``OMP_NUM_THREADS`` is capped with a warning. 1 in a
    process made by fork(), where libgomp's thread pool is gone.
    """
    if _forked:
        return 1
    openmp, lowered = _openmp_threads()
    if _num_threads is None:
        return _capped(openmp, "OMP_NUM_THREADS")
    return min(_num_threads, openmp) if lowered else _num_threads


def set_num_threads(n: int | None) -> None:
    """Set how many threads cprop's kernels use.

    Parameters
    ----------
    n : int in [1, 4096] or None
        None goes back to the default: ``OMP_NUM_THREADS`` when set, else all
        usable cores. Counts above :func:`thread_cap` (4 per usable core) are
        capped at it, with a RuntimeWarning.
    """
    global _num_threads
    if n is None:
        _num_threads = None
        return
    n = check_positive_int(n, "n_threads", maximum=MAX_THREADS)
    _num_threads = _capped(n, f"set_num_threads({n})")


@contextlib.contextmanager
def num_threads(n):
    """set_num_threads(n) for the duration, then the previous setting back (unset included)."""
    global _num_threads
    saved = _num_threads
    set_num_threads(n)
    try:
        yield
    finally:
        _num_threads = saved


def resolve_threads(n_threads):
    """An explicit n_threads (capped at thread_cap()), or the global setting; 1 in a build
    without OpenMP, in a process made by fork(), and inside a compiled epoch (see
    :func:`compiled_epoch`)."""
    if n_threads is not None:
        n_threads = check_positive_int(n_threads, "n_threads", maximum=MAX_THREADS)
    if not _core.OPENMP or epoch_network() is not None or _forked:
        return 1
    if n_threads is None:
        return get_num_threads()
    return _capped(n_threads, f"n_threads={n_threads}")


# libgomp's thread pool does not survive fork(): a forked child (multiprocessing's
# default start method on Linux) that opens a parallel region after the parent had one
# waits for pool threads that do not exist. A forked child runs cprop on one thread.
_forked = False


def _after_fork_in_child():
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# the network whose compiled epoch this thread is running, if any
_epoch = threading.local()


@contextlib.contextmanager
def compiled_epoch(net):
    """Mark this thread as running `net`'s compiled training epoch.

    The epoch takes the GIL every SIGNAL_CHECK_SECONDS to run Python's signal handlers,
    from inside its parallel region. cprop called from such a handler runs on one
    thread (:func:`resolve_threads`): a parallel region nested in the epoch's would
    reset this thread's team barrier and leave the epoch's threads waiting for good.
    And `net` itself refuses to be trained meanwhile (Sequential._training)."""
    previous = getattr(_epoch, "net", None)
    _epoch.net = net
    try:
        yield
    finally:
        _epoch.net = previous


def epoch_network():
    """The network whose compiled epoch this thread is inside (from a signal handler), or None."""
    return getattr(_epoch, "net", None)


# -- busy machines -----------------------------------------------------------------
# A fit falls back to one thread when, over a window of at least this many seconds of
# epochs, its threads together got less work done than one thread alone would have
STALL_WINDOW_SECONDS = 0.05


class ThreadFallback:
    """The thread count of each epoch of one fit, and its fall-back to one thread.

    With ``n_threads=None`` the fit starts on :func:`get_num_threads` threads and
    goes on with one when they stall each other; an explicit count is kept as
    given (so that a fit repeats bit for bit: results differ between thread
    counts in the last bits).

    The epoch's threads meet at barriers twice a minibatch. When other processes
    take the cores, a descheduled thread holds up every other at the next
    barrier, and two threads can train several times slower than one. After
    every multi-threaded epoch the compiled core reports the CPU time its
    threads worked (spinning at barriers not counted) and the share of a CPU
    they got while runnable. Over a window of at least STALL_WINDOW_SECONDS of
    epochs, the team's work is set against what one thread would have done in
    the same time with that share of a CPU (a thread alone never waits for
    another); when it is less, the rest of the fit runs on one thread. On a
    quiet machine the team works about speed-up x the time, and one thread
    would have had the whole CPU.
    """

    def __init__(self, n_threads: int | None) -> None:
        self.adaptive = n_threads is None
        self.n_threads = resolve_threads(n_threads)
        self.fell_back = False
        self._elapsed = self._worked = self._one_thread = 0.0
        _core.take_team_stats()   # forget epochs before this fit

    def after_epoch(self, seconds: float) -> int:
        """Account an epoch that took `seconds`; returns the thread count for the next one."""
        threads, _, worked, share = _core.take_team_stats()
        if threads > 1 and self.adaptive and not self.fell_back:
            self._elapsed += seconds
            self._worked += worked
            self._one_thread += share * seconds
            if self._elapsed >= STALL_WINDOW_SECONDS:
                if self._worked < self._one_thread:
                    self.n_threads, self.fell_back = 1, True
                self._elapsed = self._worked = self._one_thread = 0.0
        return self.n_threads


# libgomp's own waits (a pool thread between two parallel regions, the barrier that
# ends a region) spin GOMP_SPINCOUNT pauses before they sleep: 300,000 by default, tens
# of milliseconds (benchmarks/README.md). Between two epochs that keeps a thread
# spinning through the Python in between, and on a machine whose cores are shared it is
# then descheduled just when the next epoch needs it. libgomp reads the variable once,
# when it loads, so cprop sets it while its core loads (unless the user chose a wait
# policy) and puts the environment back afterwards.
GOMP_SPINCOUNT = "1000"
_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_openmp_wait = None


def _libgomps():
    """The libgomp libraries loaded in this process (as threadpoolctl finds them: a system
    libgomp.so.1, or a wheel's vendored libgomp-<hash>)."""
    from threadpoolctl import ThreadpoolController

    return {os.path.realpath(lib.filepath)
            for lib in ThreadpoolController().select(prefix="libgomp").lib_controllers}


@contextlib.contextmanager
def openmp_environment():
    """For the import of cprop's core: GOMP_SPINCOUNT set for libgomp, then the environment
    as it was; records what applies (see :func:`openmp_wait_info`).

    Whether the setting reached cprop's libgomp shows afterwards: the core's import
    loaded a libgomp that was not there before, and that one read the environment.
    Otherwise the core uses one already loaded under the same name (torch's
    libgomp.so.1, say), which read it before.
    """
    global _openmp_wait, _openmp_default
    user = [f"{name}={os.environ[name]}" for name in _WAIT_VARIABLES if name in os.environ]
    before = _libgomps()
    if not user:
        os.environ["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
    try:
        yield
    finally:
        if not user:
            os.environ.pop("GOMP_SPINCOUNT", None)
    after = _libgomps()
    if user:
        _openmp_wait = f"{', '.join(user)} (set by the user)"
    elif after - before:
        _openmp_wait = f"GOMP_SPINCOUNT={GOMP_SPINCOUNT} (set by cprop while loading libgomp)"
    elif after:
        _openmp_wait = ("libgomp's default spinning: it was loaded before cprop's core "
                        "(set OMP_WAIT_POLICY=passive before starting Python to change it)")
    else:
        _openmp_wait = "the OpenMP runtime's own default (cprop's core did not load libgomp)"
    _openmp_default = max(1, _core.max_threads())


def openmp_wait_info():
    """How OpenMP's own waits are set: by the user, by cprop, or libgomp's default."""
    if not _core.OPENMP:   # loads the core
        return None
    return _openmp_wait
