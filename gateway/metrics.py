"""Prometheus metrics of one gateway: its own registry, mostly read from existing counters at scrape time.

The webhook path pays for one dictionary increment and one histogram observation (its
append latency); everything else (outbox depth, retries, drops, dead letters, rate-limit
waits, fold lag, call-interactive answers) is read when ``/metrics`` is scraped, from the
counters the dispatcher, the engine and the store keep anyway.  No label names a tenant:
with thousands of tenants the series would outnumber the samples.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gateway.lookup import FRESH, LOOKUP, NONE, STALE
from gateway.model import DEAD, DONE, DROPPED, FAILED

# Seconds: an append commits in a few milliseconds (one fsync per batch).
APPEND_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0)
# Events per append transaction (the store's group commit; at most its batch, 2000).
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
# Seconds: a CRM answers in tens to hundreds of milliseconds, its timeout is 10 s.
CRM_BUCKETS = (.01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Seconds: the IVR waits for the tenant's interactive_deadline (a second or two).
INTERACTIVE_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1.0, 2.0, 5.0)

# Outcomes of one delivery attempt (gateway_crm_request_seconds' ``outcome``).
OK = "ok"                # the CRM took it
RETRYABLE = "retryable"  # refused or unreachable for now: tried again later
PERMANENT = "permanent"  # refused for good
ERROR = "error"          # the request could not be built (a bug): failed at once

# Call-interactive answers by source; ``stale`` and ``none`` are the fallbacks.
SOURCES = (FRESH, LOOKUP, STALE, NONE)
# Settled outbox actions by state: dropped (pop-ups too late or of an ended leg) and dead
# letters (retried until --max-age) among them.
SETTLED = (DONE, FAILED, DEAD, DROPPED)


class Metrics:
    """The metrics of one :class:`~gateway.service.Gateway`, in a registry of their own
    (tests run many gateways in one process: the global registry would refuse the second)."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        self.registry = CollectorRegistry()
        # (URL prefix, HTTP status) → webhooks answered; the prefix names the PBX kind.
        self.webhooks: dict[tuple[bytes, int], int] = {}
        # Call-interactive answers by Answer.source.
        self.interactive: dict[str, int] = dict.fromkeys(SOURCES, 0)
        # The store's last stats() (the /metrics handler reads them before a scrape).
        self.stats: dict[str, Any] | None = None
        self.append_seconds = Histogram(
            "gateway_append_seconds", "Webhook events: from append to committed.",
            buckets=APPEND_BUCKETS, registry=self.registry)
        self.append_batch = Histogram(
            "gateway_append_batch_events", "Events per append transaction (group commit).",
            buckets=BATCH_BUCKETS, registry=self.registry)
        self.crm_seconds = Histogram(
            "gateway_crm_request_seconds",
            "CRM delivery attempts by CRM kind and outcome, with their latency.",
            ["crm", "outcome"], buckets=CRM_BUCKETS, registry=self.registry)
        self.interactive_seconds = Histogram(
            "gateway_interactive_seconds",
            "Call-interactive: from the PBX's request to the gateway's answer.",
            buckets=INTERACTIVE_BUCKETS, registry=self.registry)
        self.registry.register(_Collector(self))

    def webhook(self, prefix: bytes, status: int) -> None:
        """One webhook answered ``status`` (the hot path: a dictionary increment)."""
        key = (prefix, status)
        self.webhooks[key] = self.webhooks.get(key, 0) + 1

    def answered(self, source: str) -> None:
        """One call-interactive answer from ``source`` (a :mod:`gateway.lookup` source)."""
        self.interactive[source] = self.interactive.get(source, 0) + 1

    def watch_appends(self, store: Any) -> None:
        """Observe the size of every append transaction of ``store``'s group commit, when it
        has one (SQLiteStore); a store without it has no batches to report."""
        commit = getattr(store, "_appends", None)
        write = getattr(commit, "_write", None)
        if write is None:
            return
        observe = self.append_batch.observe

        def counted(events: list) -> Any:
            observe(len(events))  # in the store's thread: Histogram is thread-safe
            return write(events)

        commit._write = counted

    async def exposition(self) -> bytes:
        """The text exposition format, with the store's figures read first."""
        try:
            self.stats = await self.gateway.store.stats()
        except Exception:
            self.stats = None  # the store's figures are left out; the rest still answer
        return generate_latest(self.registry)


class _Collector:
    """Reads the gateway's own counters when the registry is collected."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        m = self.metrics
        gw = m.gateway
        dispatcher, engine = gw.dispatcher, gw.engine
        kinds = {pbx.prefix.encode(): kind for kind, pbx in gw.pbxs.items()}

        hooks = CounterMetricFamily("gateway_webhooks", "PBX webhooks by PBX kind and the "
                                    "HTTP status answered.", labels=["pbx", "status"])
        for (prefix, status), count in sorted(m.webhooks.items()):
            hooks.add_metric([kinds.get(prefix, prefix.decode("ascii", "replace")),
                              str(status)], count)
        yield hooks

        counts = dispatcher.counts
        yield CounterMetricFamily("gateway_outbox_retries", "Delivery attempts to be tried "
                                  "again (the CRM refused for now or did not answer).",
                                  value=counts.get("retry", 0))
        settled = CounterMetricFamily("gateway_outbox_settled", "Actions settled, by state: "
                                      "done, failed, dead (dead letters), dropped.",
                                      labels=["state"])
        for state in SETTLED:
            settled.add_metric([state], counts.get(state, 0))
        yield settled
        yield CounterMetricFamily("gateway_rate_limit_waits", "Times the dispatcher held "
                                  "an action for a CRM's rate limit or a 429's pause.",
                                  value=counts.get("rate_limit_wait", 0))
        yield GaugeMetricFamily("gateway_paused_hosts", "CRM hosts or accounts paused by a "
                                "429 with Retry-After.", value=len(dispatcher.paused()))

        in_flight = dispatcher.in_flight
        depth = GaugeMetricFamily("gateway_outbox_actions", "Outbox actions by state: "
                                  "pending and in_flight (in memory), failed and dead (stored, "
                                  "kept for re-drives).", labels=["state"])
        depth.add_metric(["pending"], dispatcher.depth - in_flight)
        depth.add_metric(["in_flight"], in_flight)
        stats = m.stats
        if stats is not None:
            for state in (FAILED, DEAD):
                depth.add_metric([state], stats["actions"].get(state, 0))
        yield depth
        yield GaugeMetricFamily("gateway_outbox_oldest_pending_seconds", "Age of the oldest "
                                "undelivered action (dispatch lag).",
                                value=dispatcher.oldest_age())

        yield CounterMetricFamily("gateway_events_folded", "Events folded into calls.",
                                  value=engine.folded)
        if stats is not None:
            yield GaugeMetricFamily("gateway_fold_lag_events", "Events stored but not yet "
                                    "folded.", value=max(0, stats["log_head"] - engine.cursor))
            yield GaugeMetricFamily("gateway_quarantined_calls", "Calls held in the "
                                    "quarantine.", value=stats["quarantined"])
        yield GaugeMetricFamily("gateway_open_calls", "Calls in progress.",
                                value=len(engine.calls))

        answers = CounterMetricFamily("gateway_interactive_answers", "Call-interactive "
                                      "answers by source: fresh (cache), lookup (the CRM), "
                                      "stale and none (fallbacks: the CRM was slow or "
                                      "failed).", labels=["source"])
        for source, count in m.interactive.items():
            answers.add_metric([source], count)
        yield answers
