"""jobs/annotate/startup_clock.py: the first report of a run is kept, in the cluster, until read."""

from __future__ import annotations

from jobs.annotate.startup_clock import FirstBatchClock


def test_the_first_report_of_a_run_is_kept_and_read_once(ray_cluster):
    clock, other_run = FirstBatchClock("run-a"), FirstBatchClock("run-b")
    assert clock.read() is None  # no batch done
    report = ray_cluster.remote(lambda clock, at: clock(at))  # as an actor reports: from another process
    ray_cluster.get(report.remote(clock, 100.5))
    ray_cluster.get(report.remote(clock, 99.0))  # arrives later: not the first
    ray_cluster.get(report.remote(other_run, 7.0))
    assert clock.read() == 100.5
    assert clock.read() is None  # taken out: a re-run with the same id starts afresh
    assert other_run.read() == 7.0
