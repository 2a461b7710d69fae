"""The admin API as an operator uses it: bearer auth, tenants with write-only secrets, the
setup actions a tenant's life cycle queues, its calls with their delivery attempts, and the
outbox with re-drives.

Each test runs a real gateway (SQLite store, engine, dispatcher) whose two sites listen on
loopback; its CRM is a tiny in-memory Altegio stand-in that answers what the test says.
"""

from __future__ import annotations

import copy
import json
from typing import Any
from urllib.parse import urlencode

import attrs
import pytest
import pytest_twisted
import treq
from klein import Klein
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

from gateway import outbox
from gateway.httpclient import HttpClient
from gateway.service import Gateway
from gateway.store.sqlite import SQLiteStore
from gateway.web import site as site_for
from gateway.web.admin import AdminSite
from gateway.web.public import PublicSite
from tests.test_public import CALL, DIAL_IN, LEG

TOKEN = "adm1n-t0ken-for-tests"
KEY = "tenant-key-0123456789abcdef"
PBX_SECRET = "pbx-client-secret-9f8e7d"
PARTNER = "partner-token-5a4b3c2d1e"
CRM_TOKEN = "7cf262d6-1b2a-4c3d-9e8f-0a1b2c3d4ec2"
SECRETS = (KEY, PBX_SECRET, PARTNER, CRM_TOKEN)

MISSING = object()


def tenant_body(tenant_id: int = 807, **top: Any) -> dict[str, Any]:
    """A complete, valid tenant as an operator would POST it (operator-chosen key)."""
    body = {
        "id": tenant_id, "name": "ACME", "enabled": True, "key": KEY,
        "pbx": {"kind": "telphin", "login": "TLP55522", "client_id": "app1",
                "client_secret": PBX_SECRET},
        "crm": {"kind": "altegio", "api_url": "http://altegio.test",
                "partner_token": PARTNER, "crm_token": CRM_TOKEN},
        "numbers": ["74951234567"],
        "options": {"timezone": "Europe/Moscow"},
    }
    body.update(top)
    return body


def changed(path: str, value: Any) -> dict[str, Any]:
    """The valid body with one dotted field set to ``value`` (or removed: ``MISSING``)."""
    body = copy.deepcopy(tenant_body())
    *parents, last = path.split(".")
    node = body
    for part in parents:
        node = node[part]
    if value is MISSING:
        del node[last]
    else:
        node[last] = value
    return body


class FakeCrm:
    """Answers Altegio's ``POST /api/v1/voip/integration`` with ``status``; keeps the bodies."""

    app = Klein()

    def __init__(self) -> None:
        self.status = 202
        self.retry_after: str | None = None
        self.received: list[dict[str, Any]] = []
        self.authorizations: list[bytes] = []

    @app.route("/api/v1/voip/integration", methods=["POST"])
    def integration(self, request: Any) -> bytes:
        self.received.append(json.loads(request.content.read()))
        self.authorizations.append(request.getHeader(b"authorization") or b"")
        request.setResponseCode(self.status)
        request.setHeader(b"Content-Type", b"application/json")
        if self.retry_after is not None:
            request.setHeader(b"Retry-After", self.retry_after.encode())
        if self.status >= 400:
            return b'{"success": false, "meta": {"message": "refused by the test"}}'
        return b'{"success": true}'

    def commands(self) -> list[tuple[str, str]]:
        return [(body["command"], body["type"]) for body in self.received]


class LaterStub:
    """``StubTreq`` whose requests start on a later reactor turn, as they do over a network.

    A plain ``StubTreq`` answers within the call; the dispatcher does not survive that (see
    ``test_a_crm_that_answers_at_once_does_not_break_dispatch``).
    """

    def __init__(self, resource: Any) -> None:
        self._stub = StubTreq(resource)

    def request(self, *args: Any, **kwargs: Any) -> Any:
        d = deferLater(reactor, 0, lambda: None)
        d.addCallback(lambda _: self._stub.request(*args, **kwargs))
        return d


@attrs.frozen
class Reply:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None


