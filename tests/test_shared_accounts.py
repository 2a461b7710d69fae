"""What an operator sees of a CRM account: two tenants sharing one (issue 8, case 11: one
Altegio chain served by two PBX accounts; switching one tenant off must not switch the
chain off for the other, the last one to go does), and a CRM host that paused us."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted

from tests.test_admin import CRM_TOKEN, Harness, eventually, gateway, tenant_body  # noqa: F401


def second(**crm: Any) -> dict[str, Any]:
    body = tenant_body(808, key="second-tenant-key-0123456789")
    body["pbx"] = {**body["pbx"], "login": "TLP55523"}
    body["crm"] = {**body["crm"], **crm}
    return body


@pytest_twisted.ensureDeferred
async def test_a_shared_crm_account_is_switched_off_only_by_the_last_tenant(
        gateway: Harness) -> None:
    await gateway.create()
    reply = await gateway.create(second())
    assert reply.json()["crm_shared_with"] == [807]
    await gateway.delivered(2)
    assert gateway.crm.commands() == [("setup", "enable"), ("setup", "enable")]
    shown = (await gateway.admin("GET", "/api/v1/tenants/807")).json()
    assert shown["crm_shared_with"] == [808]

    # 807 goes: the chain stays on for 808.
    assert (await gateway.admin("DELETE", "/api/v1/tenants/807")).status == 204
    listed = (await gateway.admin("GET", "/api/v1/tenants")).json()
    assert [(t["id"], t["crm_shared_with"]) for t in listed] == [(808, [])]
    # 808 is disabled: it was the last one, so the chain is switched off.
    await gateway.admin("PATCH", "/api/v1/tenants/808", {"enabled": False})
    await gateway.delivered(3)
    assert gateway.crm.commands()[2:] == [("setup", "disable")]
    assert all(body["crm_token"] == CRM_TOKEN for body in gateway.crm.received)


@pytest_twisted.ensureDeferred
async def test_another_chain_or_another_host_is_another_account(gateway: Harness) -> None:
    await gateway.create()
    other_chain = await gateway.create(second(crm_token="another-chain-token"))
    assert other_chain.json()["crm_shared_with"] == []
    body = second(api_url="http://other-altegio.test")
    body["id"], body["pbx"]["login"], body["key"] = 809, "TLP55524", "third-tenant-key-012345"
    assert (await gateway.create(body)).json()["crm_shared_with"] == []
    await gateway.delivered(3)
    assert (await gateway.admin("DELETE", "/api/v1/tenants/807")).status == 204
    await gateway.delivered(4)
    assert gateway.crm.commands()[-1] == ("setup", "disable")


@pytest_twisted.ensureDeferred
async def test_a_host_paused_by_a_429_shows_in_healthz_and_the_admin_api(
        gateway: Harness) -> None:
    """Case 6: a paused host is visible to the operator (it is also stored: see
    tests/test_retry_after.py), and the pause is bounded by --max-retry-after."""
    gateway.crm.status = 429
    gateway.crm.retry_after = "3600"
    await gateway.create()
    await eventually(lambda: gateway.gw.dispatcher.paused())
    pauses = (await gateway.admin("GET", "/api/v1/pauses")).json()
    assert list(pauses) == ["altegio:altegio.test"]
    assert 0 < pauses["altegio:altegio.test"] <= 300
    resp = await gateway.client.get(gateway._url(0, "/healthz"))
    health = json.loads(await resp.content())
    assert health["paused_hosts"] == pauses and health["ok"] is True
