"""The fake Megaplan behaves as /work/shared/protocols/megaplan.md says, and refuses what it must."""

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
from urllib.parse import quote

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from tests.fakes.control import ControlApp
from tests.fakes.megaplan import FakeMegaplan

HOST = "http://acme.megaplan.test"
API = f"{HOST}/api/v3"
TOKEN_URL = f"{API}/auth/access_token"
USER, PASSWORD = "robot@acme.ru", "S3cret"
CLIENT, DID = "79161234567", "74951234567"
PROVIDER = "807:5f0c1e2a9b3d4c6e8f10a2b3c4d5e6f7:200501-0a1b"

SETUP = {
    "employees": [
        {"id": "1000005", "name": "Иван Петров", "internalNumber": "101"},
        {"id": "1000006", "name": "Мария Сидорова", "internalNumber": "sip:102@pbx.example.net"},
        {"id": "1000007", "name": "Без телефонии"},
    ],
    "routes": {
        "+7 (916) 123-45-67": ["1000005"],
        "74950000000": {"employees": ["1000005", "1000006"], "type": "all", "timeout": 30, "delay": 5},
    },
    "contractors": [
        {
            "contentType": "ContractorHuman", "id": "4001", "firstName": "Олег", "lastName": "Клиентов",
            "contactInfo": [
                {"contentType": "ContactInfo", "type": "phone", "value": "+7 916 123-45-67", "isMain": True},
                {"contentType": "ContactInfo", "type": "email", "value": "oleg@client.example"},
            ],
        },
        {"contentType": "ContractorCompany", "id": "4002", "name": "ООО Ромашка"},
    ],
}

CALLING = {
    "contentType": "CallInfo", "type": "in", "state": "calling",
    "fromPhone": CLIENT, "toPhone": DID,
    "toUser": {"contentType": "Employee", "id": "1000005"},
    "providerId": PROVIDER,
    "timeFrom": {"contentType": "DateTime", "value": "2026-05-14T10:22:05+03:00"},
}
TALKING = {"contentType": "CallInfo", "providerId": PROVIDER, "state": "talking"}
FINISHED = {
    "contentType": "CallInfo", "providerId": PROVIDER, "state": "finished",
    "timeTo": {"contentType": "DateTime", "value": "2026-05-14T10:23:38+03:00"},
    "recordLinks": ["https://rec.example.net/8f1e2a.mp3"],
}
NEW_CONTACT = {
    "contentType": "ContractorHuman", "firstName": "Клиент 79031112233",
    "contactInfo": [{"contentType": "ContactInfo", "type": "phone", "value": "79031112233", "isMain": True}],
    "responsibles": [{"contentType": "Employee", "id": "1000005"}],
}


def megaplan(configure: bool = True, **kwargs: Any) -> tuple[FakeMegaplan, StubTreq, Clock]:
    clock = Clock()
    fake = FakeMegaplan(USER, PASSWORD, clock=clock, **kwargs)
    if configure:
        fake.setup(SETUP)
    return fake, StubTreq(fake.resource()), clock


def query(params: object) -> str:
    """GET parameters the Megaplan way: one URL-encoded JSON object after `?`."""
    return "?" + quote(json.dumps(params), safe="")


def answered_yet(response: Deferred[Any]) -> list[Any]:
    box: list[Any] = []

    def arrived(result: Any) -> Any:
        box.append(result)
        return result

    response.addBoth(arrived)
    return box


async def get_token(stub: StubTreq, **form: str) -> tuple[int, Any]:
    fields = {"username": USER, "password": PASSWORD, "grant_type": "password", **form}
    response = await stub.post(TOKEN_URL, data=fields)
    return response.code, await response.json()


class Api:
    """A signed-in client of the fake: GET with JSON parameters, POST with JSON bodies."""

    def __init__(self, stub: StubTreq, token: str) -> None:
        self.stub, self.token = stub, token

    @classmethod
    async def login(cls, stub: StubTreq) -> Api:
        code, answer = await get_token(stub)
        assert code == 200
        return cls(stub, answer["access_token"])

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def get(self, path: str, params: object = None) -> tuple[int, Any]:
        url = API + path + ("" if params is None else query(params))
        response = await self.stub.get(url, headers=self.headers)
        return response.code, await response.json()

    async def post(self, path: str, body: object) -> tuple[int, Any]:
        response = await self.stub.post(API + path, json=body, headers=self.headers)
        return response.code, await response.json()


def ok(data: object) -> dict[str, object]:
    return {"meta": {"status": 200, "errors": []}, "data": data}


def named(answer: dict[str, Any]) -> list[str]:
    """The field names in an error envelope's `meta.errors`, sorted."""
    assert answer["data"] is None
    return sorted(e["name"] for e in answer["meta"]["errors"] if "name" in e)


