"""A small AMQP 1.0 peer that the unmodified ``azure-servicebus`` SDK talks to (tests only).

Built on python-qpid-proton's server side: a proton ``Container`` runs in its own
thread and listens on 127.0.0.1 without TLS (the SDK's ``UseDevelopmentEmulator=true``).
What it implements and what it does not: see README.md beside this file.

All proton objects live in the container thread. The test thread touches only
plain state (queues, settings) under ``ServiceBusPeer.lock``.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from proton import Array, Condition, Data, Delivery, Endpoint, Handler, Link, Message, symbol, timestamp
from proton.reactor import Container

__all__ = ["ServiceBusPeer", "connection_string"]

TICK = 0.05  # how often lock expiry and scheduled messages are checked
DEAD_LETTER_SUFFIX = "/$deadletterqueue"
LOCK_LOST = symbol("com.microsoft:message-lock-lost")
DATA_SECTION = 0x75


@dataclass
class Stored:
    """A message in a queue: its encoded sections and Service Bus's bookkeeping."""

    message: Message
    seq: int
    enqueued_ms: int
    delivery_count: int = 0  # failed deliveries so far (the AMQP header's meaning)


@dataclass
class Lock:
    token: uuid.UUID
    queue: Queue
    stored: Stored
    until: float  # epoch seconds
    delivery: Delivery | None = None


@dataclass
class Queue:
    name: str
    lock_duration: float
    max_delivery_count: int
    duplicate_window: float = 0.0  # seconds; 0: duplicate detection off (Service Bus's default)
    ready: deque[Stored] = field(default_factory=deque)
    scheduled: list[tuple[float, Stored]] = field(default_factory=list)
    consumers: list[Link] = field(default_factory=list)
    seen: dict[str, float] = field(default_factory=dict)  # message id -> when first sent
    duplicates_dropped: int = 0


def connection_string(port: int) -> str:
    """What the unmodified SDK is given to reach a peer on ``port`` (plain TCP, no TLS)."""
    return (
        f"Endpoint=sb://127.0.0.1:{port};SharedAccessKeyName=peer;SharedAccessKey=cGVlcg==;UseDevelopmentEmulator=true;"
    )


def _node(address: str | None) -> str:
    """``amqps://host:port/q`` or ``sb://host/q`` → ``q``; other addresses as they are."""
    address = address or ""
    if "://" in address:
        address = address.split("://", 1)[1].partition("/")[2]
    if address.lower().endswith(DEAD_LETTER_SUFFIX):  # the SDK spells it /$DeadLetterQueue
        address = address[: -len(DEAD_LETTER_SUFFIX)] + DEAD_LETTER_SUFFIX
    return address


def _now_ms() -> int:
    return int(time.time() * 1000)


def _split_batch(raw: bytes) -> list[bytes] | None:
    """The encoded messages of a batch transfer, else None.

    proton's Python binding does not expose a delivery's message-format (0x80013700 for a
    batch), so a batch is recognised by its shape: every data section holds an encoded
    message (the SDK copies the first message's properties onto the envelope).
    """
    parts: list[bytes] = []
    data = Data()
    rest = bytes(raw)
    while rest:
        data.clear()
        used = data.decode(rest)
        rest = rest[used:]
        data.rewind()
        data.next()
        if data.type() != Data.DESCRIBED:
            return None
        data.enter()
        data.next()
        code = data.get_object()
        data.next()
        if code == DATA_SECTION:
            parts.append(bytes(data.get_binary()))
    if not parts or any(not p.startswith(b"\x00\x53") for p in parts):
        return None
    return parts


