"""The fake Planfix telephony API is as strict as protocols/planfix.md: form bodies only,
`planfix_token` on every command, Planfix's 400/401 bodies, the ring-group rules per
(callid, ext); its control API; its standalone runner and client mode."""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock

from tests.fakes.control import ControlApp
from tests.fakes.planfix import FakePlanfix

TOKEN = "303cb962ac59075b964b07152d234b70"
URL = "https://test.planfix.ru/tel/api"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ROOT = Path(__file__).resolve().parent.parent


def event(event: str, ext: str = "101", callid: str = "807-c1", kind: str = "in",
          **extra: str) -> dict[str, str]:
    fields = {"cmd": "event", "type": kind, "event": event, "phone": "79101234567",
              "diversion": "74951234567", "ext": ext, "callid": callid}
    if event == "COMPLETED":
        fields.update(duration="0", is_recorded="0", status="Cancelled")
    return {**fields, **extra, "planfix_token": TOKEN}


class Client:
    def __init__(self, **setup: Any) -> None:
        self.fake = FakePlanfix(TOKEN, clock=Clock())
        if setup:
            self.fake.setup(setup)
        self.stub = StubTreq(self.fake.resource())

    async def post(self, fields: dict[str, str] | bytes, headers: dict | None = None,
                   url: str = URL, method: str = "POST") -> tuple[int, Any]:
        body = fields if isinstance(fields, bytes) else urlencode(fields).encode()
        resp = await self.stub.request(method, url, data=body,
                                       headers=FORM if headers is None else headers)
        text = await resp.content()
        return resp.code, (json.loads(text) if text else None)


# --- transport and tokens ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_event_is_200_with_an_empty_body_and_is_recorded() -> None:
    c = Client()
    assert await c.post(event("INCOMING")) == (200, None)
    [seen] = c.fake.events
    assert seen["event"] == "INCOMING" and "planfix_token" not in seen
    assert c.fake.requests[0]["form"][0] == ("cmd", "event")


@pytest.mark.parametrize("token", [None, "", "wrong"])
@pytest_twisted.ensureDeferred
async def test_a_missing_or_wrong_planfix_token_is_401(token: str | None) -> None:
    c = Client()
    fields = {k: v for k, v in event("INCOMING").items() if k != "planfix_token"}
    if token is not None:
        fields["planfix_token"] = token
    assert await c.post(fields) == (401, {"error": "Invalid token"})
    assert c.fake.events == []


@pytest_twisted.ensureDeferred
async def test_the_general_sections_token_field_does_not_stand_in() -> None:
    c = Client()
    fields = {k: v for k, v in event("INCOMING").items() if k != "planfix_token"}
    assert (await c.post({**fields, "token": TOKEN}))[0] == 401


@pytest_twisted.ensureDeferred
async def test_only_form_bodies_posted_to_tel_api() -> None:
    c = Client()
    assert await c.post(json.dumps(event("INCOMING")).encode(),
                        {"Content-Type": "application/json"}) == (
        400, {"error": "Invalid parameters"})
    assert (await c.post(event("INCOMING"), url=URL + "?cmd=event"))[0] == 400
    assert (await c.post(event("INCOMING"), method="PUT"))[0] == 405
    assert (await c.post(event("INCOMING"), url="https://test.planfix.ru/rest/x"))[0] == 404
    assert (await c.post(b"cmd=event&cmd=ping&planfix_token=" + TOKEN.encode()))[0] == 400
    assert c.fake.events == []


@pytest.mark.parametrize("change", [
    {"cmd": "dial"}, {"type": "inbound"}, {"event": "RINGING"}, {"phone": ""}, {"ext": ""},
    {"callid": ""}, {"unknown": "x"}, {"duration": "5"}, {"status": "Success"},
    {"data_utm_source": "ads"},
])
@pytest_twisted.ensureDeferred
async def test_bad_events_are_400(change: dict[str, str]) -> None:
    c = Client()
    assert await c.post({**event("INCOMING"), **change}) == (400, {"error": "Invalid parameters"})
    assert c.fake.events == [] and c.fake.violations == []


@pytest.mark.parametrize("change", [
    {"duration": "1.5"}, {"duration": "-1"}, {"is_recorded": "yes"}, {"status": "Busy"},
    {"status": ""}, {"record_link": "not a url"},
])
@pytest_twisted.ensureDeferred
async def test_bad_completed_fields_are_400(change: dict[str, str]) -> None:
    c = Client()
    await c.post(event("INCOMING"))
    assert (await c.post({**event("COMPLETED"), **change}))[0] == 400


