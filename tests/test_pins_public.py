"""The public site, pinned where tests/test_public.py leaves it loose: what exactly each
answer says, the form's content types and query string, the tenant id's and login's
spelling in the URL, a request answered after its client left, and /healthz's body.

The webhooks go through the running gateway of tests/test_public.py (its Harness).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.web.test.requesthelper import DummyRequest

from gateway import web
from tests.test_public import DIAL_IN, KEY, LOGIN, Harness, gateway  # noqa: F401 (a fixture)

BASE = f"/events/807/dial-in/{LOGIN}"


def media_type(reply: Any) -> str:
    """The answer's Content-Type, as compared: media types and charsets in any case
    (RFC 9110 §8.3.1)."""
    return (reply.header("Content-Type") or "").lower()


# What each answer says

@pytest_twisted.ensureDeferred
async def test_a_stored_event_is_answered_ok_in_plain_text(gateway: Harness) -> None:
    reply = await gateway.post(DIAL_IN)
    assert (reply.status, media_type(reply), reply.body) == (200, "text/plain",
                                                                        b"OK")


@pytest_twisted.ensureDeferred
async def test_a_refusal_is_the_field_and_the_reason_on_one_line_of_utf8_text(
        gateway: Harness) -> None:
    reply = await gateway.post(DIAL_IN, key="wrong-key-0123456789")
    assert reply.status == 403
    assert media_type(reply) == "text/plain; charset=utf-8"
    assert reply.body == b"key: wrong or missing key\n"


@pytest_twisted.ensureDeferred
async def test_an_unknown_tenant_is_named_with_the_login_in_the_refusal(
        gateway: Harness) -> None:
    reply = await gateway.post(DIAL_IN, tenant=999)
    assert (reply.status, reply.body) == (404, f"tenant: no tenant 999 with PBX login {LOGIN}\n"
                                          .encode())


@pytest_twisted.ensureDeferred
async def test_a_disabled_tenant_is_refused_by_its_id(gateway: Harness) -> None:
    reply = await gateway.post(DIAL_IN, tenant=808)
    assert (reply.status, reply.body) == (403, b"tenant: tenant 808 is disabled\n")


@pytest_twisted.ensureDeferred
async def test_a_path_of_the_wrong_length_is_404_naming_the_path(gateway: Harness) -> None:
    for path in ("/events/807/dial-in", f"/events/807/dial-in/{LOGIN}/more"):
        reply = await gateway.request("POST", f"{path}?key={KEY}", urlencode(DIAL_IN).encode())
        assert (reply.status, reply.body) == (
            404, b"path: expected /events/<tenant>/<event>/<login>\n")
    assert await gateway.events() == []


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest_twisted.ensureDeferred
async def test_a_method_other_than_get_or_post_is_405_naming_both(
        gateway: Harness, method: str) -> None:
    reply = await gateway.request(method, f"{BASE}?key={KEY}", urlencode(DIAL_IN).encode())
    assert (reply.status, reply.header("Allow")) == (405, "GET, POST")
    assert reply.body == b"method not allowed: use GET or POST\n"
    assert await gateway.events() == []


@pytest_twisted.ensureDeferred
async def test_a_head_is_405_without_a_body(gateway: Harness) -> None:
    reply = await gateway.request("HEAD", f"{BASE}?key={KEY}", content_type=None)
    assert (reply.status, reply.header("Allow"), reply.body) == (405, "GET, POST", b"")


@pytest_twisted.ensureDeferred
async def test_an_event_the_store_cannot_take_is_503_saying_so(gateway: Harness) -> None:
    gateway.store.append = lambda events: defer.fail(OSError("disk full"))
    try:
        reply = await gateway.request("POST", f"{BASE}?key={KEY}", urlencode(DIAL_IN).encode(),
                                      server_error=True)
    finally:
        del gateway.store.append
    assert (reply.status, media_type(reply), reply.body) == (
        503, "text/plain", b"store unavailable, not stored\n")


# The form

@pytest.mark.parametrize("content_type", [
    "application/x-www-form-urlencoded", "Application/X-WWW-Form-URLEncoded",
    "application/x-www-form-urlencoded ; charset=utf-8", None])
@pytest_twisted.ensureDeferred
async def test_a_form_body_is_read_whatever_the_case_and_parameters_of_its_type(
        gateway: Harness, content_type: str | None) -> None:
    reply = await gateway.post(DIAL_IN, content_type=content_type)
    assert reply.status == 200, reply.body
    [ev] = await gateway.events()
    assert ev.peer == DIAL_IN["CallerIDNum"]


@pytest_twisted.ensureDeferred
async def test_an_empty_body_of_another_type_is_no_body(gateway: Harness) -> None:
    """A GET's fields are in its query string; a Content-Type with nothing in it is harmless."""
    reply = await gateway.request("POST", f"{BASE}?key={KEY}&{urlencode(DIAL_IN)}", b"",
                                  "application/json")
    assert reply.status == 200, reply.body
    assert len(await gateway.events()) == 1


