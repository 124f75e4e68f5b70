"""One settings object, read from ``POLYQUEUE_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

import re
import warnings
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = [
    "DEPRECATED_BACKENDS",
    "EMBEDDED",
    "QUEUE_NAME_RULE",
    "QueueBackend",
    "Settings",
    "queue_name_problem",
    "secret_value",
]

#: ``direct``: workers claim straight from the table (default, no broker).
#: ``memory``: an in-process asyncio queue, relay and worker in one process.
#: The others: the broker of that name, fed by the relay.
QueueBackend = Literal["direct", "memory", "redis", "sqs", "azure_service_bus", "pgmq"]
#: Old spellings of ``queue_backend``, accepted with a DeprecationWarning: ``postgres`` read as a
#: broker in Postgres (that is ``pgmq``) while it meant none, and ``none`` was the in-memory one.
DEPRECATED_BACKENDS = {"postgres": "direct", "none": "memory"}


#: ``database_url`` meaning "the embedded Postgres under embedded_dir", asked for explicitly.
EMBEDDED = "embedded"

#: What a queue name may be, in every broker: Redis keys it as ``prefix:queue`` (so no ``:``),
#: SQS allows letters, digits, ``-`` and ``_``, PGMQ turns it into table names of at most 47
#: characters, and the enqueue NOTIFY carries it.
QUEUE_NAME_RULE = "1 to 47 characters: letters, digits, '_' and '-', starting with a letter or digit"
_QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,46}")


def queue_name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid queue name (naming :data:`QUEUE_NAME_RULE`), or None when it is."""
    if isinstance(name, str) and _QUEUE_NAME.fullmatch(name):
        return None
    return f"queue name {name!r} is not valid: a queue name is {QUEUE_NAME_RULE}"


def secret_value(value: SecretStr | str | None) -> str | None:
    """The plain text of a credential-bearing setting (a ``SecretStr``), or None."""
    return value.get_secret_value() if isinstance(value, SecretStr) else value


