"""The fake Telphin's click-to-call callback, who-am-I and extension list (telphin.md §1, §2, §6)."""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock

from tests.fakes.control import ControlApp
from tests.fakes.telphin import DEFAULT_USER, FakeTelphin

TELPHIN = "http://apiproxy.telphin.ru"
EXT = 200501
CALLBACK = f"{TELPHIN}/api/ver1.0/extension/{EXT}/callback/"
CLIENT, SECRET = "5f1c0e9a2b", "9d8c7b6a"
ROOT = Path(__file__).resolve().parent.parent
# Seed 002: the employee's extension rings first; caller id = the dialled number, so the
# employee sees whom they are calling and can redial it.
CLICK = {
    "src_num": ["101"],
    "dst_num": "89161234567",
    "caller_id_name": "89161234567",
    "caller_id_number": "89161234567",
}


def telphin() -> tuple[FakeTelphin, StubTreq, Clock]:
    clock = Clock()
    fake = FakeTelphin({CLIENT: SECRET}, clock=clock)
    fake.setup({"extensions": {
        str(EXT): "7001*101",
        "200502": {"name": "7001*102", "label": "Anna"},
        "200600": {"name": "7001*600", "type": "queue"},
        "200500": {"name": "7001*500", "type": "ivr", "status": "blocked"},
    }})
    return fake, StubTreq(fake.resource()), clock


async def bearer(stub: StubTreq) -> dict[str, str]:
    form = {"grant_type": "client_credentials", "client_id": CLIENT, "client_secret": SECRET}
    response = await stub.post(f"{TELPHIN}/oauth/token", data=form)
    assert response.code == 200
    return {"Authorization": f"Bearer {(await response.json())['access_token']}"}


async def call_back(stub: StubTreq, body: object, url: str = CALLBACK, **headers: str) -> tuple[int, Any]:
    response = await stub.post(url, json=body, headers={**await bearer(stub), **headers})
    return response.code, await response.json()


# --- Accepted callbacks ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_accepted_callback_answers_its_ids_and_is_recorded_as_asked() -> None:
    fake, stub, clock = telphin()
    clock.advance(7)
    code, answer = await call_back(stub, CLICK)
    assert code == 200
    assert set(answer) == {"call_api_id", "call_id"}
    assert re.fullmatch(r"[0-9a-f]{32}", answer["call_id"])
    assert answer["call_api_id"] == f"cb-{answer['call_id'][:16]}"
    assert fake.state()["callbacks"] == [{
        "extension_id": EXT,
        "extension_name": "7001*101",
        "src_num": ["101"],
        "dst_num": "89161234567",
        "caller_id_name": "89161234567",
        "caller_id_number": "89161234567",
        "body": CLICK,
        "call_api_id": answer["call_api_id"],
        "call_id": answer["call_id"],
        "at": 7,
    }]
    assert fake.requests == [{
        "method": "POST", "path": f"/api/ver1.0/extension/{EXT}/callback/", "at": 7, "status": 200,
    }]


@pytest_twisted.ensureDeferred
async def test_every_documented_option_is_accepted_and_null_means_not_given() -> None:
    fake, stub, _ = telphin()
    full = {
        "src_num": ["7001*101", "+79161230000"], "dst_num": "7001*600",
        "caller_id_name": None, "caller_id_number": None,
        "src_caller_id_name": "ACME", "src_caller_id_number": "74951234567",
        "src_ani": "74951234567", "dst_ani": "74951234567",
        "announce_sound_id": 3, "dst_announce_sound_id": 4, "dst_dtmf": "12W#w*0",
        "allow_public_transfer": False, "call_duration": 600, "wait_for_pickup": 0,
        "transfer_after_src_hangup": "102", "transfer_after_dst_hangup": None,
    }
    code, first = await call_back(stub, full)
    code2, second = await call_back(stub, CLICK, url=f"{TELPHIN}/api/ver1.0/extension/200600/callback/")
    assert (code, code2) == (200, 200)
    assert first["call_id"] != second["call_id"]
    one, two = fake.callbacks
    assert (one["caller_id_name"], one["caller_id_number"], one["body"]) == (None, None, full)
    assert (two["extension_id"], two["extension_name"]) == (200600, "7001*600")


