"""Threads: the cap on thread counts, the drop-ins' n_threads, threadpoolctl's and joblib's
limits, cprop's own barrier (results, team statistics, short-handed teams) and the fall-back
to one thread when a fit's threads stall each other. Whatever could end the interpreter (a
thread count OpenMP cannot create, a barrier that never opens) runs in a subprocess."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import threadpoolctl
from numpy.testing import assert_allclose, assert_array_equal

import cprop
from cprop import _threads
from cprop._lazy import core as _core

from conftest import TOLERANCES, make_net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_openmp = pytest.mark.skipif(not _core.OPENMP, reason="built without OpenMP")


def run_python(script, env=None, timeout=180):
    """Run `script` in a fresh interpreter on this checkout; its last stdout line as JSON,
    and its stderr. A crash, a non-zero exit or a hang fails the test, not pytest."""
    env = dict(os.environ, **(env or {}))
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the interpreter did not finish in {timeout} s")
    how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with {proc.returncode}"
    assert proc.returncode == 0, f"the interpreter {how}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture
def restore_threads():
    saved = _threads._num_threads
    yield
    _threads._num_threads = saved


@pytest.fixture
def epoch_threads(monkeypatch):
    """The n_threads every compiled epoch is called with, in order."""
    calls = []
    real = _core.train_epoch

    def train_epoch(*args, **kwargs):
        calls.append(args[4]["n_threads"])   # train_epoch(table, hyper, row_width, n_bstats, settings, ...)
        return real(*args, **kwargs)

    monkeypatch.setattr(_core, "train_epoch", train_epoch)
    return calls


def classification(n=600, n_features=100, n_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, n_features)), rng.integers(0, n_classes, n)


# -- the cap on thread counts ---------------------------------------------------------------

def test_thread_cap_is_four_threads_per_usable_core():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert _threads.usable_cores() == cores
    assert _threads.thread_cap() == 4 * cores


def test_set_num_threads_above_the_cap_warns_and_uses_the_cap(restore_threads):
    cap = _threads.thread_cap()
    with pytest.warns(RuntimeWarning, match=f"{cap + 1} threads.*using {cap}"):
        cprop.set_num_threads(cap + 1)
    assert cprop.get_num_threads() == cap
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cprop.set_num_threads(cap)          # the cap itself: no warning
    assert cprop.get_num_threads() == cap


def test_counts_beyond_max_threads_are_refused(restore_threads):
    with pytest.raises(ValueError, match="n_threads"):
        cprop.set_num_threads(_threads.MAX_THREADS + 1)
    with pytest.raises(ValueError, match="n_threads"):
        cprop.Trainer(make_net([4, 3]), n_threads=_threads.MAX_THREADS + 1)


@needs_openmp
def test_explicit_n_threads_above_the_cap_warns_and_runs_capped(epoch_threads):
    cap = _threads.thread_cap()
    X, y = classification(n=64, n_features=8, n_classes=3)
    net = make_net([8, 16, 3])
    with pytest.warns(RuntimeWarning, match=f"n_threads=1000 .*using {cap}"):
        out = net.forward(X, n_threads=1000)
    assert_allclose(out, net.forward(X, n_threads=1), **TOLERANCES[np.float64])
    with pytest.warns(RuntimeWarning, match=f"using {cap}"):
        cprop.Trainer(net, loss="cross_entropy", n_threads=1000).fit(X, y, epochs=2)
    assert epoch_threads == [cap, cap]


# a fit and a prediction big enough that, uncapped, OpenMP would start about 150 threads
# (and thousands for larger data): the process's thread count after them shows the cap
CAPPED_FIT = """
import json, os, warnings
import numpy as np
import cprop
from cprop import _threads
rng = np.random.default_rng(0)
X, y = rng.normal(size=(4096, 64)).astype(np.float32), rng.integers(0, 10, 4096)
net = cprop.Sequential([cprop.Dense(64, 256, "relu"), cprop.Dense(256, 10)], dtype=np.float32)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    cprop.Trainer(net, loss="cross_entropy", batch_size=256, n_threads={n_threads}).fit(X, y, epochs=2)
    net.predict_raw(X, n_threads={n_threads})
print(json.dumps({{"threads": cprop.get_num_threads(), "cap": _threads.thread_cap(),
                  "os_threads": len(os.listdir("/proc/self/task")),
                  "warnings": [str(w.message) for w in caught]}}))
