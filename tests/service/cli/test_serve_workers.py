"""`lusai serve` and `lusai worker`: the Celery command lines they start."""

from __future__ import annotations


def test_serve_runs_an_analyze_worker_and_a_deliver_worker_with_their_own_sizes(tmp_path: object) -> None:
    """The deliver worker gets LUSAI_DELIVER_CONCURRENCY processes (a C-STORE never waits for the
    previews before it), the analyze worker LUSAI_WORKER_CONCURRENCY; their node names differ."""
    from service.cli.serve import worker_argv
    from service.core.settings import Settings

    s = Settings(data_dir=tmp_path, worker_concurrency=1, deliver_concurrency=3)  # type: ignore[arg-type]
    analyze, deliver = worker_argv(s, "analyze"), worker_argv(s, "deliver")
    assert analyze[analyze.index("--concurrency") + 1] == "1"
    assert deliver[deliver.index("--concurrency") + 1] == "3"
    assert analyze[analyze.index("--queues") + 1] == "analyze"
    assert analyze[analyze.index("-n") + 1] != deliver[deliver.index("-n") + 1]
    both = worker_argv(s, "analyze,deliver")
    assert both[both.index("--concurrency") + 1] == "1"
