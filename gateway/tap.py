"""``twistd gateway``: the command-line options and the service they make."""

from __future__ import annotations

import gc
import os
import secrets
import sys

from twisted.python import usage

from gateway import logs, outbox, seal, web
from gateway.service import Gateway
from gateway.store import open_store

# Webhook bodies are a few hundred bytes; a body is held in memory while it arrives.
MAX_MAX_BODY = 16 * 1024 * 1024

from gateway.crm import gateway_options as _crm_options  # noqa: E402


class Options(usage.Options):
    """Options for ``twistd gateway``."""

    synopsis = "[options]"
    longdesc = ("Telephony integration gateway: takes PBX call events, folds them into calls "
                "and tells each tenant's CRM (pop-ups, call history).")
    optParameters = [
        ["listen", None, "tcp:8080",
         "Twisted endpoint for the public site (PBX webhooks, /healthz)."],
        ["public-url", None, "",
         "The public site's URL as PBXs and CRMs reach it (https://gw.example.net), for "
         "the URLs of a tenant's setup guide; default http://localhost:<--listen port>."],
        ["admin-listen", None, "tcp:8081:interface=127.0.0.1",
         "Twisted endpoint for the admin API (keep it on localhost or a private network)."],
        ["database", None, "sqlite:var/gateway.sqlite",
         "Where state lives: sqlite:PATH (the embedded store)."],
        ["admin-token-file", None, "var/admin-token",
         "File holding the admin API bearer token; generated (and printed) if absent."],
        ["secret-key-file", None, "",
         "File holding the key that seals secrets in the database; generated (mode "
         "0600) if absent.  A database sealed with another key does not start.  "
         "Default: secret-key beside --admin-token-file."],
        ["max-age", None, 86400.0,
         "Seconds a CRM action is retried before it is dead-lettered.", float],
        ["popup-ttl", None, 60.0,
         "Seconds after which an undelivered pop-up is dropped instead of shown late.",
         float],
        ["max-in-flight", None, 64, "Most CRM requests in flight at once.", int],
        ["max-body", None, 65536, "Largest webhook body accepted, in bytes (413 above).",
         int],
        ["max-retry-after", None, 300.0,
         "Longest pause a CRM may ask for with Retry-After, in seconds (one action on a "
         "503, its whole host on a 429).", float],
        ["request-deadline", None, web.REQUEST_DEADLINE,
         "Seconds a client has to send a whole request (line, headers, body) from its "
         "first byte; 408 and the connection closed after.", float],
        ["max-connections-per-ip", None, web.MAX_PER_SOURCE,
         "Most connections one source address may hold on each site (503 for more); "
         "0: no cap (e.g. behind a reverse proxy).", int],
        ["log-format", None, "text",
         "Log lines as text or json (one object a line, the event's fields as fields)."],
        ["log-level", None, "info",
         "Least important level logged: debug, info, warn, error or critical."],
    ] + _crm_options()  # a CRM module's gateway-wide settings (ICrm.gateway_options)

    def postOptions(self) -> None:
        url = self["public-url"]
        if url and not (url.startswith(("http://", "https://")) and " " not in url):
            raise usage.UsageError(f"--public-url: not an http(s) URL: {url[:80]!r}")
        if not self["database"].startswith("sqlite:"):
            raise usage.UsageError(f"--database: unsupported URL {self['database']!r} "
                                   "(use sqlite:PATH)")
        for name in ("max-age", "popup-ttl", "max-in-flight", "max-body",
                     "request-deadline", "max-retry-after"):
            if not 0 < self[name] < float("inf"):  # NaN too
                raise usage.UsageError(f"--{name} must be positive")
        if self["max-body"] > MAX_MAX_BODY:
            # Bodies are held in memory while they arrive (never spooled to disk).
            raise usage.UsageError(f"--max-body: at most {MAX_MAX_BODY} bytes")
        if self["request-deadline"] > 3600:
            raise usage.UsageError("--request-deadline: at most 3600 seconds")
        if self["max-connections-per-ip"] < 0:
            raise usage.UsageError("--max-connections-per-ip must be 0 (no cap) or positive")
        self._log_options()

    def _log_options(self) -> None:
        """Check --log-format and --log-level, and have twistd log through them (its own
        --logger or --syslog, when given, wins)."""
        if self["log-format"] not in logs.FORMATS:
            raise usage.UsageError(f"--log-format: {' or '.join(logs.FORMATS)}")
        if self["log-level"] not in logs.LEVELS:
            raise usage.UsageError(f"--log-level: one of {', '.join(logs.LEVELS)}")
        server = self.parent
        if server is None or server.get("logger") or server.get("syslog"):
            return
        logs.configure(self["log-format"], self["log-level"], server.get("logfile") or "",
                       bool(server.get("nodaemon")))
        server["logger"] = "gateway.logs.observer_for_twistd"  # twistd resolves the name


def admin_token(path: str) -> str:
    """Read the admin token, creating the file (mode 0600) on first run."""
    if os.path.exists(path):
        with open(path) as f:
            token = f.read().strip()
        if not token:
            raise usage.UsageError(f"--admin-token-file: {path} is empty")
        return token
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    print(f"gateway: generated the admin API token in {path}: {token}", file=sys.stderr)
    return token


def secret_key(options: Options) -> seal.Sealer:
    """The key that seals secrets in the store, from its file (created on first run)."""
    path = (options["secret-key-file"]
            or seal.default_key_file(options["admin-token-file"]))
    try:
        return seal.key_file(path)
    except ValueError as e:
        raise usage.UsageError(f"--secret-key-file: {e}") from None


def tune_gc() -> None:
    """Garbage collection for the daemon, tuned for latency (make bench: p99.9 at a steady
    1,100 webhooks/s went from 27-141 ms to 18-28 ms, RSS unchanged).

    - What exists before the reactor runs (modules: ~60,000 objects) lives as long as the
      process: frozen, it is left out of every later collection (~40 ms each on its own).
    - A full collection walks every live object (an outbox backlog of 30,000 actions:
      ~100 ms), so it runs a hundred times less often than Python's default; the young
      generations, where almost all garbage dies, are collected as before.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(700, 10, 1000)


def makeService(options: Options) -> Gateway:
    from twisted.internet import reactor

    tune_gc()
    gateway = Gateway(
        store=open_store(options["database"], reactor, sealer=secret_key(options)),
        reactor=reactor,
        listen=options["listen"],
        admin_listen=options["admin-listen"],
        admin_token=admin_token(options["admin-token-file"]),
        dispatch=outbox.Policy(max_age=options["max-age"], popup_ttl=options["popup-ttl"],
                               max_in_flight=options["max-in-flight"],
                               max_retry_after=options["max-retry-after"]),
        max_body=options["max-body"],
        request_deadline=options["request-deadline"],
        max_connections_per_ip=options["max-connections-per-ip"],
        public_url=options["public-url"],
    )
    for module in gateway.crms.values():
        configure = getattr(module, "configure", None)
        if configure is not None:
            try:
                configure(options)
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
    return gateway