# --- Refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        pytest.param({"dst_num": "89161234567"}, "src_num: required", id="no src_num"),
        pytest.param({**CLICK, "src_num": None}, "src_num: required", id="null src_num"),
        pytest.param({"src_num": ["101"]}, "dst_num: required", id="no dst_num"),
        pytest.param({**CLICK, "caller_id_num": "89161234567"}, "caller_id_num: unknown field", id="misspelt caller_id_number"),
        pytest.param({**CLICK, "src": ["101"]}, "src: unknown field", id="misspelt src_num"),
        pytest.param({**CLICK, "src_num": "101"}, "src_num: must be a non-empty array of non-empty strings", id="src_num a string"),
        pytest.param({**CLICK, "src_num": []}, "src_num: must be a non-empty array of non-empty strings", id="src_num empty"),
        pytest.param({**CLICK, "src_num": [101]}, "src_num: must be a non-empty array of non-empty strings", id="src_num of integers"),
        pytest.param({**CLICK, "dst_num": 89161234567}, "dst_num: must be a non-empty string", id="dst_num an integer"),
        pytest.param({**CLICK, "dst_num": ""}, "dst_num: must be a non-empty string", id="dst_num empty"),
        pytest.param({**CLICK, "caller_id_name": 5}, "caller_id_name: must be a string", id="caller_id_name an integer"),
        pytest.param({**CLICK, "caller_id_number": ["1"]}, "caller_id_number: must be a string", id="caller_id_number an array"),
        pytest.param({**CLICK, "allow_public_transfer": "yes"}, "allow_public_transfer: must be a boolean", id="boolean as text"),
        pytest.param({**CLICK, "call_duration": -1}, "call_duration: must be an integer >= 0", id="negative duration"),
        pytest.param({**CLICK, "call_duration": True}, "call_duration: must be an integer >= 0", id="duration true"),
        pytest.param({**CLICK, "announce_sound_id": "5"}, "announce_sound_id: must be an integer", id="sound id as text"),
        pytest.param({**CLICK, "dst_dtmf": "12x"}, "dst_dtmf: must be a string of 0-9 * # W w", id="bad DTMF"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_bad_body_is_refused_naming_the_field(body: dict[str, object], message: str) -> None:
    fake, stub, _ = telphin()
    assert await call_back(stub, body) == (400, {"message": message})
    assert fake.callbacks == []
    assert [r["status"] for r in fake.requests] == [400]


@pytest.mark.parametrize(
    "payload, content_type, message",
    [
        pytest.param(b"[1]", "application/json", "body must be a JSON object", id="an array"),
        pytest.param(b"{", "application/json", None, id="not JSON"),
        pytest.param(b"src_num=101&dst_num=8916", "application/x-www-form-urlencoded",
                     "Content-Type: must be application/json", id="a form"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_body_that_is_not_a_json_object_is_refused(payload: bytes, content_type: str, message: str | None) -> None:
    fake, stub, _ = telphin()
    response = await stub.post(CALLBACK, data=payload, headers={**await bearer(stub), "Content-Type": content_type})
    answer = await response.json()
    assert response.code == 400 and set(answer) == {"message"}
    assert answer["message"] == message or (message is None and answer["message"].startswith("body is not JSON"))
    assert fake.callbacks == []


@pytest.mark.parametrize("extension", ["200599", "abc", "7001*101", "%C2%B2"])
@pytest_twisted.ensureDeferred
async def test_an_unknown_extension_is_404(extension: str) -> None:
    fake, stub, _ = telphin()
    url = f"{TELPHIN}/api/ver1.0/extension/{extension}/callback/"
    assert await call_back(stub, CLICK, url=url) == (404, {"message": "Extension not found"})
    assert fake.callbacks == []


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no token"),
        pytest.param({"Authorization": "Bearer 0123"}, id="an unknown token"),
        pytest.param({"Authorization": "Basic YXBwOnNlY3JldA=="}, id="not a bearer"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_callback_without_a_live_token_is_401(headers: dict[str, str]) -> None:
    fake, stub, _ = telphin()
    response = await stub.post(CALLBACK, json=CLICK, headers=headers)
    assert (response.code, await response.json()) == (401, {"message": "Unauthorized"})
    assert fake.callbacks == []


@pytest_twisted.ensureDeferred
async def test_an_expired_token_is_401_even_for_an_unknown_extension() -> None:
    fake, stub, clock = telphin()
    headers = await bearer(stub)
    clock.advance(3600)
    for url in (CALLBACK, f"{TELPHIN}/api/ver1.0/extension/1/callback/"):
        response = await stub.post(url, json=CLICK, headers=headers)
        assert response.code == 401
    assert fake.callbacks == []


@pytest_twisted.ensureDeferred
async def test_a_fault_answers_before_the_callback_is_placed() -> None:
    fake, stub, _ = telphin()
    headers = await bearer(stub)
    fake.faults.update({"fail_status": 503, "fail_count": 1})
    response = await stub.post(CALLBACK, json=CLICK, headers=headers)
    assert (response.code, await response.json()) == (503, {"message": "Service Unavailable"})
    assert fake.callbacks == []
    assert (await stub.post(CALLBACK, json=CLICK, headers=headers)).code == 200
    assert len(fake.callbacks) == 1


@pytest_twisted.ensureDeferred
async def test_no_hangup_or_other_call_control_is_served() -> None:
    # telphin.md §6 documents no way to end a call; the fake invents none.
    _, stub, _ = telphin()
    headers = await bearer(stub)
    for method, path in [("DELETE", CALLBACK), ("GET", CALLBACK), ("POST", f"{CALLBACK}cb-1/hangup/")]:
        response = await stub.request(method, path, headers=headers)
        assert (response.code, await response.json()) == (404, {"message": "Not found"})


# --- Who am I and the extension list -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_who_am_i_answers_the_configured_user() -> None:
    fake, stub, _ = telphin()
    headers = await bearer(stub)
    response = await stub.get(f"{TELPHIN}/api/ver1.0/user/", headers=headers)
    assert (response.code, await response.json()) == (200, DEFAULT_USER)
    fake.setup({"user": {"client_id": 9100, "login": "TLP91000"}})
    answer = await (await stub.get(f"{TELPHIN}/api/ver1.0/user/", headers=headers)).json()
    assert (answer["client_id"], answer["login"], answer["id"]) == (9100, "TLP91000", 41127)
    assert (await stub.get(f"{TELPHIN}/api/ver1.0/user/")).code == 401


@pytest_twisted.ensureDeferred
async def test_the_extension_list_maps_names_to_ids_by_type_and_page() -> None:
    fake, stub, _ = telphin()
    headers = await bearer(stub)

    async def listing(client: str = "@me", **query: str) -> tuple[int, Any]:
        response = await stub.get(f"{TELPHIN}/api/ver1.0/client/{client}/extension/", params=query, headers=headers)
        return response.code, await response.json()

    code, everything = await listing()
    assert code == 200
    assert everything[:2] == [
        {"id": 200500, "name": "7001*500", "type": "ivr", "status": "blocked", "label": ""},
        {"id": EXT, "name": "7001*101", "type": "phone", "status": "active", "label": ""},
    ]
    assert [e["id"] for e in everything] == [200500, 200501, 200502, 200600]
    code, phones = await listing("7001", type="phone")
    assert [e["name"] for e in phones] == ["7001*101", "7001*102"]
    fake.setup({"extension_page_size": 1})
    assert [(await listing(type="phone", page=str(n)))[1] for n in (1, 2, 3)] == [
        [phones[0]], [phones[1]], [],
    ]
    assert await listing("7002") == (404, {"message": "Not found"})
    assert await listing(type="sip") == (400, {"message": "type: must be one of fax, ivr, phone, queue"})
    assert await listing(page="0") == (400, {"message": "page: must be an integer >= 1"})


@pytest.mark.parametrize(
    "config, error",
    [
        pytest.param({"extensions": {"x1": "7001*101"}}, "must be digits", id="id not digits"),
        pytest.param({"extensions": {"1": ""}}, "name must be", id="empty name"),
        pytest.param({"extensions": {"1": {"name": "7001*1", "type": "sip"}}}, "type must be", id="unknown type"),
        pytest.param({"extensions": {"1": {"name": "7001*1", "number": "1"}}}, "unknown keys: number", id="unknown key"),
        pytest.param({"extensions": ["7001*101"]}, "extensions must be", id="a list"),
        pytest.param({"user": {"client": 1}}, "unknown fields: client", id="user field"),
        pytest.param({"user": {"client_id": "7001"}}, "client_id must be", id="client id as text"),
        pytest.param({"extension_page_size": 0}, "extension_page_size", id="page size 0"),
        pytest.param({"callbacks": []}, "unknown setup keys: callbacks", id="unknown key"),
    ],
)
def test_bad_setup_is_refused_and_changes_nothing(config: dict[str, object], error: str) -> None:
    fake = FakeTelphin({}, clock=Clock())
    fake.setup({"extensions": {str(EXT): "7001*101"}})
    with pytest.raises(ValueError, match=re.escape(error)):
        fake.setup({"records": {"r": "u"}, **config})
    assert list(fake.extensions) == [EXT] and fake.records == {} and fake.user == DEFAULT_USER


@pytest_twisted.ensureDeferred
async def test_the_control_app_configures_extensions_and_reports_callbacks() -> None:
    fake = FakeTelphin({CLIENT: SECRET}, clock=Clock())
    stub, control = StubTreq(fake.resource()), StubTreq(ControlApp(fake).resource())
    response = await control.post("http://c/_control/setup", json={"extensions": {str(EXT): "7001*101"}})
    assert response.code == 200
    code, answer = await call_back(stub, CLICK)
    assert code == 200
    state = await (await control.get("http://c/_control/state")).json()
    assert [(c["extension_id"], c["call_id"], c["body"]) for c in state["callbacks"]] == [(EXT, answer["call_id"], CLICK)]
    state = await (await control.post("http://c/_control/reset")).json()
    assert state["callbacks"] == [] and fake.extensions[EXT]["name"] == "7001*101"


# --- Standalone ------------------------------------------------------------------------


def test_the_cli_help_runs_and_names_the_extension_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.fakes.telphin", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert "--extension ID=NAME" in result.stdout


def test_the_runner_takes_extensions_and_places_callbacks() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.telphin", "--client", "app:secret", "--extension", f"{EXT}=7001*101"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 10)
        assert ready, "the runner did not print READY in time"
        words = dict(part.split("=") for part in process.stdout.readline().split()[1:])
        port, control = int(words["port"]), int(words["control"])

        def send(port: int, method: str, path: str, body: str, headers: dict[str, str]) -> tuple[int, Any]:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                return response.status, json.loads(response.read())
            finally:
                connection.close()

        _, token = send(port, "POST", "/oauth/token", "grant_type=client_credentials&client_id=app&client_secret=secret",
                        {"Content-Type": "application/x-www-form-urlencoded"})
        code, answer = send(port, "POST", f"/api/ver1.0/extension/{EXT}/callback/", json.dumps(CLICK),
                            {"Content-Type": "application/json", "Authorization": f"Bearer {token['access_token']}"})
        assert code == 200
        _, state = send(control, "GET", "/_control/state", "", {})
        assert [(c["extension_name"], c["call_id"]) for c in state["callbacks"]] == [("7001*101", answer["call_id"])]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
        process.stdout.close()