class Settings(BaseSettings):
    """Every knob of polyqueue, validated at construction, with named defaults.

    Environment variables use the prefix ``POLYQUEUE_`` (``POLYQUEUE_DATABASE_URL``,
    ``POLYQUEUE_QUEUE_BACKEND``, ``POLYQUEUE_CONCURRENCY`` ...).
    """

    model_config = SettingsConfigDict(env_prefix="POLYQUEUE_", extra="ignore")

    database_url: SecretStr | None = Field(
        default=None,
        description="Postgres URL (a secret: never shown). Unset: `polyqueue demo`, dev.py and the tests use "
        "the embedded Postgres under embedded_dir, every other command refuses; 'embedded' asks for it explicitly.",
    )
    embedded_dir: str = Field(default=".polyqueue", description="Where the embedded Postgres keeps its data.")
    queue_backend: QueueBackend = Field(default="direct", description="How deliveries travel (the broker).")
    broker_url: SecretStr | None = Field(
        default=None, description="The broker's URL, for brokers that take one (a secret: never shown)."
    )

    # NoDecode: POLYQUEUE_QUEUES=a,b is split by the validator below, not parsed as JSON.
    queues: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["default"],
        description="Queues a worker serves (at least one; each name " + QUEUE_NAME_RULE + ").",
    )
    concurrency: int = Field(default=16, ge=1, le=10_000, description="Jobs run at once per worker process.")
    poll_interval: float = Field(default=1.0, gt=0, description="Seconds between polls when NOTIFY is silent.")
    completion_flush_interval: float = Field(
        default=0.05, gt=0, description="Seconds completions may wait to be written in one batch."
    )
    completion_batch_size: int = Field(default=100, ge=1, description="Completions written per statement.")
    heartbeat_interval: float = Field(default=5.0, gt=0, description="Seconds between worker heartbeats.")
    worker_dead_after: float = Field(
        default=30.0,
        gt=0,
        description="A worker whose heartbeat is older than this is dead; its jobs rescued.",
    )
    shutdown_grace: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM, seconds to let running jobs finish before handing them back.",
    )
    maintenance_interval: float = Field(default=5.0, gt=0, description="Seconds between maintenance passes.")
    timeout_grace: float = Field(
        default=10.0, ge=0, description="Maintenance rescues a job this long after its timeout_at passed."
    )
    retention_seconds: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="Finished jobs older than this are pruned."
    )
    redispatch_after: float = Field(
        default=300.0,
        gt=0,
        description="Enqueued jobs unclaimed this long go back to pending (lost delivery).",
    )
    relay_batch_size: int = Field(default=500, ge=1, description="Jobs the relay publishes per batch.")
    relay_max_enqueued: int = Field(
        default=10_000,
        ge=0,
        description="Most jobs of one queue the relay keeps enqueued (in the broker, unclaimed); the rest wait "
        "pending in Postgres, in priority order. Keep it well under what workers take in redispatch_after. "
        "0: no limit.",
    )
    max_payload_bytes: int = Field(
        default=1_000_000, ge=1, description="Largest payload (JSON bytes) enqueue accepts; larger is refused."
    )
    max_meta_bytes: int = Field(
        default=64 * 1024, ge=1, description="Largest meta (JSON bytes) enqueue accepts; larger is refused."
    )
    max_result_bytes: int = Field(
        default=1_000_000, ge=1, description="Largest result (JSON bytes) stored; larger fails the job."
    )
    lease_seconds: float = Field(default=30.0, gt=0, description="Broker lease (visibility) of a delivery.")
    pool_mode: Literal["session", "transaction"] = Field(
        default="session",
        description="How connections to database_url are pooled: 'session' (Postgres itself, or a pooler in "
        "session mode) or 'transaction' (pgbouncer in transaction mode: no prepared statements, no session "
        "state, no LISTEN through it; see listen_database_url).",
    )
    listen_database_url: SecretStr | None = Field(
        default=None,
        description="A direct Postgres URL (not through a transaction pooler) for LISTEN (a secret). With "
        "pool_mode='transaction' and none set, workers and relays poll every poll_interval.",
    )
    unknown_task_grace: float = Field(
        default=900.0,
        ge=0,
        le=30 * 24 * 3600.0,
        description="Seconds a job whose task no worker that claimed it knows is handed back (a rolling "
        "deploy) before it fails naming the task and the workers that lacked it.",
    )
    blocked_loop_threshold: float = Field(
        default=1.0,
        gt=0,
        le=3600.0,
        description="A worker's event loop blocked longer than this (a handler calling blocking code) is "
        "logged with the jobs that were running, and counted in the metrics.",
    )
    command_timeout: float = Field(
        default=300.0,
        ge=0,
        description="Seconds any one statement on polyqueue's connections (handlers' ctx.session included) may "
        "wait for Postgres before it is cancelled with TimeoutError and the job retried; a connection whose "
        "server never answers is dropped instead of holding a job forever. 0: no limit.",
    )
    startup_wait: float = Field(
        default=30.0,
        ge=0,
        description="Seconds a starting worker or relay retries while the database is unreachable; 0 fails at once.",
    )

    @field_validator("queue_backend", mode="before")
    @classmethod
    def _old_spellings(cls, value: object) -> object:
        if isinstance(value, str) and value in DEPRECATED_BACKENDS:
            new = DEPRECATED_BACKENDS[value]
            warnings.warn(f"queue_backend {value!r} is deprecated: say {new!r}", DeprecationWarning, stacklevel=2)
            return new
        return value

    @field_validator("queues", mode="before")
    @classmethod
    def _split_queues(cls, value: object) -> object:
        if isinstance(value, str):
            return [q.strip() for q in value.strip("[] ").replace('"', "").split(",") if q.strip()]
        return value

    @field_validator("queues", mode="after")
    @classmethod
    def _queues_are_named(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(
                "name at least one queue (e.g. POLYQUEUE_QUEUES=default,emails): a worker with none serves nothing"
            )
        for name in value:
            problem = queue_name_problem(name)
            if problem:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _liveness_is_consistent(self) -> Settings:
        if self.worker_dead_after < 2 * self.heartbeat_interval:
            raise ValueError(
                f"worker_dead_after ({self.worker_dead_after}s) must be at least twice heartbeat_interval "
                f"({self.heartbeat_interval}s), or live workers would be declared dead"
            )
        return self
