"""``python -m tests.moto_server -H HOST -p PORT``: moto's standalone server, with one fix.

moto 5's ``ReceiveMessage`` checks each message it is about to return against the queue's
retention period by computing *every* queue attribute, and the counting ones scan the whole
queue: O(messages in the queue) per message returned. With a few thousand messages waiting
(a chaos run, a benchmark backlog) moto spends its time in that scan, answers in tens of
seconds and times requests out: a test of moto, not of polyqueue. The fix reads the one
attribute it needs; what is retained, and for how long, is unchanged.
"""

from __future__ import annotations

from typing import Any

from moto.core.utils import unix_time
from moto.server import main
from moto.sqs.models import SQSBackend


def _within_retention(self: SQSBackend, queue_name: str, message: Any) -> bool:
    queue = self.get_queue(queue_name)
    retention = int(queue.message_retention_period)  # type: ignore[attr-defined]
    return bool(retention + message.sent_timestamp / 1000 > unix_time())


SQSBackend.is_message_valid_based_on_retention_period = _within_retention  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