"""


@needs_openmp
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
@pytest.mark.parametrize("env, n_threads", [({"OMP_NUM_THREADS": "5000"}, None),
                                            ({}, 1000)], ids=["OMP_NUM_THREADS=5000", "n_threads=1000"])
def test_huge_thread_counts_are_capped_in_a_real_process(env, n_threads):
    result, _ = run_python(CAPPED_FIT.format(n_threads=n_threads), env=env)

    cap = result["cap"]
    if n_threads is None:
        assert result["threads"] == cap
    assert any(f"using {cap}" in w for w in result["warnings"]), result["warnings"]
    # the main thread, cap - 1 OpenMP workers, and a few of the BLAS libraries' own
    assert result["os_threads"] <= cap + 8, result


# -- the drop-ins' n_threads ------------------------------------------------------------------

def estimators():
    """cprop.sklearn (skips the test without scikit-learn)."""
    pytest.importorskip("sklearn", minversion="1.6")
    import cprop.sklearn
    return cprop.sklearn


@pytest.mark.parametrize("name", ["MLPClassifier", "MLPRegressor"])
def test_estimators_take_n_threads_through_get_set_params_and_clone(name):
    cls = getattr(estimators(), name)
    from sklearn.base import clone

    est = cls(n_threads=2)

    assert cls().get_params()["n_threads"] is None
    assert est.get_params()["n_threads"] == 2
    assert clone(est).get_params()["n_threads"] == 2
    assert est.set_params(n_threads=1).n_threads == 1


@pytest.mark.parametrize("value", [0, -1, 1.5, "2"], ids=repr)
def test_estimators_refuse_bad_n_threads_at_fit(value):
    MLPClassifier = estimators().MLPClassifier
    X, y = classification(n=40, n_features=4, n_classes=2)
    with pytest.raises((ValueError, TypeError), match="n_threads"):
        MLPClassifier(n_threads=value, max_iter=1).fit(X, y)


@needs_openmp
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_estimator_n_threads_reaches_every_epoch_and_prediction(epoch_threads, monkeypatch, restore_threads):
    MLPClassifier = estimators().MLPClassifier
    forward_threads = []
    real_forward = _core.forward

    def forward(*args):
        forward_threads.append(args[-1])
        return real_forward(*args)

    monkeypatch.setattr(_core, "forward", forward)
    X, y = classification()
    cprop.set_num_threads(1)

    clf = MLPClassifier((64,), max_iter=3, batch_size=300, n_threads=2, random_state=0).fit(X, y)
    clf.predict(X)
    assert epoch_threads == [2, 2, 2] and forward_threads == [2]

    epoch_threads.clear()
    MLPClassifier((64,), max_iter=3, batch_size=300, random_state=0).fit(X, y)
    assert epoch_threads == [1, 1, 1]      # n_threads=None: cprop.set_num_threads


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_estimator_results_do_not_depend_on_n_threads_beyond_rounding():
    MLPClassifier = estimators().MLPClassifier
    X, y = classification()
    fits = [MLPClassifier((64,), max_iter=3, batch_size=300, n_threads=n, random_state=0).fit(X, y)
            for n in (1, 2)]
    for a, b in zip(fits[0].coefs_, fits[1].coefs_):
        assert_allclose(a, b, **TOLERANCES[np.float64])


# -- threadpoolctl and joblib -----------------------------------------------------------------

@needs_openmp
def test_threadpool_limits_limit_cprop(epoch_threads, restore_threads):
    X, y = classification()
    net = make_net([100, 64, 10])
    _core.module()                          # cprop's libgomp must be loaded to be limited
    default = cprop.get_num_threads()

    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert cprop.get_num_threads() == 1
        cprop.Trainer(net, loss="cross_entropy", batch_size=300).fit(X, y)
        cprop.set_num_threads(2)             # an explicit setting is capped by the limit too
        assert cprop.get_num_threads() == 1
    assert cprop.get_num_threads() == 2
    cprop.set_num_threads(None)
    assert cprop.get_num_threads() == default
    assert epoch_threads == [1]


@needs_openmp
def test_threadpoolctl_sees_cprops_openmp():
    _core.module()
    maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
    openmp = [lib for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "openmp"]
    if maps:   # the libgomp cprop's core linked is among the libraries threadpoolctl controls
        # libgomp.so.1 from the system, or a wheel's vendored libgomp-<hash>.so.1.0.0
        core_libgomp = {line.split()[-1] for line in maps.splitlines()
                        if os.path.basename(line.split()[-1]).startswith("libgomp")}
        assert core_libgomp
        assert core_libgomp & {os.path.realpath(lib["filepath"]) for lib in openmp}


def blas_threads():
    """The thread count threadpoolctl reports for the BLAS cprop holds."""
    path = _threads.blas_info()
    counts = [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["filepath"] == path]
    assert len(counts) == 1, (path, threadpoolctl.threadpool_info())
    return counts[0]


def test_a_fit_holds_blas_at_one_thread_and_puts_the_count_back():
    X, y = classification()
    seen = []

    def callback(trainer, epoch, logs):
        seen.append(blas_threads())

    assert _threads.blas_info() is not None
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        if before == 1:
            pytest.skip("this BLAS runs one thread only")
        cprop.Trainer(make_net([100, 16, 10]), loss="cross_entropy", batch_size=100).fit(
            X, y, epochs=2, callbacks=[callback])
        assert seen == [1, 1]
        assert blas_threads() == before


BLAS_ACROSS_THREADS = """
import json, threading
import threadpoolctl
from cprop import _threads

