"""The fake Altegio and Telphin behave as their protocol notes say, faults included."""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from tests.fakes.altegio import ACCEPT_V2, FakeAltegio
from tests.fakes.control import ControlApp, Faults
from tests.fakes.telphin import FakeTelphin

PARTNER = "partner-8a7b6c5d"
USER = "user-1f2e3d"
CRM = "7cf262d6-1b2a-4c3d-9e8f-0a1b2c3d4ec2"
INTEGRATION = "http://api.alteg.io/api/v1/voip/integration"
CALLS = "http://api.alteg.io/api/v1/voip/integration/calls"
GOOD_HEADERS = {"Authorization": f"Bearer {PARTNER}", "Accept": ACCEPT_V2}

SETUP = {"command": "setup", "type": "enable", "crm_token": CRM}
EVENT = {
    "command": "event",
    "type": "incoming",
    "crm_token": CRM,
    "phone": "+79161234567",
    "diversion": "+74951234567",
    "user": "101",
}
HISTORY = {
    "command": "history",
    "type": "incoming",
    "crm_token": CRM,
    "phone": "+79161234567",
    "diversion": "+74951234567",
    "user": "101",
    "duration": 93,
    "status": "success",
    "call_id": "807-5f0c1e2a-200501-0a1b",
    "link": "https://rec.example.net/8f1e2a.mp3",
    "date": "2026-05-14T10:22:05+03:00",
}


def altegio(**kwargs: Any) -> tuple[FakeAltegio, StubTreq, Clock]:
    clock = Clock()
    kwargs.setdefault("rate_limit", None)
    fake = FakeAltegio(PARTNER, user_token=USER, clock=clock, **kwargs)
    return fake, StubTreq(fake.resource()), clock


async def post(stub: StubTreq, body: object, headers: dict[str, str] = GOOD_HEADERS) -> tuple[int, Any, Any]:
    response = await stub.post(INTEGRATION, json=body, headers=headers)
    return response.code, await response.json(), response.headers


# --- Altegio: POST /voip/integration -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_valid_setup_event_and_history_are_accepted_and_recorded() -> None:
    fake, stub, clock = altegio()
    clock.advance(42)
    for body in (SETUP, EVENT, HISTORY):
        code, answer, _ = await post(stub, body)
        assert (code, answer) == (202, {"success": True, "data": None, "meta": {"message": "Accepted"}})
    assert fake.enabled == {CRM}
    assert [r["at"] for r in fake.received] == [42, 42, 42]
    assert fake.events() == [EVENT]
    assert fake.histories() == [HISTORY]


@pytest_twisted.ensureDeferred
async def test_a_history_delivered_twice_is_recorded_twice() -> None:
    fake, stub, _ = altegio()
    for body in (SETUP, HISTORY, HISTORY):
        await post(stub, body)
    assert fake.histories() == [HISTORY, HISTORY]


@pytest_twisted.ensureDeferred
async def test_events_for_a_chain_not_enabled_are_accepted_but_ignored() -> None:
    fake, stub, _ = altegio()
    code, _, _ = await post(stub, EVENT)
    assert code == 202
    assert fake.received[0]["ignored"] is True
    assert fake.events() == []
    await post(stub, SETUP)
    await post(stub, {**SETUP, "type": "disable"})
    await post(stub, HISTORY)
    assert fake.enabled == set()
    assert fake.histories() == []


