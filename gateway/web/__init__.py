"""The two Klein sites: public (PBXs and CRMs call it) and admin (operators)."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest


def json_response(request: IRequest, body: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body, ensure_ascii=False).encode()