class Harness:
    """A running gateway with its public and admin sites on loopback, and its fake CRM."""

    def __init__(self, tmp_path: Any, stub: Any = LaterStub, **gateway_options: Any) -> None:
        self.crm = FakeCrm()
        self.store = SQLiteStore(str(tmp_path / "g.sqlite"), reactor)
        self.gw = Gateway(self.store, reactor, admin_token=TOKEN,
                          http=HttpClient(reactor, client=stub(self.crm.app.resource())),
                          **gateway_options)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = treq.client.HTTPClient(Agent(reactor, pool=self.pool))
        self.ports: list[Any] = []

    async def start(self) -> None:
        await self.gw.start()
        for site in (PublicSite(self.gw), AdminSite(self.gw)):
            web = site_for(site.resource())
            self.ports.append(reactor.listenTCP(0, web, interface="127.0.0.1"))

    async def stop(self) -> None:
        for port in self.ports:
            await port.stopListening()
        await self.pool.closeCachedConnections()
        await self.gw._stop()

    def _url(self, which: int, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[which].getHost().port}{path}"

    async def _request(self, method: str, url: str, data: bytes | None,
                       headers: dict[str, str]) -> Reply:
        resp = await self.client.request(method, url, data=data, headers=headers)
        body = await resp.content()
        assert resp.code < 500, (method, url, resp.code, body)
        return Reply(resp.code, resp.headers, body)

    async def admin(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                    token: str | None = TOKEN, auth: str | None = None) -> Reply:
        """One admin request; ``body`` is sent as JSON, ``raw`` as it is."""
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers["Authorization"] = auth
        elif token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        return await self._request(method, self._url(1, path), data, headers)

    async def hook(self, fields: dict[str, str], event: str = "dial-in", tenant: int = 807,
                   login: str = "TLP55522", key: str = KEY) -> Reply:
        """One Telphin event webhook, form-encoded as Telphin posts it."""
        return await self._request(
            "POST", self._url(0, f"/events/{tenant}/{event}/{login}?key={key}"),
            urlencode(fields).encode(), {"Content-Type": "application/x-www-form-urlencoded"})

    async def create(self, body: dict[str, Any] | None = None) -> Reply:
        reply = await self.admin("POST", "/api/v1/tenants", body or tenant_body())
        assert reply.status == 201, reply.body
        return reply

    async def delivered(self, count: int) -> None:
        """Wait until the fake CRM has received ``count`` requests and the outbox is empty."""
        await eventually(lambda: len(self.crm.received) >= count
                         and self.gw.dispatcher.depth == 0)
        assert len(self.crm.received) == count, self.crm.received


async def eventually(check: Any, timeout: float = 5.0) -> Any:
    """Poll ``check`` (plain or async) every 10 ms until it is truthy; fail after ``timeout``."""
    deadline = reactor.seconds() + timeout
    while True:
        result = check()
        if hasattr(result, "__await__"):
            result = await result
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"not true after {timeout} s: {check}")
        await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.async_yield_fixture
async def gateway(tmp_path: Any) -> Any:
    harness = Harness(tmp_path)
    await harness.start()
    yield harness
    await harness.stop()


# Authentication

ROUTES = [
    ("GET", "/api/v1/tenants"),
    ("POST", "/api/v1/tenants"),
    ("GET", "/api/v1/tenants/807"),
    ("PATCH", "/api/v1/tenants/807"),
    ("DELETE", "/api/v1/tenants/807"),
    ("GET", "/api/v1/tenants/807/calls"),
    ("GET", "/api/v1/tenants/807/setup"),
    ("GET", "/api/v1/actions"),
    ("GET", "/api/v1/actions/1"),
    ("POST", "/api/v1/actions/1/retry"),
]


@pytest_twisted.ensureDeferred
async def test_every_admin_route_wants_the_bearer_token(gateway: Harness) -> None:
    await gateway.create()
    for method, path in ROUTES:
        for auth in (None, "Bearer wrong-token", f"Bearer {TOKEN}x", TOKEN, f"Basic {TOKEN}",
                     "Bearer "):
            reply = await gateway.admin(method, path, {"name": "Mallory"},
                                        token=None, auth=auth)
            assert reply.status == 401, (method, path, auth, reply.body)
            assert reply.header("WWW-Authenticate") == 'Bearer realm="gateway"'
            assert reply.json()["field"] == "Authorization"
    # Nothing the refused requests asked for happened.
    listed = (await gateway.admin("GET", "/api/v1/tenants")).json()
    assert [t["name"] for t in listed] == ["ACME"]


@pytest_twisted.ensureDeferred
async def test_an_empty_admin_token_locks_the_api(tmp_path: Any) -> None:
    harness = Harness(tmp_path)
    harness.gw.admin_token = ""
    await harness.start()
    try:
        for auth in ("Bearer ", "Bearer", ""):
            reply = await harness.admin("GET", "/api/v1/tenants", auth=auth)
            assert reply.status == 401
    finally:
        await harness.stop()


# Creating tenants