@pytest.mark.parametrize(
    "headers, status, message",
    [
        pytest.param({"Accept": ACCEPT_V2}, 401, "Authentication needed.", id="no token"),
        pytest.param({**GOOD_HEADERS, "Authorization": "Bearer wrong"}, 401, "Authentication needed.", id="wrong token"),
        pytest.param(
            {**GOOD_HEADERS, "Authorization": f"Bearer {PARTNER}, User {USER}"}, 403, "Access denied.",
            id="a user token on a partner-only endpoint",
        ),
        pytest.param({**GOOD_HEADERS, "Accept": "application/json"}, 406, None, id="plain JSON Accept"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_authentication_and_accept_are_enforced(headers: dict[str, str], status: int, message: str | None) -> None:
    fake, stub, _ = altegio()
    code, answer, _ = await post(stub, SETUP, headers)
    assert code == status
    assert answer["success"] is False and answer["data"] is None
    if message is not None:
        assert answer["meta"]["message"] == message
    else:
        assert "Accept" in answer["meta"]["message"]
    assert fake.received == []


def answered_yet(response: Deferred[Any]) -> list[Any]:
    """A box that holds the response once it has really arrived (`.called` fires early)."""
    box: list[Any] = []

    def arrived(result: Any) -> Any:
        box.append(result)
        return result

    response.addBoth(arrived)
    return box


def without(body: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != name}


@pytest.mark.parametrize(
    "body, fields",
    [
        pytest.param(without(EVENT, "phone"), ["phone"], id="an event without phone"),
        pytest.param({**EVENT, "phone": ""}, ["phone"], id="an empty phone"),
        pytest.param({**HISTORY, "date": "2026-05-14T10:22:05"}, ["date"], id="a naive date"),
        pytest.param({**HISTORY, "date": "2026-05-14"}, ["date"], id="a date without time"),
        pytest.param({**HISTORY, "status": "busy"}, ["status"], id="status busy"),
        pytest.param(
            {**without(EVENT, "crm_token"), "crmToken": CRM}, ["crmToken", "crm_token"],
            id="camelCase crmToken",
        ),
        pytest.param({**HISTORY, "duration": "93"}, ["duration"], id="duration as a string"),
        pytest.param({**HISTORY, "duration": True}, ["duration"], id="duration as a boolean"),
        pytest.param({**HISTORY, "duration": -1}, ["duration"], id="a negative duration"),
        pytest.param({**HISTORY, "link": "ftp://x/y.mp3"}, ["link"], id="a link that is not http"),
        pytest.param({**HISTORY, "call_id": 5}, ["call_id"], id="a numeric call_id"),
        pytest.param({**EVENT, "duration": 3}, ["duration"], id="a history field on an event"),
        pytest.param({**SETUP, "type": "on"}, ["type"], id="an unknown setup type"),
        pytest.param({**EVENT, "command": "popup"}, ["command"], id="an unknown command"),
        pytest.param(
            {**without(HISTORY, "diversion"), "status": "busy"}, ["diversion", "status"],
            id="every bad field is named",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_invalid_bodies_get_422_naming_the_field(body: dict[str, Any], fields: list[str]) -> None:
    fake, stub, _ = altegio()
    code, answer, _ = await post(stub, body)
    assert code == 422
    assert answer["meta"]["message"] == "An error has occurred."
    assert sorted(e["field"] for e in answer["meta"]["errors"]) == fields
    assert fake.received == []


@pytest_twisted.ensureDeferred
async def test_a_utc_z_date_and_an_optional_free_history_are_valid() -> None:
    _, stub, _ = altegio()
    for body in (
        {**HISTORY, "date": "2026-05-14T07:22:05Z"},
        {k: HISTORY[k] for k in ("command", "type", "crm_token", "phone", "diversion")},
        {**HISTORY, "duration": 12.5},
    ):
        code, _, _ = await post(stub, body)
        assert code == 202


@pytest_twisted.ensureDeferred
async def test_bodies_that_are_not_json_objects_get_422() -> None:
    _, stub, _ = altegio()
    response = await stub.post(
        INTEGRATION, data=b"command=setup", headers={**GOOD_HEADERS, "Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.code == 422
    assert (await response.json())["meta"]["errors"][0]["field"] == "Content-Type"
    response = await stub.post(INTEGRATION, data=b"[1]", headers={**GOOD_HEADERS, "Content-Type": "application/json"})
    assert response.code == 422
    assert (await response.json())["meta"]["errors"][0]["field"] == "body"


@pytest_twisted.ensureDeferred
async def test_the_sixth_request_in_a_second_is_rate_limited() -> None:
    fake, stub, clock = altegio(rate_limit=5.0)
    for _ in range(5):
        assert (await post(stub, SETUP))[0] == 202
        clock.advance(0.1)
    code, answer, headers = await post(stub, SETUP)
    assert code == 429
    assert answer["meta"]["message"] == "Too many requests"
    assert headers.getRawHeaders("Retry-After") == ["1"]
    assert fake.rejected_rate_limited == 1
    assert len(fake.received) == 5
    # The first request leaves the one-second window at t=1.0.
    clock.advance(0.5)
    assert (await post(stub, SETUP))[0] == 202


@pytest_twisted.ensureDeferred
async def test_a_per_account_limit_counts_each_crm_token_alone() -> None:
    fake, stub, _ = altegio(rate_limit=2.0, rate_limit_by="account")
    other = {**SETUP, "crm_token": "0b9a8c7d-1e2f-4a5b-8c9d-0e1f2a3b4c5d"}
    assert [(await post(stub, SETUP))[0] for _ in range(3)] == [202, 202, 429]
    assert [(await post(stub, other))[0] for _ in range(3)] == [202, 202, 429]
    assert fake.rejected_rate_limited == 2


@pytest_twisted.ensureDeferred
async def test_rejected_requests_count_toward_the_rate_limit() -> None:
    fake, stub, _ = altegio(rate_limit=2.0)
    assert (await post(stub, SETUP, {}))[0] == 401
    assert (await post(stub, SETUP))[0] == 202
    assert (await post(stub, SETUP))[0] == 429


# --- Faults ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fail_status_with_a_count_fails_that_many_times_then_recovers() -> None:
    fake, stub, _ = altegio()
    fake.faults.fail_status, fake.faults.fail_count = 503, 2
    assert (await post(stub, SETUP))[0] == 503
    code, answer, _ = await post(stub, SETUP)
    assert code == 503 and answer["success"] is False
    assert (await post(stub, SETUP))[0] == 202
    assert fake.faults.requests_seen == 3
    assert len(fake.received) == 1


@pytest_twisted.ensureDeferred
async def test_a_429_fault_carries_retry_after_in_whole_seconds() -> None:
    telphin = FakeTelphin({"app": "secret"}, clock=Clock())
    stub = StubTreq(telphin.resource())
    telphin.faults.update({"fail_status": 429, "retry_after": 2.5})
    response = await stub.get("http://apiproxy.telphin.ru/api/ver1.0/client/@me/record/x/storage_url/")
    assert response.code == 429
    assert response.headers.getRawHeaders("Retry-After") == ["3"]
    assert await response.json() == {"message": "Too Many Requests"}
    # No count: it keeps failing until cleared.
    assert (await stub.get("http://apiproxy.telphin.ru/api/ver1.0/client/@me/record/x/storage_url/")).code == 429


@pytest_twisted.ensureDeferred
async def test_a_delay_holds_the_answer_until_the_clock_moves() -> None:
    fake, stub, clock = altegio()
    fake.faults.delay = 2.0
    answered = stub.post(INTEGRATION, json=SETUP, headers=GOOD_HEADERS)
    arrived = answered_yet(answered)
    clock.advance(1.9)
    stub.flush()
    assert arrived == []
    clock.advance(0.1)
    stub.flush()
    assert (await answered).code == 202


@pytest_twisted.ensureDeferred
async def test_a_hung_request_is_answered_once_hang_is_cleared() -> None:
    fake, stub, clock = altegio()
    fake.faults.hang = True
    answered = stub.post(INTEGRATION, json=SETUP, headers=GOOD_HEADERS)
    arrived = answered_yet(answered)
    clock.advance(3600)
    stub.flush()
    assert arrived == []
    assert fake.received == []
    fake.faults.update({"hang": False})
    stub.flush()
    assert (await answered).code == 202
    assert len(fake.received) == 1


def test_a_hung_request_is_let_go_when_the_client_hangs_up() -> None:
    faults = Faults(hang=True)
    request = DummyRequest([b""])
    outcome = ensureDeferred(faults.intercept(request, Clock(), lambda status: {}))
    failures: list[Failure] = []
    outcome.addErrback(failures.append)
    assert failures == [] and len(faults._hung) == 1
    request.processingFailed(Failure(ConnectionDone()))
    assert failures[0].check(CancelledError)
    assert faults._hung == []


def test_fault_updates_are_checked_before_anything_changes() -> None:
    fake = FakeAltegio(PARTNER, clock=Clock())
    with pytest.raises(ValueError, match="fail_count"):
        fake.faults.update({"fail_status": 500, "fail_count": -1})
    with pytest.raises(ValueError, match="unknown"):
        fake.faults.update({"status": 500})
    assert fake.faults.fail_status is None
    fake.faults.update({"fail_status": 502, "delay": 1})
    fake.faults.update({"clear": True, "retry_after": 4})
    assert fake.faults.snapshot() == {
        "fail_status": None, "fail_count": None, "retry_after": 4, "delay": 0.0,
        "hang": False, "requests_seen": 0,
    }


# --- Altegio: read-back -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_read_back_lists_processed_histories_in_the_date_range() -> None:
    fake, stub, _ = altegio()
    await post(stub, {**HISTORY, "crm_token": "not-enabled"})
    for body in (SETUP, EVENT, HISTORY, HISTORY, {**HISTORY, "status": "missed", "date": "2026-05-15T00:30:00+03:00"}):
        await post(stub, body)
    headers = {"Authorization": f"Bearer {PARTNER}, User {USER}", "Accept": ACCEPT_V2}
    query = {"salon_id": "4564", "date_from": "2026-05-14", "date_to": "2026-05-14"}
    response = await stub.get(CALLS, params=query, headers=headers)
    assert response.code == 200
    answer = await response.json()
    assert answer["meta"] == {"count": 2}
    assert answer["data"][0] == {
        "id": 4, "client_id": 0, "caller_phone": "+79161234567",
        "record_link": "https://rec.example.net/8f1e2a.mp3", "duration": 93,
        "status": "success", "type": "incoming", "call_date": "2026-05-14T10:22:05+03:00",
    }
    wide = {**query, "date_to": "2026-05-15", "statuses[]": "missed"}
    answer = await (await stub.get(CALLS, params=wide, headers=headers)).json()
    assert [item["status"] for item in answer["data"]] == ["missed"]


@pytest.mark.parametrize(
    "authorization, query, status",
    [
        pytest.param(f"Bearer {PARTNER}", {"salon_id": "1", "date_from": "2026-05-14", "date_to": "2026-05-14"}, 401, id="partner token only"),
        pytest.param(f"Bearer {PARTNER}, User wrong", {"salon_id": "1", "date_from": "2026-05-14", "date_to": "2026-05-14"}, 401, id="wrong user token"),
        pytest.param(f"Bearer {PARTNER}, User {USER}", {"date_from": "2026-05-14", "date_to": "2026-05-14"}, 422, id="no salon_id"),
        pytest.param(f"Bearer {PARTNER}, User {USER}", {"salon_id": "1", "date_from": "14.05.2026", "date_to": "2026-05-14"}, 422, id="a date not YYYY-MM-DD"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_read_back_needs_both_tokens_and_a_range(authorization: str, query: dict[str, str], status: int) -> None:
    _, stub, _ = altegio()
    response = await stub.get(CALLS, params=query, headers={"Authorization": authorization, "Accept": ACCEPT_V2})
    assert response.code == status


# --- Control app (in process) ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_control_app_sets_faults_configures_and_reports() -> None:
    fake, stub, _ = altegio()
    control = StubTreq(ControlApp(fake).resource())
    response = await control.post("http://c/_control/faults", json={"fail_status": 502, "fail_count": 1})
    assert (await response.json())["fail_status"] == 502
    assert (await post(stub, SETUP))[0] == 502
    response = await control.post("http://c/_control/setup", json={"rate_limit": 1})
    assert response.code == 200 and fake.rate_limit == 1
    assert (await control.post("http://c/_control/setup", json={"rate": 1})).code == 400
    assert (await control.post("http://c/_control/faults", json={"hang": "yes"})).code == 400
    await post(stub, SETUP)
    state = await (await control.get("http://c/_control/state")).json()
    assert state["enabled"] == [CRM]
    assert [r["body"] for r in state["received"]] == [SETUP]
    assert state["faults"]["requests_seen"] == 2
    assert (await control.post("http://c/_control/refuse")).code == 409


# --- Telphin ----------------------------------------------------------------------------

TELPHIN = "http://apiproxy.telphin.ru"
REC = "200501-9F2C4A1B0D3E4F5A6B7C8D9E0F1A2B3C"
REC_URL = f"https://storage.telphin.ru/rec/7001/{REC}.mp3?sig=ab12"


def telphin() -> tuple[FakeTelphin, StubTreq, Clock]:
    clock = Clock()
    fake = FakeTelphin({"5f1c0e9a2b": "9d8c7b6a"}, clock=clock, records={REC: REC_URL})
    return fake, StubTreq(fake.resource()), clock


async def get_token(stub: StubTreq, **form: str) -> tuple[int, Any]:
    fields = {"grant_type": "client_credentials", "client_id": "5f1c0e9a2b", "client_secret": "9d8c7b6a", **form}
    response = await stub.post(f"{TELPHIN}/oauth/token", data=fields)
    return response.code, await response.json()


@pytest_twisted.ensureDeferred
async def test_client_credentials_get_a_bearer_token() -> None:
    fake, stub, _ = telphin()
    code, answer = await get_token(stub)
    assert code == 200
    assert answer == {"access_token": answer["access_token"], "token_type": "Bearer", "expires_in": 3600, "scope": "all"}
    assert int(answer["access_token"], 16) >= 0
    assert fake.tokens_issued == 1


@pytest.mark.parametrize(
    "form, status, error",
    [
        pytest.param({"client_secret": "nope"}, 401, "invalid_client", id="a wrong secret"),
        pytest.param({"client_id": "stranger"}, 401, "invalid_client", id="an unknown client"),
        pytest.param({"grant_type": "password"}, 400, "unsupported_grant_type", id="a password grant"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_token_requests_are_refused(form: dict[str, str], status: int, error: str) -> None:
    fake, stub, _ = telphin()
    assert await get_token(stub, **form) == (status, {"error": error})
    assert fake.tokens_issued == 0


@pytest_twisted.ensureDeferred
async def test_a_json_token_request_is_invalid() -> None:
    _, stub, _ = telphin()
    response = await stub.post(
        f"{TELPHIN}/oauth/token",
        json={"grant_type": "client_credentials", "client_id": "5f1c0e9a2b", "client_secret": "9d8c7b6a"},
    )
    assert (response.code, await response.json()) == (400, {"error": "invalid_request"})


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(f"/api/ver1.0/client/@me/record/{REC}/storage_url/", id="client @me"),
        pytest.param(f"/api/ver1.0/client/%40me/record/{REC}/storage_url/", id="client %40me"),
        pytest.param(f"/api/ver1.0/client/7001/record/{REC}/storage_url/", id="numeric client"),
        pytest.param(f"/api/ver1.0/extension/200501/record/{REC}/storage_url/", id="extension"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_storage_url_of_a_known_record(path: str) -> None:
    fake, stub, clock = telphin()
    _, token = await get_token(stub)
    clock.advance(5)
    response = await stub.get(TELPHIN + path, headers={"Authorization": f"Bearer {token['access_token']}"})
    assert (response.code, await response.json()) == (200, {"record_url": REC_URL})
    assert fake.requests == [{"method": "GET", "path": path, "at": 5, "status": 200}]


@pytest_twisted.ensureDeferred
async def test_storage_url_of_an_unknown_record_is_404() -> None:
    _, stub, _ = telphin()
    _, token = await get_token(stub)
    response = await stub.get(
        f"{TELPHIN}/api/ver1.0/client/@me/record/200501-0000/storage_url/",
        headers={"Authorization": f"Bearer {token['access_token']}"},
    )
    assert (response.code, await response.json()) == (404, {"message": "Record not found"})


@pytest_twisted.ensureDeferred
async def test_tokens_stop_working_when_revoked_or_expired() -> None:
    fake, stub, clock = telphin()
    url = f"{TELPHIN}/api/ver1.0/client/@me/record/{REC}/storage_url/"

    async def fetch(token: str | None) -> int:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        response = await stub.get(url, headers=headers)
        if response.code == 401:
            assert await response.json() == {"message": "Unauthorized"}
        return response.code

    assert await fetch(None) == 401
    _, first = await get_token(stub)
    assert await fetch(first["access_token"]) == 200
    fake.expire_all_tokens()
    assert await fetch(first["access_token"]) == 401
    _, second = await get_token(stub)
    clock.advance(3599)
    assert await fetch(second["access_token"]) == 200
    clock.advance(1)
    assert await fetch(second["access_token"]) == 401
    assert [r["status"] for r in fake.requests] == [401, 200, 401, 200, 401]


# --- Standalone runner ----------------------------------------------------------------


def control_post(port: int, path: str, body: object = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        payload = json.dumps(body if body is not None else {})
        connection.request("POST", path, body=payload, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return False
    return True


def test_the_runner_refuses_and_accepts_connections_on_the_same_port() -> None:
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.telphin", "--port", "0", "--control-port", "0", "--client", "app:secret"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 4)
        assert ready, "the runner did not print READY in time"
        words = dict(part.split("=") for part in process.stdout.readline().split()[1:])
        port, control = int(words["port"]), int(words["control"])
        assert connects(port)
        assert control_post(control, "/_control/refuse") == (200, {"listening": False, "port": port})
        assert not connects(port)
        assert control_post(control, "/_control/accept") == (200, {"listening": True, "port": port})
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        connection.request("POST", "/oauth/token", body="grant_type=client_credentials&client_id=app&client_secret=secret",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert connection.getresponse().status == 200
        connection.close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=3) == 0
        process.stdout.close()
