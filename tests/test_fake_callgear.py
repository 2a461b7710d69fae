"""The fake CallGear's own strictness: JSON-RPC envelope, auth and sessions, mnemonics,
limits, click-to-call parameters, the notification renderer and the control API."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock

from tests.fakes.callgear import FakeCallGear, render
from tests.fakes.control import ControlApp

CALL, DATA = "http://callapi.test/v4.0", "http://dataapi.test/v2.0"
ROOT = Path(__file__).resolve().parent.parent
CLICK = {"access_token": "k3y", "first_call": "employee", "virtual_phone_number": "74951234567",
         "contact": "79161234567", "employee": {"id": 25}}


def fake(**setup: Any) -> tuple[FakeCallGear, StubTreq, Clock]:
    clock = Clock()
    clock.advance(10)
    f = FakeCallGear(clock=clock)
    f.setup({"api_keys": ["k3y"], "users": {"u": "pw"}, "virtual_numbers": ["74951234567"],
             "employees": [{"id": 25, "extension": {"extension_phone_number": "101"}}],
             **setup})
    return f, StubTreq(f.resource()), clock


async def rpc(stub: StubTreq, body: Any, url: str = CALL, raw: bytes | None = None,
              ctype: str = "application/json") -> dict[str, Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    response = await stub.post(url, data=data, headers={"Content-Type": ctype})
    assert response.code == 200
    return await response.json()


def call(method: str, params: Any, rid: Any = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}


def mnemonic(answer: dict[str, Any]) -> tuple[int, str]:
    return answer["error"]["code"], answer["error"]["data"]["mnemonic"]


@pytest.mark.parametrize("body, raw, ctype, expected", [
    pytest.param(None, b"{nope", "application/json", (-32700, "parse_error"), id="not JSON"),
    pytest.param([call("release.call", {})], None, "application/json",
                 (-32099, "batch_opreations_not_supported"), id="a batch"),
    pytest.param({"jsonrpc": "2.0", "method": "release.call", "params": {}}, None,
                 "application/json", (-32099, "notifications_not_supported"), id="no id"),
    pytest.param({**call("release.call", {}), "jsonrpc": "1.0"}, None, "application/json",
                 (-32600, "invalid_request"), id="not 2.0"),
    pytest.param(call("release.call", {}), None, "text/plain", (-32600, "invalid_request"),
                 id="not JSON content type"),
    pytest.param(call("get.employees", {}), None, "application/json",
                 (-32601, "method_not_found"), id="a Data API method on the Call API"),
    pytest.param(call("release.call", []), None, "application/json",
                 (-32602, "data_type_error"), id="params not an object"),
    pytest.param(call("release.call", {"call_session_id": 1}), None, "application/json",
                 (-32001, "access_token_invalid"), id="no access_token"),
    pytest.param(call("release.call", {"access_token": "k3y", "call_session_id": "1"}), None,
                 "application/json", (-32602, "data_type_error"), id="id as a string"),
    pytest.param(call("start.employee_call", {**CLICK, "extrnal_id": "x"}), None,
                 "application/json", (-32602, "unexpected_parameter"), id="misspelt param"),
    pytest.param(call("start.employee_call", {k: v for k, v in CLICK.items()
                                              if k != "contact"}), None, "application/json",
                 (-32602, "required_parameter_missed"), id="no contact"),
    pytest.param(call("start.employee_call", {**CLICK, "early_switching": True}), None,
                 "application/json", (-32602, "invalid_parameters_combination"),
                 id="early_switching without switch_at_once"),
    pytest.param(call("start.employee_call", {**CLICK, "virtual_phone_number": "7000"}), None,
                 "application/json", (-32007, "virtual_phone_number_not_found"),
                 id="not the account's number"),
    pytest.param(call("start.employee_call", {**CLICK, "employee": {"id": 26}}), None,
                 "application/json", (-32602, "employee_not_found"), id="unknown employee"),
    pytest.param(call("start.employee_call", {**CLICK, "contact": "101"}), None,
                 "application/json", (-32602, "data_type_error"), id="a short number"),
    pytest.param(call("release.call", {"access_token": "k3y", "call_session_id": 5}), None,
                 "application/json", (-32602, "call_session_not_found"), id="unknown call"),
])
@pytest_twisted.ensureDeferred
async def test_a_bad_request_gets_its_code_and_mnemonic(body: Any, raw: bytes | None,
                                                        ctype: str, expected: tuple) -> None:
    f, stub, _ = fake()
    answer = await rpc(stub, body, raw=raw, ctype=ctype)
    assert mnemonic(answer) == expected
    assert f.calls == [] and f.released == []


@pytest_twisted.ensureDeferred
async def test_a_started_call_answers_a_session_and_echoes_the_limits() -> None:
    f, stub, _ = fake()
    answer = await rpc(stub, call("start.employee_call", {**CLICK, "external_id": "gw-1"},
                                  "c2c-1f3a"))
    assert answer["id"] == "c2c-1f3a"
    session = answer["result"]["data"]["call_session_id"]
    assert answer["result"]["metadata"]["limits"]["minute_remaining"] == 99
    assert f.calls[0]["call_session_id"] == session
    assert f.calls[0]["params"]["external_id"] == "gw-1"
    released = await rpc(stub, call("release.call", {"access_token": "k3y",
                                                     "call_session_id": session}))
    assert released["result"]["data"] == {"success": True} and f.released == [session]


@pytest_twisted.ensureDeferred
async def test_sessions_open_with_login_and_end_after_their_lifetime() -> None:
    f, stub, clock = fake(session_lifetime=60)
    assert mnemonic(await rpc(stub, call("login.user", {"login": "u", "password": "no"}))) == (
        -32001, "auth_error")
    data = (await rpc(stub, call("login.user", {"login": "u", "password": "pw"}),
                      DATA))["result"]["data"]
    assert set(data) == {"access_token", "expire_at", "app_id"} and data["expire_at"] == 70
    ok = await rpc(stub, call("get.employees", {"access_token": data["access_token"]}), DATA)
    assert ok["result"]["data"][0]["id"] == 25
    clock.advance(60)
    late = await rpc(stub, call("get.employees", {"access_token": data["access_token"]}), DATA)
    assert mnemonic(late) == (-32001, "access_token_invalid")
    f.setup({"expired_mnemonic": "access_token_expired"})
    late = await rpc(stub, call("get.employees", {"access_token": data["access_token"]}), DATA)
    assert mnemonic(late) == (-32001, "access_token_expired")


@pytest_twisted.ensureDeferred
async def test_the_minute_limit_runs_out_and_resets() -> None:
    f, stub, clock = fake(minute_limit=2)
    body = call("get.employees", {"access_token": "k3y"})
    await rpc(stub, body, DATA)
    await rpc(stub, body, DATA)
    over = await rpc(stub, body, DATA)
    assert mnemonic(over) == (-32029, "limit_exceeded")
    assert over["error"]["data"]["metadata"]["limits"]["minute_reset"] == 50
    clock.advance(50)
    assert "result" in await rpc(stub, body, DATA)


@pytest_twisted.ensureDeferred
async def test_a_gateway_ip_not_allowed_is_refused() -> None:
    _, stub, _ = fake(ip_allowed=False)
    answer = await rpc(stub, call("get.employees", {"access_token": "k3y"}), DATA)
    assert mnemonic(answer) == (-32003, "ip_not_whitelisted")


def test_templates_are_rendered_with_json_literals_or_doubled_quotes() -> None:
    template = '{"a": {{a}}, "b": {{b}}, "c": {{c}}, "d": {{d}}}'
    values = {"a": "x", "b": 5, "d": [1, 2]}
    assert json.loads(render(template, values)) == {"a": "x", "b": 5, "c": None, "d": [1, 2]}
    assert render(template, values, doubled=True) == (
        b'{"a": ""x"", "b": "5", "c": "null", "d": "[1, 2]"}')


@pytest_twisted.ensureDeferred
async def test_the_control_api_sets_up_and_reports() -> None:
    f, _, _ = fake()
    control = StubTreq(ControlApp(f).resource())
    bad = await control.post("http://c/_control/setup", json={"minute_limit": 0})
    assert bad.code == 400
    good = await control.post("http://c/_control/setup", json={"api_keys": ["other"]})
    assert good.code == 200 and f.api_keys == {"other"}
    state = await (await control.get("http://c/_control/state")).json()
    assert {"requests", "calls", "released", "logins", "sessions_valid", "faults"} <= set(state)


def test_it_runs_standalone() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.callgear", "--api-key", "k",
                             "--employee", "25=101"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "no READY line"
        line = proc.stdout.readline().decode()
        assert line.startswith("READY port=")
    finally:
        proc.terminate()
        proc.wait(10)
