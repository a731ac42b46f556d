"""The machine a benchmark runs on: CPU, cores, load, versions, and BLAS thread limits."""
import importlib.metadata
import os
import platform

import numpy as np


def package_version(dist):
    """The installed version of distribution `dist`, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_cores():
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def blas_limits(n_threads):
    """threadpoolctl's BLAS limit at `n_threads`."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n_threads, user_api="blas")


def machine_info():
    """CPU, cores, load, and the versions of Python, cprop and every peer."""
    import cprop
    from cprop import _threads
    from cprop._lazy import core as _core
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "available_cores": available_cores(),
        "load_average_1min": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cprop": cprop.__version__,
        "cprop_openmp": bool(_core.OPENMP),
        "cprop_simd": _core.variant(),
        "cprop_blas": _threads.blas_info(),
        "numpy": np.__version__,
        "scipy": package_version("scipy"),
        "torch": package_version("torch"),
        "jax": package_version("jax"),
        "jaxlib": package_version("jaxlib"),
        "scikit-learn": package_version("scikit-learn"),
        "threadpoolctl": package_version("threadpoolctl"),
        "matplotlib": package_version("matplotlib"),
    }
