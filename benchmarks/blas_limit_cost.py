"""What holding BLAS at one thread costs per fit (and per predict): one enter and exit.

cprop holds the BLAS its products call at one thread around every fit, forward
pass and optimizer step (cprop._threads.single_threaded_blas, through
threadpoolctl). This times one enter/exit of:

- ``cprop``: single_threaded_blas as it is: threadpoolctl's ``limit(limits=1)``
  on a controller made once, with cprop's lock and count of users;
- ``ctypes``: the code it replaced: the library's own get/set functions through
  ctypes, with the same lock and count;
- ``limit``: threadpoolctl's ``limit(limits=1)`` context alone, on the same controller;
- ``uncached``: ``threadpool_limits(1, user_api="blas")``, which lists the loaded
  libraries anew every time.

In one process, the variants alternate within each round (so a slow spell of a
shared machine hits all of them); the figures are medians over rounds of the
mean time per enter/exit. Run from the root of a built checkout (PYTHONPATH=. picks
its cprop over an installed one):

    PYTHONPATH=. python benchmarks/blas_limit_cost.py [--rounds 15] [--calls 2000]
"""
import argparse
import contextlib
import ctypes
import statistics
import threading
import time

from threadpoolctl import threadpool_limits

from cprop import _threads


def handmade(path):
    """The pre-threadpoolctl single_threaded_blas, on the library at `path`."""
    lib = ctypes.CDLL(path)
    for prefix in ("scipy_", ""):
        for suffix in ("", "64_"):
            getter = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
            setter = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
            if getter is not None and setter is not None:
                getter.restype = ctypes.c_int
                setter.argtypes = [ctypes.c_int]
                break
        else:
            continue
        break
    else:
        raise SystemExit(f"no OpenBLAS thread functions in {path}")
    lock = threading.Lock()
    state = {"users": 0, "saved": None}

    @contextlib.contextmanager
    def single_threaded():
        with lock:
            if state["users"] == 0:
                state["saved"] = getter()
                if state["saved"] != 1:
                    setter(1)
            state["users"] += 1
        try:
            yield
        finally:
            with lock:
                state["users"] -= 1
                if state["users"] == 0 and state["saved"] not in (None, 1):
                    setter(state["saved"])

    return single_threaded


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000, help="enter/exit pairs per round and variant")
    args = parser.parse_args()

    controller = _threads._blas_controller()
    path = _threads.blas_info()
    libraries = controller.lib_controllers

    variants = {
        "cprop": (_threads.single_threaded_blas, 1),
        "ctypes": (handmade(path), 1),
        "limit": (lambda: controller.limit(limits=1), 1),
        "uncached": (lambda: threadpool_limits(1, user_api="blas"), 20),  # slow: fewer calls
    }
    before = [lib.num_threads for lib in libraries]
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (make, divisor) in variants.items():
            calls = max(1, args.calls // divisor)
            start = time.perf_counter()
            for _ in range(calls):
                with make():
                    pass
            times[name].append((time.perf_counter() - start) / calls)
    after = [lib.num_threads for lib in libraries]
    assert after == before, (before, after)

    print(f"BLAS held: {path} ({before} threads outside)")
    print(f"{'variant':>9}  median us per enter/exit  (min, max over {args.rounds} rounds)")
    for name, values in times.items():
        print(f"{name:>9}  {1e6 * statistics.median(values):10.2f}  ({1e6 * min(values):.2f}, {1e6 * max(values):.2f})")


if __name__ == "__main__":
    main()
