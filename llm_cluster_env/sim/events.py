"""Event kinds of the cluster's event heap and their tie-break order.

Heap entries are ``(time, kind, replica_id, version)``. At equal times the kind decides, in this
order:

1. ``BATCH_END`` — a replica finishes an iteration (or a pure-decode stretch of iterations):
   tokens are emitted, finished requests leave and free their KV blocks.
2. ``ARRIVAL`` — a request reaches the router, which sends it to a replica. Arrivals are not
   stored in the heap (the workload is a time-ordered list), but they take this place in the
   order: every event ordered before ``(arrival_time, ARRIVAL)`` happens first.
3. ``BATCH_START`` — a replica schedules its next iteration (preemption, admission, batch
   composition). Coming after arrivals, a request that arrives exactly when a replica frees up
   joins that replica's next iteration, as in a real engine whose scheduler runs after its
   input queue is drained.

Equal ``(time, kind)`` pairs are ordered by replica id. A replica has at most one live event;
``version`` lets the cluster discard entries made stale when a stretch is cut short.
"""

from __future__ import annotations

from enum import IntEnum


class EventKind(IntEnum):
    BATCH_END = 0
    ARRIVAL = 1
    BATCH_START = 2


BATCH_END = int(EventKind.BATCH_END)
ARRIVAL = int(EventKind.ARRIVAL)
BATCH_START = int(EventKind.BATCH_START)
