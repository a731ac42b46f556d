"""``cprop bench``: training speed of cprop against PyTorch, JAX, scikit-learn and NumPy.

One module per concern, each importing only the ones above it:

- :mod:`~cprop.bench.workloads`: the networks, their data and the training recipe;
- :mod:`~cprop.bench.machine`: CPU, cores, versions, BLAS thread limits;
- :mod:`~cprop.bench.runners`: one runner per framework (cprop and its peers);
- :mod:`~cprop.bench.measure`: alternating timed rounds, the GEMM peak probe;
- :mod:`~cprop.bench.report`: figures, tables and the plot;
- :mod:`~cprop.bench.estimators`: ``--estimators``, the scikit-learn drop-in against scikit-learn;
- :mod:`~cprop.bench.cli`: the ``cprop bench`` options and command.

The pytest-benchmark suite in ``benchmarks/`` imports its workloads and
runners from here, so the suite and the command time the same thing. Peers
are imported lazily: this package imports without torch, JAX, scikit-learn or
matplotlib.
"""
from .cli import add_arguments, run
from .machine import available_cores, blas_limits, machine_info
from .measure import GemmProbe, bench_inference, bench_training, seconds_per_call, settle, timed
from .report import format_report
from .runners import PEERS, RUNNERS, PeerUnavailable, Runner, installed_peers, peer_installed
from .workloads import LEARNING_RATE, MOMENTUM, SEED, WORKLOADS, Workload

__all__ = ["LEARNING_RATE", "MOMENTUM", "PEERS", "RUNNERS", "SEED", "WORKLOADS", "GemmProbe",
           "PeerUnavailable", "Runner", "Workload", "add_arguments", "available_cores", "bench_inference",
           "bench_training", "blas_limits", "format_report", "installed_peers", "machine_info",
           "peer_installed", "run", "seconds_per_call", "settle", "timed"]
