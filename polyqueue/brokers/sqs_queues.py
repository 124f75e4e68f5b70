"""Amazon SQS: the client and the queues the broker works on (:mod:`polyqueue.brokers.sqs`).

:class:`SqsQueues` makes the one aiobotocore client (in the running loop), resolves each
polyqueue queue to its SQS queue URL (creating it, and its dead-letter queue, when
``create`` is on), retries once a call whose queue vanished, and acts on receipt handles
only while the delivery is still ours by its local clock. The URL's options are
:class:`SqsOptions`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import aiohttp
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import AioSession  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError  # type: ignore[import-untyped]
from botocore.exceptions import ConnectionError as SdkConnectionError

from polyqueue.brokers.base import Delivery, ErrorMap, read_options, retry_if_vanished
from polyqueue.errors import BrokerError, ConfigurationError

__all__ = ["BATCH", "LONG_POLL", "MAX_VISIBILITY", "SDK_ERRORS", "SqsOptions", "SqsQueues"]

log = logging.getLogger("polyqueue.brokers.sqs")

T = TypeVar("T")

BATCH = 10  # SQS's limit for SendMessageBatch entries and ReceiveMessage's MaxNumberOfMessages
LONG_POLL = 20  # seconds, SQS's longest WaitTimeSeconds
MAX_VISIBILITY = 43_200  # 12 hours, SQS's limit
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
_MISSING = {"QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue"}
# AWS answers InvalidParameterValue for an expired receipt handle (and past the 12-hour limit)
_LOST = {"ReceiptHandleIsInvalid", "MessageNotInflight", "InvalidParameterValue", *_MISSING}
_TRANSIENT = {
    "Throttling", "ThrottlingException", "RequestThrottled", "AWS.SimpleQueueService.RequestThrottled",
    "KmsThrottled", "ServiceUnavailable", "InternalError", "InternalFailure", "RequestTimeout",
    "QueueDeletedRecently", "AWS.SimpleQueueService.QueueDeletedRecently",
}  # fmt: skip
_NETWORK_ERRORS = (SdkConnectionError, HTTPClientError, aiohttp.ClientError, OSError, TimeoutError)
SDK_ERRORS = (BotoCoreError, ClientError, *_NETWORK_ERRORS)


@dataclass(frozen=True, slots=True)
class SqsOptions:
    """The options of an ``sqs://`` URL's query string, with their defaults (docs/brokers/sqs.md)."""

    region: str | None = None  # None: the AWS chain (AWS_REGION, AWS_DEFAULT_REGION, the profile)
    endpoint_url: str | None = None  # an emulator (moto, ElasticMQ, LocalStack) or a VPC endpoint
    prefix: str = "polyqueue-"  # polyqueue queue Q is SQS queue {prefix}Q
    fifo: bool = False  # FIFO queues ({prefix}Q.fifo)
    group_by: str = "job"  # FIFO MessageGroupId: the job id (no ordering) or the queue name (strict order)
    create: bool = True  # create missing queues; off: they must exist (IAM needs no sqs:CreateQueue)
    dead_letter_after: int = 0  # >0: created queues get a redrive policy to {prefix}Q-dead
    polls_per_queue: int = 1  # concurrent long polls per queue (each brings up to 10 messages)
    max_attempts: int = 3  # botocore's attempts per call (standard retry mode)

    def __post_init__(self) -> None:
        if self.group_by not in ("job", "queue"):
            raise ConfigurationError("sqs broker: group_by must be 'job' or 'queue'")
        if self.dead_letter_after < 0 or min(self.polls_per_queue, self.max_attempts) < 1:
            raise ConfigurationError("sqs broker: dead_letter_after >= 0, polls_per_queue and max_attempts >= 1")
        if self.prefix and not _NAME.match(self.prefix):
            raise ConfigurationError(f"sqs broker: prefix {self.prefix!r} may hold only letters, digits, - and _")


