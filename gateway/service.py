"""The gateway service: owns the store, engine, dispatcher, PBX/CRM clients and both web sites."""

from __future__ import annotations

import os
import random
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import (Deferred, DeferredLock, ensureDeferred, maybeDeferred,
                                    succeed)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gateway import crm, logs, outbox, protocols, web
from gateway.engine import Engine
from gateway.errors import Permanent, Retryable
from gateway.httpclient import HttpClient
from gateway.crm import Command
from gateway.lookup import Lookup
from gateway.metrics import ERROR, OK, PERMANENT, RETRYABLE, Metrics
from gateway.model import ATTACH, RECORD, SETUP, Action, Tenant, digits, parse_tenant

log = Logger()

# Call-interactive: a cached manager is served stale (when the CRM is slow) for this long,
# and at most this many numbers are cached per tenant.
INTERACTIVE_KEEP = 86400.0
INTERACTIVE_ENTRIES = 10_000

# How long folded events and finished calls are kept (duplicates are recognised within it),
# and how long delivered actions and their attempts stay readable for operators.
EVENT_RETENTION = 7 * 86400.0
ACTION_RETENTION = 30 * 86400.0


class Gateway(MultiService):
    """One gateway process: append → fold → outbox → dispatch, and the sites that feed it."""

    def __init__(self, store: Any, reactor: Any, listen: str | None = None,
                 admin_listen: str | None = None, admin_token: str = "",
                 dispatch: outbox.Policy = outbox.Policy(), max_body: int = 64 * 1024,
                 request_deadline: float = web.REQUEST_DEADLINE,
                 max_connections_per_ip: int = web.MAX_PER_SOURCE,
                 http: HttpClient | None = None, rng: random.Random | None = None,
                 public_url: str = "") -> None:
        super().__init__()
        self.store = store
        self.reactor = reactor
        self.listen = listen
        self.admin_listen = admin_listen
        self.admin_token = admin_token
        # Where PBXs and CRMs reach the public site (the URLs of a tenant's setup guide).
        self.public_url = (public_url or _local_url(listen)).rstrip("/")
        self.max_body = max_body
        self.request_deadline = request_deadline
        self.max_connections_per_ip = max_connections_per_ip
        self.tenants: dict[int, Tenant] = {}
        self.http = http or HttpClient(reactor)
        # One instance of every registered module (they keep tokens and caches).
        self.pbxs = {kind: protocols.pbx_type(kind)(self.http, reactor)
                     for kind in protocols.KINDS}
        self.crms = {kind: crm.crm_type(kind)(self.http, reactor, store)
                     for kind in crm.KINDS}
        self.engine = Engine(store, reactor, self.tenants.get, self._supports, self._deliver)
        self.dispatcher = outbox.Dispatcher(store, reactor, self._perform, self._limits,
                                            dispatch, rng)
        self.metrics = Metrics(self)
        self.metrics.watch_appends(store)
        self.lookups: dict[int, tuple[float, Lookup]] = {}  # tenant → (fresh, its cache)
        self.credentials: dict[int, dict[str, Any]] = {}  # id → {"kind", "name", "fields"}
        # Tenant and credential writes one at a time (the admin API, a CRM's setup
        # callback): each checks the directory, then awaits the store, and two at once would
        # both pass the check (two 201s for one id, lost patches).
        self.writes = DeferredLock()
        self.ready = False
        self.sites: list[Any] = []
        self._pruning = LoopingCall(self._prune)
        self._pruning.clock = reactor

    # Service life cycle

    def startService(self) -> None:
        super().startService()
        d = ensureDeferred(self.start())

        def failed(f: Any) -> None:
            log.failure("gateway failed to start", f)
            if self.reactor.running:
                # twistd exits 0 after a reactor.stop(): a supervisor (systemd, a container
                # runtime) must see the failure, so the process ends with 1 once the
                # reactor has shut down (and the log is flushed).
                self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
                self.reactor.stop()

        d.addErrback(failed)

    async def start(self) -> None:
        await self.store.start()
        for tenant in await self.store.tenants():
            self.tenants[tenant.id] = tenant
        for credential in await self.store.credentials(None):
            self.credentials[credential["id"]] = credential
        await self.engine.start()
        await self.dispatcher.start()
        from gateway.web import admin, public

        limits = {"deadline": self.request_deadline,
                  "max_per_source": self.max_connections_per_ip, "reactor": self.reactor}
        for description, resource, max_body in (
                (self.listen, public.PublicSite(self).resource(), self.max_body),
                (self.admin_listen, admin.AdminSite(self).resource(), web.ADMIN_MAX_BODY)):
            if description:
                service = strports.service(description, web.site(resource, max_body,
                                                                 **limits))
                service.setServiceParent(self)
                self.sites.append(service)
        self.ready = True
        self._pruning.start(3600, now=True).addErrback(
            lambda f: log.failure("pruning stopped", f))
        log.info("gateway ready: {tenants} tenants, {pending} actions pending",
                 tenants=len(self.tenants), pending=self.dispatcher.depth)

    def stopService(self) -> Any:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        # Stop accepting first; in-flight appends finish inside the store's stop.
        await super().stopService()
        if self._pruning.running:
            self._pruning.stop()
        self.dispatcher.stop()
        # An attempt cut off here would be sent again after the restart; give the ones in
        # flight the length of one request timeout to finish and be recorded.
        await self.dispatcher.drain(self.http.timeout)
        self.engine.stop()
        await self.engine.idle()
        await self.store.stop()
        await self.http.close()

    async def _prune(self) -> None:
        now = self.reactor.seconds()
        try:
            counts = await self.store.prune(now - EVENT_RETENTION, now - ACTION_RETENTION,
                                            self.engine.cursor)
        except Exception:
            log.failure("pruning old rows failed; will try again")
            return
        for crm in self.crms.values():
            # State a CRM module keeps for a while only (say a registration page's visits,
            # which anyone can start): prefix → seconds.
            for prefix, keep in getattr(crm, "transient_tokens", {}).items():
                try:
                    counts[prefix] = await self.store.prune_tokens(prefix, now - keep)
                except Exception:
                    log.failure("pruning {prefix} rows failed; will try again", prefix=prefix)
        if any(counts.values()):
            log.info("pruned old rows: {counts}", counts=counts)

    # Wiring between the stages

    def _supports(self, tenant: Tenant, kind: str, payload: dict) -> bool:
        return self.crms[tenant.crm.kind].supports(tenant, kind, payload)

    def _deliver(self, inserted: list[Action], dropped: list[int]) -> None:
        self.dispatcher.drop(dropped)
        self.dispatcher.add(inserted)

    def _limits(self, action: Action) -> list[tuple[str, float, int]]:
        tenant = self.tenants.get(action.tenant)
        if tenant is None:
            return []
        return self.crms[tenant.crm.kind].limits(tenant)

    async def _perform(self, action: Action) -> tuple[str, int, str]:
        started = self.reactor.seconds()
        outcome = ERROR
        try:
            result = await self._deliver_one(action)
            outcome = OK
            return result
        except (Retryable, Permanent) as e:
            outcome = RETRYABLE if isinstance(e, Retryable) else PERMANENT
            tenant = self.tenants.get(action.tenant)
            log.warn("{about}: {kind} #{action} not delivered (try {attempt}): {error}",
                     **logs.about(action.tenant, tenant.pbx.login if tenant else None,
                                  action.call),
                     kind=action.kind, action=action.id, attempt=action.attempts + 1,
                     error=str(e))
            raise
        finally:
            tenant = self.tenants.get(action.tenant)
            self.metrics.crm_seconds.labels(tenant.crm.kind if tenant else "unknown",
                                            outcome).observe(
                self.reactor.seconds() - started)

    async def _deliver_one(self, action: Action) -> tuple[str, int, str]:
        tenant = self.tenants.get(action.tenant)
        if tenant is None:
            raise Permanent(f"tenant {action.tenant} no longer exists")
        if tenant.deleted and action.kind != SETUP:
            raise Permanent(f"tenant {action.tenant} was deleted")
        link = None
        recording = action.payload.get("recording") if action.kind in (RECORD, ATTACH) else None
        lookup = (self.pbxs[tenant.pbx.kind].recording_url(tenant, recording)
                  if recording else None)
        if lookup is not None:
            try:
                link = await lookup
            except (Retryable, Permanent) as e:
                if action.attempts + 1 < self.dispatcher.policy.recording_tries:
                    raise Retryable(f"recording {recording}: {e}", e.status, e.answer,
                                    getattr(e, "retry_after", None)) from None
                log.warn("tenant {tenant} ({login}) call {call}: recording {recording} not "
                         "resolved ({error}); the record goes without a link",
                         tenant=tenant.id, login=tenant.pbx.login, call=action.call,
                         action=action.id, recording=recording, error=str(e))
        summary, resp = await self.crms[tenant.crm.kind].perform(tenant, action, link)
        return summary + (f" link={link}" if link else ""), resp.status, resp.excerpt()

    # The synchronous paths

    def pbx_prefixes(self) -> set[str]:
        return {pbx.prefix for pbx in self.pbxs.values()}

    def responsible(self, tenant: Tenant, number: str) -> Deferred:
        """The extension of the caller's manager, or None, within the tenant's
        ``interactive_deadline``: a fresh cached answer, else the CRM's, else a stale one,
        else None (the IVR goes on to its next rule).  A CRM without the lookup: None."""
        crm = self.crms[tenant.crm.kind]
        if not crm.has_responsible:
            return succeed(None)
        fresh = float(tenant.option("interactive_fresh"))
        cached = self.lookups.get(tenant.id)
        if cached is None or cached[0] != fresh:
            cached = self.lookups[tenant.id] = (fresh, Lookup(
                self.reactor, fresh, max(fresh, INTERACTIVE_KEEP), INTERACTIVE_ENTRIES))
        key = digits(number)
        if not key:
            return succeed(None)

        def fetch() -> Any:
            return crm.responsible(tenant, number)

        d = cached[1].get(key, fetch, float(tenant.option("interactive_deadline")))
        return d.addCallback(self._answered)

    def _answered(self, answer: Any) -> Any:
        self.metrics.answered(answer.source)
        return answer.value

    def command(self, tenant: Tenant, command: Command) -> Deferred:
        """A CRM's click-to-call or hang-up, performed through the tenant's PBX."""
        if command.action == "setup":
            return ensureDeferred(self._crm_setup(tenant, command.settings))
        pbx = self.pbxs[tenant.pbx.kind]
        if command.action == "hangup":
            return maybeDeferred(pbx.hangup, tenant, command.call)
        extension = self.extension_of(tenant, command.employee)
        number = command.number.strip()
        number = ("+" if number.startswith("+") else "") + digits(number)
        return maybeDeferred(pbx.call, tenant, extension, number)

    async def _crm_setup(self, tenant: Tenant, settings: dict[str, Any]) -> str:
        """A CRM switched the integration on from its side (Planfix's ``setup``): its
        settings are merged into the tenant's ``crm`` section, checked by the module's
        schema like an admin patch, and the tenant is enabled."""
        async with self.writes:
            current = self.tenants[tenant.id]
            updated = parse_tenant({"crm": settings, "enabled": True}, current,
                                   self.credentials)
            await self.save_tenant(updated, current)
        log.info("tenant {tenant} ({login}): switched on by its CRM", tenant=tenant.id,
                 login=tenant.pbx.login)
        return "setup"

    @staticmethod
    def extension_of(tenant: Tenant, employee: str) -> str:
        """The extension of an employee named by the CRM: its user id (through the tenant's
        ``employees``), or an extension already."""
        if employee in tenant.employees:
            return employee
        for extension, user in tenant.employees.items():
            if user == employee:
                return extension
        if employee.isdigit() and len(employee) <= 5 or "*" in employee:
            return employee
        raise Permanent(f"employee {employee[:40]!r} has no extension: add it to the "
                        "tenant's employees (extension → CRM user)")

    # Tenants (the admin API goes through here so the directory and the store agree)

    def crm_accounts(self) -> dict[tuple[str, str], list[int]]:
        """Live (enabled, not deleted) tenants by the CRM account their config names."""
        out: dict[tuple[str, str], list[int]] = {}
        for t in self.tenants.values():
            if t.enabled and not t.deleted:
                out.setdefault((t.crm.kind, self.crms[t.crm.kind].account(t)), []).append(t.id)
        return out

    def sharing(self, tenant: Tenant,
                accounts: dict[tuple[str, str], list[int]] | None = None) -> list[int]:
        """The other live tenants on the same CRM account as ``tenant``."""
        if accounts is None:
            accounts = self.crm_accounts()
        key = (tenant.crm.kind, self.crms[tenant.crm.kind].account(tenant))
        return sorted(i for i in accounts.get(key, ()) if i != tenant.id)

    async def save_tenant(self, tenant: Tenant, previous: Tenant | None) -> None:
        """Store a tenant, queueing ``setup`` when its CRM integration must be (re)enabled
        or disabled.

        Several tenants may share one CRM account (one Altegio chain, several PBX
        accounts): the account is switched off only when no other enabled tenant uses it.
        """
        now = self.reactor.seconds()
        was_on = previous is not None and previous.enabled and not previous.deleted
        is_on = tenant.enabled and not tenant.deleted
        changed_crm = previous is not None and previous.crm != tenant.crm
        setup = None
        if is_on and (not was_on or changed_crm):
            setup = "enable"
        elif was_on and not is_on:
            setup = "disable"
            others = self.sharing(tenant)
            if others:
                setup = None
                log.info("tenant {tenant} ({login}) switched off; its CRM account stays on "
                         "for tenants {others}", tenant=tenant.id, login=tenant.pbx.login,
                         others=others)
        action = None
        if setup:
            action = Action(tenant=tenant.id, call="", kind=SETUP,
                            key=f"setup:{setup}:{int(now * 1e6)}", payload={"type": setup},
                            created=now)
        await self.store.put_tenant_with_action(tenant, action, now)
        self.tenants[tenant.id] = tenant
        if tenant != previous:
            # Its cached managers may name another account's users or old extensions; a
            # deleted tenant's cache would otherwise stay for the life of the process.
            self.lookups.pop(tenant.id, None)
        if action is not None:
            self.dispatcher.add([action])


def _local_url(listen: str | None) -> str:
    """http://localhost:PORT for a ``tcp:PORT…`` endpoint (the default ``--public-url``)."""
    parts = (listen or "").split(":")
    port = parts[1] if len(parts) > 1 and parts[0] == "tcp" and parts[1].isdigit() else "8080"
    return f"http://localhost:{port}"
