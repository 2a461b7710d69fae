"""Structured logs (issue 13): ``--log-format json`` writes one JSON object a line with the
event's fields (tenant, PBX login, call, action) as fields, no ``b'…'`` and no empty field;
``--log-level`` filters, and debug is off unless asked for.
"""

from __future__ import annotations

import io
import json
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.logger import Logger, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure

from gateway import logs
from gateway.tap import Options
from tests.test_admin import KEY, Harness, TOKEN, eventually
from tests.test_public import CALL, DIAL_IN


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    """Every line written, each parsed as JSON (a line that is not JSON fails the test)."""
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_json_line_carries_the_fields_of_its_event() -> None:
    out = io.StringIO()
    log = Logger(namespace="gateway.test", observer=logs.observer("json", "info", out))
    log.warn("{about}: {kind} #{action} not delivered: {error}",
             **logs.about(807, "TLP55522", CALL), kind="popup", action=12, error="503",
             method=b"POST", nothing=None)
    [line] = lines(out)
    assert line["message"] == f"tenant 807 (TLP55522) call {CALL}: popup #12 not delivered: 503"
    assert (line["tenant"], line["login"], line["call"], line["action"]) == (
        807, "TLP55522", CALL, 12)
    assert line["level"] == "warn" and line["namespace"] == "gateway.test"
    assert line["time"].endswith("+00:00")
    assert line["method"] == "POST"  # bytes decoded, never "b'POST'"
    assert "about" not in line and "nothing" not in line


def test_a_tenant_action_says_no_call() -> None:
    out = io.StringIO()
    log = Logger(observer=logs.observer("json", "info", out))
    log.warn("{about}: setup #{action} not delivered", **logs.about(807, "TLP55522", ""),
             action=1)
    [line] = lines(out)
    assert "call" not in line
    assert line["message"] == "tenant 807 (TLP55522): setup #1 not delivered"


def test_a_failure_keeps_its_traceback() -> None:
    out = io.StringIO()
    log = Logger(observer=logs.observer("json", "info", out))
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("tenant {tenant}: it broke", Failure(), tenant=807)
    [line] = lines(out)
    assert line["level"] == "critical" and line["tenant"] == 807
    assert "ZeroDivisionError" in line["traceback"]


@pytest.mark.parametrize("format", logs.FORMATS)
def test_debug_is_off_unless_asked_for(format: str) -> None:
    quiet, loud = io.StringIO(), io.StringIO()
    for out, level in ((quiet, "info"), (loud, "debug")):
        log = Logger(observer=logs.observer(format, level, out))
        log.debug("GET {url} → {status}", url="http://crm", status=200)
        log.info("gateway ready")
    assert "crm" not in quiet.getvalue() and "gateway ready" in quiet.getvalue()
    assert "crm" in loud.getvalue() and "gateway ready" in loud.getvalue()


def test_twistd_logs_through_the_gateway_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.scripts.twistd import ServerOptions

    monkeypatch.setattr(logs, "_settings", {})
    config = ServerOptions()
    config.parseOptions(["--nodaemon", "gateway", "--log-format", "json"])
    assert config["logger"] is logs.observer_for_twistd
    assert logs._settings["format"] == "json" and logs._settings["level"] == "info"
    # An operator's own --logger wins.
    config = ServerOptions()
    config.parseOptions(["--nodaemon", "--logger", "twisted.logger.textFileLogObserver",
                         "gateway", "--log-format", "json"])
    assert config["logger"] is not logs.observer_for_twistd


@pytest.mark.parametrize("args", [["--log-format", "xml"], ["--log-level", "verbose"]])
def test_unknown_log_options_are_refused(args: list[str]) -> None:
    with pytest.raises(usage.UsageError):
        Options().parseOptions(args)


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    """The gateway's log while the test runs, as ``--log-format json`` writes it."""
    out = io.StringIO()
    observer = logs.observer("json", "info", out)
    globalLogPublisher.addObserver(observer)
    try:
        yield out
    finally:
        globalLogPublisher.removeObserver(observer)


@pytest_twisted.ensureDeferred
async def test_the_log_of_a_refused_call(tmp_path: Any, logged: io.StringIO) -> None:
    harness = Harness(tmp_path)
    harness.crm.status = 422  # the tenant's setup and the call's pop-up: refused for good
    await harness.start()
    try:
        await harness.create()
        assert (await harness.hook(DIAL_IN)).status == 200
        assert (await harness.hook(DIAL_IN, key="wrong")).status == 403
        await harness.admin("GET", "/api/v1/nothing")
        await eventually(lambda: harness.gw.dispatcher.counts.get("failed") == 2)
    finally:
        await harness.stop()
    text = logged.getvalue()
    found = lines(logged)
    assert found
    assert "b'" not in text and 'b"' not in text
    assert KEY not in text and TOKEN not in text
    assert not [line for line in found if "" in line.values()]
    refused = [line for line in found if "not delivered" in line["message"]]
    setup = [line for line in refused if "call" not in line]
    popup = [line for line in refused if line.get("call") == CALL]
    assert len(setup) == 1 and len(popup) == 1, refused
    for line in setup + popup:
        assert (line["tenant"], line["login"]) == (807, "TLP55522")
        assert isinstance(line["action"], int)
    rejected = [line for line in found if line["message"].startswith("rejected")]
    assert rejected and rejected[0]["method"] == "POST"
    assert "key=***" in rejected[0]["uri"]
