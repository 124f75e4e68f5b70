"""The Service Bus test peer as a process: ``python -m tests.chaos.peer_process PORT LOCK_SECONDS``.

Prints ``ready`` once it listens; runs until SIGTERM. Deliveries are dead-lettered only
after many attempts, so a chaos run measures polyqueue's recovery, not the queue's limit.
"""

from __future__ import annotations

import signal
import sys
import threading

from tests.servicebus_peer.peer import ServiceBusPeer

if __name__ == "__main__":
    port, lock_seconds = int(sys.argv[1]), float(sys.argv[2])
    peer = ServiceBusPeer(port=port, lock_duration=lock_seconds, max_delivery_count=1000)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    peer.start()
    print("ready", flush=True)
    done.wait()
    peer.stop()
