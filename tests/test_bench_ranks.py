"""`cprop bench --ranks`: the α-β model's arithmetic, and the command's errors outside mpiexec.
(tests/distributed/test_mpi_bench.py runs the measurement itself under mpiexec.)"""
import math

import pytest
from test_cli import assert_clean_error

from cprop.__main__ import main
from cprop.bench import ranks


def test_rank_counts_double_up_to_n():
    assert ranks.rank_counts(1) == [1]
    assert ranks.rank_counts(2) == [1, 2]
    assert ranks.rank_counts(6) == [1, 2, 4, 6]
    assert ranks.rank_counts(8) == [1, 2, 4, 8]


def test_alpha_beta_fit_recovers_the_model_it_was_given():
    alpha, beta = 3e-6, 0.2e-9
    seconds = {n: 2 * alpha + n * beta for n in ranks.ALLREDUCE_BYTES}
    got_alpha, got_beta = ranks.fit_alpha_beta(seconds)
    assert math.isclose(got_alpha, alpha, rel_tol=1e-6) and math.isclose(got_beta, beta, rel_tol=1e-6)


def test_ring_allreduce_and_efficiency_formulas():
    # 2 ranks: 2α + n·β; many ranks: the bandwidth term tends to 2·n·β
    assert math.isclose(ranks.ring_allreduce_seconds(2, 1000, 1e-6, 1e-9), 2e-6 + 1e-6)
    assert math.isclose(ranks.ring_allreduce_seconds(1000, 1e6, 0.0, 1e-9), 2 * 999 / 1000 * 1e-3)
    assert ranks.ring_allreduce_seconds(1, 1e6, 1e-6, 1e-9) == 0       # one rank sends nothing
    # synchronous: compute as long as the gradient's allreduce gives 50%
    t_ar = ranks.allreduce_seconds(8, 1e6, 1e-6, 1e-9)
    assert t_ar == ranks.ring_allreduce_seconds(8, 1e6, 1e-6, 1e-9)           # large: the ring
    assert math.isclose(ranks.model_efficiency(t_ar, 1e6, 8, 1e-6, 1e-9), 0.5)
    # local SGD every 8 steps: the flags' allreduce every step, parameters and momentum every 8
    flags = ranks.allreduce_seconds(8, ranks.FLAG_BYTES, 1e-6, 1e-9)
    assert math.isclose(flags, 3 * (1e-6 + ranks.FLAG_BYTES * 1e-9))           # small: 3 doublings
    expected = t_ar / (t_ar + flags + 2 * t_ar / 8)
    assert math.isclose(ranks.model_efficiency(t_ar, 1e6, 8, 1e-6, 1e-9, average_every=8), expected)
    # without latency: 1 s of compute, 1 s per (ring) allreduce of the parameters (β = 1 / 1.75e6
    # at p = 8), the 16 bytes of flags 1.75·16·β: two arrays every 8 steps cost 0.25 s a step
    beta = 1 / (2 * 7 / 8 * 1e6)
    assert math.isclose(ranks.model_efficiency(1.0, 1e6, 8, 0.0, beta, average_every=8),
                        1 / (1 + 16e-6 + 0.25))


def test_bench_ranks_outside_mpiexec_says_how_to_launch(capsys):
    pytest.importorskip("mpi4py")
    code = main(["bench", "--ranks", "4", "--quick", "--workload", "tiny"])
    assert_clean_error(code, capsys.readouterr().err, "bench", "--ranks 4", "mpiexec -n 4")


@pytest.mark.parametrize("args, words", [(["--average-every", "4"], ["--average-every", "--ranks"]),
                                         (["--ranks", "1", "--peers", "torch"], ["--ranks", "--peers"]),
                                         (["--ranks", "1", "--average-every", "0"], ["--average-every", ">= 1"]),
                                         (["--ranks", "1", "--json", "/no/such/dir/r.json"], ["--json", "directory"])],
                         ids=["average_without_ranks", "peers", "average_zero", "json_directory"])
def test_bench_ranks_refuses_options_that_do_not_apply(args, words, capsys):
    code = main(["bench", "--quick", "--workload", "tiny", *args])
    assert_clean_error(code, capsys.readouterr().err, "bench", *words)
