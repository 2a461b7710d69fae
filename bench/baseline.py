"""The baselines: a bare twisted.web resource and a bare Klein route, both answering 200.

They get what the gateway's public site gets (``gateway.web.site``: the same ``Site``
options and access log, epoll reactor, the log written to a file as twistd writes it) and
do nothing else, so the bench can say how much
of the gateway's time is its own.  ``python -m bench.baseline --kind web|klein --port 0``
prints ``READY port=N`` once listening.
"""

from __future__ import annotations

import argparse
import os
import sys

from klein import Klein
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.resource import Resource

from gateway.web import site


class Bare(Resource):
    isLeaf = True

    def render_GET(self, request):  # noqa: N802 (twisted.web's spelling)
        request.setHeader(b"Content-Type", b"text/plain")
        return b"OK"

    render_POST = render_GET


klein_app = Klein()


@klein_app.route("/events/<tenant_id>/<event>/<login>", methods=["GET", "POST"])
def klein_event(request, tenant_id: str, event: str, login: str) -> bytes:
    request.setHeader(b"Content-Type", b"text/plain")
    return b"OK"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("web", "klein"), required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", default=os.devnull, help="where the access log goes")
    parser.add_argument("--cpu", type=int, default=None, help="pin to this core")
    args = parser.parse_args(argv)
    from twisted.internet import reactor  # the default: epoll on Linux, as twistd's

    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    globalLogBeginner.beginLoggingTo([textFileLogObserver(open(args.log, "a"))],
                                     redirectStandardIO=False)
    root = Bare() if args.kind == "web" else klein_app.resource()
    port = reactor.listenTCP(args.port, site(root), interface="127.0.0.1")
    print(f"READY port={port.getHost().port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
