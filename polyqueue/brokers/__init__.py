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
    raise ConfigurationError(f"queue_backend {backend!r} is not available in this version of polyqueue")
