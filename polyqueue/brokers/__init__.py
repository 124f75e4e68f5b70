"""Broker adapters. ``make_broker`` picks one from settings (the composition root's job).

Each adapter module exposes ``create(config: BrokerConfig) -> BrokerAdapter`` and is
imported only when chosen, so its SDK stays an optional extra. ``make_broker`` hands the
adapter back behind :class:`~polyqueue.brokers.facade.BrokerFacade`, the one shape the
runtime sees.
"""

from __future__ import annotations

import importlib

from polyqueue.brokers.base import Broker, BrokerAdapter, BrokerConfig, Capabilities, Delivery, Message
from polyqueue.brokers.facade import BrokerFacade
from polyqueue.errors import ConfigurationError
from polyqueue.settings import Settings, secret_value

__all__ = ["Broker", "BrokerConfig", "BrokerFacade", "Capabilities", "Delivery", "Message", "make_broker"]

#: queue_backend → (adapter module, the SDK's top-level package, the pip extra)
ADAPTERS: dict[str, tuple[str, str, str]] = {
    "redis": ("polyqueue.brokers.redis", "redis", "redis"),
    "sqs": ("polyqueue.brokers.sqs", "aiobotocore", "sqs"),
    "pgmq": ("polyqueue.brokers.pgmq", "pgmq", "pgmq"),
    "azure_service_bus": ("polyqueue.brokers.servicebus", "azure", "azure"),
}


def make_broker(
    settings: Settings, *, database_url: str | None = None, metrics: object | None = None
) -> BrokerFacade | None:
    """The broker for ``settings.queue_backend``, behind its facade; None for direct Postgres mode.

    ``database_url`` is the jobs' database as resolved (the embedded one when none is
    configured), for brokers that live in Postgres. ``metrics`` (a ``MetricsHook`` or
    ``GuardedMetrics``) receives ``broker_call`` for every call on the broker.
    """
    backend = settings.queue_backend
    if backend == "direct":
        return None
    if backend == "memory":
        from polyqueue.brokers.memory import MemoryBroker

        return BrokerFacade(MemoryBroker(), metrics=metrics)
    if backend not in ADAPTERS:
        raise ConfigurationError(f"queue_backend {backend!r} is not available in this version of polyqueue")
    module_name, sdk, extra = ADAPTERS[backend]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.partition(".")[0] == sdk:
            raise ConfigurationError(
                f"queue_backend {backend!r} needs the {extra} extra: pip install 'polyqueue[{extra}]'"
            ) from exc
        if exc.name == module_name:
            raise ConfigurationError(
                f"queue_backend {backend!r} is not available in this version of polyqueue"
            ) from exc
        raise
    broker_url = secret_value(settings.broker_url)
    config = BrokerConfig(
        broker_url,
        settings.lease_seconds,
        database_url or secret_value(settings.database_url),
        transaction_pooling=settings.pool_mode == "transaction",
    )
    try:
        adapter: BrokerAdapter = module.create(config)
    except ConfigurationError as exc:
        if broker_url and "POLYQUEUE_BROKER_URL" not in str(exc):
            # The adapter knows what is wrong; the user needs to know which setting to change.
            raise ConfigurationError(f"broker_url (POLYQUEUE_BROKER_URL) for queue_backend {backend!r}: {exc}") from exc
        raise
    return BrokerFacade(adapter, metrics=metrics)
