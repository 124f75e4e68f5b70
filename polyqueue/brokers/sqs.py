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

The client, the queue URLs and the calls on receipt handles are
:mod:`polyqueue.brokers.sqs_queues`. See docs/brokers/sqs.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections.abc import Sequence
from typing import Any

from aiobotocore.session import AioSession  # type: ignore[import-untyped]

from polyqueue._aio import gather_all
from polyqueue.brokers.base import (
    BrokerAdapter,
    BrokerConfig,
    Capabilities,
    Delivery,
    Message,
    by_queue,
    decode_each,
    decode_message,
    encode_message,
    wait_or_closed,
)
from polyqueue.brokers.sqs_queues import BATCH, LONG_POLL, MAX_VISIBILITY, SDK_ERRORS, SqsOptions, SqsQueues
from polyqueue.errors import BrokerError, ConfigurationError, LeaseLostError

__all__ = ["SqsBroker", "SqsOptions"]

log = logging.getLogger("polyqueue.brokers.sqs")

_Poll = asyncio.Task[list[Delivery]]

LEASE_SLACK = 0.1  # seconds a delivery's lease is assumed to end early (the reply's time in transit)


class SqsBroker(SqsQueues, BrokerAdapter):
    """Deliveries on Amazon SQS (``queue_backend="sqs"``).

    ``url`` is ``sqs://`` plus :class:`SqsOptions` in the query string, e.g.
    ``sqs://?region=eu-west-1&prefix=myapp-``. Credentials come from the standard AWS chain
    unless the URL has them as ``sqs://KEY_ID:SECRET@?...`` (percent-encoded). ``lease_seconds``,
    rounded up to whole seconds, is the visibility timeout of every delivery.
    """

    name = "sqs"

    def __init__(self, url: str = "sqs://", *, lease_seconds: float = 30.0) -> None:
        super().__init__(url, lease_seconds)
        dead_letter = self.options.dead_letter_after > 0
        self.capabilities = Capabilities(lease=True, survives_restart=True, dead_letter=dead_letter)
        self._polls: dict[str, set[_Poll]] = {}
        self._ready: list[Delivery] = []  # received by a poll, not handed out yet

    def __repr__(self) -> str:
        return f"SqsBroker({self._where!r}, prefix={self.options.prefix!r}, fifo={self.options.fifo})"

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
        chunks = [(q, ms[i : i + BATCH]) for q, ms in by_queue(messages).items() for i in range(0, len(ms), BATCH)]
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
                await wait_or_closed(self._closing, [t for q in queues for t in self._polls.get(q, ())], left)
            elif started:  # wait=0: one round trip of short polls (WaitTimeSeconds=0)
                await wait_or_closed(self._closing, started, None)
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
            with contextlib.suppress(*SDK_ERRORS):
                await self._sqs.close()
            self._sqs = None

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