@pytest_twisted.ensureDeferred
async def test_create_answers_201_with_location_and_hides_secrets(gateway: Harness) -> None:
    reply = await gateway.create()
    assert reply.header("Location") == "/api/v1/tenants/807"
    out = reply.json()
    assert out["id"] == 807 and out["name"] == "ACME" and out["enabled"] is True
    assert out["pbx"]["login"] == "TLP55522" and "crm_token" not in out["crm"]
    assert out["numbers"] == ["74951234567"]
    # The chain's crm_token is a secret too: with the partner token it writes into the
    # chain's account.
    assert out["secrets_set"] == {"key": True, "pbx.client_secret": True,
                                  "crm.partner_token": True, "crm.crm_token": True}
    assert "key" not in out, "a key the operator chose is not echoed"
    for secret in SECRETS:
        assert secret.encode() not in reply.body
    # The secrets were stored all the same.
    stored = gateway.gw.tenants[807]
    assert (stored.key, stored.pbx.client_secret, stored.crm.partner_token,
            stored.crm.crm_token) == SECRETS


@pytest_twisted.ensureDeferred
async def test_a_generated_key_is_shown_once(gateway: Harness) -> None:
    body = tenant_body()
    del body["key"]
    reply = await gateway.create(body)
    key = reply.json()["key"]
    assert key == gateway.gw.tenants[807].key and len(key) >= 16
    for path in ("/api/v1/tenants", "/api/v1/tenants/807"):
        again = await gateway.admin("GET", path)
        assert again.status == 200
        assert key.encode() not in again.body
    # It is the key the PBX must use.
    assert (await gateway.hook(DIAL_IN, key=key)).status == 200


@pytest_twisted.ensureDeferred
async def test_secrets_never_appear_in_what_the_api_answers(gateway: Harness) -> None:
    answers = [(await gateway.create()).body]
    await gateway.delivered(1)
    assert (await gateway.hook(DIAL_IN)).status == 200
    await gateway.delivered(2)
    for method, path, body in [
        ("GET", "/api/v1/tenants", None),
        ("GET", "/api/v1/tenants/807", None),
        ("PATCH", "/api/v1/tenants/807", {"name": "ACME Ltd"}),
        ("PATCH", "/api/v1/tenants/807", {"pbx": {"client_id": "app2"}}),
        ("GET", "/api/v1/tenants/807/calls", None),
        ("GET", "/api/v1/actions", None),
        ("GET", "/api/v1/actions/1", None),
    ]:
        reply = await gateway.admin(method, path, body)
        assert reply.status == 200, (method, path, reply.body)
        answers.append(reply.body)
    listed = json.loads(answers[1])
    assert listed[0]["secrets_set"] == {"key": True, "pbx.client_secret": True,
                                        "crm.partner_token": True, "crm.crm_token": True}
    for raw in answers:
        for secret in SECRETS:
            assert secret.encode() not in raw, (secret, raw)


@pytest_twisted.ensureDeferred
async def test_a_duplicate_id_is_409(gateway: Harness) -> None:
    await gateway.create()
    reply = await gateway.admin("POST", "/api/v1/tenants", tenant_body(name="Other"))
    assert reply.status == 409
    assert reply.json()["field"] == "id"
    assert gateway.gw.tenants[807].name == "ACME"