@pytest_twisted.ensureDeferred
async def test_a_body_of_another_type_is_415_naming_the_type_expected(gateway: Harness) -> None:
    reply = await gateway.post(DIAL_IN, content_type="text/plain")
    assert (reply.status, reply.body) == (
        415, b"Content-Type: must be application/x-www-form-urlencoded\n")


@pytest_twisted.ensureDeferred
async def test_the_query_string_runs_from_its_first_question_mark_to_the_end(
        gateway: Harness) -> None:
    """A '?' inside the query string is part of a value, not the start of another query."""
    fields = urlencode({**DIAL_IN, "CallStatus": "WHY?NOT"}).replace("%3F", "?")
    reply = await gateway.request("GET", f"{BASE}?key={KEY}&{fields}", content_type=None)
    assert reply.status == 200, reply.body
    [ev] = await gateway.events()
    assert (ev.outcome, ev.at) == ("failed", int(DIAL_IN["EventTime"]))


@pytest_twisted.ensureDeferred
async def test_fields_with_blank_values_are_kept_as_blank(gateway: Harness) -> None:
    """``CallerIDNum=`` is a blank number (no number), and a blank first value wins."""
    body = urlencode(dict(DIAL_IN, CallerIDNum="")) + "&CallerIDNum=%2B70000000000"
    reply = await gateway.post(body.encode())
    assert reply.status == 200, reply.body
    [ev] = await gateway.events()
    assert ev.peer == ""


@pytest_twisted.ensureDeferred
async def test_a_query_string_that_is_not_utf8_is_refused_as_such(gateway: Harness) -> None:
    reply = await gateway.request("GET", f"{BASE}?key={KEY}&{urlencode(DIAL_IN)}&X=%FF",
                                  content_type=None)
    assert (reply.status, reply.body) == (400, b"query: not UTF-8 form data\n")


# The URL

@pytest_twisted.ensureDeferred
async def test_the_login_and_the_tenant_id_are_read_percent_decoded(gateway: Harness) -> None:
    reply = await gateway.post(DIAL_IN, tenant="%38%307", login="TLP%35%35522")
    assert reply.status == 200, reply.body


@pytest_twisted.ensureDeferred
async def test_a_tenant_id_of_twenty_digits_is_read_and_of_more_is_not(
        gateway: Harness) -> None:
    assert (await gateway.post(DIAL_IN, tenant="807".zfill(20))).status == 200
    reply = await gateway.post(DIAL_IN, tenant="807".zfill(21))
    assert (reply.status, reply.body) == (
        404, f"tenant: no tenant {'807'.zfill(21)[:20]} with PBX login {LOGIN}\n".encode())


@pytest_twisted.ensureDeferred
async def test_a_deleted_tenant_is_unknown(gateway: Harness) -> None:
    gateway.gw.tenants[807] = attrs.evolve(gateway.gw.tenants[807], deleted=True)
    reply = await gateway.post(DIAL_IN)
    assert reply.status == 404 and reply.body.startswith(b"tenant: no tenant 807")


@pytest_twisted.ensureDeferred
async def test_the_key_is_read_from_its_percent_encoded_name_and_value(gateway: Harness) -> None:
    path = f"{BASE}?%6bey={KEY.replace('-', '%2D')}&{urlencode(DIAL_IN)}"
    reply = await gateway.request("GET", path, content_type=None)
    assert reply.status == 200, reply.body


@pytest_twisted.ensureDeferred
async def test_the_first_key_in_the_query_counts(gateway: Harness) -> None:
    reply = await gateway.request(
        "GET", f"{BASE}?key={KEY}&key=wrong&{urlencode(DIAL_IN)}", content_type=None)
    assert reply.status == 200, reply.body
    reply = await gateway.request(
        "GET", f"{BASE}?key=wrong&key={KEY}&{urlencode(DIAL_IN)}", content_type=None)
    assert reply.status == 403