path = _threads.blas_info()      # loads cprop's core, and with it the BLAS

def count():
    return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["filepath"] == path][0]

before = count()
seen = {}
a_in, b_in, a_out, b_out = (threading.Event() for _ in range(4))

def first():                      # enters first and leaves first, and outlives the last user
    with _threads.single_threaded_blas():
        a_in.set(); b_in.wait()
        seen["a"] = count()
    a_out.set(); b_out.wait()
    seen["a, after b left"] = count()

def last():
    a_in.wait()
    with _threads.single_threaded_blas():
        b_in.set(); a_out.wait()
        seen["b, alone"] = count()
    b_out.set()

threads = [threading.Thread(target=first), threading.Thread(target=last)]
for t in threads: t.start()
for t in threads: t.join()
with _threads.single_threaded_blas():    # and once more from the main thread
    seen["main"] = count()
print(json.dumps({"before": before, "seen": seen, "after": count()}))
"""


def test_blas_is_held_by_overlapping_users_in_other_threads_and_put_back_by_the_last():
    result, _ = run_python(BLAS_ACROSS_THREADS, env={"OPENBLAS_NUM_THREADS": "2"})
    if result["before"] == 1:
        pytest.skip("this BLAS runs one thread only")
    assert result["seen"] == {"a": 1, "b, alone": 1, "a, after b left": result["before"], "main": 1}
    assert result["after"] == result["before"]


def report_threads():
    """In a joblib worker: OMP_NUM_THREADS, cprop's thread count, and the threads its epochs get."""
    import cprop
    from cprop._lazy import core

    used = []
    real = core.train_epoch
    core.train_epoch = lambda *args, **kwargs: (used.append(args[4]["n_threads"]), real(*args, **kwargs))[1]
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(600, 100)), rng.integers(0, 10, 600)
    net = cprop.Sequential([cprop.Dense(100, 64, "relu"), cprop.Dense(64, 10)])
    cprop.Trainer(net, loss="cross_entropy", batch_size=300).fit(X, y)
    return os.environ.get("OMP_NUM_THREADS"), cprop.get_num_threads(), used