@pytest_twisted.ensureDeferred
async def test_diversion_is_required_except_on_completed_and_data_fields_pass() -> None:
    c = Client()
    no_diversion = {k: v for k, v in event("INCOMING").items() if k != "diversion"}
    assert (await c.post(no_diversion))[0] == 400
    assert (await c.post(event("INCOMING")))[0] == 200
    completed = {k: v for k, v in event("COMPLETED", status="Success", duration="12",
                                        data_utm_source="ads").items() if k != "diversion"}
    assert (await c.post(completed))[0] == 200
    assert c.fake.completed["807-c1"][0]["data_utm_source"] == "ads"


# --- the ring-group rules ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_documents_ring_group_passes() -> None:
    c = Client()
    for fields in (event("INCOMING", "101"), event("INCOMING", "102"), event("ACCEPTED", "102"),
                   event("COMPLETED", "101"),
                   event("COMPLETED", "102", status="Success", duration="124",
                         is_recorded="1")):
        assert (await c.post(fields))[0] == 200, fields
    assert c.fake.popups["807-c1"] == {"101": ["ringing", "closed"],
                                       "102": ["ringing", "talking", "final"]}
    assert [f["ext"] for f in c.fake.completed["807-c1"]] == ["102"]
    assert c.fake.violations == []


@pytest.mark.parametrize("before, bad, problem", [
    ([], event("ACCEPTED"), "never sent INCOMING"),
    ([event("INCOMING"), event("COMPLETED")], event("ACCEPTED"), "in closed"),
    ([], event("COMPLETED"), "never sent INCOMING"),
    ([event("INCOMING"), event("COMPLETED")], event("COMPLETED"), "after COMPLETED"),
    ([event("INCOMING"), event("COMPLETED", status="Missed")],
     event("COMPLETED", status="Missed"), "COMPLETED after COMPLETED"),
    ([event("INCOMING"), event("COMPLETED")], event("COMPLETED", status="Success"),
     "after Cancelled"),
    ([event("INCOMING")], event("INCOMING"), "pop-up is open"),
])
@pytest_twisted.ensureDeferred
async def test_events_out_of_order_are_refused_and_named(before: list, bad: dict,
                                                         problem: str) -> None:
    c = Client()
    for fields in before:
        assert (await c.post(fields))[0] == 200
    assert await c.post(bad) == (400, {"error": "Invalid parameters"})
    [violation] = c.fake.violations
    assert problem in violation
    # Flagging instead of refusing: accepted, still named.
    c = Client(sequence="flag")
    for fields in before:
        await c.post(fields)
    assert (await c.post(bad))[0] == 200 and len(c.fake.violations) == 1


@pytest_twisted.ensureDeferred
async def test_a_missed_call_after_cancelled_pop_ups_and_without_any() -> None:
    c = Client()
    for fields in (event("INCOMING"), event("COMPLETED"), event("COMPLETED", status="Missed"),
                   event("COMPLETED", ext="500", callid="807-c2", status="Missed")):
        assert (await c.post(fields))[0] == 200
    assert c.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_record_needs_a_recorded_completed_first() -> None:
    c = Client()
    record = {"cmd": "record", "callid": "807-c1", "record_link": "https://r.example/f.mp3",
              "is_temp": "1", "planfix_token": TOKEN}
    assert (await c.post(record))[0] == 400 and "no COMPLETED" in c.fake.violations[0]
    await c.post(event("INCOMING"))
    await c.post(event("COMPLETED", status="Success", duration="3", is_recorded="1"))
    assert (await c.post(record))[0] == 200
    assert c.fake.records == [{k: v for k, v in record.items() if k != "planfix_token"}]
    for change in ({"record_link": ""}, {"record_link": "f.mp3"}, {"is_temp": "2"},
                   {"callid": ""}, {"duration": "3"}):
        assert (await c.post({**record, **change}))[0] == 400, change


# --- contact, ping ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_contact_and_ping() -> None:
    c = Client(contacts={"+7 910 123-45-67": {"contact_name": "Иванов", "responsible": 103}},
               pbx_token="pbx", pbx_url="https://gw/crm/807/pbx/L")
    ask = {"cmd": "contact", "phone": "79101234567", "planfix_token": TOKEN}
    assert await c.post(ask) == (200, {"contact_name": "Иванов", "responsible": 103})
    assert await c.post({**ask, "phone": "79990000000", "callid": "x"}) == (200, {})
    assert (await c.post({**ask, "phone": ""}))[0] == 400
    assert (await c.post({**ask, "planfix_token": "no"}))[0] == 401
    assert await c.post({"cmd": "ping", "planfix_token": TOKEN}) == (
        200, {"pbxToken": "pbx", "pbxUrl": "https://gw/crm/807/pbx/L"})


