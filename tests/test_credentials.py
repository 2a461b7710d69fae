"""Named credentials (``/api/v1/credentials``): one CRM login or PBX application, picked by
several tenants, its secrets written once and never returned."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from tests.test_admin import CRM_TOKEN, Harness, tenant_body

PARTNER = "partner-token-of-the-developer"


@pytest_twisted.async_yield_fixture
async def gateway(tmp_path: Any) -> Any:
    harness = Harness(tmp_path)
    await harness.start()
    yield harness
    await harness.stop()


async def new_credential(gateway: Harness, **fields: Any) -> Any:
    return await gateway.admin("POST", "/api/v1/credentials", {
        "kind": "altegio", "name": "Altegio production",
        "fields": {"api_url": "http://altegio.test", "partner_token": PARTNER, **fields}})


def with_credential(cid: int, tenant_id: int = 807, login: str = "TLP55522") -> dict:
    body = tenant_body(tenant_id)
    body["pbx"]["login"] = login
    body["crm"] = {"kind": "altegio", "credential": cid, "crm_token": CRM_TOKEN}
    return body


@pytest_twisted.ensureDeferred
async def test_tenants_pick_credentials_by_id_and_secrets_are_never_returned(
        gateway: Harness) -> None:
    reply = await new_credential(gateway)
    assert reply.status == 201, reply.body
    cid = reply.json()["id"]
    assert PARTNER.encode() not in reply.body
    assert reply.json()["secrets_set"] == {"partner_token": True}
    for tenant_id, login in ((807, "TLP55522"), (808, "TLP55523")):
        created = await gateway.admin("POST", "/api/v1/tenants",
                                      with_credential(cid, tenant_id, login))
        assert created.status == 201, created.body
    assert gateway.gw.tenants[807].crm.partner_token == PARTNER
    assert gateway.gw.tenants[808].crm.credential == cid
    shown = await gateway.admin("GET", f"/api/v1/credentials/{cid}")
    assert shown.json()["used_by"] == [807, 808]
    assert shown.json()["fields"] == {"api_url": "http://altegio.test"}
    listed = await gateway.admin("GET", "/api/v1/credentials?kind=altegio")
    assert [c["id"] for c in listed.json()] == [cid]
    assert (await gateway.admin("GET", "/api/v1/credentials?kind=megaplan")).json() == []


@pytest_twisted.ensureDeferred
async def test_changing_credentials_changes_every_tenant_that_uses_them(gateway: Harness) -> None:
    cid = (await new_credential(gateway)).json()["id"]
    await gateway.admin("POST", "/api/v1/tenants", with_credential(cid))
    reply = await gateway.admin("PATCH", f"/api/v1/credentials/{cid}",
                                {"fields": {"partner_token": "rotated-partner-token"}})
    assert reply.status == 200, reply.body
    assert gateway.gw.tenants[807].crm.partner_token == "rotated-partner-token"
    # A change one of its tenants could not take is refused, naming the tenant.
    reply = await gateway.admin("PATCH", f"/api/v1/credentials/{cid}",
                                {"fields": {"api_url": "ftp://altegio.test"}})
    assert reply.status == 400 and reply.json()["field"] == "crm.api_url"
    assert "tenant 807" in reply.json()["error"]
    assert gateway.gw.tenants[807].crm.api_url == "http://altegio.test"


@pytest_twisted.ensureDeferred
async def test_credentials_in_use_cannot_be_deleted(gateway: Harness) -> None:
    cid = (await new_credential(gateway)).json()["id"]
    await gateway.admin("POST", "/api/v1/tenants", with_credential(cid))
    reply = await gateway.admin("DELETE", f"/api/v1/credentials/{cid}")
    assert reply.status == 409 and "807" in reply.json()["error"]
    assert (await gateway.admin("DELETE", "/api/v1/tenants/807")).status == 204
    assert (await gateway.admin("DELETE", f"/api/v1/credentials/{cid}")).status == 204
    assert (await gateway.admin("GET", f"/api/v1/credentials/{cid}")).status == 404


@pytest_twisted.ensureDeferred
async def test_bad_credentials_are_refused_naming_the_field(gateway: Harness) -> None:
    for body, field, status in (
            ({"kind": "asterisk", "name": "x", "fields": {}}, "kind", 400),
            ({"kind": "altegio", "name": "", "fields": {}}, "name", 400),
            ({"kind": "altegio", "name": "x", "fields": {"crm_token": "t"}}, "fields.crm_token",
             400),
            ({"kind": "altegio", "name": "x", "fields": {"api_url": 5}}, "fields.api_url", 400),
            ({"kind": "altegio", "name": "x", "fields": [], }, "fields", 400),
            ({"kind": "altegio", "name": "x", "colour": "red"}, "colour", 400)):
        reply = await gateway.admin("POST", "/api/v1/credentials", body)
        assert (reply.status, reply.json()["field"]) == (status, field), body
    await new_credential(gateway)
    reply = await new_credential(gateway)
    assert (reply.status, reply.json()["field"]) == (409, "name")


@pytest_twisted.ensureDeferred
async def test_a_tenant_naming_missing_or_foreign_credentials_is_refused(gateway: Harness) -> None:
    reply = await gateway.admin("POST", "/api/v1/tenants", with_credential(99))
    assert (reply.status, reply.json()["field"]) == (400, "crm.credential")
    telphin = await gateway.admin("POST", "/api/v1/credentials", {
        "kind": "telphin", "name": "Telphin app", "fields": {"client_id": "a",
                                                           "client_secret": "b"}})
    assert telphin.status == 201, telphin.body
    reply = await gateway.admin("POST", "/api/v1/tenants",
                                with_credential(telphin.json()["id"]))
    assert (reply.status, reply.json()["field"]) == (400, "crm.credential")
    body = tenant_body()
    body["pbx"] = {"kind": "telphin", "login": "TLP55522", "credential": telphin.json()["id"]}
    reply = await gateway.admin("POST", "/api/v1/tenants", body)
    assert reply.status == 201, reply.body
    assert gateway.gw.tenants[807].pbx.client_secret == "b"