class SqsQueues:
    """The SQS client and queue URLs of one broker; ``lease_seconds`` is every delivery's visibility."""

    def __init__(self, url: str, lease_seconds: float) -> None:
        self.options, self._key_id, self._secret = _parse_url(url)
        if not 0 < lease_seconds <= MAX_VISIBILITY:
            raise ConfigurationError(f"sqs broker: lease_seconds must be in (0, {MAX_VISIBILITY}]")
        self.lease_seconds = lease_seconds
        self._visibility = math.ceil(lease_seconds)  # SQS counts visibility in whole seconds
        self._where = self.options.endpoint_url or f"region {self.options.region or '(from the AWS config)'}"
        self.errors = ErrorMap("sqs", self._where, SDK_ERRORS, _transient, _detail)
        self._sqs: Any = None  # the aiobotocore client (untyped), created in the running loop
        self._lock = asyncio.Lock()  # creating the client; resolving queue URLs (a first publish sends many)
        self._urls: dict[str, str] = {}  # queue → queue URL
        self._closing = asyncio.Event()

    def queue_name(self, queue: str) -> str:
        """The SQS queue name of ``queue``: ``{prefix}{queue}``, plus ``.fifo`` for FIFO queues."""
        return self._checked(self.options.prefix + queue)

    def dead_letter_queue_name(self, queue: str) -> str:
        """The SQS dead-letter queue of ``queue``: ``{prefix}{queue}-dead`` (plus ``.fifo``)."""
        return self._checked(f"{self.options.prefix}{queue}-dead")

    # -- internals -------------------------------------------------------------------------------
    async def _client(self) -> Any:
        """The one aiobotocore SQS client, created on first use in the running loop."""
        if self._sqs is not None:
            return self._sqs
        async with self._lock:
            if self._closing.is_set():  # close() still uses a client it has; nobody makes a new one
                raise BrokerError("the sqs broker is closed", transient=False)
            if self._sqs is None:
                retries = {"mode": "standard", "total_max_attempts": self.options.max_attempts}
                # read_timeout: a long poll holds its response up to 20 s
                config = AioConfig(
                    retries=retries, connect_timeout=5, read_timeout=LONG_POLL + 10, max_pool_connections=100
                )
                o, keys = self.options, {"aws_access_key_id": self._key_id, "aws_secret_access_key": self._secret}
                with self.errors.mapped("connect"):
                    creator = AioSession().create_client(
                        "sqs", o.region, endpoint_url=o.endpoint_url, config=config, **keys
                    )
                    self._sqs = await creator.__aenter__()
            return self._sqs

    async def _url(self, queue: str) -> str:
        """The queue's URL: cached, else ``GetQueueUrl``, else (``create``) ``CreateQueue``."""
        if queue in self._urls:
            return self._urls[queue]
        name = self.queue_name(queue)
        sqs = await self._client()
        async with self._lock:
            if queue in self._urls:
                return self._urls[queue]
            try:
                url: str = (await sqs.get_queue_url(QueueName=name))["QueueUrl"]
            except SDK_ERRORS as exc:
                if not _vanished(exc) or not self.options.create:
                    raise self.errors.error(f"resolve of queue {name!r}", exc) from exc
                with self.errors.mapped(f"create of queue {name!r}"):
                    url = await self._create(sqs, queue, name)
            self._urls[queue] = url
            return url

    async def _create(self, sqs: Any, queue: str, name: str) -> str:
        attributes = {"VisibilityTimeout": str(self._visibility)}
        fifo = {"FifoQueue": "true"} if self.options.fifo else {}
        if self.options.dead_letter_after:
            dead = await sqs.create_queue(
                QueueName=self.dead_letter_queue_name(queue),
                Attributes={**fifo, "MessageRetentionPeriod": "1209600"},  # 14 days, the maximum
            )
            reply = await sqs.get_queue_attributes(QueueUrl=dead["QueueUrl"], AttributeNames=["QueueArn"])
            arn, count = reply["Attributes"]["QueueArn"], self.options.dead_letter_after
            attributes["RedrivePolicy"] = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": count})
        log.info("creating sqs queue %s at %s", name, self._where)
        reply = await sqs.create_queue(QueueName=name, Attributes={**attributes, **fifo})
        url: str = reply["QueueUrl"]
        return url

    async def _on_queue(self, queue: str, op: str, call: Callable[[Any, str], Awaitable[T]]) -> T:
        """Run ``call(client, queue_url)``; on ``QueueDoesNotExist`` resolve the queue again and retry once."""

        async def attempt() -> T:
            url = await self._url(queue)
            return await call(await self._client(), url)

        what = f"queue {self.queue_name(queue)}"
        forget = functools.partial(self._urls.pop, queue, None)
        return await retry_if_vanished(
            op, attempt, errors=self.errors, vanished=_vanished, forget=forget, log=log, what=what
        )

    async def _on_receipt(self, op: str, delivery: Delivery, method: str, **params: Any) -> bool:
        """Call ``method`` on the delivery's receipt handle; False when the delivery is no longer ours.

        That is known locally once its visibility ran out (by our conservative clock): SQS may
        still accept the stale handle (moto always does) and act on another worker's delivery.
        """
        if delivery.handle is None or asyncio.get_running_loop().time() >= delivery.extra.get("lease_until", 0.0):
            return False
        queue_url, receipt = delivery.handle
        sqs = await self._client()
        try:
            await getattr(sqs, method)(QueueUrl=queue_url, ReceiptHandle=receipt, **params)
        except SDK_ERRORS as exc:
            if isinstance(exc, ClientError) and _code(exc) in _LOST:
                return False
            raise self.errors.error(op, exc) from exc
        return True

    async def _delete(self, queue_url: str, chunk: list[Delivery]) -> None:
        entries = [{"Id": str(i), "ReceiptHandle": d.handle[1]} for i, d in enumerate(chunk)]
        sqs = await self._client()
        try:
            reply = await sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries)
        except SDK_ERRORS as exc:
            if not _vanished(exc):  # a queue that is gone has nothing left to delete
                raise self.errors.error("ack", exc) from exc
            reply = {}
        for d in chunk:
            d.extra["lease_until"] = 0.0
        for f in reply.get("Failed", []):  # a stale handle, mostly: the delivery comes back, the claim drops it
            log.info("ack of sqs delivery of job %s failed: %s", chunk[int(f["Id"])].job_id, f.get("Code"))

    def _checked(self, base: str) -> str:
        if not _NAME.match(base) or len(base) > (75 if self.options.fifo else 80):
            raise BrokerError(f"{base!r} is not a valid SQS queue name (letters, digits, - and _)", transient=False)
        return base + ".fifo" if self.options.fifo else base


