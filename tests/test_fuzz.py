"""Property-based fuzzing of the public webhook and the admin API through the real sites.

Whatever a careless PBX or an attacker sends: never a 5xx, nothing stored for a refused
request, no tenant key or admin token in any log line, and afterwards the gateway still
folds a normal call.  ``make test`` runs a small, fixed (derandomised) set of examples;
``make fuzz`` runs many more, freshly random (``FUZZ_EXAMPLES``, default 3000 there).

Hypothesis draws the requests; they are then sent one by one through the reactor (a test
under pytest-twisted runs in the reactor's greenlet, where Hypothesis cannot wait for a
Deferred), so a failure names the exact request rather than a shrunk one.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote, urlencode

import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import formatEvent, globalLogPublisher

from tests.test_admin import PARTNER, PBX_SECRET, TOKEN
from tests.test_admin import Harness as AdminHarness
from tests.test_admin import tenant_body
from tests.test_public import DIAL_IN, HANGUP, KEY, LOGIN
from tests.test_public import Harness as PublicHarness

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=EXAMPLES or 150,
    derandomize=not EXAMPLES,  # the suite is repeatable; make fuzz explores
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def drawn(strategy: Any) -> list[Any]:
    """The examples Hypothesis draws from ``strategy`` under the fuzz settings."""
    out: list[Any] = []

    @FUZZ
    @given(strategy)
    def collect(example: Any) -> None:
        out.append(example)

    collect()
    return out


class LogText:
    """Every log event of the process, formatted, while installed."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict) -> None:
        text = formatEvent(event) or ""
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        self.lines.append(text)

    def __enter__(self) -> "LogText":
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self)

    def leaked(self, *secrets: str) -> list[str]:
        return [line for line in self.lines for s in secrets if s in line]


# Strategies: mostly-valid requests with one or more things wrong

ANY_TEXT = st.text(max_size=80)
NUMBERS = st.one_of(
    st.integers(min_value=0, max_value=10**30).map(str),
    st.builds(lambda d, n: d * n, st.sampled_from("19"), st.integers(31, 6000)),
    st.integers(max_value=-1).map(str),
    st.sampled_from(["", " ", "\t", "0", "1e400", "inf", "NaN", "٣", "²", "0x10", "+7916"]))
VALUES = st.one_of(ANY_TEXT, NUMBERS, st.text(alphabet="\x00\x01\r\n\x7f ", max_size=5),
                   st.builds(lambda n: "9" * n, st.integers(0, 70_000)))
FIELDS = st.sampled_from(sorted(set(DIAL_IN) | set(HANGUP) | {
    "Bridged", "Transfered", "RemoteNumber", "CallBackID", "CallerExtension"}))


@st.composite
def webhook(draw: Any) -> dict[str, Any]:
    form = dict(draw(st.sampled_from([DIAL_IN, HANGUP])))
    event = form["EventType"]
    for name, value in draw(st.dictionaries(st.one_of(FIELDS, ANY_TEXT), VALUES, max_size=4)
                            ).items():
        form[name] = value
    for name in draw(st.lists(FIELDS, max_size=2)):
        form.pop(name, None)
    # A fresh call now and then, so accepted events are not all duplicates.
    form["CallID"] = draw(st.sampled_from([form.get("CallID", ""), draw(ANY_TEXT)]))
    key = draw(st.sampled_from(["key", "%6bey", "KEY", "token", None]))
    key_value = draw(st.sampled_from([KEY, KEY + "x", "", KEY[:-1]]))
    query = f"?{key}={quote(key_value)}" if key else ""
    query += draw(st.sampled_from(["", "&key=other", "&%ff=1", "&x=%E2%98%83", "&ké=✓"]))
    tenant = draw(st.sampled_from(["807", "808", "0", "8070", "-1", "9" * 40, "８０７", "a b"]))
    login = draw(st.sampled_from([LOGIN, LOGIN.lower(), "", "x" * 300]))
    url_event = draw(st.sampled_from([event, "dial-out", "answer", "hangup", "bogus", ""]))
    path = draw(st.sampled_from([
        f"/events/{quote(tenant)}/{url_event}/{quote(login)}",
        f"/events/{quote(tenant)}/{url_event}",
        f"/events/{quote(tenant)}/{url_event}/{quote(login)}/extra",
        "/cid/807/getmanager/" + LOGIN, "/healthz", "/" + quote(draw(ANY_TEXT))]))
    raw = draw(st.one_of(st.none(), st.binary(max_size=300)))
    body = raw if raw is not None else urlencode(form).encode()
    return {
        "method": draw(st.sampled_from(["POST", "POST", "POST", "GET", "HEAD", "PUT",
                                        "DELETE", "OPTIONS"])),
        "path": path + query,
        "body": body,
        "ctype": draw(st.sampled_from(["application/x-www-form-urlencoded",
                                       "application/x-www-form-urlencoded; charset=UTF-8",
                                       "application/json", "text/plain", None])),
    }


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=20)
TENANT_PATHS = st.sampled_from([
    "id", "name", "enabled", "key", "pbx", "pbx.kind", "pbx.login", "pbx.api_url",
    "pbx.client_id", "pbx.queues", "crm", "crm.kind", "crm.api_url", "crm.crm_token",
    "crm.partner_token", "numbers", "routing", "employees", "options", "options.timezone",
    "options.grace", "options.internal_calls", "unknown"])


