"""Leg and call state machines: normalised events in, CRM-neutral effects out (no I/O).

A leg is one ring of one extension, queue or IVR; a call is every leg sharing the PBX's
call key.  The machines accept every input in every state and never raise on PBX data:
out-of-order, missing and repeated events are normal.  Time only enters through the
events themselves (``Event.received``) and through ``Call.expire``, which the engine
calls when the call's due time has passed, so the same events always give the same
effects.
"""

from __future__ import annotations

from typing import Any, Iterator

import attrs

from gateway.model import (ANSWERED, ATTACH, CANCELLED, CLOSE_POPUP, CLOSING, FINISHED, POPUP,
                           POPUP_UPDATE, RECORD, RECORDING, Event, digits, e164,
                           legacy_outcome)

PHONE, QUEUE, IVR = "phone", "queue", "ivr"
INCOMING, OUTGOING, INTERNAL = "incoming", "outgoing", "internal"


@attrs.frozen
class Policy:
    """The per-tenant choices the call model depends on."""

    numbers: frozenset[str] = frozenset()  # virtual-number filter; empty: every DID
    internal_calls: bool = False
    grace: float = 3.0
    queues: frozenset[str] = frozenset()
    ivrs: frozenset[str] = frozenset()
    # A call with a leg that never hung up is closed after this long.
    max_open: float = 4 * 3600.0
    # A number of at most this many digits (or with the PBX's ``prefix*`` form) is one of
    # the tenant's own extensions, not an outside party; a ``+`` number never is.  [I]
    extension_digits: int = 5

    def is_extension(self, number: str) -> bool:
        if "*" in number:
            return True
        return (not number.lstrip().startswith("+")
                and 0 < len(digits(number)) <= self.extension_digits)


@attrs.frozen
class Effect:
    """One action for the CRM, before it has a tenant, a time and an outbox id."""

    kind: str
    key: str
    leg: str
    payload: dict[str, Any]


