"""The fake MegaFon's strictness: what a real ATS refuses, the fake refuses too."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock

from tests.fakes.megafon import LEGACY, REST, FakeMegaFon, reordered, script

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def fake() -> tuple[FakeMegaFon, StubTreq]:
    f = FakeMegaFon("tok", "key", "crm", clock=Clock())
    return f, StubTreq(f.resource())


async def legacy(http: StubTreq, **fields: str) -> tuple[int, Any]:
    resp = await http.post(f"http://ats.test{LEGACY}", data=fields, headers=FORM)
    body = await resp.content()
    try:
        return resp.code, json.loads(body)
    except ValueError:
        return resp.code, body.decode()


@pytest.mark.parametrize("fields, status, body", [
    ({"cmd": "makeCall", "token": "bad", "user": "ivanov", "phone": "79161234567"}, 401,
     {"error": "Invalid token"}),
    ({"cmd": "makeCall", "token": "tok", "user": "ivanov", "phone": "+79161234567"}, 400,
     {"error": "Invalid parameters: [phone]"}),
    ({"cmd": "makeCall", "token": "tok", "user": "nobody", "phone": "79161234567"}, 400,
     {"error": "Invalid parameters: [user]"}),
    ({"cmd": "subscribtionstatus", "token": "tok", "user": "ivanov"}, 400,
     {"error": "Invalid parameters: [cmd]"}),
    ({"cmd": "subscriptionStatus", "token": "tok", "user": "ivanov"}, 200, {"status": "on"}),
])
@pytest_twisted.ensureDeferred
async def test_legacy_endpoint(fields: dict, status: int, body: Any) -> None:
    f, http = fake()
    assert await legacy(http, **fields) == (status, body)
    assert f.calls == []


@pytest_twisted.ensureDeferred
async def test_make_call_answers_bare_or_json_and_wrong_ats_is_301() -> None:
    f, http = fake()
    code, body = await legacy(http, cmd="makeCall", token="tok", user="101", phone="7916")
    assert code == 200 and body == f.calls[0]["callid"]
    f.setup({"make_call_answer": "json"})
    assert (await legacy(http, cmd="makeCall", token="tok", user="101", phone="7916"))[1] == {
        "callid": f.calls[1]["callid"]}
    f.setup({"wrong_ats": True})
    resp = await http.post(f"http://ats.test{LEGACY}", data={"cmd": "accounts", "token": "tok"},
                           headers=FORM, allow_redirects=False)
    assert resp.code == 301 and resp.headers.getRawHeaders("location") == [
        "https://megapbx.ru/"]


@pytest_twisted.ensureDeferred
async def test_rest_checks_the_api_key_and_digits() -> None:
    f, http = fake()
    url = f"http://ats.test{REST}/makecall"
    resp = await http.post(url, json={"user": "ivanov", "phone": "79161234567"},
                           headers={"X-API-KEY": "wrong"})
    assert resp.code == 401 and "message" in json.loads(await resp.content())
    resp = await http.post(url, json={"user": "ivanov", "phone": "+7916"},
                           headers={"X-API-KEY": "key"})
    assert resp.code == 400
    resp = await http.get(f"http://ats.test{REST}/users?start=1&limit=1",
                          headers={"X-API-KEY": "key"})
    body = json.loads(await resp.content())
    assert [u["login"] for u in body["items"]] == ["petrov"] and body["info"]["total"] == 3
    assert f.calls == []


def test_scripts_are_what_the_pbx_sends() -> None:
    group = script("group")
    assert [(c["cmd"], c.get("type"), c.get("user")) for c in group] == [
        ("event", "INCOMING", "ivanov"), ("event", "INCOMING", "petrov"),
        ("event", "ACCEPTED", "ivanov"), ("event", "CANCELLED", "petrov"),
        ("event", "COMPLETED", "ivanov"), ("history", "in", "ivanov")]
    assert group[-1]["status"] == "Success" and group[-1]["start"].endswith("Z")
    assert [c.get("type") for c in reordered(group)][-2:] == ["in", "COMPLETED"]
    with pytest.raises(ValueError):
        script("conference")