# --- faults, control, setup ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_faults_answer_in_planfixs_shape() -> None:
    c = Client()
    c.fake.faults.update({"fail_status": 503, "fail_count": 1})
    assert await c.post(event("INCOMING")) == (503, {"error": "Service Unavailable"})
    assert (await c.post(event("INCOMING")))[0] == 200


@pytest_twisted.ensureDeferred
async def test_the_control_app_configures_reports_and_resets() -> None:
    c = Client()
    control = StubTreq(ControlApp(c.fake).resource())
    resp = await control.post("http://fake/_control/setup", data=json.dumps(
        {"contacts": {"79101234567": {"responsible": "101"}}, "sequence": "flag"}).encode())
    assert resp.code == 200
    await c.post(event("ACCEPTED"))
    resp = await control.get("http://fake/_control/state")
    state = json.loads(await resp.content())
    assert state["sequence"] == "flag" and len(state["violations"]) == 1
    assert state["contacts"] == {"79101234567": {"responsible": "101"}}
    for bad in ({"sequence": "loose"}, {"contacts": {"x": {}}}, {"nope": 1},
                {"contacts": {"7910": {"responsible": True}}}, {"planfix_token": ""}):
        resp = await control.post("http://fake/_control/setup", data=json.dumps(bad).encode())
        assert resp.code == 400, bad
    resp = await control.post("http://fake/_control/reset")
    assert json.loads(await resp.content())["violations"] == []


@pytest_twisted.ensureDeferred
async def test_planfixs_side_sends_setup_and_make_call_as_forms_with_its_token() -> None:
    gateway = FakePlanfix("gw-side", clock=Clock())  # stands in for a PBX that records forms
    c = Client(pbx_url="https://pbx.example/crm/807/pbx/L", pbx_token="pbx-token",
               own_url=URL)
    stub = StubTreq(gateway.resource())
    status, text = await c.fake.send_setup(stub)
    # The stand-in answers as Planfix would to a stranger: that answer is what Planfix shows.
    assert (status, json.loads(text)) == (404, {"error": "Not found"})
    await c.fake.make_call(stub, "101", "79101234567")
    assert [s["fields"] for s in c.fake.sent] == [
        {"cmd": "setup", "planfix_token": TOKEN, "planfix_url": URL},
        {"cmd": "makeCall", "from": "101", "to": "79101234567"}]
    assert c.fake.sent[0]["shown"] == text


# --- standalone --------------------------------------------------------------------------------


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.fakes.planfix", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_standalone_help_runs() -> None:
    result = run("--help")
    assert result.returncode == 0
    for flag in ("--planfix-token", "--pbx-url", "--pbx-token", "--contact", "--sequence",
                 "--port", "--control-port"):
        assert flag in result.stdout


def test_the_standalone_fake_over_tcp_and_the_client_mode() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.planfix", "--planfix-token", TOKEN,
         "--contact", "79101234567=Иванов:103"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        ready, _, _ = select.select([process.stdout], [], [], 10)
        assert ready, "the runner did not print READY in time"
        words = dict(part.split("=") for part in process.stdout.readline().split()[1:])
        port, control = int(words["port"]), int(words["control"])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("POST", "/tel/api", body=urlencode(
            {"cmd": "contact", "phone": "79101234567", "planfix_token": TOKEN}), headers=FORM)
        response = connection.getresponse()
        assert (response.status, json.loads(response.read())) == (
            200, {"contact_name": "Иванов", "responsible": 103})
        connection.close()
        # Client mode: Planfix's makeCall to a URL (here the fake itself, which refuses a
        # request without its planfix_token): the answer is printed, non-200 exits 1.
        result = run("send", f"http://127.0.0.1:{port}/tel/api", "pbx-token", "cmd=makeCall",
                     "from=101", "to=79101234567")
        assert result.returncode == 1
        assert json.loads(result.stdout) == {"status": 401,
                                             "answer": '{"error": "Invalid token"}'}
        connection = http.client.HTTPConnection("127.0.0.1", control, timeout=5)
        connection.request("GET", "/_control/state")
        state = json.loads(connection.getresponse().read())
        connection.close()
        assert [r["form"] for r in state["requests"]][-1] == [
            ["cmd", "makeCall"], ["from", "101"], ["to", "79101234567"], ["token", "pbx-token"]]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
        process.stdout.close()
