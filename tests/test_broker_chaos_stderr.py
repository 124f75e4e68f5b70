"""The chaos runner keeps each process's stderr in a file of its own and shows its tail with the
violation a crashed process causes (test_chaos[postgres] once failed with "worker ... exited 1
on its own" and nothing to say why)."""

from __future__ import annotations

from pathlib import Path

from tests.chaos.brokers import ChaosBroker
from tests.chaos.runner import Fleet


def test_a_crashed_process_is_reported_with_its_stderr(tmp_path: Path) -> None:
    # A setting the worker refuses at start: it exits 1 on its own, saying why on stderr.
    broker = ChaosBroker({"POLYQUEUE_QUEUE_BACKEND": "no-such-broker"}, separate_relays=False)
    fleet = Fleet("postgresql://nobody@127.0.0.1:1/none", broker, workers=1, relays=0, log_dir=tmp_path)
    fleet.start()
    [worker] = fleet.workers
    assert worker.wait(60) not in (0, None)
    [violation] = fleet.crashed()
    assert f"(pid {worker.pid}) exited {worker.returncode} on its own" in violation
    stderr = tmp_path / "worker-0.stderr"
    assert str(stderr) in violation
    reason = "invalid setting: queue_backend (POLYQUEUE_QUEUE_BACKEND)"
    assert reason in stderr.read_text()
    assert reason in violation  # the reason itself, from the tail
    assert reason in fleet.stderr_tails()