# A request answered after its client left

def test_an_answer_for_a_client_that_left_is_not_written() -> None:
    request = DummyRequest([b"events"])
    request._disconnected = True
    web.answer(request, 200, b"text/plain", b"OK")
    assert (request.written, request.finished) == ([], 0)


def test_an_answer_for_a_finished_request_is_not_written_again() -> None:
    request = DummyRequest([b"events"])
    request.finished = 1
    web.answer(request, 200, b"text/plain", b"OK")
    assert request.written == []


def test_an_answer_is_written_with_its_status_and_type() -> None:
    request = DummyRequest([b"events"])
    web.answer(request, 503, b"text/plain", b"store unavailable\n")
    assert (request.responseCode, request.written, request.finished) == (
        503, [b"store unavailable\n"], 1)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/plain"]


# /healthz

async def health(gateway: Harness) -> tuple[int, dict[str, Any]]:
    reply = await gateway.request("GET", "/healthz", content_type=None, server_error=True)
    return reply.status, json.loads(reply.body)


@pytest_twisted.ensureDeferred
async def test_healthz_of_an_idle_gateway_is_every_count_at_zero(gateway: Harness) -> None:
    await gateway.gw.engine.idle()
    status, body = await health(gateway)
    assert status == 200
    assert body == {"ok": True, "fold_lag_events": 0, "open_calls": 0, "quarantined_calls": 0,
                    "outbox_depth": 0, "oldest_pending_seconds": body["oldest_pending_seconds"],
                    "in_flight": 0, "actions": {"pending": 0}, "paused_hosts": {}}


@pytest_twisted.ensureDeferred
async def test_healthz_names_every_problem_and_rounds_the_pauses(gateway: Harness) -> None:
    stats = {"commit_error": "disk I/O error", "quarantined": 2, "log_head": 5,
             "actions": {"failed": 1, "dead": 3}}
    engine = gateway.gw.engine
    gateway.store.health = lambda quiet: defer.succeed(stats)
    gateway.gw.dispatcher.paused = lambda: {"altegio:api.alteg.io": 12.345}
    engine.failing_since, engine.last_error = gateway.gw.reactor.seconds() - 42.4, "boom"
    try:
        status, body = await health(gateway)
    finally:
        engine.failing_since = None
        del gateway.store.health, gateway.gw.dispatcher.paused
    assert status == 503
    assert body["ok"] is False
    assert body["problems"] == ["store cannot commit: disk I/O error",
                                "fold failing for 42 s: boom", "2 calls quarantined"]
    assert body["quarantined_calls"] == 2
    assert body["fold_lag_events"] == 5 - engine.cursor
    assert body["actions"] == {"pending": 0, "failed": 1, "dead": 3}
    assert body["paused_hosts"] == {"altegio:api.alteg.io": 12.3}


@pytest_twisted.ensureDeferred
async def test_healthz_with_quarantined_calls_only_is_200_not_ok(gateway: Harness) -> None:
    stats = {"commit_error": None, "quarantined": 1, "log_head": 0, "actions": {}}
    gateway.store.health = lambda quiet: defer.succeed(stats)
    try:
        status, body = await health(gateway)
    finally:
        del gateway.store.health
    assert (status, body["ok"], body["problems"]) == (200, False, ["1 calls quarantined"])


@pytest_twisted.ensureDeferred
async def test_healthz_reports_a_store_that_fails_with_its_error(gateway: Harness) -> None:
    gateway.store.health = lambda quiet: defer.fail(OSError("no space"))
    try:
        status, body = await health(gateway)
    finally:
        del gateway.store.health
    assert (status, body) == (503, {"ok": False, "problems": ["store: OSError('no space')"]})


@pytest_twisted.ensureDeferred
async def test_healthz_asks_the_store_for_a_write_after_five_quiet_seconds(
        gateway: Harness) -> None:
    asked = []
    real = gateway.store.health
    gateway.store.health = lambda quiet: asked.append(quiet) or real(quiet)
    try:
        status, _ = await health(gateway)
    finally:
        del gateway.store.health
    assert (status, asked) == (200, [5.0])
