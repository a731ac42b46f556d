"""`cprop bench --ranks` measures under mpiexec: every rank count trains, rank 0 reports."""
import pytest

from cprop.bench import ranks
from cprop.bench.workloads import Workload

from mpi_helpers import (
    OVERSUBSCRIBED,
    comm,  # noqa: F401 (fixture)
)

pytestmark = OVERSUBSCRIBED


@pytest.mark.parametrize("average_every", [None, 2])
def test_run_ranks_reports_every_rank_count_on_rank_0(comm, average_every, capsys):
    workload = Workload("test", (8, 16, 3), 16, "cross_entropy", 400)
    report = ranks.run_ranks([workload], comm.Get_size(), 1, 2, "float32", 1.0, average_every)
    printed = capsys.readouterr().out
    if comm.rank:
        assert report is None and printed == ""
        return
    counts = ranks.rank_counts(comm.Get_size())
    (entry,) = report["workloads"]
    assert sorted(entry["samples_per_second"]) == counts
    assert all(rate > 0 for rate in entry["samples_per_second"].values())
    assert entry["efficiency"][1] == 1.0
    assert report["allreduce"]["alpha"] >= 0 and report["allreduce"]["beta"] > 0
    assert "α" in printed and f"{comm.Get_size()} rank(s)" in printed
