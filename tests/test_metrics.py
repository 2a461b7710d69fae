"""``/metrics`` on the admin site (issue 13): Prometheus' text format, behind the admin
bearer token, with the figures of a scripted call: webhooks by PBX kind and status, the
append, the fold, CRM deliveries by kind and outcome, retries and the outbox by state.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from tests.test_admin import KEY, TOKEN, Harness, eventually, gateway  # noqa: F401
from tests.test_public import DIAL_IN


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) → value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape(harness: Harness) -> dict[tuple[str, tuple], float]:
    reply = await harness.admin("GET", "/metrics")
    assert reply.status == 200, reply.body
    assert reply.header("Content-Type").startswith("text/plain; version=")
    return samples(reply.body.decode())


@pytest_twisted.ensureDeferred
async def test_metrics_want_the_admin_token(gateway: Harness) -> None:  # noqa: F811
    for auth in (None, "Bearer wrong", TOKEN):
        reply = await gateway.admin("GET", "/metrics", token=None, auth=auth)
        assert reply.status == 401
        assert TOKEN.encode() not in reply.body


@pytest_twisted.ensureDeferred
async def test_a_call_shows_in_the_metrics(gateway: Harness) -> None:  # noqa: F811
    await gateway.create()
    assert (await gateway.hook(DIAL_IN)).status == 200
    assert (await gateway.hook(DIAL_IN, key="wrong")).status == 403
    await gateway.delivered(2)  # the tenant's setup, then the pop-up
    await gateway.gw.engine.idle()

    got = await scrape(gateway)
    assert got[("gateway_webhooks_total", (("pbx", "telphin"), ("status", "200")))] == 1
    assert got[("gateway_webhooks_total", (("pbx", "telphin"), ("status", "403")))] == 1
    assert got[("gateway_append_seconds_count", ())] == 1
    assert got[("gateway_append_batch_events_count", ())] >= 1
    assert got[("gateway_append_batch_events_sum", ())] == 1  # one event was appended
    assert got[("gateway_events_folded_total", ())] == 1
    assert got[("gateway_fold_lag_events", ())] == 0
    assert got[("gateway_open_calls", ())] == 1
    ok = (("crm", "altegio"), ("outcome", "ok"))
    assert got[("gateway_crm_request_seconds_count", ok)] == 2
    assert got[("gateway_crm_request_seconds_bucket",
                (("crm", "altegio"), ("le", "+Inf"), ("outcome", "ok")))] == 2
    assert got[("gateway_outbox_settled_total", (("state", "done"),))] == 2
    for state in ("failed", "dead", "dropped"):
        assert got[("gateway_outbox_settled_total", (("state", state),))] == 0
    assert got[("gateway_outbox_retries_total", ())] == 0
    for state in ("pending", "in_flight", "failed", "dead"):
        assert got[("gateway_outbox_actions", (("state", state),))] == 0
    # No label names a tenant (thousands of tenants: thousands of series).
    assert not any(dict(labels).keys() & {"tenant", "login", "call"} for _, labels in got)


@pytest_twisted.ensureDeferred
async def test_a_crm_that_refuses_for_now_counts_a_retry(tmp_path: Any) -> None:
    harness = Harness(tmp_path)
    harness.crm.status = 503
    harness.crm.retry_after = "3600"
    await harness.start()
    try:
        await harness.create()
        await eventually(lambda: harness.gw.dispatcher.counts.get("retry"))
        got = await scrape(harness)
        assert got[("gateway_outbox_retries_total", ())] == 1
        assert got[("gateway_crm_request_seconds_count",
                    (("crm", "altegio"), ("outcome", "retryable")))] == 1
        assert got[("gateway_outbox_actions", (("state", "pending"),))] == 1
        assert got[("gateway_outbox_oldest_pending_seconds", ())] >= 0
    finally:
        await harness.stop()


def test_two_gateways_keep_separate_registries(tmp_path: Any) -> None:
    one, two = Harness(tmp_path / "1"), Harness(tmp_path / "2")
    one.gw.metrics.webhook(b"events", 200)
    assert one.gw.metrics.registry is not two.gw.metrics.registry
    assert two.gw.metrics.webhooks == {}
