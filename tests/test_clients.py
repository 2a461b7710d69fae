"""The Altegio and Telphin clients against the strict fakes, through the real HTTP stack."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.task import Clock

from gateway.crm import altegio
from gateway.errors import Permanent, Retryable
from gateway.httpclient import HttpClient
from gateway.model import POPUP, RECORD, SETUP, Action, Tenant
from gateway.protocols.telphin import TelphinClient
from tests.fakes.altegio import FakeAltegio
from tests.fakes.telphin import FakeTelphin

TENANT = Tenant.from_json({
    "id": 807, "name": "ACME", "enabled": True, "key": "k" * 24,
    "pbx": {"kind": "telphin", "login": "TLP55522", "api_url": "http://telphin.test",
            "client_id": "app1", "client_secret": "s3cret"},
    "crm": {"kind": "altegio", "api_url": "http://altegio.test", "partner_token": "partner",
            "crm_token": "7cf262d6-1b2a-4c3d-9e8f-0a1b2c3d4ec2"},
    "options": {"timezone": "Europe/Moscow"},
})

RECORD_PAYLOAD = {"direction": "incoming", "status": "success", "outcome": "ANSWER",
                  "duration": 83, "client": "+79161234567", "did": "74951234567",
                  "extension": "101", "sip": "7001*101", "started": 1715677267123456,
                  "recording": "R1", "record_id": "807-c1-S1"}


def act(kind: str, payload: dict) -> Action:
    return Action(tenant=807, call="c1", kind=kind, key=kind, payload=payload, created=0.0,
                  id=1)


def altegio_client(fake: FakeAltegio) -> HttpClient:
    return HttpClient(reactor, client=StubTreq(fake.resource()))


@pytest_twisted.ensureDeferred
async def test_altegio_accepts_what_the_module_sends() -> None:
    fake = FakeAltegio(partner_token="partner", rate_limit=None)
    http = altegio_client(fake)
    for action in (act(SETUP, {"type": "enable"}),
                   act(POPUP, {"direction": "incoming", "client": "89161234567",
                               "did": "74951234567", "extension": "101", "sip": "7001*101",
                               "at": 1}),
                   act(RECORD, RECORD_PAYLOAD)):
        summary, resp = await altegio.perform(http, TENANT, action, "https://rec.test/1.mp3")
        assert resp.status == 202, resp.body
    assert [r["ignored"] for r in fake.received] == [False, False, False]
    history = fake.histories()[0]
    assert history["date"] == "2024-05-14T12:01:07+03:00"
    assert history["link"] == "https://rec.test/1.mp3"
    assert fake.events()[0]["phone"] == "+79161234567"


@pytest.mark.parametrize("status", [401, 403, 404, 422])
@pytest_twisted.ensureDeferred
async def test_altegio_client_errors_are_permanent(status: int) -> None:
    fake = FakeAltegio(partner_token="partner", rate_limit=None)
    fake.faults.update({"fail_status": status})
    with pytest.raises(Permanent) as raised:
        await altegio.perform(altegio_client(fake), TENANT, act(RECORD, RECORD_PAYLOAD))
    assert raised.value.status == status


@pytest_twisted.ensureDeferred
async def test_altegio_wrong_partner_token_is_permanent() -> None:
    fake = FakeAltegio(partner_token="another", rate_limit=None)
    with pytest.raises(Permanent) as raised:
        await altegio.perform(altegio_client(fake), TENANT, act(SETUP, {"type": "enable"}))
    assert raised.value.status == 401 and "Authentication needed" in raised.value.answer


@pytest.mark.parametrize("status", [500, 502, 503, 429])
@pytest_twisted.ensureDeferred
async def test_altegio_server_errors_and_429_are_retryable(status: int) -> None:
    fake = FakeAltegio(partner_token="partner", rate_limit=None)
    fake.faults.update({"fail_status": status, "retry_after": 7})
    with pytest.raises(Retryable) as raised:
        await altegio.perform(altegio_client(fake), TENANT, act(RECORD, RECORD_PAYLOAD))
    assert raised.value.status == status and raised.value.retry_after == 7


@pytest_twisted.ensureDeferred
async def test_refused_connection_is_retryable() -> None:
    http = HttpClient(reactor, timeout=2)
    tenant = attrs.evolve(TENANT, crm=attrs.evolve(TENANT.crm, api_url="http://127.0.0.1:9"))
    with pytest.raises(Retryable):
        await altegio.perform(http, tenant, act(SETUP, {"type": "enable"}))
    await http.close()


def test_altegio_has_no_outgoing_popup_and_no_close() -> None:
    assert altegio.supports(POPUP, {"direction": "incoming", "client": "+79161234567"})
    assert not altegio.supports(POPUP, {"direction": "outgoing", "client": "+79161234567"})
    assert not altegio.supports("close_popup", {"client": "+79161234567"})
    assert altegio.supports(RECORD, {"client": "+79161234567"}) and altegio.supports(SETUP, {})


def telphin(fake: FakeTelphin, clock: Any) -> TelphinClient:
    return TelphinClient(HttpClient(reactor, client=StubTreq(fake.resource())), clock)


@pytest_twisted.ensureDeferred
async def test_telphin_token_is_cached_and_recordings_resolve() -> None:
    clock = Clock()
    fake = FakeTelphin(clients={"app1": "s3cret"}, clock=clock,
                       records={"R1": "https://storage.telphin.test/R1.mp3"})
    client = telphin(fake, clock)
    assert await client.recording_url(TENANT, "R1") == "https://storage.telphin.test/R1.mp3"
    assert await client.recording_url(TENANT, "R1") == "https://storage.telphin.test/R1.mp3"
    assert fake.tokens_issued == 1


@pytest_twisted.ensureDeferred
async def test_telphin_token_renewed_before_expiry_and_once_on_401() -> None:
    clock = Clock()
    fake = FakeTelphin(clients={"app1": "s3cret"}, clock=clock,
                       records={"R1": "https://storage.telphin.test/R1.mp3"})
    client = telphin(fake, clock)
    await client.recording_url(TENANT, "R1")
    clock.advance(3600 - 30)  # within the renewal margin
    await client.recording_url(TENANT, "R1")
    assert fake.tokens_issued == 2
    fake.expire_all_tokens()
    await client.recording_url(TENANT, "R1")
    assert fake.tokens_issued == 3


@pytest_twisted.ensureDeferred
async def test_telphin_unknown_recording_and_bad_credentials() -> None:
    clock = Clock()
    fake = FakeTelphin(clients={"app1": "s3cret"}, clock=clock)
    client = telphin(fake, clock)
    with pytest.raises(Permanent) as raised:
        await client.recording_url(TENANT, "NOPE")
    assert raised.value.status == 404
    wrong = attrs.evolve(TENANT, pbx=attrs.evolve(TENANT.pbx, client_secret="wrong"))
    with pytest.raises(Permanent) as raised:
        await telphin(fake, clock).recording_url(wrong, "NOPE")
    assert raised.value.status == 401