# --- Tokens ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_password_grant_answers_flat_json_with_both_tokens() -> None:
    fake, stub, _ = megaplan(token_lifetime=600)
    code, answer = await get_token(stub)
    assert code == 200
    assert sorted(answer) == ["access_token", "expires_in", "refresh_token", "token_type"]
    assert answer["token_type"] == "bearer" and answer["expires_in"] == 600
    assert answer["access_token"] != answer["refresh_token"]
    assert fake.tokens_issued == {"password": 1, "refresh_token": 0}
    assert fake.state()["tokens_valid"] == 1
    # The password is not kept in the request log.
    assert fake.requests[0]["body"] == {"grant_type": "password"}


@pytest_twisted.ensureDeferred
async def test_a_multipart_token_request_is_accepted() -> None:
    fake, stub, _ = megaplan()
    boundary = "x9b8c7"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in (("username", USER), ("password", PASSWORD), ("grant_type", "password"))
    ]
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    response = await stub.post(
        TOKEN_URL, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.code == 200
    assert (await response.json())["token_type"] == "bearer"
    assert fake.tokens_issued["password"] == 1


@pytest_twisted.ensureDeferred
async def test_a_refresh_token_gets_new_tokens_once() -> None:
    fake, stub, clock = megaplan(token_lifetime=100)
    _, first = await get_token(stub)
    clock.advance(100)
    api = Api(stub, first["access_token"])
    assert (await api.get("/employee"))[0] == 401
    code, second = await get_token(stub, grant_type="refresh_token", refresh_token=first["refresh_token"],
                                   username="", password="")
    assert code == 200 and second["token_type"] == "bearer"
    assert second["access_token"] != first["access_token"]
    api.token = second["access_token"]
    assert (await api.get("/employee"))[0] == 200
    # Refresh tokens are rotated: the used one is refused.
    code, answer = await get_token(stub, grant_type="refresh_token", refresh_token=first["refresh_token"])
    assert code == 401 and named(answer) == ["refresh_token"]
    assert fake.tokens_issued == {"password": 1, "refresh_token": 1}
    assert fake.token_requests == 3
    assert [r["body"]["grant_type"] for r in fake.requests if r["path"].endswith("access_token")] == [
        "password", "refresh_token", "refresh_token",
    ]


@pytest.mark.parametrize(
    "form, status, names",
    [
        pytest.param({"password": "nope"}, 401, [], id="a wrong password"),
        pytest.param({"username": "someone@acme.ru"}, 401, [], id="a wrong username"),
        pytest.param({"password": ""}, 400, ["password"], id="an empty password"),
        pytest.param({"grant_type": "client_credentials"}, 400, ["grant_type"], id="an unknown grant"),
        pytest.param({"grant_type": "refresh_token"}, 400, ["refresh_token"], id="a refresh without a token"),
        pytest.param({"grant_type": "refresh_token", "refresh_token": "forged"}, 401, ["refresh_token"], id="a forged refresh token"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_token_requests_are_refused(form: dict[str, str], status: int, names: list[str]) -> None:
    fake, stub, _ = megaplan()
    code, answer = await get_token(stub, **form)
    assert code == status
    assert answer["meta"]["status"] == status and answer["meta"]["errors"]
    assert named(answer) == names
    assert fake.tokens_issued == {"password": 0, "refresh_token": 0}


@pytest_twisted.ensureDeferred
async def test_a_token_request_must_be_a_form() -> None:
    _, stub, _ = megaplan()
    response = await stub.post(TOKEN_URL, json={"username": USER, "password": PASSWORD, "grant_type": "password"})
    assert response.code == 400
    assert named(await response.json()) == ["Content-Type"]
    response = await stub.post(TOKEN_URL, data={"username": USER, "password": PASSWORD})
    assert response.code == 400
    assert named(await response.json()) == ["grant_type"]


@pytest_twisted.ensureDeferred
async def test_missing_wrong_expired_and_revoked_tokens_get_a_401_envelope() -> None:
    fake, stub, clock = megaplan(token_lifetime=3600)
    url = f"{API}/callUserConfig"

    async def fetch(authorization: str | None) -> int:
        headers = {} if authorization is None else {"Authorization": authorization}
        response = await stub.get(url, headers=headers)
        if response.code == 401:
            answer = await response.json()
            assert answer["data"] is None and answer["meta"]["status"] == 401
            assert [sorted(e) for e in answer["meta"]["errors"]] == [["message"]]
        return response.code

    assert await fetch(None) == 401
    assert await fetch("Bearer") == 401
    assert await fetch("Bearer made-up") == 401
    _, first = await get_token(stub)
    assert await fetch(f"Basic {first['access_token']}") == 401
    assert await fetch(f"Bearer {first['access_token']}") == 200
    fake.expire_all_tokens()
    assert await fetch(f"Bearer {first['access_token']}") == 401
    _, second = await get_token(stub)
    clock.advance(3599)
    assert await fetch(f"Bearer {second['access_token']}") == 200
    clock.advance(1)
    assert await fetch(f"Bearer {second['access_token']}") == 401
    assert [r["status"] for r in fake.requests if r["path"] == "/api/v3/callUserConfig"] == [
        401, 401, 401, 401, 200, 401, 200, 401,
    ]
    # The refresh token outlives the access token; "all" revokes it too.
    code, _ = await get_token(stub, grant_type="refresh_token", refresh_token=second["refresh_token"])
    assert code == 200
    fake.setup({"expire_tokens": "all"})
    assert fake.state()["tokens_valid"] == 0
    assert (await get_token(stub, grant_type="refresh_token", refresh_token=second["refresh_token"]))[0] == 401


# --- Request conventions -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_get_parameters_are_one_json_object_in_the_query() -> None:
    fake, stub, _ = megaplan()
    api = await Api.login(stub)
    code, answer = await api.get("/callRoute", {"phone": CLIENT})
    assert code == 200
    assert answer["meta"] == {"status": 200, "errors": []}
    assert fake.requests[-1]["query"] == json.dumps({"phone": CLIENT})


@pytest.mark.parametrize(
    "raw_query, names, message",
    [
        pytest.param("?phone=79161234567", ["query"], "key=value pairs (phone)", id="key=value"),
        pytest.param("?phone=1&x=2", ["query"], "(phone, x)", id="several key=value"),
        pytest.param("?" + quote('{"phone": 791'), ["query"], "not JSON", id="broken JSON"),
        pytest.param("?" + quote('["79161234567"]'), ["query"], "JSON object", id="a JSON array"),
        pytest.param(query({}), ["phone"], "is required", id="no phone"),
        pytest.param(query({"phone": CLIENT, "number": CLIENT}), ["number"], "unknown parameter", id="an unknown parameter"),
        pytest.param(query({"phone": 79161234567}), ["phone"], "phone number string", id="a numeric phone"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_get_parameters_get_400_naming_them(raw_query: str, names: list[str], message: str) -> None:
    _, stub, _ = megaplan()
    api = await Api.login(stub)
    response = await stub.get(f"{API}/callRoute{raw_query}", headers=api.headers)
    assert response.code == 400
    answer = await response.json()
    assert answer["meta"]["status"] == 400
    assert named(answer) == names
    assert message in answer["meta"]["errors"][0]["message"]


@pytest_twisted.ensureDeferred
async def test_a_raw_plus_in_the_query_decodes_to_a_space_and_percent_2b_to_a_plus() -> None:
    fake, stub, _ = megaplan()
    api = await Api.login(stub)
    response = await stub.get(API + '/callRoute?{"phone":"+79161234567"}', headers=api.headers)
    assert response.code == 200
    assert fake.requests[-1]["query"] == '{"phone":" 79161234567"}'
    await api.get("/callRoute", {"phone": "+79161234567"})
    assert fake.requests[-1]["query"] == '{"phone": "+79161234567"}'


@pytest_twisted.ensureDeferred
async def test_post_bodies_must_be_json() -> None:
    _, stub, _ = megaplan()
    api = await Api.login(stub)
    response = await stub.post(f"{API}/callInfo", data={"contentType": "CallInfo"}, headers=api.headers)
    assert response.code == 415
    assert named(await response.json()) == ["Content-Type"]
    response = await stub.post(f"{API}/callInfo", data=b"{nope", headers={**api.headers, "Content-Type": "application/json"})
    assert response.code == 400
    assert named(await response.json()) == ["body"]
    assert await api.post("/callInfo", [CALLING]) == (400, {"meta": {"status": 400, "errors": [{"name": "body", "message": "body must be a JSON object"}]}, "data": None})


@pytest_twisted.ensureDeferred
async def test_unknown_paths_and_wrong_methods_are_refused() -> None:
    _, stub, _ = megaplan()
    api = await Api.login(stub)
    assert (await api.get("/task"))[0] == 404
    assert (await stub.get(f"{API}/task")).code == 401
    response = await stub.get(TOKEN_URL)
    assert response.code == 405 and response.headers.getRawHeaders("Allow") == ["POST"]
    code, answer = await api.post("/callRoute", {"phone": CLIENT})
    assert code == 405 and answer["meta"]["status"] == 405


# --- CallInfo ------------------------------------------------------------------------------


def without(body: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != name}


@pytest.mark.parametrize(
    "body, names",
    [
        pytest.param(without(CALLING, "contentType"), ["contentType"], id="no contentType"),
        pytest.param({**CALLING, "contentType": "Call"}, ["contentType"], id="a wrong contentType"),
        pytest.param(without(CALLING, "providerId"), ["providerId"], id="no providerId"),
        pytest.param({**CALLING, "providerId": ""}, ["providerId"], id="an empty providerId"),
        pytest.param({**CALLING, "providerId": 807}, ["providerId"], id="a numeric providerId"),
        pytest.param(without(CALLING, "type"), ["type"], id="no type"),
        pytest.param({**CALLING, "type": "incoming"}, ["type"], id="type incoming"),
        pytest.param({**CALLING, "state": "ringing"}, ["state"], id="state ringing"),
        pytest.param({**CALLING, "fromPhone": 79161234567}, ["fromPhone"], id="a numeric fromPhone"),
        pytest.param({**CALLING, "toUser": {"contentType": "User", "id": "1"}}, ["toUser.contentType"], id="a ref of an unknown type"),
        pytest.param({**CALLING, "toUser": {"contentType": "Employee", "id": "999"}}, ["toUser.id"], id="an unknown employee"),
        pytest.param({**CALLING, "toUser": {"contentType": "Employee", "id": 1000005}}, ["toUser.id"], id="a numeric id"),
        pytest.param({**CALLING, "toUser": "1000005"}, ["toUser"], id="a bare id"),
        pytest.param({**CALLING, "fromUser": {"contentType": "ContractorHuman", "id": "4002"}}, ["fromUser.id"], id="a company as a human"),
        pytest.param(
            {**CALLING, "timeFrom": {"contentType": "DateTime", "value": "2026-05-14T10:22:05"}},
            ["timeFrom.value"], id="a DateTime without an offset",
        ),
        pytest.param({**CALLING, "timeFrom": {"contentType": "DateTime", "value": "2026-05-14"}}, ["timeFrom.value"], id="a date only"),
        pytest.param({**CALLING, "timeFrom": "2026-05-14T10:22:05+03:00"}, ["timeFrom"], id="a bare date string"),
        pytest.param({**CALLING, "timeFrom": {"value": "2026-05-14T10:22:05+03:00"}}, ["timeFrom"], id="a DateTime without contentType"),
        pytest.param({**CALLING, "recordLinks": "https://rec.example.net/a.mp3"}, ["recordLinks"], id="recordLinks not a list"),
        pytest.param({**CALLING, "recordLinks": ["ftp://x/a.mp3", 5]}, ["recordLinks[0]", "recordLinks[1]"], id="bad record links"),
        pytest.param({**CALLING, "duration": 93}, ["duration"], id="an unknown field"),
        pytest.param({**CALLING, "id": "2201"}, ["id"], id="an id on create"),
        pytest.param(
            {**without(CALLING, "providerId"), "state": "ringing", "callId": "x"}, ["callId", "providerId", "state"],
            id="every bad field is named",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_invalid_call_infos_get_400_naming_the_field(body: dict[str, Any], names: list[str]) -> None:
    fake, stub, _ = megaplan()
    api = await Api.login(stub)
    code, answer = await api.post("/callInfo", body)
    assert code == 400 and answer["meta"]["status"] == 400
    assert named(answer) == names
    assert fake.calls == []


@pytest_twisted.ensureDeferred
async def test_a_utc_z_time_and_null_optional_fields_are_valid() -> None:
    _, stub, _ = megaplan()
    api = await Api.login(stub)
    body = {**CALLING, "timeFrom": {"contentType": "DateTime", "value": "2026-05-14T07:22:05Z"}, "timeTo": None, "fromUser": None}
    assert (await api.post("/callInfo", body))[0] == 200


@pytest_twisted.ensureDeferred
async def test_a_call_goes_calling_talking_finished_with_a_widget_event_each_time() -> None:
    fake, stub, clock = megaplan()
    api = await Api.login(stub)
    code, answer = await api.post("/callInfo", CALLING)
    assert code == 200
    created = answer["data"]
    assert created == {
        **CALLING, "id": "2201", "fromUser": None, "timeTo": None, "recordLinks": [],
    }
    clock.advance(3)
    assert (await api.post("/callInfo/provider", TALKING))[0] == 200
    clock.advance(90)
    code, answer = await api.post("/callInfo/provider", FINISHED)
    assert code == 200
    assert answer["data"]["state"] == "finished"
    assert answer["data"]["recordLinks"] == FINISHED["recordLinks"]
    assert answer["data"]["timeFrom"] == CALLING["timeFrom"]
    [call] = fake.state()["calls"]
    assert call["id"] == "2201" and call["providerId"] == PROVIDER
    assert call["states"] == ["calling", "talking", "finished"]
    assert call["widget"] is True and call["widget_events"] == 3
    assert [(w["via"], w["at"]) for w in call["writes"]] == [("create", 0), ("provider", 3), ("provider", 93)]
    assert call["entity"] == answer["data"]
    assert await api.get("/callInfo/2201") == (200, ok(answer["data"]))
    assert await api.get("/callInfo/provider", {"providerId": PROVIDER}) == (200, ok(answer["data"]))
    assert fake.call(PROVIDER) == call


@pytest_twisted.ensureDeferred
async def test_an_update_by_provider_id_edits_the_latest_match() -> None:
    fake, stub, _ = megaplan()
    api = await Api.login(stub)
    first = (await api.post("/callInfo", CALLING))[1]["data"]
    second = (await api.post("/callInfo", {**CALLING, "toUser": {"contentType": "Employee", "id": "1000006"}}))[1]["data"]
    assert (first["id"], second["id"]) == ("2201", "2202")
    await api.post("/callInfo/provider", TALKING)
    calls = {c["id"]: c for c in fake.state()["calls"]}
    assert calls["2201"]["states"] == ["calling"]
    assert calls["2202"]["states"] == ["calling", "talking"]
    code, answer = await api.get("/callInfo/provider", {"providerId": PROVIDER})
    assert code == 200 and answer["data"]["id"] == "2202"


@pytest_twisted.ensureDeferred
async def test_an_update_of_an_unknown_provider_id_is_a_404_envelope() -> None:
    fake, stub, _ = megaplan()
    api = await Api.login(stub)
    code, answer = await api.post("/callInfo/provider", TALKING)
    assert code == 404
    assert answer["meta"]["status"] == 404 and answer["data"] is None
    assert named(answer) == ["providerId"]
    assert (await api.get("/callInfo/provider", {"providerId": PROVIDER}))[0] == 404
    code, answer = await api.post("/callInfo/provider", without(TALKING, "providerId"))
    assert code == 400 and named(answer) == ["providerId"]
    assert fake.calls == []


@pytest_twisted.ensureDeferred
async def test_updates_by_id_check_the_body_and_the_id() -> None:
    fake, stub, _ = megaplan()
    api = await Api.login(stub)
    await api.post("/callInfo", CALLING)
    body = {"contentType": "CallInfo", "id": "2201", "state": "finished", "type": "miss"}
    code, answer = await api.post("/callInfo/2201", body)
    assert code == 200 and (answer["data"]["state"], answer["data"]["type"]) == ("finished", "miss")
    code, answer = await api.post("/callInfo/2201", {**body, "id": "2202"})
    assert code == 400 and named(answer) == ["id"]
    code, answer = await api.post("/callInfo/2201", {"contentType": "CallInfo", "state": "done"})
    assert code == 400 and named(answer) == ["state"]
    assert (await api.post("/callInfo/9999", body))[0] == 404
    assert (await api.get("/callInfo/9999"))[0] == 404
    assert fake.state()["calls"][0]["states"] == ["calling", "finished"]


@pytest_twisted.ensureDeferred
async def test_history_creates_or_updates_finished_calls_without_a_widget_event() -> None:
    fake, stub, _ = megaplan()
    api = await Api.login(stub)
    await api.post("/callInfo", CALLING)
    missed = {
        "contentType": "CallInfo", "type": "miss", "fromPhone": "79035554433", "toPhone": DID,
        "providerId": "807:other", "timeFrom": {"contentType": "DateTime", "value": "2026-05-14T11:00:00+03:00"},
    }
    code, answer = await api.post("/callInfo/history", [missed, {"contentType": "CallInfo", "providerId": PROVIDER, "state": "finished"}])
    assert code == 200
    assert [(c["id"], c["state"]) for c in answer["data"]] == [("2202", "finished"), ("2201", "finished")]
    calls = {c["providerId"]: c for c in fake.state()["calls"]}
    assert calls["807:other"]["widget"] is False and calls["807:other"]["via_history"] is True
    assert calls["807:other"]["states"] == ["finished"]
    # The existing call is updated: no new widget event for it either.
    assert calls[PROVIDER]["widget_events"] == 1
    assert [w["via"] for w in calls[PROVIDER]["writes"]] == ["create", "history"]


@pytest.mark.parametrize(
    "body, names",
    [
        pytest.param({"contentType": "CallInfo", "type": "miss", "providerId": "x"}, ["body"], id="an object, not a list"),
        pytest.param([{"contentType": "CallInfo", "type": "miss", "providerId": "x", "state": "calling"}], ["[0].state"], id="a state other than finished"),
        pytest.param([{"contentType": "CallInfo", "providerId": "x"}], ["[0].type"], id="a new call without a type"),
        pytest.param([{"contentType": "CallInfo", "type": "miss"}], ["[0].providerId"], id="no providerId"),
        pytest.param([{"contentType": "CallInfo", "type": "miss", "providerId": "x"}, "y"], ["[1]"], id="an element that is not an object"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_invalid_history_imports_are_refused_whole(body: object, names: list[str]) -> None:
    fake, stub, _ = megaplan()
    api = await Api.login(stub)
    code, answer = await api.post("/callInfo/history", body)
    assert code == 400 and named(answer) == names
    assert fake.calls == []


@pytest_twisted.ensureDeferred
async def test_set_contractor_fills_from_user_or_to_user_by_direction() -> None:
    fake, stub, _ = megaplan()
    api = await Api.login(stub)
    await api.post("/callInfo", CALLING)
    await api.post("/callInfo", {**CALLING, "type": "out", "providerId": "807:out", "fromUser": CALLING["toUser"], "toUser": None})
    human = {"contentType": "ContractorHuman", "id": "4001"}
    code, answer = await api.post("/callInfo/2201/setContractor", human)
    assert code == 200 and answer["data"]["fromUser"] == human
    code, answer = await api.post("/callInfo/2202/setContractor", {"contentType": "ContractorCompany", "id": "4002"})
    assert code == 200 and answer["data"]["toUser"] == {"contentType": "ContractorCompany", "id": "4002"}
    code, answer = await api.post("/callInfo/2201/setContractor", {"contentType": "ContractorHuman", "id": "4002"})
    assert code == 400 and named(answer) == ["body.id"]
    code, answer = await api.post("/callInfo/2201/setContractor", {"contentType": "Employee", "id": "1000005"})
    assert code == 400 and named(answer) == ["body.contentType"]
    assert (await api.post("/callInfo/9999/setContractor", human))[0] == 404
    assert fake.state()["calls"][0]["widget_events"] == 1


@pytest_twisted.ensureDeferred
async def test_the_call_list_pages_with_limit_and_page_after() -> None:
    _, stub, _ = megaplan()
    api = await Api.login(stub)
    for n in range(3):
        await api.post("/callInfo", {**CALLING, "providerId": f"807:{n}"})
    code, answer = await api.get("/callInfo")
    assert code == 200 and [c["id"] for c in answer["data"]] == ["2201", "2202", "2203"]
    code, answer = await api.get("/callInfo", {"limit": 1, "pageAfter": {"contentType": "CallInfo", "id": "2201"}})
    assert [c["id"] for c in answer["data"]] == ["2202"]
    code, answer = await api.get("/callInfo", {"limit": 0})
    assert code == 400 and named(answer) == ["limit"]
    code, answer = await api.get("/callInfo", {"sortBy": []})
    assert code == 400 and answer["meta"]["errors"][0]["message"] == "is not supported by the fake"


# --- CallRoute, CallUserConfig, employees ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_call_route_of_a_configured_and_an_unknown_phone() -> None:
    _, stub, _ = megaplan()
    api = await Api.login(stub)
    code, answer = await api.get("/callRoute", {"phone": "+79161234567"})
    assert code == 200
    assert answer == ok({
        "contentType": "CallRoute", "type": "responsible", "timeout": 20,
        "employees": [{"contentType": "Employee", "id": "1000005", "name": "Иван Петров"}],
        "users": [{"contentType": "ContractorHuman", "id": "4001", "name": "Клиентов Олег"}],
    })
    code, answer = await api.get("/callRoute", {"phone": "79990000000"})
    assert code == 200
    assert answer["data"]["employees"] == [] and answer["data"]["users"] == []


@pytest_twisted.ensureDeferred
async def test_a_route_with_a_delay_answers_late() -> None:
    _, stub, clock = megaplan()
    api = await Api.login(stub)
    response = stub.get(API + "/callRoute" + query({"phone": "74950000000"}), headers=api.headers)
    arrived = answered_yet(response)
    clock.advance(4.9)
    stub.flush()
    assert arrived == []
    clock.advance(0.1)
    stub.flush()
    answer = await (await response).json()
    assert answer["data"]["type"] == "all" and answer["data"]["timeout"] == 30
    assert [e["id"] for e in answer["data"]["employees"]] == ["1000005", "1000006"]


@pytest_twisted.ensureDeferred
async def test_a_path_delay_holds_only_that_path() -> None:
    fake, stub, clock = megaplan()
    api = await Api.login(stub)
    fake.setup({"delays": {"/api/v3/callUserConfig": 2.5}})
    assert (await api.get("/employee"))[0] == 200
    response = stub.get(f"{API}/callUserConfig", headers=api.headers)
    arrived = answered_yet(response)
    clock.advance(2.4)
    stub.flush()
    assert arrived == []
    clock.advance(0.1)
    stub.flush()
    assert (await response).code == 200
    fake.setup({"delays": {"/api/v3/callUserConfig": 0}})
    assert fake.delays == {}


@pytest_twisted.ensureDeferred
async def test_call_user_config_maps_extensions_to_employees() -> None:
    _, stub, _ = megaplan()
    api = await Api.login(stub)
    code, answer = await api.get("/callUserConfig")
    assert code == 200
    assert answer["data"] == [
        {"contentType": "CallUserConfig", "id": "101", "employee": {"contentType": "Employee", "id": "1000005"},
         "internalNumber": "101", "settings": "{}"},
        {"contentType": "CallUserConfig", "id": "102", "employee": {"contentType": "Employee", "id": "1000006"},
         "internalNumber": "sip:102@pbx.example.net", "settings": "{}"},
    ]
    assert await api.get("/callUserConfig/Employee/1000006") == (200, ok(answer["data"][1]))
    assert (await api.get("/callUserConfig/Employee/1000007"))[0] == 404
    assert (await api.get("/callUserConfig/Employee/42"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_the_employee_list() -> None:
    _, stub, _ = megaplan()
    api = await Api.login(stub)
    code, answer = await api.get("/employee")
    assert code == 200
    assert [(e["contentType"], e["id"], e["name"]) for e in answer["data"]] == [
        ("Employee", "1000005", "Иван Петров"), ("Employee", "1000006", "Мария Сидорова"),
        ("Employee", "1000007", "Без телефонии"),
    ]


# --- Contractors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "q, ids",
    [
        pytest.param("79161234567", ["4001"], id="phone digits"),
        pytest.param("+7 (916) 123-45-67", ["4001"], id="a formatted phone"),
        pytest.param("1234567", ["4001"], id="the tail of a phone"),
        pytest.param("ромашка", ["4002"], id="a company name"),
        pytest.param("oleg@client", ["4001"], id="an e-mail"),
        pytest.param("79990000000", [], id="an unknown phone"),
        pytest.param("", ["4001", "4002"], id="no query"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_contractor_search(q: str, ids: list[str]) -> None:
    _, stub, _ = megaplan()
    api = await Api.login(stub)
    code, answer = await api.get("/contractor", {"q": q})
    assert code == 200
    assert [c["id"] for c in answer["data"]] == ids


@pytest_twisted.ensureDeferred
async def test_a_created_contractor_gets_an_id_is_found_and_is_counted_per_phone() -> None:
    fake, stub, _ = megaplan()
    api = await Api.login(stub)
    code, answer = await api.post("/contractor", NEW_CONTACT)
    assert code == 200
    created = answer["data"]
    assert created["id"] == "3001" and created["contentType"] == "ContractorHuman"
    assert created["name"] == "Клиент 79031112233"
    assert created["contactInfo"] == [
        {"contentType": "ContactInfo", "type": "phone", "value": "79031112233", "isMain": True, "comment": None},
    ]
    assert created["responsibles"] == [{"contentType": "Employee", "id": "1000005"}]
    code, answer = await api.get("/contractor", {"q": "+79031112233"})
    assert [c["id"] for c in answer["data"]] == ["3001"]
    await api.post("/contractor", {"contentType": "ContractorCompany", "name": "ООО Лютик"})
    state = fake.state()
    assert state["contractors_created_by_phone"] == {"79031112233": 1}
    assert [c["id"] for c in state["contractors_created"]] == ["3001", "3002"]
    # The created contact can be attached to a call.
    await api.post("/callInfo", CALLING)
    assert (await api.post("/callInfo/2201/setContractor", {"contentType": "ContractorHuman", "id": "3001"}))[0] == 200
    await api.post("/contractor", NEW_CONTACT)
    assert fake.contractors_created_by_phone == {"79031112233": 2}


@pytest.mark.parametrize(
    "body, names",
    [
        pytest.param({**NEW_CONTACT, "contentType": "Contractor"}, ["contentType"], id="a wrong contentType"),
        pytest.param({**NEW_CONTACT, "phone": "79031112233"}, ["phone"], id="an unknown field"),
        pytest.param({**NEW_CONTACT, "id": "5"}, ["id"], id="an id"),
        pytest.param({"contentType": "ContractorHuman"}, ["firstName"], id="a human without a name"),
        pytest.param({"contentType": "ContractorCompany", "firstName": "X"}, ["firstName", "name"], id="a company without a name"),
        pytest.param(
            {**NEW_CONTACT, "contactInfo": [{"contentType": "ContactInfo", "type": "mobile", "value": "7903"}]},
            ["contactInfo[0].type"], id="a contact type outside the enum",
        ),
        pytest.param(
            {**NEW_CONTACT, "contactInfo": [{"contentType": "ContactInfo", "type": "phone"}]},
            ["contactInfo[0].value"], id="a contact without a value",
        ),
        pytest.param(
            {**NEW_CONTACT, "contactInfo": [{"type": "phone", "value": "7903", "main": True}]},
            ["contactInfo[0].contentType", "contactInfo[0].main"], id="a contact without contentType and a typo",
        ),
        pytest.param(
            {**NEW_CONTACT, "contactInfo": [{"contentType": "ContactInfo", "type": "phone", "value": "7903", "isMain": "yes"}]},
            ["contactInfo[0].isMain"], id="isMain not a boolean",
        ),
        pytest.param({**NEW_CONTACT, "contactInfo": {"type": "phone"}}, ["contactInfo"], id="contactInfo not a list"),
        pytest.param(
            {**NEW_CONTACT, "responsibles": [{"contentType": "Employee", "id": "999"}]}, ["responsibles[0].id"],
            id="an unknown responsible",
        ),
        pytest.param(
            {**NEW_CONTACT, "responsibles": [{"contentType": "Group", "id": "1"}]}, ["responsibles[0].contentType"],
            id="a responsible that is not an employee",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_invalid_contractors_get_400_naming_the_field(body: dict[str, Any], names: list[str]) -> None:
    fake, stub, _ = megaplan()
    api = await Api.login(stub)
    code, answer = await api.post("/contractor", body)
    assert code == 400 and named(answer) == names
    assert fake.contractors_created == []


# --- Faults and control --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_faults_answer_in_the_envelope_and_cover_the_token_endpoint() -> None:
    fake, stub, _ = megaplan()
    fake.faults.update({"fail_status": 429, "retry_after": 1.5, "fail_count": 1})
    response = await stub.post(TOKEN_URL, data={"username": USER, "password": PASSWORD, "grant_type": "password"})
    assert response.code == 429
    assert response.headers.getRawHeaders("Retry-After") == ["2"]
    assert await response.json() == {"meta": {"status": 429, "errors": [{"message": "Too Many Requests"}]}, "data": None}
    assert fake.token_requests == 1 and fake.tokens_issued["password"] == 0
    api = await Api.login(stub)
    fake.faults.update({"fail_status": 503, "fail_count": 2})
    assert (await api.post("/callInfo", CALLING))[0] == 503
    assert (await api.post("/callInfo", CALLING))[0] == 503
    assert (await api.post("/callInfo", CALLING))[0] == 200
    assert len(fake.calls) == 1
    assert [r["status"] for r in fake.requests] == [429, 200, 503, 503, 200]


@pytest_twisted.ensureDeferred
async def test_a_hung_request_waits_until_released() -> None:
    fake, stub, clock = megaplan()
    api = await Api.login(stub)
    fake.faults.hang = True
    response = stub.post(API + "/callInfo", json=CALLING, headers=api.headers)
    arrived = answered_yet(response)
    clock.advance(600)
    stub.flush()
    assert arrived == [] and fake.calls == []
    fake.faults.update({"hang": False})
    stub.flush()
    assert (await response).code == 200


@pytest_twisted.ensureDeferred
async def test_the_control_app_configures_reports_and_resets() -> None:
    fake, stub, _ = megaplan(configure=False)
    control = StubTreq(ControlApp(fake).resource())
    response = await control.post("http://c/_control/setup", json=SETUP)
    assert response.code == 200
    api = await Api.login(stub)
    await api.post("/callInfo", CALLING)
    await api.post("/callInfo/provider", TALKING)
    await api.post("/contractor", NEW_CONTACT)
    state = await (await control.get("http://c/_control/state")).json()
    assert state["calls"][0]["states"] == ["calling", "talking"]
    assert state["contractors_created_by_phone"] == {"79031112233": 1}
    assert state["token_requests"] == 1 and state["tokens_issued"] == {"password": 1, "refresh_token": 0}
    assert state["faults"]["requests_seen"] == 4
    assert [r["path"] for r in state["requests"]] == [
        "/api/v3/auth/access_token", "/api/v3/callInfo", "/api/v3/callInfo/provider", "/api/v3/contractor",
    ]
    assert state["requests"][1]["body"] == CALLING
    # A bad setup changes nothing.
    for bad in (
        {"employees": [{"id": "1000009", "name": "X"}], "routes": {"7": ["404"]}},
        {"routes": {"7": {"employees": [], "type": "queue"}}},
        {"employees": [{"id": "x", "name": "X"}]},
        {"credentials": {"username": ""}},
        {"contractors": [{"contentType": "ContractorHuman"}]},
        {"expire_tokens": "some"},
        {"delays": {"callRoute": 1}},
        {"phones": {}},
    ):
        response = await control.post("http://c/_control/setup", json=bad)
        assert response.code == 400, bad
    assert "1000009" not in fake.employees
    response = await control.post("http://c/_control/reset")
    state = await response.json()
    assert state["calls"] == [] and state["requests"] == [] and state["contractors_created"] == []
    assert state["token_requests"] == 0
    # Configuration survives a reset; tokens do not.
    assert (await api.get("/employee"))[0] == 401
    api = await Api.login(stub)
    assert len((await api.get("/employee"))[1]["data"]) == 3
    assert [c["id"] for c in (await api.get("/contractor", {"q": ""}))[1]["data"]] == ["4001", "4002"]
    assert (await api.post("/callInfo", CALLING))[1]["data"]["id"] == "2201"


@pytest_twisted.ensureDeferred
async def test_credentials_can_be_changed_through_setup() -> None:
    fake, stub, _ = megaplan()
    fake.setup({"credentials": {"password": "N3w"}, "token_lifetime": 60})
    assert (await get_token(stub))[0] == 401
    code, answer = await get_token(stub, password="N3w")
    assert code == 200 and answer["expires_in"] == 60


# --- Standalone runner ---------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_the_standalone_help_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.fakes.megaplan", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0
    for flag in ("--username", "--password", "--port", "--control-port", "--employee", "--route", "--contractor", "--config"):
        assert flag in result.stdout


def test_the_standalone_fake_serves_json_queries_over_tcp() -> None:
    process = subprocess.Popen(
        [
            sys.executable, "-m", "tests.fakes.megaplan", "--port", "0", "--control-port", "0",
            "--username", USER, "--password", PASSWORD,
            "--employee", "1000005:Иван Петров:101", "--route", f"{CLIENT}=1000005",
            "--contractor", f"Олег:{CLIENT}",
        ],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 10)
        assert ready, "the runner did not print READY in time"
        words = dict(part.split("=") for part in process.stdout.readline().split()[1:])
        port = int(words["port"])

        def call(method: str, path: str, body: str | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                connection.request(method, path, body=body, headers=headers or {})
                response = connection.getresponse()
                return response.status, json.loads(response.read())
            finally:
                connection.close()

        form = f"username={quote(USER)}&password={PASSWORD}&grant_type=password"
        status, token = call("POST", "/api/v3/auth/access_token", form, {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 200
        bearer = {"Authorization": f"Bearer {token['access_token']}"}
        status, answer = call("GET", "/api/v3/callRoute" + query({"phone": CLIENT}), headers=bearer)
        assert status == 200
        assert [e["id"] for e in answer["data"]["employees"]] == ["1000005"]
        assert [u["name"] for u in answer["data"]["users"]] == ["Олег"]
        status, answer = call("GET", f"/api/v3/callRoute?phone={CLIENT}", headers=bearer)
        assert status == 400 and answer["meta"]["errors"][0]["name"] == "query"
        status, answer = call("GET", "/api/v3/callUserConfig/Employee/1000005", headers=bearer)
        assert status == 200 and answer["data"]["internalNumber"] == "101"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
        process.stdout.close()