class ServiceBusPeer(Handler):
    """The peer. ``start()`` listens (on ``port``, or a free one), ``stop()`` closes every connection.

    State survives ``stop``/``start`` unless ``wipe()`` is called, so a test can restart it.
    """

    def __init__(self, *, port: int = 0, lock_duration: float = 30.0, max_delivery_count: int = 10) -> None:
        super().__init__()
        self.port = port or _free_port()
        self.lock = threading.RLock()
        self.defaults = (lock_duration, max_delivery_count, 0.0)
        self._prefix_settings: dict[str, tuple[float, int, float]] = {}
        self.queues: dict[str, Queue] = {}
        self.locks: dict[uuid.UUID, Lock] = {}
        self._seq = itertools.count(1)
        self._container: Container | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._started = threading.Event()
        self._replies: dict[tuple[Any, str], Link] = {}  # (connection id, node) → our link answering requests
        self._connections: list[Any] = []
        self._acceptor: Any = None
        #: Connections proton closed for a protocol violation by the client (condition, description).
        self.protocol_errors: list[tuple[str, str]] = []
        #: While True, settlements on receive links wait unanswered (see ``hold_settlements``).
        self._holding = False
        self._held: list[Delivery] = []
        #: While True, client attaches of queue links wait unanswered (see ``hold_attaches``).
        self._holding_attaches = False
        self._held_attaches: list[Link] = []

    # -- the test thread's side --------------------------------------------------------------------
    @property
    def connection_string(self) -> str:
        return connection_string(self.port)

    def configure(
        self, prefix: str, *, lock_duration: float, max_delivery_count: int = 10, duplicate_window: float = 0.0
    ) -> None:
        """Settings for queues whose names start with ``prefix`` (existing ones included).

        ``duplicate_window`` > 0 turns duplicate detection on: a message sent with a message id
        already sent within that many seconds is accepted and dropped, as Service Bus does.
        """
        with self.lock:
            self._prefix_settings[prefix] = (lock_duration, max_delivery_count, duplicate_window)
            for q in self.queues.values():
                if q.name.startswith(prefix) and not q.name.endswith(DEAD_LETTER_SUFFIX):
                    q.lock_duration, q.max_delivery_count = lock_duration, max_delivery_count
                    q.duplicate_window = duplicate_window

    def duplicates_dropped(self, queue: str) -> int:
        """Messages duplicate detection dropped from ``queue``."""
        with self.lock:
            q = self.queues.get(queue)
            return q.duplicates_dropped if q else 0

    def bodies(self, queue: str) -> list[bytes]:
        """The body bytes of the messages ready in ``queue`` (e.g. ``q/$deadletterqueue``)."""
        with self.lock:
            q = self.queues.get(queue)
            return [_body_bytes(s.message) for s in q.ready] if q else []

    def outstanding(self, queue: str) -> int:
        """Messages of ``queue`` not yet completed: ready, scheduled or locked."""
        with self.lock:
            q = self.queues.get(queue)
            waiting = len(q.ready) + len(q.scheduled) if q else 0
            return waiting + sum(1 for lk in self.locks.values() if lk.queue.name == queue)

    def hold_settlements(self, hold: bool) -> None:
        """Hold client settlements on receive links unanswered (True) or answer them (False).

        Lets a test see how many settlements a client has in flight at once.
        """
        with self.lock:
            self._holding = hold

    def held_settlements(self) -> int:
        with self.lock:
            return len(self._held)

    def hold_attaches(self, hold: bool) -> None:
        """Leave client attaches of queue links (senders and receivers, not ``$cbs`` or
        ``$management``) unanswered (True), or answer them on the next tick (False).

        Keeps a client's handler half-open for as long as a test needs, e.g. to close the client
        under it.
        """
        with self.lock:
            self._holding_attaches = hold

    def held_attaches(self) -> int:
        with self.lock:
            return len(self._held_attaches)

    def wipe(self) -> None:
        with self.lock:
            self.queues.clear()
            self.locks.clear()

    def start(self) -> None:
        self._stopping = False
        self._started.clear()
        self._container = Container(self)
        self._thread = threading.Thread(target=self._container.run, name=f"sb-peer-{self.port}", daemon=True)
        self._thread.start()
        if not self._started.wait(5):
            raise RuntimeError("service bus peer did not start")

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping = True  # the next tick closes everything and stops the container
        self._thread.join(10)
        self._thread = None
        with self.lock:
            for q in self.queues.values():
                q.consumers.clear()
            for lk in self.locks.values():
                lk.delivery = None
            self._held.clear()  # their connections are gone: the client sees the settlements fail

    # -- proton events (container thread) ----------------------------------------------------------
    def on_reactor_init(self, event: Any) -> None:
        self._acceptor = event.container.listen(f"127.0.0.1:{self.port}")
        event.container.schedule(TICK, self)
        self._started.set()

    def on_timer_task(self, event: Any) -> None:
        if self._stopping:  # close every socket first: container.stop() alone leaves them open
            if self._connections or self._acceptor is not None:
                if self._acceptor is not None:
                    self._acceptor.close()
                    self._acceptor = None
                for conn in self._connections:
                    conn.close()
                    if conn.transport is not None:
                        conn.transport.close_tail()
                        conn.transport.close_head()
                self._connections.clear()
                event.container.schedule(TICK, self)
            else:
                event.container.stop()
            return
        with self.lock:
            if not self._holding:
                held, self._held = self._held, []
                for d in held:
                    self._settled_by_client(d)
            if not self._holding_attaches:
                attaches, self._held_attaches = self._held_attaches, []
                for link in attaches:
                    if not link.state & Endpoint.REMOTE_CLOSED:
                        self._attach(link)
            self._expire()
            self._pump_all()
        event.container.schedule(TICK, self)

    def on_connection_remote_open(self, event: Any) -> None:
        if event.connection.state & Endpoint.LOCAL_UNINIT:
            event.connection.open()
            self._connections.append(event.connection)

    def on_session_remote_open(self, event: Any) -> None:
        if event.session.state & Endpoint.LOCAL_UNINIT:
            event.session.open()

    def on_link_remote_open(self, event: Any) -> None:
        link = event.link
        address = (link.remote_source if link.is_sender else link.remote_target).address
        node = _node(address)
        with self.lock:
            if self._holding_attaches and node != "$cbs" and not node.endswith("/$management"):
                self._held_attaches.append(link)
                return
        self._attach(link)

    def _attach(self, link: Link) -> None:
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        link.open()
        with self.lock:
            if link.is_receiver:
                link.flow(1000)
            else:
                node = _node(link.remote_source.address)
                if node == "$cbs" or node.endswith("/$management"):
                    self._replies[(link.connection, node)] = link
                else:
                    self._queue(node).consumers.append(link)

    def on_link_remote_close(self, event: Any) -> None:
        with self.lock:
            if event.link in self._held_attaches:
                self._held_attaches.remove(event.link)
        self._forget(event.link)
        event.link.close()

    def on_session_remote_close(self, event: Any) -> None:
        event.session.close()

    def on_connection_remote_close(self, event: Any) -> None:
        event.connection.close()

    def on_transport_error(self, event: Any) -> None:
        """A framing or sequencing error by the client: proton drops the connection; tests assert on it."""
        cond = event.transport.condition
        if cond is not None and not self._stopping:
            with self.lock:
                self.protocol_errors.append((str(cond.name), str(cond.description)))

    def on_transport_closed(self, event: Any) -> None:
        conn = event.connection
        if conn is None:
            return
        link = conn.link_head(0)
        while link:
            self._forget(link)
            link = link.next(0)
        if conn in self._connections:
            self._connections.remove(conn)

    def on_link_flow(self, event: Any) -> None:
        link = event.link
        if link.is_sender:
            with self.lock:
                self._pump(self._queue(_node(link.remote_source.address)))
                if link.drain_mode:
                    link.drained()

    def on_delivery(self, event: Any) -> None:
        d, link = event.delivery, event.link
        with self.lock:
            if link.is_receiver:
                if d.readable and not d.partial:
                    raw = link.recv(d.pending)
                    link.advance()
                    self._incoming(link, raw)
                    d.update(Delivery.ACCEPTED)
                    d.settle()
                    link.flow(1)
            elif d.updated and d.remote_state:
                if self._holding:
                    if d not in self._held:
                        self._held.append(d)
                else:
                    self._settled_by_client(d)

    # -- queues ------------------------------------------------------------------------------------
    def _queue(self, name: str) -> Queue:
        q = self.queues.get(name)
        if q is None:
            lock_duration, max_count, window = self.defaults
            for prefix, settings in self._prefix_settings.items():
                if name.startswith(prefix):
                    lock_duration, max_count, window = settings
            if name.endswith(DEAD_LETTER_SUFFIX):
                max_count, window = 2**31, 0.0
            q = self.queues[name] = Queue(name, lock_duration, max_count, window)
        return q

    def _store(self, queue: Queue, message: Message, at: float | None = None) -> int:
        stored = Stored(message, next(self._seq), _now_ms())
        if at is not None and at > time.time():
            queue.scheduled.append((at, stored))
        else:
            queue.ready.append(stored)
        return stored.seq

    def _incoming(self, link: Link, raw: bytes) -> None:
        node = _node(link.remote_target.address)
        if node == "$cbs" or node.endswith("/$management"):
            request = Message()
            request.decode(raw)
            self._answer(link, node, request)
            return
        queue = self._queue(node)
        for part in _split_batch(raw) or [raw]:
            m = Message()
            m.decode(part)
            if not self._duplicate(queue, m):
                self._store(queue, m, _scheduled_at(m))
        self._pump(queue)

    @staticmethod
    def _duplicate(queue: Queue, message: Message) -> bool:
        """Duplicate detection: ``message``'s id was sent to ``queue`` within its window."""
        if queue.duplicate_window <= 0 or message.id is None:
            return False
        now, key = time.time(), str(message.id)
        first = queue.seen.get(key)
        if first is not None and now - first < queue.duplicate_window:
            queue.duplicates_dropped += 1
            return True
        queue.seen[key] = now
        return False

    def _pump_all(self) -> None:
        for q in list(self.queues.values()):
            self._pump(q)

    def _pump(self, queue: Queue) -> None:
        """Send ready messages to the queue's receivers that have credit, round robin."""
        while queue.ready:
            links = [lk for lk in queue.consumers if lk.credit > 0 and lk.state & Endpoint.LOCAL_ACTIVE]
            if not links:
                return
            for link in links:
                if not queue.ready:
                    return
                self._send(link, queue, queue.ready.popleft())
            queue.consumers.append(queue.consumers.pop(0))

    def _send(self, link: Link, queue: Queue, stored: Stored) -> None:
        token = uuid.uuid4()
        until = time.time() + queue.lock_duration
        m = stored.message
        m.annotations = {
            **(m.annotations or {}),
            symbol("x-opt-sequence-number"): stored.seq,
            symbol("x-opt-enqueued-time"): timestamp(stored.enqueued_ms),
            symbol("x-opt-locked-until"): timestamp(int(until * 1000)),
        }
        m.delivery_count = stored.delivery_count
        d = link.delivery(token.bytes_le)  # type: ignore[arg-type] # the lock token, as the SDK reads it back: UUID(bytes_le=tag)
        link.send(m.encode())
        link.advance()
        self.locks[token] = Lock(token, queue, stored, until, d)

    def _expire(self) -> None:
        now = time.time()
        for token, lk in list(self.locks.items()):
            if lk.until <= now:
                del self.locks[token]
                self._redeliver(lk.queue, lk.stored, failed=True)
        for q in self.queues.values():
            due = [s for at, s in q.scheduled if at <= now]
            if due:
                q.scheduled = [(at, s) for at, s in q.scheduled if at > now]
                q.ready.extend(due)

    def _redeliver(self, queue: Queue, stored: Stored, *, failed: bool) -> None:
        if failed:
            stored.delivery_count += 1
        if stored.delivery_count >= queue.max_delivery_count:
            self._dead_letter(queue, stored, "MaxDeliveryCountExceeded", "delivered too often")
        else:
            queue.ready.appendleft(stored)

    def _dead_letter(self, queue: Queue, stored: Stored, reason: str, description: str) -> None:
        m = stored.message
        props: dict[Any, Any] = {**_map(m.properties), "DeadLetterReason": reason}
        props["DeadLetterErrorDescription"] = description
        m.properties = props  # type: ignore[assignment]  # proton types the setter as None
        self._queue(queue.name + DEAD_LETTER_SUFFIX).ready.append(stored)

    def _settle(self, token: uuid.UUID, status: str, reason: str = "", description: str = "") -> bool:
        """Apply a settlement to a held lock; False when the lock is gone (expired or settled)."""
        lk = self.locks.pop(token, None)
        if lk is None:
            return False
        if status == "abandoned":
            self._redeliver(lk.queue, lk.stored, failed=True)
        elif status == "released":
            self._redeliver(lk.queue, lk.stored, failed=False)
        elif status == "suspended":
            self._dead_letter(lk.queue, lk.stored, reason, description)
        self._pump(lk.queue)
        return True

    def _settled_by_client(self, d: Delivery) -> None:
        token = uuid.UUID(bytes_le=_tag(d))
        state = d.remote_state
        if state == Delivery.MODIFIED and d.remote.undeliverable:
            ok = False  # defer is not implemented
        else:
            statuses: dict[Any, str] = {
                Delivery.ACCEPTED: "completed",
                Delivery.MODIFIED: "abandoned",
                Delivery.RELEASED: "released",
                Delivery.REJECTED: "suspended",
            }
            status = statuses[state]
            cond = d.remote.condition
            ok = self._settle(token, status, *(_dead_letter_info(cond) if status == "suspended" else ()))
        if ok:
            d.update(state)
        else:
            d.local.condition = Condition(str(LOCK_LOST), "the lock was lost or the message is gone")
            d.update(Delivery.REJECTED)
        d.settle()

    # -- $cbs and $management ------------------------------------------------------------------------
    def _answer(self, link: Link, node: str, request: Message) -> None:
        props: dict[Any, Any] = dict(request.properties or {})
        if node == "$cbs":
            status, body, code_key = 202, None, "status-code"
        else:
            code_key = "statusCode"
            status, body = self._management(node.rsplit("/", 1)[0], str(props.get("operation")), _map(request.body))
        reply = Message(correlation_id=request.id, address=request.reply_to, body=body)
        reply_props: dict[Any, Any] = {code_key: status, "statusDescription": "OK" if status < 300 else "failed"}
        if status >= 300:
            reply_props["errorCondition"] = LOCK_LOST
        reply.properties = reply_props  # type: ignore[assignment]  # proton types the setter as None
        out = self._replies.get((link.connection, node))
        if out is not None:
            out.send(reply)

    def _management(self, queue_name: str, operation: str, body: dict[Any, Any]) -> tuple[int, Any]:
        queue = self._queue(queue_name)
        if operation == "com.microsoft:renew-lock":
            expirations = []
            for token in body["lock-tokens"]:
                lk = self.locks.get(token)
                if lk is None:
                    return 410, None
                lk.until = time.time() + queue.lock_duration
                expirations.append(timestamp(int(lk.until * 1000)))
            return 200, {"expirations": Array(Data.NULL, Data.TIMESTAMP, *expirations)}
        if operation == "com.microsoft:update-disposition":
            reason, description = body.get("deadletter-reason", ""), body.get("deadletter-description", "")
            for token in body["lock-tokens"]:
                if not self._settle(token, body["disposition-status"], reason, description):
                    return 410, None
            return 200, {}
        if operation == "com.microsoft:schedule-message":
            seqs = []
            for item in body["messages"]:
                m = Message()
                m.decode(bytes(item["message"]))
                seqs.append(self._store(queue, m, _scheduled_at(m)))
            return 200, {"sequence-numbers": Array(Data.NULL, Data.LONG, *seqs)}
        if operation == "com.microsoft:cancel-scheduled-message":
            cancel = set(body["sequence-numbers"])
            queue.scheduled = [(at, s) for at, s in queue.scheduled if s.seq not in cancel]
            return 200, {}
        return 501, None

    def _forget(self, link: Link) -> None:
        with self.lock:
            for q in self.queues.values():
                if link in q.consumers:
                    q.consumers.remove(link)
            for lk in self.locks.values():
                if lk.delivery is not None and lk.delivery.link == link:
                    lk.delivery = None  # the lock stays until it expires, as on Service Bus
            for key, value in list(self._replies.items()):
                if value == link:
                    del self._replies[key]


def _tag(d: Delivery) -> bytes:
    """The delivery tag as raw bytes (proton's ``Delivery.tag`` decodes it as UTF-8 and fails)."""
    from cproton import bytes2pybytes, lib  # type: ignore[import-untyped]

    return bytes(bytes2pybytes(lib.pn_delivery_tag(d._impl)))


def _dead_letter_info(cond: Condition | None) -> tuple[str, str]:
    info = _map(cond.info if cond is not None else None)
    return str(info.get("DeadLetterReason", "")), str(info.get("DeadLetterErrorDescription", ""))


def _body_bytes(m: Message) -> bytes:
    body = m.body
    if isinstance(body, memoryview | bytearray):
        return bytes(body)
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return b"" if body is None else repr(body).encode()


def _map(value: object) -> dict[Any, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _scheduled_at(m: Message) -> float | None:
    """Epoch seconds of ``x-opt-scheduled-enqueue-time`` (a timestamp in ms), if set."""
    when = _map(m.annotations).get(symbol("x-opt-scheduled-enqueue-time"))
    return float(when) / 1000 if isinstance(when, int) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