BAD_BODIES = [
    ("a missing id", changed("id", MISSING), "id"),
    ("an id given as a string", changed("id", "807"), "id"),
    ("a zero id", changed("id", 0), "id"),
    ("a negative id", changed("id", -807), "id"),
    ("a boolean id", changed("id", True), "id"),
    ("a fractional id", changed("id", 807.5), "id"),
    ("an id too large for the store", changed("id", 10**20), "id"),
    ("a missing name", changed("name", MISSING), "name"),
    ("a blank name", changed("name", "   "), "name"),
    ("enabled given as a string", changed("enabled", "yes"), "enabled"),
    ("a key too short", changed("key", "short"), "key"),
    ("a key with spaces", changed("key", "a key with spaces in it"), "key"),
    ("a missing pbx section", changed("pbx", MISSING), "pbx"),
    ("an unknown pbx kind", changed("pbx.kind", "asterisk"), "pbx.kind"),
    ("a missing pbx login", changed("pbx.login", MISSING), "pbx.login"),
    ("a pbx login with a space", changed("pbx.login", "TLP 555"), "pbx.login"),
    ("a pbx login with a slash", changed("pbx.login", "TLP/555"), "pbx.login"),
    ("an unknown pbx field", changed("pbx.password", "x"), "pbx.password"),
    ("a pbx api_url that is not http", changed("pbx.api_url", "ftp://telphin.test"),
     "pbx.api_url"),
    ("an unknown crm kind", changed("crm.kind", "bitrix"), "crm.kind"),
    ("a crm api_url that is not http(s)", changed("crm.api_url", "ftp://altegio.test"),
     "crm.api_url"),
    ("a crm api_url without a scheme", changed("crm.api_url", "altegio.test"), "crm.api_url"),
    ("a missing crm api_url", changed("crm.api_url", MISSING), "crm.api_url"),
    ("a missing crm partner_token", changed("crm.partner_token", MISSING),
     "crm.partner_token"),
    ("a missing crm crm_token", changed("crm.crm_token", MISSING), "crm.crm_token"),
    ("numbers as one string", changed("numbers", "74951234567"), "numbers"),
    ("numbers as integers", changed("numbers", [74951234567]), "numbers"),
    ("a number without digits", changed("numbers", ["reception"]), "numbers"),
    ("an unknown routing", changed("routing", "pager"), "routing"),
    ("employees mapping to numbers", changed("employees", {"101": 5}), "employees"),
    ("an unknown time zone", changed("options.timezone", "Mars/Olympus"), "options.timezone"),
    ("a time zone path", changed("options.timezone", "../../etc/passwd"), "options.timezone"),
    ("an empty time zone", changed("options.timezone", ""), "options.timezone"),
    ("a grace that is not a number", changed("options.grace", "3"), "options.grace"),
    ("a grace of an hour", changed("options.grace", 3600), "options.grace"),
    ("an unknown options field", changed("options.volume", 11), "options.volume"),
    ("an unknown top-level field", changed("colour", "blue"), "colour"),
    ("deleted given by the operator", changed("deleted", True), "deleted"),
]