class Leg:
    """One ring of one extension: new → ringing → talking → ended (or ringing → ended).

    The machine is the table ``_MACHINE``: (state, input) → (next state, outputs).  Every
    input is accepted in every state.  (It was an Automat MethodicalMachine with the same
    table; under ``make bench`` Automat's per-call wrappers were a seventh of the reactor's
    time and its per-instance state a good part of an open call's memory.)
    """

    __slots__ = ("key", "order", "kind", "flow", "extension", "sip", "peer", "did",
                 "ring_at", "answer_at", "end_at", "outcome", "duration", "recording",
                 "bridged", "transferred", "answered", "state", "callback", "rating")

    def __init__(self, key: str, order: int) -> None:
        self.key = key
        self.order = order  # position in the call, for "first" and "last" with equal times
        self.kind = PHONE
        self.flow = ""
        self.extension = ""
        self.sip = ""
        self.peer = ""
        self.did = ""
        self.ring_at = 0
        self.answer_at = 0
        self.end_at = 0
        self.outcome = ""
        self.duration = 0
        self.recording = ""
        self.bridged: bool | None = None
        self.transferred = False
        self.answered = False
        self.state = "new"  # new | ringing (not answered yet) | talking | ended (final)
        self.callback = ""  # the click-to-call that rang this phone
        self.rating = 0  # the caller's score of the talk, where the PBX has one

    # Inputs: each returns the signals its outputs gave ("rang", "talked", ...).

    def ring(self, ev: Event, policy: Policy) -> list[str]:
        "The PBX rang this leg (dial-in / dial-out)."
        return self._input("ring", ev, policy)

    def answer(self, ev: Event, policy: Policy) -> list[str]:
        "The leg was answered."
        return self._input("answer", ev, policy)

    def hangup(self, ev: Event, policy: Policy) -> list[str]:
        "The leg hung up."
        return self._input("hangup", ev, policy)

    def _input(self, name: str, ev: Event, policy: Policy) -> list[str]:
        self.state, outputs = self._MACHINE[self.state, name]
        self._learn(ev, policy)
        return [output(self, ev) for output in outputs]

    # Outputs

    def _learn(self, ev: Event, policy: Policy) -> None:
        # Any event may be the first we see of a leg, so each one fills what is missing.
        self.flow = self.flow or ev.flow
        self.extension = self.extension or ev.extension
        self.sip = self.sip or ev.sip
        self.peer = self.peer or ev.peer
        self.did = self.did or ev.did
        self.transferred = self.transferred or ev.transferred
        self.callback = self.callback or ev.callback
        self.rating = ev.rating or self.rating
        if ev.bridged is not None:
            self.bridged = ev.bridged
        if self.extension in policy.ivrs:
            self.kind = IVR
        elif ev.bridged is not None or self.extension in policy.queues:
            self.kind = QUEUE
        if ev.kind == "ring":
            self.ring_at = self.ring_at or ev.at
        elif ev.kind == "answer":
            self.answer_at = self.answer_at or ev.at

    def _rang(self, ev: Event) -> str:
        return "rang"

    def _answered(self, ev: Event) -> str:
        self.answered = True
        return "answered"

    def _end(self, ev: Event) -> None:
        self.end_at = ev.at
        self.outcome = ev.outcome
        self.duration = ev.duration
        # A recording announced before the hangup (its own event) is kept.
        self.recording = ev.recording or self.recording

    def _talked(self, ev: Event) -> str:
        self._end(ev)
        self.answered = True
        return "talked"

    def _unanswered(self, ev: Event) -> str:
        self._end(ev)
        return "unanswered"

    def _hung_up_unseen(self, ev: Event) -> str:
        # The hangup came first (its ring and answer were lost or are late): its own
        # status is all there is to tell a talk from a miss.
        self._end(ev)
        if ev.outcome == ANSWERED:
            self.answered = True
            return "talked"
        return "unseen"

    # Every state learns from every event; these are the outputs after that.
    _MACHINE: dict[tuple[str, str], tuple[str, tuple]] = {
        ("new", "ring"): ("ringing", (_rang,)),
        ("new", "answer"): ("talking", (_answered,)),
        ("new", "hangup"): ("ended", (_hung_up_unseen,)),
        ("ringing", "ring"): ("ringing", ()),
        ("ringing", "answer"): ("talking", (_answered,)),
        ("ringing", "hangup"): ("ended", (_unanswered,)),
        ("talking", "ring"): ("talking", ()),
        ("talking", "answer"): ("talking", ()),
        ("talking", "hangup"): ("ended", (_talked,)),
        ("ended", "ring"): ("ended", ()),
        ("ended", "answer"): ("ended", ()),
        ("ended", "hangup"): ("ended", ()),
    }

    @property
    def is_ended(self) -> bool:
        return self.state == "ended"

    def direction(self, policy: Policy) -> str:
        if self.callback and self.kind == PHONE:
            # Click-to-call rings the employee first (an incoming leg to the PBX), showing
            # the number it then dials as the caller: the employee is calling out.
            return INTERNAL if policy.is_extension(self.peer) else OUTGOING
        if self.flow == "out" and not self.transferred:
            return INTERNAL if policy.is_extension(self.peer) else OUTGOING
        # Incoming legs, and outgoing legs a forward created for an incoming call.
        return INTERNAL if policy.is_extension(self.peer) else INCOMING

    def to_state(self) -> dict[str, Any]:
        # A rating only where there is one (most PBXs have none): states stay as they were.
        return {name: getattr(self, name) for name in self.__slots__
                if name != "rating" or self.rating}

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> "Leg":
        if "status" in data:  # stored before outcomes were neutral
            data = dict(data)
            data["outcome"] = legacy_outcome(data.pop("status"))
        leg = cls(data["key"], data["order"])
        for name in cls.__slots__:
            if name in data or name not in _LATER_SLOTS:
                setattr(leg, name, data[name])
        if leg.state not in _LEG_STATES:
            raise ValueError(f"unknown leg state {leg.state!r}")
        return leg


_LEG_STATES = {state for state, _ in Leg._MACHINE}
# Slots added after states were first stored: absent from older rows, left at their default.
_LATER_SLOTS = {"callback", "rating"}


