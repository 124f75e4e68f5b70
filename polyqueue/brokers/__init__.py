"""Broker adapters. ``make_broker`` picks one from settings (the composition root's job)."""

from __future__ import annotations

from polyqueue.brokers.base import Broker, Capabilities, Delivery, Message
from polyqueue.errors import ConfigurationError
from polyqueue.settings import Settings

__all__ = ["Broker", "Capabilities", "Delivery", "Message", "make_broker"]


def make_broker(settings: Settings) -> Broker | None:
    """The broker for ``settings.queue_backend``; None for direct Postgres mode."""
    backend = settings.queue_backend
    if backend == "postgres":
        return None
    if backend == "none":
        from polyqueue.brokers.memory import MemoryBroker

        return MemoryBroker()
    if backend == "redis":
        if not settings.broker_url:
            raise ConfigurationError(
                "queue_backend 'redis' needs broker_url (POLYQUEUE_BROKER_URL=redis://host:6379/0)"
            )
        try:
            from polyqueue.brokers.redis import RedisBroker
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.partition(".")[0] != "redis":
                raise
            raise ConfigurationError(
                "queue_backend 'redis' needs the redis extra: pip install 'polyqueue[redis]'"
            ) from exc
        return RedisBroker(settings.broker_url, lease_seconds=settings.lease_seconds)
    raise ConfigurationError(f"queue_backend {backend!r} is not available in this version of polyqueue")
