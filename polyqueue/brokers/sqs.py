"""Amazon SQS broker on aiobotocore: one SQS queue per polyqueue queue (``{prefix}{queue}``).

* publish: ``SendMessageBatch`` in groups of 10, all groups at once; all or ``BrokerError``.
* receive: 20-second long polls run as background tasks (``polls_per_queue`` per queue) and
  may outlive the ``receive`` that started them: their messages wait in a buffer for the next
  call, which hands out those with at least half their visibility left and releases the rest.
  Only ``close()`` cancels a poll mid-request: SQS would hide the messages of a cancelled poll
  until their visibility ran out. ``wait=0`` is one round trip of short polls.
* extend: ``ChangeMessageVisibility``; ack: ``DeleteMessage``; a buffered delivery handed
  back (stale, or at close) gets visibility 0. Each delivery knows when its visibility ends
  (a local, conservative clock); past that, ack and hand-back are no-ops and extend raises
  ``LeaseLostError``, because SQS (and moto even more) may accept a stale receipt handle and
  delete or re-hide a delivery another worker now holds.
* a queue that vanished (``QueueDoesNotExist``: deleted, or an emulator restarted) is
  resolved again (and re-created when ``create`` is on) and the call retried once.

See docs/brokers/sqs.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import aiohttp
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import AioSession  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError  # type: ignore[import-untyped]
from botocore.exceptions import ConnectionError as SdkConnectionError

from polyqueue._aio import gather_all
from polyqueue.brokers.base import (
    BrokerAdapter,
    BrokerConfig,
    Capabilities,
    Delivery,
    ErrorMap,
    Message,
    decode_each,
    decode_message,
    encode_message,
    read_options,
    retry_if_vanished,
)
from polyqueue.errors import BrokerError, ConfigurationError, LeaseLostError

__all__ = ["SqsBroker"]

log = logging.getLogger("polyqueue.brokers.sqs")

T = TypeVar("T")
_Poll = asyncio.Task[list[Delivery]]

BATCH = 10  # SQS's limit for SendMessageBatch entries and ReceiveMessage's MaxNumberOfMessages
LONG_POLL = 20  # seconds, SQS's longest WaitTimeSeconds
MAX_VISIBILITY = 43_200  # 12 hours, SQS's limit
LEASE_SLACK = 0.1  # seconds a delivery's lease is assumed to end early (the reply's time in transit)
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
_SDK_ERRORS = (BotoCoreError, ClientError, *_NETWORK_ERRORS)


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


class SqsBroker(BrokerAdapter):
    """Deliveries on Amazon SQS (``queue_backend="sqs"``).

    ``url`` is ``sqs://`` plus :class:`SqsOptions` in the query string, e.g.
    ``sqs://?region=eu-west-1&prefix=myapp-``. Credentials come from the standard AWS chain
    unless the URL has them as ``sqs://KEY_ID:SECRET@?...`` (percent-encoded). ``lease_seconds``,
    rounded up to whole seconds, is the visibility timeout of every delivery.
    """

    name = "sqs"

    def __init__(self, url: str = "sqs://", *, lease_seconds: float = 30.0) -> None:
        self.options, self._key_id, self._secret = _parse_url(url)
        if not 0 < lease_seconds <= MAX_VISIBILITY:
            raise ConfigurationError(f"sqs broker: lease_seconds must be in (0, {MAX_VISIBILITY}]")
        self.lease_seconds = lease_seconds
        self._visibility = math.ceil(lease_seconds)  # SQS counts visibility in whole seconds
        dead_letter = self.options.dead_letter_after > 0
        self.capabilities = Capabilities(lease=True, survives_restart=True, dead_letter=dead_letter)
        self._where = self.options.endpoint_url or f"region {self.options.region or '(from the AWS config)'}"
        self.errors = ErrorMap("sqs", self._where, _SDK_ERRORS, _transient, _detail)
        self._sqs: Any = None  # the aiobotocore client (untyped), created in the running loop
        self._lock = asyncio.Lock()  # creating the client; resolving queue URLs (a first publish sends many)
        self._urls: dict[str, str] = {}  # queue → queue URL
        self._polls: dict[str, set[_Poll]] = {}
        self._ready: list[Delivery] = []  # received by a poll, not handed out yet
        self._closing = asyncio.Event()

    def __repr__(self) -> str:
        return f"SqsBroker({self._where!r}, prefix={self.options.prefix!r}, fifo={self.options.fifo})"

    def queue_name(self, queue: str) -> str:
        """The SQS queue name of ``queue``: ``{prefix}{queue}``, plus ``.fifo`` for FIFO queues."""
        return self._checked(self.options.prefix + queue)

    def dead_letter_queue_name(self, queue: str) -> str:
        """The SQS dead-letter queue of ``queue``: ``{prefix}{queue}-dead`` (plus ``.fifo``)."""
        return self._checked(f"{self.options.prefix}{queue}-dead")

    # -- the contract ----------------------------------------------------------------------------
    async def ensure(self, queues: Sequence[str]) -> None:
        """Resolve each queue's URL, creating the queue (and its dead-letter queue) if ``create`` is on."""
        await asyncio.gather(*(self._url(q) for q in queues))

    async def publish(self, messages: Sequence[Message]) -> None:
        """``SendMessageBatch`` per 10 messages, all at once; ``BrokerError`` names what was not sent.

        Entries that did go out stay published: the relay publishes the whole batch again and
        the worker's claim drops the duplicates.
        """
        if not messages:
            return
        by_queue: dict[str, list[Message]] = {}
        for m in messages:
            by_queue.setdefault(m.queue, []).append(m)
        chunks = [(q, ms[i : i + BATCH]) for q, ms in by_queue.items() for i in range(0, len(ms), BATCH)]
        token = secrets.token_hex(6)  # this call's deduplication ids (FIFO): SDK retries reuse them
        results = await asyncio.gather(*(self._send(q, c, token) for q, c in chunks), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for e in errors:
            if not isinstance(e, BrokerError):
                raise e
        if errors:
            transient = all(isinstance(e, BrokerError) and e.is_transient() for e in errors)
            message = f"sqs publish: {len(errors)} of {len(chunks)} batches of 10 failed; the first: {errors[0]}"
            raise BrokerError(message, transient=transient) from errors[0]

    async def receive(self, queues: Sequence[str], max_messages: int, wait: float) -> list[Delivery]:
        """Buffered deliveries first, else what the queues' long polls bring within ``wait`` seconds."""
        if self._closing.is_set() or not queues or max_messages < 1:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait, 0.0)
        first = True
        while True:
            out = await self._take(queues, max_messages)
            left = deadline - loop.time()
            if out or self._closing.is_set() or (left <= 0 and not first):
                return out
            started = self._start_polls(queues, max_messages, short=left <= 0)
            first = False
            if left > 0:
                await self._wait([t for q in queues for t in self._polls.get(q, ())], left)
            elif started:  # wait=0: one round trip of short polls (WaitTimeSeconds=0)
                await self._wait(started, None)
            else:
                return []

    async def extend(self, delivery: Delivery, seconds: float) -> None:
        """``ChangeMessageVisibility`` to ``seconds`` from now (whole seconds, at most 12 hours)."""
        visibility = min(MAX_VISIBILITY, max(1, math.ceil(seconds)))
        sent = asyncio.get_running_loop().time()
        if not await self._on_receipt("extend", delivery, "change_message_visibility", VisibilityTimeout=visibility):
            raise LeaseLostError(f"sqs delivery of job {delivery.job_id} ({delivery.queue!r}) is no longer ours")
        delivery.extra["lease_until"] = sent + visibility  # SQS started counting after we sent

    async def ack(self, delivery: Delivery) -> None:
        """``DeleteMessage`` while the delivery is still ours; otherwise a logged no-op."""
        await self.ack_many([delivery])

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """:meth:`ack` for many: ``DeleteMessageBatch`` per queue and 10 deliveries, all at once."""
        now = asyncio.get_running_loop().time()
        by_url: dict[str, dict[str, Delivery]] = {}  # queue URL → receipt handle → delivery (once each)
        for d in deliveries:
            if d.handle is not None and now < d.extra.get("lease_until", 0.0):
                by_url.setdefault(d.handle[0], {})[d.handle[1]] = d
        skipped = len(deliveries) - sum(len(ds) for ds in by_url.values())
        if skipped:
            log.info("ack of %d sqs deliveries skipped: their visibility ran out", skipped)
        chunks = [(url, [*ds.values()][i : i + BATCH]) for url, ds in by_url.items() for i in range(0, len(ds), BATCH)]
        await gather_all(*(self._delete(url, chunk) for url, chunk in chunks))

    async def release(self, delivery: Delivery) -> None:
        """Not part of the contract: hand a buffered delivery back (``ChangeMessageVisibility`` to 0)."""
        if not await self._on_receipt("release", delivery, "change_message_visibility", VisibilityTimeout=0):
            log.info("release of sqs delivery of job %s skipped: no longer ours", delivery.job_id)
        delivery.extra["lease_until"] = 0.0

    async def close(self) -> None:
        """Return any blocked receive, stop the polls, give buffered deliveries back, close the client."""
        if self._closing.is_set():
            return
        self._closing.set()
        polls = [t for tasks in self._polls.values() for t in tasks]
        for t in polls:
            t.cancel()  # a poll cut short may hide its messages until their visibility runs out
        await asyncio.gather(*polls, return_exceptions=True)
        self._polls.clear()
        buffered, self._ready = self._ready, []
        if self._sqs is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.gather(*(self.release(d) for d in buffered), return_exceptions=True)
            with contextlib.suppress(*_SDK_ERRORS):
                await self._sqs.close()
            self._sqs = None

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
            except _SDK_ERRORS as exc:
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

    async def _send(self, queue: str, chunk: list[Message], token: str) -> None:
        """Send up to 10 messages; ``BrokerError`` naming the jobs of the entries that failed."""
        entries: list[dict[str, str]] = []
        for i, m in enumerate(chunk):
            entry = {"Id": str(i), "MessageBody": encode_message(m).decode()}
            if self.options.fifo:
                entry["MessageGroupId"] = str(m.job_id) if self.options.group_by == "job" else m.queue
                # The relay's dispatch key: SQS drops a re-publish of a batch whose commit failed, never
                # a retry or a re-dispatch. Without one, this call's token (its SDK retries reuse it).
                entry["MessageDeduplicationId"] = m.dispatch_key or f"{m.job_id.hex}-{token}"
            entries.append(entry)

        async def send(sqs: Any, url: str) -> Any:
            return await sqs.send_message_batch(QueueUrl=url, Entries=entries)

        failed = (await self._on_queue(queue, "publish", send)).get("Failed", [])
        if failed:  # entry by entry: throttled, too large... the sender's fault is not worth a retry
            ids = ", ".join(str(chunk[int(f["Id"])].job_id) for f in failed)
            reason = f"{failed[0].get('Code')}: {failed[0].get('Message')}"
            transient = not any(f.get("SenderFault") for f in failed)
            raise BrokerError(f"sqs publish at {self._where}: jobs {ids} not sent: {reason}", transient=transient)

    def _start_polls(self, queues: Sequence[str], max_messages: int, *, short: bool) -> list[_Poll]:
        """Start polls until each queue has room for its share of ``max_messages`` (at least one poll)."""
        started: list[_Poll] = []
        base, extra = divmod(max_messages, len(queues))
        for i, q in enumerate(queues):
            live = self._polls.setdefault(q, set())
            want = max(1, base + (i < extra)) - BATCH * len(live)
            while want > 0 and len(live) < self.options.polls_per_queue:
                count = min(BATCH, want)
                wait_s = 0 if short else LONG_POLL
                task = asyncio.create_task(self._poll(q, count, wait_s), name=f"polyqueue-sqs-poll-{q}")
                live.add(task)
                started.append(task)
                want -= count
        return started

    async def _poll(self, queue: str, count: int, wait_s: int) -> list[Delivery]:
        loop = asyncio.get_running_loop()

        async def call(sqs: Any, url: str) -> list[Delivery]:
            reply = await sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=count,
                WaitTimeSeconds=wait_s,
                VisibilityTimeout=self._visibility,
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
            until = loop.time() + self._visibility - LEASE_SLACK  # SQS started counting just before replying
            # each decoded on its own: one bad message (body, attribute) never fails the others
            got = decode_each(
                queue,
                reply.get("Messages") or [],
                lambda m: self._delivery(queue, url, m, until),
                handle=lambda m: (url, m["ReceiptHandle"]),
            )
            for d in got:
                d.extra.setdefault("lease_until", until)  # so that an unreadable one can be acked too
            return got

        return await self._on_queue(queue, "receive", call)

    def _delivery(self, queue: str, url: str, message: dict[str, Any], lease_until: float) -> Delivery:
        try:  # a hint only (guarantee 7): an odd value is not worth losing the delivery over
            count = max(1, int((message.get("Attributes") or {}).get("ApproximateReceiveCount", 1)))
        except (TypeError, ValueError):
            count = 1
        body = message.get("Body") or ""
        delivery = decode_message(body, queue=queue, handle=(url, message["ReceiptHandle"]), delivery_count=count)
        delivery.extra.update(lease_until=lease_until, message_id=message.get("MessageId"))
        return delivery

    async def _take(self, queues: Sequence[str], max_messages: int) -> list[Delivery]:
        """Collect finished polls, then hand out up to ``max_messages`` buffered deliveries still fresh.

        A delivery with less than half its visibility left is released instead: the worker renews
        a lease only a third of a lease after the claim. One whose visibility ran out is dropped.
        """
        error: BaseException | None = None
        for tasks in self._polls.values():
            for task in [t for t in tasks if t.done()]:
                tasks.discard(task)
                if not task.cancelled():
                    if (exc := task.exception()) is None:
                        self._ready += task.result()
                    else:
                        error = error or exc
        now = asyncio.get_running_loop().time()
        out: list[Delivery] = []
        keep: list[Delivery] = []
        stale: list[Delivery] = []
        for d in self._ready:
            left = d.extra["lease_until"] - now
            if left <= 0:
                continue  # another worker may hold it now
            if d.queue not in queues or len(out) >= max_messages:
                keep.append(d)
            else:
                (out if left >= self._visibility / 2 else stale).append(d)
        self._ready = keep
        for r in await asyncio.gather(*(self.release(d) for d in stale), return_exceptions=True):
            if isinstance(r, BaseException):
                log.warning("release of a stale sqs delivery failed: %s", r)
        if error is not None and not out:
            raise error
        return out  # (a poll's error with deliveries beside it: the next poll meets it again)

    async def _wait(self, tasks: Sequence[_Poll], timeout: float | None) -> None:
        """Until one of ``tasks`` finishes, ``timeout`` passes or ``close()`` is called."""
        closed = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({*tasks, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            await asyncio.gather(closed, return_exceptions=True)

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
        except _SDK_ERRORS as exc:
            if isinstance(exc, ClientError) and _code(exc) in _LOST:
                return False
            raise self.errors.error(op, exc) from exc
        return True

    async def _delete(self, queue_url: str, chunk: list[Delivery]) -> None:
        entries = [{"Id": str(i), "ReceiptHandle": d.handle[1]} for i, d in enumerate(chunk)]
        sqs = await self._client()
        try:
            reply = await sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries)
        except _SDK_ERRORS as exc:
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


def create(config: BrokerConfig) -> SqsBroker:
    """The adapter for ``queue_backend="sqs"`` (``broker_url`` optional: ``sqs://`` uses the AWS defaults).

    A region is required, from the URL or the AWS configuration: without one every call
    would fail, and a worker would retry forever what no waiting fixes.
    """
    broker = SqsBroker(config.url or "sqs://", lease_seconds=config.lease_seconds)
    if broker.options.region is None and AioSession().get_config_variable("region") is None:
        raise ConfigurationError(
            "the sqs broker needs an AWS region: add ?region=... to broker_url (POLYQUEUE_BROKER_URL) "
            "or set AWS_DEFAULT_REGION (or a region in the AWS profile)"
        )
    return broker