def _transient(exc: BaseException) -> bool:
    """Throttling, 5xx and the network; not missing credentials or region, nor bad parameters."""
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return _code(exc) in _TRANSIENT or status >= 500
    return isinstance(exc, _NETWORK_ERRORS)


def _detail(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return f"{_code(exc)}: {exc.response.get('Error', {}).get('Message', '')}"
    return f"{type(exc).__name__}: {exc}"


def _vanished(exc: BaseException) -> bool:
    """``QueueDoesNotExist``: deleted, or an emulator restarted empty."""
    return isinstance(exc, ClientError) and _code(exc) in _MISSING


def _code(exc: ClientError) -> str:
    """The SQS error code; the JSON protocol puts the classic (query) code in ``QueryErrorCode``."""
    error = exc.response.get("Error", {})
    return str(error.get("QueryErrorCode") or error.get("Code") or "")


def _parse_url(url: str) -> tuple[SqsOptions, str | None, str | None]:
    """The URL's options, and the access key id and secret from its user info (if any)."""
    parts = urlsplit(url)
    if parts.scheme != "sqs":
        raise ConfigurationError(f"the sqs broker needs an sqs:// URL, got {parts.scheme!r}")
    if parts.hostname or parts.path.strip("/"):
        raise ConfigurationError("sqs broker URL: put every option in the query string (sqs://?region=...)")
    if (parts.username is None) != (parts.password is None):
        raise ConfigurationError("sqs broker URL: give both the access key id and the secret (sqs://ID:SECRET@?...)")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    values = read_options("sqs", query, {f.name: f.default for f in fields(SqsOptions)})
    key_id, secret = (unquote(parts.username), unquote(parts.password or "")) if parts.username else (None, None)
    return SqsOptions(**values), key_id, secret
