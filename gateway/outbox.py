"""The dispatcher: delivers outbox actions in order, within rate limits, with retries and dead letters."""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from typing import Any, Awaitable, Callable

import attrs
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from gateway import logs
from gateway.errors import Permanent, Retryable
from gateway.model import (CLOSE_POPUP, DEAD, DONE, DROPPED, FAILED, PENDING, POPUP,
                           POPUP_UPDATE, Action, Attempt)

log = Logger()

# Legs whose pop-up was never shown, remembered for their updates and close (a few MB).
UNSHOWN_KEPT = 50_000


@attrs.define
class TokenBucket:
    """``rate`` requests per second with bursts of ``burst`` (a 429's pause of the whole
    bucket is the dispatcher's, see ``Dispatcher.paused``)."""

    rate: float
    burst: int
    tokens: float
    stamp: float

    def wait(self, now: float) -> float:
        """Seconds until a token is available (0: now)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self) -> None:
        self.tokens -= 1


def _finite_positive(instance: Any, attribute: Any, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be a finite number above 0, not {value!r}")


@attrs.frozen
class Policy:
    """How hard and how long the dispatcher tries."""

    max_in_flight: int = 64
    max_age: float = 86400.0  # give up (dead letter) on an action this old
    popup_ttl: float = 60.0  # a pop-up older than this is dropped, never shown late
    backoff_base: float = attrs.field(default=1.0, validator=_finite_positive)
    backoff_cap: float = attrs.field(default=900.0, validator=_finite_positive)
    # The longest pause a CRM can ask for with Retry-After, for one action (a 503) or its
    # whole host (a 429: every tenant on it waits).  A CRM asking for more is retried after
    # this, and its answer decides again.  [I] 5 minutes: a CRM that really is down for an
    # hour costs 12 refused tries, while a wrong or hostile header cannot park every
    # tenant's pop-ups and records for an hour.
    max_retry_after: float = attrs.field(default=300.0, validator=_finite_positive)
    recording_tries: int = 3  # tries to resolve a recording before a record goes without it
    # Buckets run this much under a CRM's stated limit: a request's arrival jitters by a few
    # milliseconds, and a CRM counting a sliding one-second window answers the early one 429
    # (whose Retry-After then costs a whole second).  [I] 3 % leaves 30 ms over 5 requests.
    headroom: float = 0.97


def backoff(policy: Policy, attempts: int, rng: random.Random) -> float:
    """Exponential backoff with jitter (half fixed, half random) after ``attempts`` tries."""
    # The exponent is capped: attempts keep counting across re-drives, and 2.0 ** 1024
    # raises OverflowError; by 2 ** 60 any backoff_cap has long been reached.
    delay = min(policy.backoff_cap,
                policy.backoff_base * 2.0 ** min(max(0, attempts - 1), 60))
    return delay / 2 + rng.uniform(0, delay / 2)


def bounded_pause(seconds: float | None, limit: float) -> float | None:
    """A pause a CRM asked for, as finite seconds in [0, ``limit``]; None if it asked for
    none (or for nan, which means nothing)."""
    if seconds is None or seconds != seconds:
        return None
    return min(max(0.0, float(seconds)), limit)


# perform(action) → request summary and status, or raises Retryable / Permanent (any other
# exception is a bug or a request that cannot be built: the action fails permanently).
Perform = Callable[[Action], Awaitable[tuple[str, int, str]]]
# limits(action) → [(bucket key, rate, burst)]: every bucket must have a token.
Limits = Callable[[Action], list[tuple[str, float, int]]]


class Dispatcher:
    """Delivers actions: per-call order, pop-ups first, token buckets, in-flight cap, retries.

    The pending outbox is held in memory (loaded from the store at start); every outcome is
    written back with its attempt.  The next action of the same call may go before that
    write commits: attempts are committed in the order they are recorded, so the store never
    shows a later action of a call settled and an earlier one pending.

    Outcomes of ``perform``: success is DONE; ``Permanent`` is FAILED with the CRM's answer;
    ``Retryable`` is tried again after a backoff (or the CRM's Retry-After, bounded by
    ``Policy.max_retry_after``) until ``max_age``, then DEAD.  Any other exception means the
    request cannot be built or a CRM module has a bug: retrying the same code on the same
    action would fail the same way for a day while the call's later actions wait, so the
    action is FAILED at once with the error recorded (re-drivable by the admin API's retry
    after a fix).  A 429 with Retry-After pauses every bucket of the action (the whole CRM
    host); that pause is stored, so a restart honours it, and ``paused()`` shows it.
    """

    def __init__(self, store: Any, clock: Any, perform: Perform, limits: Limits,
                 policy: Policy = Policy(), rng: random.Random | None = None) -> None:
        self.store = store
        self.clock = clock
        self.perform = perform
        self.limits = limits
        self.policy = policy
        self.rng = rng or random.Random()
        self.actions: dict[int, Action] = {}
        self._chains: dict[tuple[int, str], deque[int]] = {}
        self._lanes: dict[tuple, list[tuple[int, int]]] = {}  # lane → heap of (priority, id)
        self._delayed: list[tuple[float, int]] = []
        self._buckets: dict[str, TokenBucket] = {}
        self._pauses: dict[str, float] = {}  # bucket key → until (clock time) a 429 asked
        self._flying: set[int] = set()
        # (tenant, call, leg) of pop-ups settled without being shown (dropped, refused,
        # dead): their updates and close would update or close nothing, and a CRM that
        # checks the order (Planfix) refuses them.  The newest UNSHOWN_KEPT only.
        self._unshown: dict[tuple[int, str, str], None] = {}
        self._stale: set[int] = set()  # pop-ups in flight whose leg has ended meanwhile
        # A tenant's setup (enable) goes before anything else of that tenant: Altegio
        # ignores events and history until it has seen it.
        self._parked: dict[int, list[Action]] = {}
        self._timer: Any = None
        self._running = False
        self._pumping = False
        self._pump_again = False
        self.counts: dict[str, int] = {}

    # Feeding

    async def start(self) -> None:
        await self._restore_pauses()
        pending = await self.store.pending_actions()
        # Not before: the fold may hand over a call's newer actions while these load, and
        # nothing may go ahead of its call's older ones (the check in _pump_once).
        self._running = True
        self.add(pending)

    async def _restore_pauses(self) -> None:
        """The host pauses stored before a restart, still running and within the bound."""
        now = self.clock.seconds()
        try:
            stored = await self.store.pauses(now)
        except Exception:
            # A pause is advice from a CRM, not state the gateway owes anyone: start
            # without it rather than not at all (the CRM answers 429 again if it must).
            log.failure("stored CRM host pauses not read; starting without them")
            return
        for key, until in stored.items():
            pause = bounded_pause(until - now, self.policy.max_retry_after)
            if pause:
                self._pauses[key] = max(self._pauses.get(key, 0.0), now + pause)
        if self._pauses:
            log.info("CRM hosts still paused after the restart: {paused}",
                     paused=self.paused())

    def paused(self) -> dict[str, float]:
        """Buckets (CRM hosts or accounts) a 429 paused → seconds the pause still lasts."""
        now = self.clock.seconds()
        for key in [k for k, until in self._pauses.items() if until <= now]:
            del self._pauses[key]
        return {key: until - now for key, until in self._pauses.items()}

    def stop(self) -> None:
        """Start no more attempts (those in flight still finish and are recorded)."""
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()

    async def drain(self, timeout: float) -> None:
        """Wait, at most ``timeout`` seconds, for the attempts in flight to finish."""
        deadline = self.clock.seconds() + timeout
        while self._flying and self.clock.seconds() < deadline:
            await deferLater(self.clock, 0.05, lambda: None)

    def add(self, actions: list[Action]) -> None:
        """New pending actions (from the fold, a restart or a re-drive)."""
        now = self.clock.seconds()
        # A row written before next_at was bounded may say inf (never), nan or an hour
        # away: nothing the dispatcher sets now is further off than this.
        latest = now + max(self.policy.backoff_cap, self.policy.max_retry_after)
        for action in actions:
            if action.id in self.actions or action.state != PENDING:
                continue
            if not action.next_at <= latest:
                action.next_at = now if not math.isfinite(action.next_at) else latest
            self.actions[action.id] = action
            chain = self._chains.setdefault((action.tenant, action.call), deque())
            # Ids grow with creation, so appending keeps a call's actions in order; a
            # re-driven old action goes to its place.
            if chain and chain[-1] > action.id:
                chain.append(action.id)
                self._chains[(action.tenant, action.call)] = deque(sorted(chain))
            else:
                chain.append(action.id)
            if self._chains[(action.tenant, action.call)][0] == action.id:
                self._ready(action)
        self._pump()

    def drop(self, ids: list[int]) -> None:
        """Pop-ups the fold found stale (their leg ended): never send them again."""
        for action_id in ids:
            action = self.actions.get(action_id)
            if action is None or action.state != PENDING:
                continue
            if action_id in self._flying:
                # Its request is out; if it fails it is dropped, not retried.
                self._stale.add(action_id)
            else:
                # Recorded (not only forgotten), so a failed try written after the fold's
                # own update cannot leave the row pending.  It may sit in a lane or the
                # delay heap: skipped there.
                self._settle(action, DROPPED, None, "", "leg ended before delivery")
        self._pump()

    def _ready(self, action: Action) -> None:
        if action.call and (action.tenant, "") in self._chains:
            self._parked.setdefault(action.tenant, []).append(action)
            return
        if action.next_at > self.clock.seconds():
            heapq.heappush(self._delayed, (action.next_at, action.id))
            return
        lane = tuple(key for key, _, _ in self.limits(action))
        heapq.heappush(self._lanes.setdefault(lane, []), (action.priority, action.id))

    def _finish(self, action: Action) -> None:
        """The action is settled: let the next one of its call go."""
        self.actions.pop(action.id, None)
        chain = self._chains.get((action.tenant, action.call))
        if chain is None:
            return
        try:
            chain.remove(action.id)
        except ValueError:
            pass
        if not chain:
            del self._chains[(action.tenant, action.call)]
            if not action.call:
                for parked in self._parked.pop(action.tenant, []):
                    if parked.state == PENDING:
                        self._ready(parked)
        elif chain[0] in self.actions:
            if chain[0] not in self._flying:
                self._ready(self.actions[chain[0]])

    # Running

    def _pump(self) -> None:
        # An attempt can settle inside _send (a perform that fails before any I/O) and
        # call back here; the outer pass then runs again instead of nesting.
        if not self._running:
            return
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            while True:
                self._pump_again = False
                self._pump_once()
                if not self._pump_again:
                    break
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        now = self.clock.seconds()
        while self._delayed and self._delayed[0][0] <= now:
            _, action_id = heapq.heappop(self._delayed)
            action = self.actions.get(action_id)
            if action is not None and action.state == PENDING:
                lane = tuple(key for key, _, _ in self.limits(action))
                heapq.heappush(self._lanes.setdefault(lane, []), (action.priority, action.id))
        wake = self._delayed[0][0] - now if self._delayed else None
        # Pop-ups first across lanes, then by lane order.
        for lane in sorted(self._lanes, key=lambda ln: self._lanes[ln][0] if self._lanes[ln]
                           else (99, 0)):
            heap = self._lanes[lane]
            while heap and len(self._flying) < self.policy.max_in_flight:
                action = self.actions.get(heap[0][1])
                if action is None or action.state != PENDING:
                    heapq.heappop(heap)
                    continue
                chain = self._chains.get((action.tenant, action.call))
                if chain and chain[0] != action.id or action.id in self._flying:
                    # An older action of its call arrived after it was readied (the fold's
                    # first actions and the restart's pending ones race at start): it goes
                    # when that one is settled (_finish readies it again).  Readied twice
                    # that way, its second heap entry must not send it again.
                    heapq.heappop(heap)
                    continue
                if action.kind == POPUP and now - action.created > self.policy.popup_ttl:
                    heapq.heappop(heap)
                    self._settle(action, DROPPED, None, "", "older than the pop-up TTL")
                    continue
                if action.kind in (POPUP_UPDATE, CLOSE_POPUP) and (
                        action.tenant, action.call, action.leg) in self._unshown:
                    # One call's actions go in order: its pop-up was settled before this.
                    heapq.heappop(heap)
                    self._settle(action, DROPPED, None, "", "its pop-up was never shown")
                    continue
                wait = self._bucket_wait(action, now)
                if wait > 0:
                    wake = wait if wake is None else min(wake, wait)
                    break
                heapq.heappop(heap)
                self._send(action)
            if not heap:
                del self._lanes[lane]
        self._arm(wake)

    def _bucket_wait(self, action: Action, now: float) -> float:
        wait = 0.0
        specs = self.limits(action)
        for key, rate, burst in specs:
            until = self._pauses.get(key)
            if until is not None:
                if until > now:
                    wait = max(wait, until - now)
                else:
                    del self._pauses[key]
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(rate * self.policy.headroom, burst,
                                                          burst, now)
            wait = max(wait, bucket.wait(now))
        if wait == 0:
            for key, _, _ in specs:
                self._buckets[key].take()
        else:
            self._count("rate_limit_wait")
        return wait

    def _arm(self, wake: float | None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if wake is not None and self._running:
            self._timer = self.clock.callLater(max(wake, 0.001), self._pump)

    def _send(self, action: Action) -> None:
        self._flying.add(action.id)
        ensureDeferred(self._attempt(action)).addErrback(
            lambda f: log.failure("dispatch of action {action} failed", f,
                                  action=action.id))

    async def _attempt(self, action: Action) -> None:
        try:
            try:
                request, status, answer = await self.perform(action)
            finally:
                self._flying.discard(action.id)
        except Retryable as e:
            self._retry(action, e)
        except Permanent as e:
            self._settle(action, FAILED, e.status, e.message, e.answer)
        except Exception as e:
            # Not a CRM's answer: the request cannot be built from this action (a value no
            # CRM can take) or a CRM module has a bug.  The same code would fail the same
            # way at every try, for max_age, with the call's later actions waiting behind
            # it: failed for good now, logged once, re-drivable after a fix.
            reason = f"cannot perform: {type(e).__name__}: {e}"[:500]
            log.failure("{about}: {kind} #{action} failed permanently: {reason}",
                        **logs.about(action.tenant, None, action.call), kind=action.kind,
                        action=action.id, reason=reason)
            self._settle(action, FAILED, None, reason, "")
        else:
            self._settle(action, DONE, status, request, answer)
        self._pump()

    def _retry(self, action: Action, error: Retryable) -> None:
        if action.id in self._stale:
            self._settle(action, DROPPED, error.status, error.message,
                         "leg ended before delivery")
            return
        action.attempts += 1
        now = self.clock.seconds()
        if now - action.created >= self.policy.max_age:
            self._settle(action, DEAD, error.status, error.message, error.answer,
                         counted=True)
            return
        delay = backoff(self.policy, action.attempts, self.rng)
        pause = bounded_pause(error.retry_after, self.policy.max_retry_after)
        if pause is not None:
            delay = max(delay, pause)
            if error.status == 429 and pause > 0:
                # The whole host said "slow down", not just this request.
                for key, _, _ in self.limits(action):
                    self._pause(key, now + pause)
        if not math.isfinite(delay):  # cannot happen with a valid Policy; never store inf
            delay = self.policy.backoff_cap
        action.next_at = now + delay
        action.last_error = error.message
        self._count("retry")
        self._record(action, Attempt(
            action=action.id, at=now, outcome="retry", status=error.status,
            request=error.message, answer=error.answer[:500]))
        heapq.heappush(self._delayed, (action.next_at, action.id))

    def _pause(self, key: str, until: float) -> None:
        """Pause a bucket until ``until`` (or longer, if it already is), and store that."""
        if until <= self._pauses.get(key, 0.0):
            return
        self._pauses[key] = until
        try:
            d = self.store.put_pause(key, until)
        except Exception:
            log.failure("pause of {bucket} not stored", bucket=key)
            return
        # Not waited for: the pause holds in memory now; storing it only lets a restart
        # see it, and a failure costs a 429 after the restart.
        d.addErrback(lambda f: log.failure("pause of {bucket} not stored", f, bucket=key))

    def _settle(self, action: Action, state: str, status: int | None, request: str,
                answer: str, counted: bool = False) -> None:
        if not counted and state in (DONE, FAILED):
            action.attempts += 1
        action.state = state
        if state != DONE:
            action.last_error = request if state != DROPPED else answer
        self._count(state)
        self._stale.discard(action.id)
        if action.kind == POPUP and state != DONE:
            self._unshown[(action.tenant, action.call, action.leg)] = None
            if len(self._unshown) > UNSHOWN_KEPT:
                del self._unshown[next(iter(self._unshown))]
        self._record(action, Attempt(
            action=action.id, at=self.clock.seconds(), outcome=state, status=status,
            request=request, answer=answer[:500]))
        self._finish(action)

    def _record(self, action: Action, attempt: Attempt) -> None:
        def failed(f: Any) -> None:
            # The outcome stays in memory; the stored row keeps its previous state, so a
            # restart before a later write succeeds sends the action again.
            log.failure("action {action}: outcome {outcome} not stored", f, action=action.id,
                        outcome=attempt.outcome)

        self.store.record_attempt(action, attempt).addErrback(failed)

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    @property
    def depth(self) -> int:
        return len(self.actions)

    def oldest_age(self) -> float:
        """Seconds the oldest undelivered action has waited (dispatch lag)."""
        if not self.actions:
            return 0.0
        return max(0.0, self.clock.seconds() - min(a.created for a in self.actions.values()))

    @property
    def in_flight(self) -> int:
        return len(self._flying)