class Call:
    """Every leg under one call key, and the rules that turn them into CRM actions.

    Two states: ``open`` (legs may still ring, answer and hang up) and ``final`` (decided:
    a missed record, if any, was produced; late legs still give their records).  Inputs:
    ``event`` and ``expire`` (the due time passed with no further event).
    """

    __slots__ = ("tenant", "key", "legs", "started", "due", "state", "closing")

    def __init__(self, tenant: int, key: str) -> None:
        self.tenant = tenant
        self.key = key
        self.legs: dict[str, Leg] = {}
        self.started = 0  # PBX time of the first event seen, microseconds
        self.due = 0.0  # gateway time at which the call is final, if nothing else arrives
        self.state = "open"
        # The PBX said the call is over (CLOSING): it is decided a grace after that, or after
        # its last late event, never after the long wait for a leg that never hangs up.
        self.closing = False

    def event(self, ev: Event, policy: Policy) -> list[Effect]:
        """An event of one of this call's legs, or a fact about the whole call."""
        if ev.kind == RECORDING:
            return self._recording(ev, policy)
        if ev.kind == FINISHED:
            # The PBX says the call is over: no grace to wait for, decide it now.
            if self.state != "final":
                self.started = min(self.started, ev.at) if self.started else ev.at
                self.due = ev.received
            return []
        if ev.kind == CLOSING:
            # The PBX's record came: the call is over, but the record may have overtaken
            # the last leg events, so it is decided after the grace (once: a second one
            # moves nothing).
            if self.state != "final" and not self.closing:
                self.closing = True
                self.started = min(self.started, ev.at) if self.started else ev.at
                self.due = ev.received + policy.grace
            return []
        if self.state == "final":
            return list(self._leg_effects(ev, policy, live=False))
        effects = list(self._leg_effects(ev, policy, live=True))
        self.due = ev.received + (policy.grace if self._all_ended() or self.closing
                                  else policy.max_open)
        return effects

    def _recording(self, ev: Event, policy: Policy) -> list[Effect]:
        """A recording ready after its leg ended: attached to the record that went out;
        before the hangup, kept for the record it will be part of."""
        leg = self.legs.get(ev.leg)
        # A recording of a leg not seen yet has nothing to attach to: a leg made from it
        # alone would hold the call open as a phone that never rang.  [I]
        if leg is None or not ev.recording or leg.recording == ev.recording:
            return []
        leg.recording = ev.recording
        if not (leg.is_ended and leg.answered and leg.kind == PHONE):
            return []
        direction = leg.direction(policy)
        if not self._passes_filter(leg, direction, policy):
            return []
        record = self._record(leg, direction, "success")
        return [Effect(ATTACH, f"attach:{leg.key}:{ev.recording}", leg.key, record.payload)]

    def expire(self, policy: Policy) -> list[Effect]:
        """The due time passed with no further event: decide the call."""
        if self.state == "final":
            return []
        self.state = "final"
        self.due = 0.0
        effects = self._close_ringing(policy)
        missed = self._missed(policy)
        return effects + [missed] if missed else effects

    def _close_ringing(self, policy: Policy) -> list[Effect]:
        """Pop-ups of phones still ringing when the call is decided: closed, as cancelled.
        A PBX that reports only the phone that answered (CallGear) never ends the others;
        nor does any PBX whose hangup was lost."""
        out = []
        for leg in sorted(self.legs.values(), key=lambda leg: leg.order):
            if leg.kind != PHONE or leg.is_ended or leg.answered or not leg.ring_at:
                continue
            direction = leg.direction(policy)
            if direction == INCOMING and leg.flow == "in" and self._passes_filter(
                    leg, direction, policy):
                out.append(Effect(CLOSE_POPUP, f"close:{leg.key}", leg.key,
                                  {**self._popup(leg, direction), "outcome": CANCELLED}))
        return out

    @property
    def is_final(self) -> bool:
        return self.state == "final"

    def _all_ended(self) -> bool:
        return all(leg.is_ended for leg in self.legs.values())

    def _passes_filter(self, leg: Leg, direction: str, policy: Policy) -> bool:
        if direction == INTERNAL:
            return policy.internal_calls
        if not policy.numbers:
            return True
        if direction == OUTGOING and not leg.did:
            return True  # outgoing legs carry no DID to filter on [I]
        return e164(leg.did) in policy.numbers

    def _leg_effects(self, ev: Event, policy: Policy, live: bool) -> Iterator[Effect]:
        self.started = min(self.started, ev.at) if self.started else ev.at
        leg = self.legs.get(ev.leg)
        if leg is None:
            leg = self.legs[ev.leg] = Leg(ev.leg, len(self.legs))
        signals = getattr(leg, ev.kind)(ev, policy)
        if leg.kind != PHONE:
            return  # queue and IVR legs only matter for the missed-call decision
        direction = leg.direction(policy)
        if not self._passes_filter(leg, direction, policy):
            return
        for signal in signals:
            if signal == "rang" and live and self._shows_popup(leg, direction):
                yield Effect(POPUP, f"popup:{leg.key}", leg.key, self._popup(leg, direction))
            elif signal == "answered" and live and leg.ring_at and self._shows_popup(
                    leg, direction):
                yield Effect(POPUP_UPDATE, f"talking:{leg.key}", leg.key,
                             {**self._popup(leg, direction), "state": "talking"})
            elif signal == "talked":
                yield self._record(leg, direction, "success")
            elif signal == "unanswered":
                if direction == OUTGOING or direction == INTERNAL and leg.flow == "out":
                    yield self._record(leg, direction, "missed")
                elif direction == INCOMING and leg.ring_at:
                    yield Effect(CLOSE_POPUP, f"close:{leg.key}", leg.key,
                                 {**self._popup(leg, direction), "outcome": leg.outcome})
            elif signal == "unseen" and leg.flow == "out" and direction != INCOMING:
                yield self._record(leg, direction, "missed")

    @staticmethod
    def _shows_popup(leg: Leg, direction: str) -> bool:
        """An incoming leg ringing a phone, or a phone dialling out: a CRM that has
        pop-ups shows one (each CRM says which directions it supports)."""
        return (direction == INCOMING and leg.flow == "in"
                or direction == OUTGOING and (leg.flow == "out" or bool(leg.callback)))

    def _popup(self, leg: Leg, direction: str) -> dict[str, Any]:
        return {"direction": direction, "client": leg.peer, "did": leg.did,
                "extension": leg.extension, "sip": leg.sip, "at": leg.ring_at,
                "call_id": f"{self.tenant}-{self.key}-{leg.key}"}

    def _record(self, leg: Leg, direction: str, status: str, key: str | None = None,
                started: int | None = None) -> Effect:
        # Whole seconds, rounded to nearest; answered/missed comes from the status, never
        # from the duration (a 0.4 s answered call is still answered).
        seconds = round(leg.duration / 1_000_000) if status == "success" else 0
        client = leg.peer
        if leg.flow == "out" and direction == INCOMING:
            # A forward's outgoing leg dials the forward target; the client is the caller.
            client = next((other.peer for other in self.legs.values()
                           if other.flow == "in" and other.peer), client)
        payload = {
            "direction": direction, "status": status, "outcome": leg.outcome,
            "duration": seconds, "client": client, "did": leg.did or self._did(),
            "extension": leg.extension, "sip": leg.sip,
            # A leg seen only by its hangup started a talk time before it.
            "started": started or leg.ring_at or leg.answer_at or leg.end_at - leg.duration,
            "recording": leg.recording if status == "success" else "",
            "record_id": f"{self.tenant}-{self.key}-{key or leg.key}",
        }
        if leg.rating and status == "success":
            payload["rating"] = leg.rating  # only where there is one: CRMs that take it
        return Effect(RECORD, f"record:{key or leg.key}", leg.key, payload)

    def _did(self) -> str:
        return next((leg.did for leg in self.legs.values() if leg.did), "")

    def _missed(self, policy: Policy) -> Effect | None:
        """One missed record for an incoming call that no phone answered, or None."""
        legs = sorted(self.legs.values(), key=lambda leg: leg.order)
        phones = [leg for leg in legs if leg.kind == PHONE]
        if any(leg.answered for leg in phones):
            return None
        if any(leg.direction(policy) != INCOMING for leg in phones):
            return None  # outgoing and internal calls have records per leg
        decided = [leg for leg in legs if leg.kind != PHONE and leg.bridged is not None
                   and leg.is_ended]
        if decided:
            # A queue's hangup beats the IVR's; of several queues the last one wins.
            queues = [leg for leg in decided if leg.kind == QUEUE] or decided
            winner = max(queues, key=lambda leg: (leg.end_at, leg.order))
            if winner.bridged:
                return None
        elif phones and (self.closing or all(leg.is_ended for leg in phones)):
            # Straight to an extension: no queue, no IVR.  Once the PBX said the call is
            # over, a phone whose end was never reported is over too.
            winner = phones[0]
        else:
            return None
        if winner.direction(policy) != INCOMING or not winner.peer:
            return None
        if policy.numbers and e164(winner.did or self._did()) not in policy.numbers:
            return None
        effect = self._record(winner, INCOMING, "missed", key="missed", started=self.started)
        if not effect.payload["extension"] and phones:
            # A call-level leg has no extension of its own (CallGear's session): the missed
            # call is the last rung phone's, for CRMs that file every call under someone.
            last = phones[-1]
            effect = attrs.evolve(effect, payload={**effect.payload, "extension": last.extension,
                                                   "sip": last.sip})
        return attrs.evolve(effect, leg="")

    def to_state(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "key": self.key, "started": self.started,
                "due": self.due, "state": self.state, "closing": self.closing,
                "legs": [leg.to_state() for leg in self.legs.values()]}

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> "Call":
        call = cls(data["tenant"], data["key"])
        call.started = data["started"]
        call.due = data["due"]
        call.closing = bool(data.get("closing", False))  # absent from states stored before it
        call.legs = {leg["key"]: Leg.from_state(leg) for leg in data["legs"]}
        if data["state"] not in ("open", "final"):
            raise ValueError(f"unknown call state {data['state']!r}")
        call.state = data["state"]
        return call
