"""The event bus: a bounded in-memory ring for replay, and one bounded queue per subscriber.

A subscriber whose queue is full is dropped at once (it is told why, if it still listens):
a slow reader never stalls the head or the other subscribers.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterable, Sequence

from gswarm.protocol import Event, encode
from gswarm.store import Store

log = logging.getLogger(__name__)


class Subscriber:
    """One follower of the event stream."""

    def __init__(self, topics: frozenset[str], maxsize: int) -> None:
        self.topics = topics
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.dropped = asyncio.Event()
        self.drop_reason = ""

    def wants(self, event: Event) -> bool:
        """True when the subscriber asked for this event's topic (or for all)."""
        return not self.topics or event.topic in self.topics


class EventBus:
    """Publishes events to subscribers and replays past ones."""

    def __init__(self, store: Store, ring_size: int, queue_size: int) -> None:
        self._store = store
        self._ring: collections.deque[Event] = collections.deque(maxlen=ring_size)
        self._queue_size = queue_size
        self._subscribers: set[Subscriber] = set()
        self.last_seq = 0
        self.dropped_count = 0

    @property
    def subscriber_count(self) -> int:
        """How many subscribers are attached now."""
        return len(self._subscribers)

    def preload(self, events: Iterable[Event], last_seq: int) -> None:
        """Fill the ring with events read back at start-up."""
        self._ring.extend(events)
        self.last_seq = last_seq

    def publish(self, events: Sequence[Event]) -> None:
        """Hand events to the ring and to every subscriber that wants them; never blocks."""
        for ev in events:
            self._ring.append(ev)
            self.last_seq = ev.seq
            for sub in list(self._subscribers):
                if not sub.wants(ev):
                    continue
                try:
                    sub.queue.put_nowait(ev)
                except asyncio.QueueFull:
                    self._drop(sub, f"slow consumer: more than {self._queue_size} events unread")

    def _drop(self, sub: Subscriber, reason: str) -> None:
        self._subscribers.discard(sub)
        self.dropped_count += 1
        sub.drop_reason = reason
        sub.dropped.set()
        log.warning("event subscriber dropped: %s", reason)

    def subscribe(self, topics: frozenset[str]) -> tuple[Subscriber, int]:
        """Attach a subscriber; returns it and the seq up to which replay must cover."""
        sub = Subscriber(topics, self._queue_size)
        self._subscribers.add(sub)
        return sub, self.last_seq

    def unsubscribe(self, sub: Subscriber) -> None:
        """Detach a subscriber (idempotent)."""
        self._subscribers.discard(sub)

    def close_all(self, reason: str) -> None:
        """Tell every subscriber to go (head shutting down)."""
        for sub in list(self._subscribers):
            self._subscribers.discard(sub)
            sub.drop_reason = reason
            sub.dropped.set()

    async def replay(
        self, since: int, until: int, topics: frozenset[str], limit: int, max_bytes: int
    ) -> tuple[list[Event], int]:
        """One page of the events with since < seq <= until in the topics, oldest first, from
        the log (what is older than the ring) or the ring: at most `limit` events and about
        `max_bytes` of them encoded (at least one). Returns the page and the seq it has looked
        up to: the next page starts there, and the replay is complete once that is `until`."""
        ring_start = self._ring[0].seq if self._ring else until + 1
        out: list[Event] = []
        seen = since
        if since + 1 < ring_start:
            upto = min(until, ring_start - 1)
            read = self._store.read_events
            out, seen = await asyncio.to_thread(read, since, upto, topics, limit, max_bytes)
            if seen < until and (seen < upto or not self._ring or self._ring[0].seq > upto + 1):
                return out, seen  # a full page, or the ring moved on meanwhile: the next page
        size = sum(len(encode(ev)) for ev in out)
        for ev in self._ring:
            if ev.seq <= seen:
                continue
            if ev.seq > until:
                break
            if topics and ev.topic not in topics:
                seen = ev.seq
                continue
            n = len(encode(ev))
            if out and (len(out) >= limit or size + n > max_bytes):
                return out, seen
            out.append(ev)
            size += n
            seen = ev.seq
        return out, until
