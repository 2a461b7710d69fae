"""Fault injection, the control API and the standalone runner shared by the fake upstreams."""

from __future__ import annotations

import argparse
import json
import math
import sys
from http import HTTPStatus
from typing import Any, Callable, Mapping, Protocol

from attrs import define, field
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.protocols.policies import WrappingFactory
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Site

log = Logger()


def default_clock() -> IReactorTime:
    """The global reactor, imported late so that importing a fake never installs one."""
    from twisted.internet import reactor

    return reactor  # type: ignore[return-value]


def json_response(
    request: IRequest,
    status: int,
    body: object,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """Set the status and headers of a JSON answer and return its encoded body."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    for name, value in (headers or {}).items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    return json.dumps(body).encode("utf-8")


def read_json_object(request: IRequest) -> dict[str, Any]:
    """The request body as a JSON object, or ValueError saying why it is not one."""
    request.content.seek(0)
    try:
        body = json.loads(request.content.read() or b"null")
    except ValueError as e:
        raise ValueError(f"body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    return body


def _is_int(value: object) -> bool:
    # bool is an int subclass, and `true` is never a sensible count or status.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)  # type: ignore[arg-type]


# What each settable fault field accepts, checked before anything is changed so that a
# bad control request leaves the faults as they were.
_FAULT_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "fail_status": (
        lambda v: v is None or (_is_int(v) and 100 <= v <= 599),  # type: ignore[operator]
        "an HTTP status or null",
    ),
    "fail_count": (
        lambda v: v is None or (_is_int(v) and v >= 0),  # type: ignore[operator]
        "a count >= 0 or null",
    ),
    "retry_after": (
        lambda v: v is None or (_is_number(v) and v >= 0),  # type: ignore[operator]
        "seconds >= 0 or null",
    ),
    "delay": (lambda v: _is_number(v) and v >= 0, "seconds >= 0"),  # type: ignore[operator]
    "hang": (lambda v: isinstance(v, bool), "a boolean"),
    "requests_seen": (lambda v: _is_int(v) and v >= 0, "a count >= 0"),  # type: ignore[operator]
}


def _release_when_cleared(instance: Faults, attribute: object, value: bool) -> bool:
    # Runs before the new value is stored; released requests do not look at `hang`
    # again, so they cannot be caught by the old value.
    if not value:
        instance._release_hung()
    return value


@define
class Faults:
    """The failure mode a fake's public routes adopt before doing their real work."""

    fail_status: int | None = None
    fail_count: int | None = None
    retry_after: float | None = None
    delay: float = 0.0
    hang: bool = field(default=False, on_setattr=_release_when_cleared)
    requests_seen: int = 0
    _hung: list[Deferred[None]] = field(factory=list, init=False, repr=False, eq=False)

    def clear(self) -> None:
        """Stop failing, delaying and hanging; `requests_seen` keeps counting."""
        self.fail_status = None
        self.fail_count = None
        self.retry_after = None
        self.delay = 0.0
        self.hang = False

    def update(self, changes: Mapping[str, object]) -> None:
        """Apply a control request's fields; `clear: true` first resets the failure mode."""
        changes = dict(changes)
        clear = changes.pop("clear", False)
        if not isinstance(clear, bool):
            raise ValueError("clear must be a boolean")
        unknown = sorted(set(changes) - set(_FAULT_CHECKS))
        if unknown:
            raise ValueError(f"unknown fault fields: {', '.join(unknown)}")
        for name, value in changes.items():
            check, expected = _FAULT_CHECKS[name]
            if not check(value):
                raise ValueError(f"{name} must be {expected}")
        if clear:
            self.clear()
        # `hang` last: releasing hung requests lets them run on, and they must see the
        # other fields of the same update.
        for name in sorted(changes, key=lambda n: n == "hang"):
            setattr(self, name, changes[name])

    def snapshot(self) -> dict[str, object]:
        """The settable fields as JSON-ready values."""
        return {name: getattr(self, name) for name in _FAULT_CHECKS}

    async def intercept(
        self,
        request: IRequest,
        clock: IReactorTime,
        error_body: Callable[[int], object],
    ) -> bytes | None:
        """
        Hang, delay or fail this request as configured.

        Returns the body of the failure answer (status and headers already set), or
        None when the route should go on and answer for real.
        """
        self.requests_seen += 1
        if self.hang:
            await self._until_released(request)
        if self.delay > 0:
            await deferLater(clock, self.delay, lambda: None)
        if self.fail_status is None:
            return None
        status = self.fail_status
        if self.fail_count is not None:
            if self.fail_count <= 0:
                self.fail_status = self.fail_count = None
                return None
            self.fail_count -= 1
            if self.fail_count == 0:
                self.fail_status = self.fail_count = None
        headers = {}
        if self.retry_after is not None:
            # Retry-After takes whole seconds; rounding down could invite an early retry.
            headers["Retry-After"] = str(math.ceil(self.retry_after))
        return json_response(request, status, error_body(status), headers)

    def _until_released(self, request: IRequest) -> Deferred[None]:
        def forget(d: Deferred[None]) -> None:
            if d in self._hung:
                self._hung.remove(d)

        waiting: Deferred[None] = Deferred(forget)
        self._hung.append(waiting)
        # A client that times out and hangs up must not leave the request parked forever.
        request.notifyFinish().addErrback(lambda _: waiting.cancel())
        return waiting

    def _release_hung(self) -> None:
        hung, self._hung = self._hung, []
        for waiting in hung:
            waiting.callback(None)


def http_reason(status: int) -> str:
    """The standard reason phrase, for fault bodies that need some text."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class Controllable(Protocol):
    """What a fake offers so that the control app and the runner can drive it."""

    faults: Faults

    def resource(self) -> IResource:
        """The public API as a Twisted Web resource."""

    def state(self) -> dict[str, object]:
        """What the fake has received, as JSON-ready values."""

    def setup(self, config: Mapping[str, object]) -> None:
        """Change the fake's configuration; ValueError names a bad key or value."""

    def reset(self) -> None:
        """Forget what was received and clear the faults."""


@define
class ControlApp:
    """The out-of-band HTTP API a harness uses to steer a fake, possibly in another process."""

    fake: Controllable
    server: FakeServer | None = None

    app = Klein()

    def resource(self) -> IResource:
        """The control API as a Twisted Web resource."""
        return self.app.resource()

    @app.route("/_control/faults", methods=["POST"])
    def set_faults(self, request: IRequest) -> bytes:
        try:
            self.fake.faults.update(read_json_object(request))
        except ValueError as e:
            return json_response(request, 400, {"error": str(e)})
        return json_response(request, 200, self.fake.faults.snapshot())

    @app.route("/_control/refuse", methods=["POST"])
    async def refuse(self, request: IRequest) -> bytes:
        if self.server is None:
            return json_response(request, 409, {"error": "not served by a FakeServer"})
        await self.server.refuse()
        return json_response(request, 200, {"listening": False, "port": self.server.public_port})

    @app.route("/_control/accept", methods=["POST"])
    def accept(self, request: IRequest) -> bytes:
        if self.server is None:
            return json_response(request, 409, {"error": "not served by a FakeServer"})
        self.server.accept()
        return json_response(request, 200, {"listening": True, "port": self.server.public_port})

    @app.route("/_control/state", methods=["GET"])
    def state(self, request: IRequest) -> bytes:
        return json_response(request, 200, {**self.fake.state(), "faults": self.fake.faults.snapshot()})

    @app.route("/_control/setup", methods=["POST"])
    def setup(self, request: IRequest) -> bytes:
        try:
            self.fake.setup(read_json_object(request))
        except ValueError as e:
            return json_response(request, 400, {"error": str(e)})
        return json_response(request, 200, self.fake.state())

    @app.route("/_control/reset", methods=["POST"])
    def reset(self, request: IRequest) -> bytes:
        self.fake.reset()
        return json_response(request, 200, self.fake.state())


@define
class FakeServer:
    """Serves a fake's public API and its control API on two TCP ports of a real reactor."""

    fake: Controllable
    reactor: Any
    host: str = "127.0.0.1"
    public_port: int | None = field(default=None, init=False)
    control_port: int | None = field(default=None, init=False)
    _public_factory: WrappingFactory | None = field(default=None, init=False)
    _public_listener: Any = field(default=None, init=False)
    _control_listener: Any = field(default=None, init=False)

    def start(self, port: int = 0, control_port: int = 0) -> None:
        """Listen on both ports; port 0 picks a free one, remembered for `accept`."""
        # WrappingFactory keeps the open connections so that `refuse` can drop them.
        self._public_factory = WrappingFactory(Site(self.fake.resource(), reactor=self.reactor))
        self._public_listener = self.reactor.listenTCP(
            port, self._public_factory, interface=self.host
        )
        self.public_port = self._public_listener.getHost().port
        control = Site(ControlApp(self.fake, self).resource(), reactor=self.reactor)
        self._control_listener = self.reactor.listenTCP(control_port, control, interface=self.host)
        self.control_port = self._control_listener.getHost().port

    async def refuse(self) -> None:
        """Close the public port, and drop its open connections as a crashed server would."""
        if self._public_listener is None:
            return
        listener, self._public_listener = self._public_listener, None
        await listener.stopListening()
        # Without this a client with a keep-alive pool would never notice the outage.
        assert self._public_factory is not None
        for wrapper in list(self._public_factory.protocols):
            wrapper.transport.abortConnection()

    def accept(self) -> None:
        """Listen again on the same public port number."""
        if self._public_listener is None:
            self._public_listener = self.reactor.listenTCP(
                self.public_port, self._public_factory, interface=self.host
            )

    async def stop(self) -> None:
        """Stop listening on both ports."""
        await self.refuse()
        if self._control_listener is not None:
            listener, self._control_listener = self._control_listener, None
            await listener.stopListening()


def run_standalone(
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    build: Callable[[argparse.Namespace, Any], Controllable],
    argv: list[str] | None = None,
) -> int:
    """
    Run one fake in this process until SIGTERM.

    Prints `READY port=<public> control=<control>` on stdout once both ports listen: the
    one line a harness waits for. Logs go to stderr.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=0, help="public port (0: any free port)")
    parser.add_argument("--control-port", type=int, default=0, help="control port (0: any)")
    add_arguments(parser)
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    fake = build(args, reactor)
    server = FakeServer(fake, reactor)
    failed = []

    def start() -> None:
        try:
            server.start(args.port, args.control_port)
        except Exception as e:
            log.failure("cannot listen")
            failed.append(e)
            reactor.stop()  # type: ignore[attr-defined]
            return
        print(f"READY port={server.public_port} control={server.control_port}", flush=True)

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return 1 if failed else 0