@needs_openmp
def test_joblib_workers_run_cprop_on_their_share_of_the_cores():
    joblib = pytest.importorskip("joblib")
    n_jobs = 2
    share = max(joblib.cpu_count() // n_jobs, 1)   # what joblib gives each worker

    results = joblib.Parallel(n_jobs=n_jobs)(joblib.delayed(report_threads)() for _ in range(n_jobs))

    for omp_num_threads, threads, used in results:
        assert omp_num_threads == str(share)
        assert threads == min(share, _threads.thread_cap())
        assert used == [threads]


# -- cprop's barrier ------------------------------------------------------------------------------

@needs_openmp
@pytest.mark.parametrize("n_threads", [2, 3, 4])
def test_threaded_fits_repeat_bit_for_bit_and_agree_with_one_thread(n_threads):
    # 3 and 4 threads on a 2-core machine: the barrier's sleeping path runs too
    X, y = classification(n=1000)
    params = []
    for threads in (1, n_threads, n_threads):
        net = make_net([100, 64, 32, 10], hidden="relu")
        cprop.Trainer(net, loss="cross_entropy", optimizer=cprop.SGD(lr=0.05, momentum=0.9),
                      batch_size=256, seed=0, n_threads=threads).fit(X, y, epochs=3)
        params.append(net.params.copy())
    assert_array_equal(params[1], params[2])
    assert_allclose(params[1], params[0], **TOLERANCES[np.float64])


@needs_openmp
def test_team_statistics_of_a_two_thread_epoch(monkeypatch):
    seen = []
    real = _core.take_team_stats
    monkeypatch.setattr(_core, "take_team_stats", lambda: (seen.append(real()), seen[-1])[1])
    X, y = classification()

    cprop.Trainer(make_net([100, 64, 10]), loss="cross_entropy", batch_size=300,
                  n_threads=2).fit(X, y, epochs=3)

    assert seen[0] == (1, 0.0, 0.0, 1.0)               # the fit starts with a clean slate
    for threads, waited, worked, share in seen[1:]:
        assert threads == 2 and waited >= 0 and worked > 0 and 0 < share <= 1
    assert real() == (1, 0.0, 0.0, 1.0)                # read once, then cleared


@needs_openmp
def test_single_threaded_epochs_report_no_team(monkeypatch):
    seen = []
    real = _core.take_team_stats
    monkeypatch.setattr(_core, "take_team_stats", lambda: (seen.append(real()), seen[-1])[1])
    X, y = classification()
    cprop.Trainer(make_net([100, 64, 10]), loss="cross_entropy", batch_size=300,
                  n_threads=1).fit(X, y, epochs=2)
    assert seen == [(1, 0.0, 0.0, 1.0)] * 3


SHORT_HANDED = """
import json
import numpy as np
import cprop
rng = np.random.default_rng(0)
X, y = rng.normal(size=(1000, 100)), rng.integers(0, 10, 1000)
params = []
for n_threads in (2, 1):
    net = cprop.Sequential([cprop.Dense(100, 64, "relu"), cprop.Dense(64, 10)], seed=0)
    cprop.Trainer(net, loss="cross_entropy", batch_size=256, seed=0, n_threads=n_threads).fit(X, y, epochs=2)
    params.append(net.params.tolist())
print(json.dumps(params))
"""


@needs_openmp
@pytest.mark.parametrize("env", [{"OMP_THREAD_LIMIT": "1"}, {"OMP_DYNAMIC": "true", "OMP_THREAD_LIMIT": "1"}],
                         ids=["OMP_THREAD_LIMIT=1", "OMP_DYNAMIC"])
def test_an_epoch_given_fewer_threads_than_asked_trains_all_rows(env):
    # OpenMP may give a parallel region fewer threads than asked: the epoch must split its
    # rows between the threads it got (not hang at a barrier waiting for absent ones)
    (two, one), _ = run_python(SHORT_HANDED, env=env, timeout=120)
    assert_allclose(two, one, **TOLERANCES[np.float64])


# -- the fall-back to one thread ----------------------------------------------------------------

class FakeCore:
    """Stands in for the compiled core: an OpenMP build whose default is `threads` threads,
    and whose team statistics are `stats`, in turn."""

    OPENMP = True

    def __init__(self, threads, stats):
        self.threads = threads
        self.stats = list(stats)

    def max_threads(self):
        return self.threads

    def take_team_stats(self):
        return self.stats.pop(0) if self.stats else (1, 0.0, 0.0, 1.0)


def fallback_with(monkeypatch, stats, threads=2, n_threads=None, window=0.05):
    monkeypatch.setattr(_threads, "STALL_WINDOW_SECONDS", window)
    monkeypatch.setattr(_threads, "_num_threads", None)
    # the first stats answer the constructor's call, which forgets earlier epochs
    monkeypatch.setattr(_threads, "_core", FakeCore(threads, [(1, 0.0, 0.0, 1.0)] + stats))
    return _threads.ThreadFallback(n_threads)


def test_fallback_waits_for_a_full_window_then_drops_to_one_thread(monkeypatch):
    # 0.02 s epochs in which the two threads did 0.01 s of work together, with whole CPUs:
    # half a thread's worth
    fallback = fallback_with(monkeypatch, [(2, 0.018, 0.01, 1.0)] * 10)

    assert fallback.n_threads == 2
    assert [fallback.after_epoch(0.02) for _ in range(3)] == [2, 2, 1]
    assert fallback.fell_back
    assert [fallback.after_epoch(0.02) for _ in range(3)] == [1, 1, 1]   # for the rest of the fit


def test_fallback_keeps_the_threads_while_they_get_more_done_than_one(monkeypatch):
    # 0.02 s epochs with 0.03 s of work: one and a half threads' worth; then one stalled
    # epoch inside a window that is still above one thread overall
    stats = [(2, 0.005, 0.03, 1.0)] * 6 + [(2, 0.015, 0.005, 1.0), (2, 0.002, 0.035, 1.0),
                                          (2, 0.002, 0.035, 1.0)]
    fallback = fallback_with(monkeypatch, stats)

    assert [fallback.after_epoch(0.02) for _ in range(9)] == [2] * 9
    assert not fallback.fell_back


def test_fallback_judges_the_team_against_one_thread_with_the_same_share_of_a_cpu(monkeypatch):
    # a busy machine: runnable threads get 40% of a CPU. Two threads that worked 0.012 s in
    # a 0.02 s epoch beat one thread (0.008 s); two that worked 0.006 s do not
    busy = fallback_with(monkeypatch, [(2, 0.01, 0.012, 0.4)] * 5)
    assert [busy.after_epoch(0.02) for _ in range(5)] == [2] * 5
    stalled = fallback_with(monkeypatch, [(2, 0.01, 0.006, 0.4)] * 5)
    assert [stalled.after_epoch(0.02) for _ in range(5)] == [2, 2, 1, 1, 1]


def test_fallback_leaves_an_explicit_thread_count_alone(monkeypatch):
    fallback = fallback_with(monkeypatch, [(2, 0.019, 0.001, 1.0)] * 5, n_threads=2, window=0.0)
    assert [fallback.after_epoch(0.02) for _ in range(5)] == [2] * 5


def test_fallback_ignores_single_threaded_epochs(monkeypatch):
    # (a batch too small for threads, or a build without OpenMP): no team, nothing to judge
    fallback = fallback_with(monkeypatch, [(1, 0.0, 0.0, 1.0)] * 5, threads=4, window=0.0)
    assert [fallback.after_epoch(1.0) for _ in range(4)] == [4] * 4


@needs_openmp
def test_a_fit_whose_threads_stall_goes_on_with_one(epoch_threads, monkeypatch, restore_threads):
    # a team that reports no work done at all in its epochs: stalled
    monkeypatch.setattr(_threads, "STALL_WINDOW_SECONDS", 0.0)
    real = _core.take_team_stats

    def stalled():
        threads, waited, _, share = real()
        return threads, waited, 0.0, share

    monkeypatch.setattr(_core, "take_team_stats", stalled)
    X, y = classification()
    cprop.set_num_threads(2)
    trainer = cprop.Trainer(make_net([100, 64, 10]), loss="cross_entropy", batch_size=300)

    trainer.fit(X, y, epochs=4)
    trainer.fit(X, y, epochs=2)       # each fit starts again with its threads
    assert epoch_threads == [2, 1, 1, 1, 2, 1]

    epoch_threads.clear()
    trainer.n_threads = 2             # an explicit count is kept, stalls or not
    trainer.fit(X, y, epochs=3)
    assert epoch_threads == [2, 2, 2]


# -- OpenMP's own waits ----------------------------------------------------------------------------

OPENMP_WAIT = """
import json, os
import cprop
info = cprop.show_config(file=open(os.devnull, "w"))
print(json.dumps({"omp_wait": info["omp_wait"], "left": os.environ.get("GOMP_SPINCOUNT")}))
"""


@needs_openmp
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp")
def test_libgomp_spins_briefly_and_the_environment_is_put_back():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_DISPLAY_ENV"] = "verbose"   # libgomp prints the settings it read as it loads
    proc = subprocess.run([sys.executable, "-c", OPENMP_WAIT], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    assert f"GOMP_SPINCOUNT = '{_threads.GOMP_SPINCOUNT}'" in proc.stderr
    assert result["left"] is None
    assert "set by cprop" in result["omp_wait"]


@needs_openmp
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp")
def test_a_users_wait_policy_is_left_alone():
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    env.update(OMP_WAIT_POLICY="passive", OMP_DISPLAY_ENV="verbose")
    proc = subprocess.run([sys.executable, "-c", OPENMP_WAIT], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    assert result["omp_wait"] == "OMP_WAIT_POLICY=passive (set by the user)"
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in proc.stderr
    assert f"GOMP_SPINCOUNT = '{_threads.GOMP_SPINCOUNT}'" not in proc.stderr
