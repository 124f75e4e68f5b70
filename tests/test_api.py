"""The public surface, registration errors and settings: no database needed."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

import polyqueue
from polyqueue import Backoff, ConfigurationError, JobContext, Polyqueue, Settings

EXPECTED_PUBLIC = {
    "Backoff",
    "BrokerError",
    "ConfigurationError",
    "Job",
    "JobContext",
    "JobFailedError",
    "JobNotFinishedError",
    "JobNotFoundError",
    "JobStatus",
    "LeaseLostError",
    "PayloadError",
    "Polyqueue",
    "PolyqueueError",
    "ResultError",
    "ResultTimeoutError",
    "Retry",
    "Settings",
    "TaskError",
    "TaskSpec",
    "TerminalError",
    "TimeoutStrategy",
    "UnknownTaskError",
    "WorkerProcess",
    "WorkerRecord",
    "enqueue",
    "enqueue_many",
    "get_job_result",
    "get_job_result_typed",
    "get_job_result_typed_via_registry",
    "main",
    "polyqueue_metadata",
    "run_relay",
    "run_worker",
    "wait_for_result",
}


def test_all_is_exactly_the_public_surface() -> None:
    assert set(polyqueue.__all__) == EXPECTED_PUBLIC
    for name in polyqueue.__all__:
        assert getattr(polyqueue, name) is not None
        assert getattr(polyqueue, name).__doc__ or name == "polyqueue_metadata", f"{name} has no docstring"


class P(BaseModel):
    x: int


def test_registration_rejects_wrong_shapes() -> None:
    app = Polyqueue()

    def sync(payload: P) -> None: ...

    async def untyped(payload) -> None: ...  # type: ignore[no-untyped-def]

    async def too_many(payload: P, ctx: JobContext, extra: int) -> None: ...

    with pytest.raises(ConfigurationError, match="async"):
        app.register(sync)  # type: ignore[type-var]
    with pytest.raises(ConfigurationError, match="BaseModel"):
        app.register(untyped)
    with pytest.raises(ConfigurationError, match="takes"):
        app.register(too_many)
    with pytest.raises(ConfigurationError, match="max_attempts"):
        app.register(max_attempts=0)(_ok_handler)
    app.register(_ok_handler)
    with pytest.raises(ConfigurationError, match="twice"):
        app.register(_ok_handler)
    spec = app.get("_ok_handler")
    assert spec.payload_model is P and spec.takes_context and spec.result_type is int


async def _ok_handler(payload: P, ctx: JobContext) -> int:
    return payload.x


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYQUEUE_QUEUE_BACKEND", "memory")
    monkeypatch.setenv("POLYQUEUE_QUEUES", "a, b")
    monkeypatch.setenv("POLYQUEUE_CONCURRENCY", "8")
    s = Settings()
    assert (s.queue_backend, s.queues, s.concurrency) == ("memory", ["a", "b"], 8)
    monkeypatch.setenv("POLYQUEUE_CONCURRENCY", "0")
    with pytest.raises(ValueError, match="concurrency"):
        Settings()
    monkeypatch.delenv("POLYQUEUE_CONCURRENCY")
    assert Polyqueue(concurrency=3).settings.concurrency == 3
    with pytest.raises(ValueError):
        Polyqueue(queue_backend="kafka")
    with pytest.raises(ValueError, match="twice heartbeat_interval"):
        Polyqueue(heartbeat_interval=10, worker_dead_after=15)


def test_backoff_grows_and_is_capped() -> None:
    b = Backoff(base=1, factor=2, maximum=10, jitter=False)
    assert [b.delay(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 8, 10]
    jittered = Backoff(base=8, maximum=100)
    assert all(4 <= jittered.delay(1) <= 8 for _ in range(100))
    with pytest.raises(ValueError):
        Backoff(factor=0.5)


def test_deprecated_names_still_work_and_say_what_replaces_them() -> None:
    with pytest.warns(DeprecationWarning, match="polyqueue.WorkerRecord"):
        assert polyqueue.Worker is polyqueue.WorkerRecord  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        polyqueue.no_such_name  # type: ignore[attr-defined]  # noqa: B018


def test_the_old_name_of_the_views_module_still_imports_and_warns() -> None:
    import importlib
    import sys

    import polyqueue.views

    sys.modules.pop("polyqueue.inspect", None)
    with pytest.warns(DeprecationWarning, match="import polyqueue.views"):
        old = importlib.import_module("polyqueue.inspect")
    assert old.stats is polyqueue.views.stats


@pytest.mark.parametrize(("old", "new"), [("postgres", "direct"), ("none", "memory")])
def test_old_queue_backend_spellings_still_work_and_warn(old: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=f"queue_backend '{old}' is deprecated: say '{new}'"):
        assert Settings(queue_backend=old).queue_backend == new
    assert Settings().queue_backend == "direct"
