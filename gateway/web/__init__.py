"""The two sites: public (PBXs and CRMs call it) and admin (operators)."""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.web.http import combinedLogFormatter
from twisted.web.iweb import IRequest
from twisted.web.server import Site


def json_response(request: IRequest, body: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body, ensure_ascii=False).encode()


def access_log(timestamp: str, request: Any) -> str:
    """Combined log format, with tenant keys in query strings masked."""
    return re.sub(r"([?&]key=)[^&\s\"]*", r"\1***", combinedLogFormatter(timestamp, request))


def site(resource: Any) -> Site:
    """The ``Site`` both sites (and the bench's baselines) are served by.

    Form bodies are not parsed into ``request.args``: the webhook handler parses them
    itself (strict UTF-8, first value wins), and twisted.web's parse costs more per request
    than the rest of the request line and headers together (its Content-Type check builds
    an ``email`` message).
    """
    out = Site(resource, logFormatter=access_log, parsePOSTFormSubmission=False)
    out.displayTracebacks = False
    return out