@st.composite
def tenant_json(draw: Any) -> Any:
    if draw(st.booleans()):
        return draw(JSON)
    body = json.loads(json.dumps(tenant_body(draw(st.sampled_from([807, 901, 902])))))
    for path in draw(st.lists(TENANT_PATHS, min_size=1, max_size=3)):
        *parents, last = path.split(".")
        node = body
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part), dict) else {}
        node[last] = draw(JSON)
    return body


# The properties


@pytest_twisted.ensureDeferred
async def test_no_webhook_gets_a_5xx_or_stores_what_it_refused(tmp_path: Any) -> None:
    h = PublicHarness(tmp_path)
    await h.start()
    try:
        with LogText() as logs:
            for req in drawn(webhook()):
                before = len(await h.store.events_after(0, 100_000))
                reply = await h.request(req["method"], req["path"], req["body"],
                                        req["ctype"], server_error=True)
                assert reply.status < 500, (req, reply)
                after = len(await h.store.events_after(0, 100_000))
                assert after - before <= 1, (req, reply)
                if reply.status != 200:
                    assert after == before, (req, reply)
            await h.gw.engine.idle()
            assert not logs.leaked(KEY), logs.leaked(KEY)[:3]
        # The gateway still folds: nothing stuck, nothing quarantined, a new call folds.
        fresh = dict(DIAL_IN, CallID="ffffffffffffffffffffffffffffffff",
                     SubCallID="200501-ffffffffffffffffffffffffffffffff")
        assert (await h.post(fresh)).status == 200
        await h.gw.engine.idle()
        stats = await h.store.stats()
        assert h.gw.engine.cursor == stats["log_head"]
        assert h.gw.engine.quarantined == {} and h.gw.engine.failing_since is None
        assert (807, "ffffffffffffffffffffffffffffffff") in h.gw.engine.calls
    finally:
        await h.stop()


READS = st.fixed_dictionaries({
    "path": st.sampled_from([
        "/api/v1/actions?state={}", "/api/v1/actions?tenant={}", "/api/v1/actions?limit={}",
        "/api/v1/tenants/{}", "/api/v1/tenants/{}/calls", "/api/v1/actions/{}",
        "/api/v1/quarantine?tenant={}", "/api/v1/tenants/807/calls?limit={}"]),
    "arg": st.one_of(ANY_TEXT, NUMBERS),
    "token": st.sampled_from([TOKEN, "", "x"]),
    "where": st.sampled_from(["header", "token", "access_token"])})
WRITES = st.fixed_dictionaries({
    "body": tenant_json(), "method": st.sampled_from(["POST", "PATCH"]),
    "raw": st.one_of(st.none(), st.binary(max_size=200))})


@pytest_twisted.ensureDeferred
async def test_no_admin_request_gets_a_5xx(tmp_path: Any) -> None:
    h = AdminHarness(tmp_path)
    await h.start()
    try:
        assert (await h.admin("POST", "/api/v1/tenants", tenant_body())).status == 201
        with LogText() as logs:
            for w in drawn(WRITES):
                path = "/api/v1/tenants" if w["method"] == "POST" else "/api/v1/tenants/807"
                reply = await h.admin(w["method"], path, w["body"], raw=w["raw"])
                assert reply.status < 500, (w, reply)
                answer = reply.json()
                if reply.status >= 400:
                    assert answer["error"] and "field" in answer, (w, answer)
                for secret in (PARTNER, PBX_SECRET, TOKEN):
                    assert secret not in reply.body.decode("utf-8", "replace"), w
            for r in drawn(READS):
                url = r["path"].format(quote(r["arg"], safe=""))
                if r["where"] == "header":
                    reply = await h.admin("GET", url, token=r["token"])
                else:
                    sep = "&" if "?" in url else "?"
                    reply = await h.admin("GET", f"{url}{sep}{r['where']}={r['token']}",
                                          token=None)
                assert reply.status < 500 and reply.json() is not None, (r, reply)
            assert not logs.leaked(TOKEN, PARTNER, PBX_SECRET)
    finally:
        await h.stop()
