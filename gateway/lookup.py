"""The synchronous lookup: an answer within a deadline, from a cache or one CRM request per key.

The two synchronous paths (the IVR asking who a caller's manager is; the PBX waits) share it.
``Lookup.get`` always answers before the caller's deadline, in this order of preference:

1. a cached answer younger than ``fresh`` (without asking the CRM);
2. the CRM's answer, if it comes before the deadline (it is cached);
3. a cached answer younger than ``keep`` (stale, but better than nothing);
4. no answer (None), so the PBX goes on to its next rule.

One fetch per key is in flight at a time; callers asking meanwhile wait for the same one.  A
fetch slower than the deadline keeps running and fills the cache for the next call; a fetch
that never ends is cancelled after ``max_fetch`` so its key can be asked again.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Hashable

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

# Where an answer came from (Answer.source; also the keys of Lookup.counts).
FRESH = "fresh"    # the cache, younger than ``fresh``: the CRM was not asked
LOOKUP = "lookup"  # the CRM, before the deadline
STALE = "stale"    # the cache, older than ``fresh`` but younger than ``keep``: the CRM was slow
NONE = "none"      # nothing: the CRM was slow or failed and nothing usable was cached

# fetch() → the CRM's answer (None: the CRM knows no answer), as a Deferred or a coroutine.
Fetch = Callable[[], "Deferred[Any] | Awaitable[Any]"]


@attrs.frozen
class Answer:
    """What a lookup answered, where from, and how old the CRM's answer is."""

    value: Any  # the CRM's answer; None for "the CRM knows none" and for source NONE
    source: str  # FRESH | LOOKUP | STALE | NONE
    age: float | None = None  # seconds since the CRM gave ``value``; None for NONE


@attrs.frozen
class _Entry:
    value: Any
    stamp: float  # reactor time the CRM answered


@attrs.define(eq=False)
class _Flight:
    """One fetch in progress for a key, and the callers waiting for it."""

    deferred: Any = None  # the fetch's Deferred
    timer: Any = None  # the max_fetch call
    waiters: dict[Deferred, Any] = attrs.Factory(dict)  # caller's Deferred → its deadline call


def _seconds(name: str, value: Any, minimum: float = 0.0) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= minimum):
        raise ValueError(f"{name} must be a finite number of seconds, at least {minimum}, "
                         f"not {value!r}")
    return float(value)