@pytest.mark.parametrize("why, body, field", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
@pytest_twisted.ensureDeferred
async def test_a_bad_tenant_is_400_naming_the_field(gateway: Harness, why: str,
                                                     body: dict[str, Any], field: str) -> None:
    reply = await gateway.admin("POST", "/api/v1/tenants", body)
    assert reply.status == 400, reply.body
    assert reply.json()["field"] == field, reply.json()
    assert reply.json()["error"]
    assert gateway.gw.tenants == {}
    assert gateway.gw.dispatcher.depth == 0


@pytest.mark.parametrize("why, raw", [
    ("not JSON", b"name=ACME"),
    ("truncated JSON", b'{"id": 807, "name": '),
    ("not UTF-8", b'{"id": 807, "name": "\xff\xfe"}'),
    ("a JSON array", json.dumps([tenant_body()]).encode()),
    ("a JSON string", b'"ACME"'),
    ("JSON null", b"null"),
    ("empty", b""),
])
@pytest_twisted.ensureDeferred
async def test_a_body_that_is_not_a_json_object_is_400_naming_body(gateway: Harness, why: str,
                                                                     raw: bytes) -> None:
    reply = await gateway.admin("POST", "/api/v1/tenants", raw=raw)
    assert reply.status == 400, reply.body
    assert reply.json()["field"] == "body", reply.json()
    assert gateway.gw.tenants == {}
    await gateway.create()
    reply = await gateway.admin("PATCH", "/api/v1/tenants/807", raw=raw)
    assert reply.status == 400, reply.body
    assert reply.json()["field"] == "body", reply.json()
    assert gateway.gw.tenants[807].name == "ACME"


# Reading, updating and deleting tenants

@pytest_twisted.ensureDeferred
async def test_the_setup_guide_lists_what_to_paste_with_the_tenants_key(
        gateway: Harness) -> None:
    await gateway.create()
    guide = (await gateway.admin("GET", "/api/v1/tenants/807/setup")).json()
    base = "http://localhost:8080"  # --public-url's default (no --listen here)
    assert [(g["what"], g["url"]) for g in guide["pbx"]] == [
        (f"event {event}", f"{base}/events/807/{event}/TLP55522?key={KEY}")
        for event in ("dial-in", "dial-out", "answer", "hangup")] + [
        ("IVR rule Call interactive (then: transfer to the number in variable number)",
         f"{base}/cid/807/getmanager/TLP55522?key={KEY}")]
    assert [g["url"] for g in guide["crm"]] == [
        f"{base}/crm/807/makecall/TLP55522?key={KEY}",
        f"{base}/crm/807/hangup/TLP55522?key={KEY}"]
    # Every URL it gives is one the public site takes (a dial-in, here).
    reply = await gateway._request("POST", gateway._url(0, guide["pbx"][0]["url"].replace(
        base, "")), urlencode(DIAL_IN).encode(),
        {"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status == 200, reply.body
    assert (await gateway.admin("GET", "/api/v1/tenants/999/setup")).status == 404


@pytest.mark.parametrize(("public_url", "listen", "base"), [
    ("", "tcp:9090:interface=127.0.0.1", "http://localhost:9090"),
    ("https://gw.example.net/", "tcp:9090", "https://gw.example.net"),
    ("", "unix:/run/gw.sock", "http://localhost:8080"),
])
def test_the_public_url_defaults_to_the_listening_port(public_url: str, listen: str,
                                                       base: str) -> None:
    gw = Gateway(None, reactor, listen=listen, public_url=public_url)
    assert gw.public_url == base


@pytest.mark.parametrize("url", ["gw.example.net", "ftp://gw", "https://gw example"])
def test_a_public_url_that_is_not_http_is_refused(url: str) -> None:
    from twisted.python import usage

    from gateway.tap import Options
    with pytest.raises(usage.UsageError, match="--public-url"):
        Options().parseOptions(["--public-url", url])


@pytest_twisted.ensureDeferred
async def test_get_list_and_one(gateway: Harness) -> None:
    assert (await gateway.admin("GET", "/api/v1/tenants")).json() == []
    await gateway.create()
    await gateway.create(tenant_body(808, name="Beta", key=KEY[::-1]))
    listed = (await gateway.admin("GET", "/api/v1/tenants")).json()
    assert sorted((t["id"], t["name"]) for t in listed) == [(807, "ACME"), (808, "Beta")]
    one = await gateway.admin("GET", "/api/v1/tenants/808")
    assert one.status == 200 and one.json()["name"] == "Beta"
    for missing in ("999", "abc", "%C2%B2", "8O7", "9" * 30, "9" * 5000):
        reply = await gateway.admin("GET", f"/api/v1/tenants/{missing}")
        assert reply.status == 404, (missing, reply.body)
        assert reply.json()["field"] == "id"


@pytest_twisted.ensureDeferred
async def test_patch_changes_only_what_it_names(gateway: Harness) -> None:
    before = (await gateway.create()).json()
    reply = await gateway.admin("PATCH", "/api/v1/tenants/807",
                                {"name": "ACME Ltd", "pbx": {"queues": ["600"]},
                                 "options": {"grace": 5}})
    assert reply.status == 200, reply.body
    after = reply.json()
    assert after["name"] == "ACME Ltd"
    assert after["pbx"]["queues"] == ["600"] and after["pbx"]["login"] == "TLP55522"
    assert after["options"] == {"timezone": "Europe/Moscow", "grace": 5}
    for same in ("id", "enabled", "crm", "numbers", "routing", "employees", "secrets_set"):
        assert after[same] == before[same], same
    stored = gateway.gw.tenants[807]
    assert (stored.key, stored.pbx.client_secret, stored.crm.partner_token,
            stored.crm.crm_token) == SECRETS
    assert (await gateway.admin("GET", "/api/v1/tenants/807")).json() == after
    # The key still opens the webhooks.
    assert (await gateway.hook(DIAL_IN)).status == 200


@pytest_twisted.ensureDeferred
async def test_patch_can_replace_a_secret_without_showing_it(gateway: Harness) -> None:
    await gateway.create()
    reply = await gateway.admin("PATCH", "/api/v1/tenants/807",
                                {"crm": {"partner_token": "new-partner-token-77"}})
    assert reply.status == 200
    assert b"new-partner-token-77" not in reply.body
    assert gateway.gw.tenants[807].crm.partner_token == "new-partner-token-77"


@pytest.mark.parametrize("value", [None, ""])
@pytest_twisted.ensureDeferred
async def test_patch_without_a_key_generates_one_and_shows_it_once(gateway: Harness,
                                                                   value: Any) -> None:
    await gateway.create()
    reply = await gateway.admin("PATCH", "/api/v1/tenants/807", {"key": value})
    assert reply.status == 200, reply.body
    new_key = reply.json()["key"]
    assert new_key != KEY and new_key == gateway.gw.tenants[807].key
    assert new_key.encode() not in (await gateway.admin("GET", "/api/v1/tenants/807")).body
    assert (await gateway.hook(DIAL_IN)).status == 403
    assert (await gateway.hook(DIAL_IN, key=new_key)).status == 200
    # A key the operator gives is not echoed.
    chosen = "operator-chosen-key-000111"
    reply = await gateway.admin("PATCH", "/api/v1/tenants/807", {"key": chosen})
    assert "key" not in reply.json() and chosen.encode() not in reply.body


@pytest_twisted.ensureDeferred
async def test_concurrent_patches_both_apply(gateway: Harness) -> None:
    await gateway.create()
    results = await DeferredList(
        [ensureDeferred(gateway.admin("PATCH", "/api/v1/tenants/807", patch))
         for patch in ({"name": "ACME Ltd"}, {"routing": "sip"},
                       {"numbers": [], "options": {"default_number": "74951234567"}})],
        fireOnOneErrback=True, consumeErrors=True)
    assert [r.status for _, r in results] == [200, 200, 200]
    stored = gateway.gw.tenants[807]
    assert (stored.name, stored.routing, stored.numbers) == ("ACME Ltd", "sip", ())


@pytest.mark.parametrize("patch, field", [
    ({"id": 808}, "id"),
    ({"id": "807"}, "id"),
    ({"pbx": {"kind": "asterisk"}}, "pbx.kind"),
    ({"pbx": {"login": "bad login"}}, "pbx.login"),
    ({"crm": {"api_url": "mailto:ops@example.com"}}, "crm.api_url"),
    ({"options": {"timezone": "Nowhere/Land"}}, "options.timezone"),
    ({"deleted": True}, "deleted"),
    ({"colour": "blue"}, "colour"),
])
@pytest_twisted.ensureDeferred
async def test_a_bad_patch_is_400_and_changes_nothing(gateway: Harness, patch: dict,
                                                      field: str) -> None:
    before = (await gateway.create()).json()
    await gateway.delivered(1)
    reply = await gateway.admin("PATCH", "/api/v1/tenants/807", patch)
    assert reply.status == 400, reply.body
    assert reply.json()["field"] == field
    assert (await gateway.admin("GET", "/api/v1/tenants/807")).json() == before
    assert 808 not in gateway.gw.tenants
    assert gateway.gw.dispatcher.depth == 0


@pytest_twisted.ensureDeferred
async def test_patch_and_delete_of_an_unknown_tenant_are_404(gateway: Harness) -> None:
    for method in ("PATCH", "DELETE"):
        reply = await gateway.admin(method, "/api/v1/tenants/807", {"name": "x"})
        assert reply.status == 404
        assert reply.json()["field"] == "id"
    calls = await gateway.admin("GET", "/api/v1/tenants/807/calls")
    assert calls.status == 404


@pytest_twisted.ensureDeferred
async def test_delete_hides_the_tenant_and_closes_its_webhooks(gateway: Harness) -> None:
    await gateway.create()
    assert (await gateway.hook(DIAL_IN)).status == 200
    reply = await gateway.admin("DELETE", "/api/v1/tenants/807")
    assert reply.status == 204 and reply.body == b""
    assert (await gateway.admin("GET", "/api/v1/tenants/807")).status == 404
    assert (await gateway.admin("GET", "/api/v1/tenants")).json() == []
    assert (await gateway.admin("DELETE", "/api/v1/tenants/807")).status == 404
    assert (await gateway.admin("PATCH", "/api/v1/tenants/807", {"name": "x"})).status == 404
    later = dict(DIAL_IN, SubCallID="200502-0a1b2c3d4e5f60718293a4b5c6d7e8f9")
    hook = await gateway.hook(later)
    assert hook.status == 404, hook.body
    assert len(await gateway.store.events_after(0, 100)) == 1
    # The id can be used again, for a new tenant.
    again = await gateway.create(tenant_body(name="ACME again"))
    assert again.json()["name"] == "ACME again"


# Setup actions the tenant's life cycle queues for its CRM

@pytest_twisted.ensureDeferred
async def test_enabling_and_disabling_tell_the_crm(gateway: Harness) -> None:
    await gateway.create()
    await gateway.delivered(1)
    assert gateway.crm.received == [{"command": "setup", "type": "enable",
                                      "crm_token": CRM_TOKEN}]
    assert gateway.crm.authorizations == [f"Bearer {PARTNER}".encode()]

    reply = await gateway.admin("PATCH", "/api/v1/tenants/807", {"enabled": False})
    assert reply.status == 200 and reply.json()["enabled"] is False
    await gateway.delivered(2)
    assert gateway.crm.commands()[-1] == ("setup", "disable")

    # A patch that leaves it disabled says nothing; enabling it again says "enable".
    await gateway.admin("PATCH", "/api/v1/tenants/807", {"name": "ACME Ltd"})
    await gateway.admin("PATCH", "/api/v1/tenants/807", {"enabled": True})
    await gateway.delivered(3)
    assert gateway.crm.commands() == [("setup", "enable"), ("setup", "disable"),
                                      ("setup", "enable")]


@pytest_twisted.ensureDeferred
async def test_a_new_crm_account_is_set_up_again(gateway: Harness) -> None:
    await gateway.create()
    await gateway.delivered(1)
    new_token = "0a0b0c0d-1b2a-4c3d-9e8f-0a1b2c3d4ec3"
    await gateway.admin("PATCH", "/api/v1/tenants/807", {"crm": {"crm_token": new_token}})
    await gateway.delivered(2)
    assert gateway.crm.received[-1] == {"command": "setup", "type": "enable",
                                        "crm_token": new_token}


@pytest_twisted.ensureDeferred
async def test_deleting_an_enabled_tenant_disables_its_crm_integration(
        gateway: Harness) -> None:
    await gateway.create()
    await gateway.delivered(1)
    assert (await gateway.admin("DELETE", "/api/v1/tenants/807")).status == 204
    await gateway.delivered(2)
    assert gateway.crm.received[-1] == {"command": "setup", "type": "disable",
                                        "crm_token": CRM_TOKEN}


@pytest_twisted.ensureDeferred
async def test_a_disabled_tenant_tells_the_crm_nothing(gateway: Harness) -> None:
    await gateway.create(tenant_body(enabled=False))
    assert (await gateway.admin("DELETE", "/api/v1/tenants/807")).status == 204
    await deferLater(reactor, 0.05, lambda: None)
    assert gateway.gw.dispatcher.depth == 0
    assert gateway.crm.received == []
    assert (await gateway.admin("GET", "/api/v1/actions")).json() == []


# Calls and the outbox

@pytest_twisted.ensureDeferred
async def test_calls_show_the_leg_and_the_popup_with_its_attempts(gateway: Harness) -> None:
    await gateway.create()
    assert (await gateway.hook(DIAL_IN)).status == 200
    await gateway.delivered(2)
    assert gateway.crm.received[1]["command"] == "event"

    async def popup_settled() -> Any:
        calls = (await gateway.admin("GET", "/api/v1/tenants/807/calls")).json()
        if calls and calls[0]["actions"] and calls[0]["actions"][0]["attempt_log"]:
            return calls
        return None

    calls = await eventually(popup_settled)
    assert len(calls) == 1
    call = calls[0]
    assert call["call"] == CALL and call["final"] is False
    assert call["started"] == 1715677267123456
    assert [(leg["key"], leg["extension"], leg["peer"], leg["did"], leg["state"])
            for leg in call["legs"]] == [(LEG, "101", "+79161234567", "74951234567",
                                          "ringing")]
    [popup] = call["actions"]
    assert (popup["kind"], popup["leg"], popup["state"], popup["attempts"]) == (
        "popup", LEG, "done", 1)
    [attempt] = popup["attempt_log"]
    assert attempt["outcome"] == "done" and attempt["status"] == 202
    assert "event/incoming" in attempt["request"]

    assert (await gateway.admin("GET", "/api/v1/tenants/807/calls?limit=0")).json()[
        "field"] == "limit"
    other = await gateway.create(tenant_body(808, key=KEY[::-1]))
    assert other.status == 201
    assert (await gateway.admin("GET", "/api/v1/tenants/808/calls")).json() == []


async def failed_setup(gateway: Harness, state: str) -> dict[str, Any]:
    """Create a tenant whose setup the CRM refuses; the action once it is ``state``."""
    await gateway.create()

    async def settled() -> Any:
        found = (await gateway.admin("GET", f"/api/v1/actions?state={state}")).json()
        return found if found and found[0]["attempt_log"] else None

    [action] = await eventually(settled)
    return action


@pytest_twisted.ensureDeferred
async def test_a_refused_action_fails_and_a_retry_delivers_it(gateway: Harness) -> None:
    gateway.crm.status = 422
    action = await failed_setup(gateway, "failed")
    assert (action["kind"], action["tenant"], action["attempts"]) == ("setup", 807, 1)
    assert "422" in action["last_error"]
    assert action["attempt_log"][0]["status"] == 422
    assert "refused by the test" in action["attempt_log"][0]["answer"]

    gateway.crm.status = 202
    reply = await gateway.admin("POST", f"/api/v1/actions/{action['id']}/retry")
    assert reply.status == 200, reply.body
    assert reply.json()["id"] == action["id"] and reply.json()["state"] == "pending"
    await gateway.delivered(2)

    async def done() -> Any:
        found = (await gateway.admin("GET", f"/api/v1/actions/{action['id']}")).json()
        return found if found["state"] == "done" and len(found["attempt_log"]) == 2 else None

    found = await eventually(done)
    assert found["attempts"] == 2
    assert [a["outcome"] for a in found["attempt_log"]] == ["failed", "done"]

    again = await gateway.admin("POST", f"/api/v1/actions/{action['id']}/retry")
    assert again.status == 409
    assert again.json()["field"] == "state"
    assert len(gateway.crm.received) == 2


@pytest_twisted.ensureDeferred
async def test_retry_of_an_unknown_action_is_404(gateway: Harness) -> None:
    for action_id in ("999", "abc", "%C2%B2", "-1", "9" * 30, "9" * 5000, str(2**63)):
        for method, path in (("POST", f"/api/v1/actions/{action_id}/retry"),
                             ("GET", f"/api/v1/actions/{action_id}")):
            reply = await gateway.admin(method, path)
            assert reply.status == 404, (method, path, reply.body)
            assert reply.json()["field"] == "id"


@pytest_twisted.ensureDeferred
async def test_dead_actions_are_listed_and_can_be_redriven(tmp_path: Any) -> None:
    # With max_age 0 the first retryable failure is final: the action is dead at once.
    harness = Harness(tmp_path, dispatch=outbox.Policy(max_age=0.0))
    await harness.start()
    try:
        harness.crm.status = 503
        action = await failed_setup(harness, "dead")
        assert action["state"] == "dead" and action["kind"] == "setup"
        assert action["attempt_log"][0]["outcome"] == "dead"
        assert action["attempt_log"][0]["status"] == 503
        assert (await harness.admin("GET", "/api/v1/actions?state=done")).json() == []
        everything = (await harness.admin("GET", "/api/v1/actions")).json()
        assert [a["id"] for a in everything] == [action["id"]]
        by_tenant = await harness.admin("GET", "/api/v1/actions?state=dead&tenant=808")
        assert by_tenant.json() == []

        harness.crm.status = 202
        reply = await harness.admin("POST", f"/api/v1/actions/{action['id']}/retry")
        assert reply.status == 200
        await harness.delivered(2)
        assert harness.crm.commands() == [("setup", "enable"), ("setup", "enable")]
    finally:
        await harness.stop()


@pytest.mark.parametrize("query, field", [
    ("state=lost", "state"),
    ("state=DEAD", "state"),
    ("state=%FF", "state"),
    ("limit=0", "limit"),
    ("limit=many", "limit"),
    ("limit=100000", "limit"),
    ("tenant=acme", "tenant"),
    ("tenant=-1", "tenant"),
])
@pytest_twisted.ensureDeferred
async def test_a_bad_actions_query_is_400_naming_it(gateway: Harness, query: str,
                                                     field: str) -> None:
    reply = await gateway.admin("GET", f"/api/v1/actions?{query}")
    assert reply.status == 400, reply.body
    assert reply.json()["field"] == field


@pytest_twisted.ensureDeferred
async def test_a_crm_that_answers_at_once_does_not_break_dispatch(tmp_path: Any) -> None:
    harness = Harness(tmp_path, stub=StubTreq)
    await harness.start()
    try:
        reply = await harness.admin("POST", "/api/v1/tenants", tenant_body())
        assert reply.status == 201
        await harness.delivered(1)
    finally:
        await harness.stop()


@pytest_twisted.ensureDeferred
async def test_concurrent_creates_of_one_id_give_one_201(gateway: Harness) -> None:
    results = await DeferredList(
        [ensureDeferred(gateway.admin("POST", "/api/v1/tenants", tenant_body(name=f"T{i}")))
         for i in range(3)], fireOnOneErrback=True, consumeErrors=True)
    assert sorted(r.status for _, r in results) == [201, 409, 409]
    await gateway.delivered(1)


@pytest_twisted.ensureDeferred
async def test_the_hourly_pruning_forgets_a_crm_modules_transient_state(
        gateway: Harness, monkeypatch: Any) -> None:
    from gateway.crm.altegio import Altegio
    monkeypatch.setattr(Altegio, "transient_tokens", {"altegio-mp:reg:": -60.0})
    await gateway.store.put_token("altegio-mp:reg:abc", {"visit": 1})
    await gateway.store.put_token("altegio-mp:chain:1", {"chain": 1})
    await gateway.gw._prune()
    assert await gateway.store.token("altegio-mp:reg:abc") is None
    assert await gateway.store.token("altegio-mp:chain:1") == {"chain": 1}
    # Kept for their time otherwise (two activation windows by default).
    monkeypatch.setattr(Altegio, "transient_tokens", {"altegio-mp:reg:": 7200.0})
    await gateway.store.put_token("altegio-mp:reg:def", {"visit": 2})
    await gateway.gw._prune()
    assert await gateway.store.token("altegio-mp:reg:def") == {"visit": 2}
