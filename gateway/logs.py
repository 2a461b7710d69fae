"""The daemon's log observer: text or JSON lines, filtered by level (``--log-format``, ``--log-level``).

``twistd`` builds its log observer before it makes the service, from its own ``--logger``
option (a dotted name of a factory); ``gateway.tap.Options`` fills that option in with
:func:`observer_for_twistd` unless the operator chose a ``--logger`` or ``--syslog``.

A JSON line is one object: ``time`` (ISO 8601, UTC), ``level``, ``namespace``, ``message``
(the event formatted as the text log shows it), then the event's own fields (``tenant``,
``login``, ``call``, ``action`` …) as values, and ``traceback`` for a failure.  Bytes are
decoded (never ``b'…'``), and empty fields (``call=""`` of a tenant's setup) are left out.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import (FilteringLogObserver, ILogObserver, LogLevel,
                            LogLevelFilterPredicate, formatEvent, textFileLogObserver)
from twisted.python import logfile
from zope.interface import provider

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warn", "error", "critical")

# Keys of twisted.python.log's legacy events, carried by twisted.logger's events from
# legacy emitters (twisted.web's own lines), and :func:`about`'s text: the message says
# what they say.
_LEGACY = frozenset({"message", "format", "system", "isError", "time", "why", "failure",
                     "about"})

# What the twistd factory builds; set by configure() while the options are parsed.
_settings: dict[str, Any] = {}


def about(tenant: Any, login: str | None = None, call: str | None = "") -> dict[str, Any]:
    """The fields naming what a line is about (``tenant``, ``login``, ``call``), with
    ``about``, their text for the message ("tenant 807 (TLP55522) call 5f0c…"); a
    tenant's own actions have no call, and say none (not ``call ""``)."""
    fields: dict[str, Any] = {"tenant": tenant}
    text = f"tenant {tenant}"
    if login:
        fields["login"] = login
        text += f" ({login})"
    if call:
        fields["call"] = call
        text += f" call {call}"
    fields["about"] = text
    return fields


def _value(value: Any) -> Any:
    """A field as JSON holds it: scalars as they are, bytes decoded, anything else as text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, (list, tuple)):
        return [_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _value(v) for k, v in value.items()}
    return str(value)


def as_json(event: dict[str, Any]) -> str:
    """One event as one JSON line (no newline)."""
    level = event.get("log_level")
    out: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time") or 0, timezone.utc).isoformat(
            timespec="milliseconds"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY or key in out:
            continue
        if value is None or value == "" or value == b"":  # an empty field says nothing
            continue
        out[key] = _value(value)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            out["traceback"] = failure.getTraceback()
        except Exception:
            out["traceback"] = repr(failure)
    return json.dumps(out, ensure_ascii=False, allow_nan=False, default=str)


def json_observer(output: IO[str]) -> ILogObserver:
    """Writes each event to ``output`` as a JSON line."""

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        output.write(as_json(event) + "\n")
        output.flush()

    return observe


def observer(format: str, level: str, output: IO[str]) -> ILogObserver:
    """An observer writing events at ``level`` or above to ``output`` in ``format``."""
    inner = json_observer(output) if format == "json" else textFileLogObserver(output)
    return FilteringLogObserver(inner, [LogLevelFilterPredicate(
        LogLevel.levelWithName(level))])


def configure(format: str, level: str, logfile_name: str, nodaemon: bool) -> None:
    """What :func:`observer_for_twistd` will build (twistd calls it with no arguments)."""
    _settings.update(format=format, level=level, logfile=logfile_name, nodaemon=nodaemon)


def _output(name: str, nodaemon: bool) -> IO[str]:
    """Where twistd itself would log: stdout for ``-`` (or no file in the foreground),
    else the file (twistd.log by default), rotated on SIGUSR1 as twistd rotates it."""
    if name == "-" or (nodaemon and not name):
        return sys.stdout
    out = logfile.LogFile.fromFullPath(name or "twistd.log")
    try:
        import signal
    except ImportError:  # pragma: no cover
        return out
    if not signal.getsignal(signal.SIGUSR1):
        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor
            reactor.callFromThread(out.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return out


def observer_for_twistd() -> ILogObserver:
    """The factory ``twistd --logger`` names (see the module docstring)."""
    settings = {"format": "text", "level": "info", "logfile": "", "nodaemon": True,
                **_settings}
    return observer(settings["format"], settings["level"],
                    _output(settings["logfile"], settings["nodaemon"]))