class Lookup:
    """A cache of answers by key, refreshed through single-flight fetches, answering every
    ``get`` within its deadline.

    ``fresh``: seconds an answer is served without asking the CRM again.  ``keep``: seconds
    (since the CRM gave it, so at least ``fresh``) an answer may still be served when the CRM
    is slow or failing.  ``max_entries``: the most answers kept; the oldest goes first.
    ``max_fetch``: seconds a fetch may hold its key's slot before it is cancelled.

    A "no answer" from the CRM (fetch gives None) is cached like any other: it is the CRM's
    word for that number, and most callers without a manager are new numbers that would
    otherwise cost a CRM request, and a wait up to the deadline, at every call.  A failed
    fetch is not an answer: it is logged, the cache keeps what it had, the next get asks again.
    """

    def __init__(self, reactor: Any, fresh: float, keep: float, max_entries: int,
                 max_fetch: float = 30.0) -> None:
        self.reactor = reactor
        self.fresh = _seconds("fresh", fresh)
        self.keep = _seconds("keep", keep, self.fresh)
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a whole number above 0, not {max_entries!r}")
        self.max_entries = max_entries
        # [I] A millisecond: below that a fetch could not even be sent.
        self.max_fetch = _seconds("max_fetch", max_fetch, 0.001)
        # In the order the CRM answered (a refill moves a key to the end), so the first
        # entry is both the next to expire and the one to evict.  An OrderedDict: a plain
        # dict finds its first key by skipping the ones deleted before it (measured 30x
        # slower at 50,000 entries).
        self._cache: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._flights: dict[Hashable, _Flight] = {}
        self.counts: dict[str, int] = {}

    def get(self, key: Hashable, fetch: Fetch, deadline: float) -> Deferred[Answer]:
        """The answer for ``key``, within ``deadline`` seconds; never fails.

        ``fetch`` asks the CRM; it is called only when no fresh answer is cached and no
        fetch for ``key`` is in flight (a caller joining one does not call its own).
        Cancelling the returned Deferred (the PBX hung up) leaves the fetch running for
        the others and for the cache.
        """
        deadline = _seconds("deadline", deadline)
        now = self.reactor.seconds()
        self._sweep(now)
        entry = self._cache.get(key)
        # An answer from the future (the clock went back) is not trusted as fresh.
        if entry is not None and 0 <= now - entry.stamp < self.fresh:
            self._count(FRESH)
            return succeed(self._answer(FRESH, entry, now))
        flight = self._flights.get(key)
        start = flight is None
        if start:
            flight = self._flights[key] = _Flight()
        else:
            self._count("join")
        d: Deferred[Answer] = Deferred(lambda d: self._leave(flight, d))
        flight.waiters[d] = self.reactor.callLater(deadline, self._late, key, flight, d)
        if start:
            self._start(key, flight, fetch)
        return d

    @property
    def in_flight(self) -> int:
        """Fetches in progress (one per key)."""
        return len(self._flights)

    @property
    def size(self) -> int:
        """Answers cached."""
        return len(self._cache)

    # Fetching

    def _start(self, key: Hashable, flight: _Flight, fetch: Fetch) -> None:
        self._count("fetch")
        flight.timer = self.reactor.callLater(self.max_fetch, self._abandon, key, flight)
        # The waiter is in place before the fetch runs: a fetch that answers at once
        # answers it here, and get returns a Deferred that has fired.
        flight.deferred = maybeDeferred(fetch)
        flight.deferred.addBoth(self._landed, key, flight)

    def _landed(self, result: Any, key: Hashable, flight: _Flight) -> None:
        if self._flights.get(key) is not flight:
            return None  # abandoned after max_fetch: its waiters are answered already
        flight.timer.cancel()
        del self._flights[key]
        now = self.reactor.seconds()
        if isinstance(result, Failure):
            self._count("failed")
            log.failure("lookup of {key} failed; {waiting} waiting answered stale or empty",
                        result, key=key, waiting=len(flight.waiters))
            self._release(flight, lambda: self._fallback(key, now))
            return None
        entry = self._store(key, result, now)
        if not flight.waiters:
            # Every caller had its fallback (or hung up): this answer is for the next call.
            self._count("late")
        self._release(flight, lambda: self._answer(LOOKUP, entry, now))
        return None

    def _abandon(self, key: Hashable, flight: _Flight) -> None:
        del self._flights[key]
        self._count("abandoned")
        log.warn("lookup of {key} unanswered after {max_fetch} s; cancelled",
                 key=key, max_fetch=self.max_fetch)
        now = self.reactor.seconds()
        self._release(flight, lambda: self._fallback(key, now))
        flight.deferred.cancel()

    # Answering

    def _release(self, flight: _Flight, answer: Callable[[], Answer]) -> None:
        """Answer every caller still waiting for ``flight``."""
        waiters, flight.waiters = flight.waiters, {}
        for timer in waiters.values():
            timer.cancel()
        for d in waiters:
            # A caller's callback may have cancelled another waiter's Deferred meanwhile.
            if not d.called:
                self._reply(d, answer())

    def _late(self, key: Hashable, flight: _Flight, d: Deferred[Answer]) -> None:
        """The caller's deadline came before the fetch's answer."""
        del flight.waiters[d]
        self._reply(d, self._fallback(key, self.reactor.seconds()))

    def _leave(self, flight: _Flight, d: Deferred[Answer]) -> None:
        """The caller cancelled its Deferred: stop its deadline; the fetch goes on."""
        self._count("cancelled")
        # Not there if the fetch is answering every waiter and an earlier one's callback
        # cancelled this one: its deadline is stopped already.
        timer = flight.waiters.pop(d, None)
        if timer is not None:
            timer.cancel()

    def _reply(self, d: Deferred[Answer], answer: Answer) -> None:
        self._count(answer.source)
        d.callback(answer)

    def _fallback(self, key: Hashable, now: float) -> Answer:
        entry = self._cache.get(key)
        if entry is not None and now - entry.stamp < self.keep:
            return self._answer(STALE, entry, now)
        return Answer(None, NONE)

    def _answer(self, source: str, entry: _Entry, now: float) -> Answer:
        return Answer(entry.value, source, now - entry.stamp)

    # The cache

    def _store(self, key: Hashable, value: Any, now: float) -> _Entry:
        self._cache.pop(key, None)
        entry = self._cache[key] = _Entry(value, now)
        while len(self._cache) > self.max_entries:
            del self._cache[next(iter(self._cache))]
            self._count("evicted")
        return entry

    def _sweep(self, now: float) -> None:
        """Forget answers too old even to be served stale."""
        while self._cache and now - next(iter(self._cache.values())).stamp >= self.keep:
            del self._cache[next(iter(self._cache))]

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1
