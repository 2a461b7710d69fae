"""Altegio's module, pinned where the scenario tables and the fakes leave it loose: which
answers count as accepted, what the request summary (the first words of every attempt's
``last_error``) says, and what a request that cannot be built reports as its reason.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import pytest_twisted

from gateway.crm import altegio
from gateway.errors import Permanent, Retryable
from gateway.httpclient import Response
from gateway.model import POPUP, RECORD, SETUP
from tests.test_clients import RECORD_PAYLOAD, TENANT, act
from tests.test_edge import NoHttp

URL = "http://altegio.test/api/v1/voip/integration"
POPUP_PAYLOAD = {"direction": "incoming", "client": "+79161234567", "did": "74951234567",
                 "extension": "101", "sip": "7001*101", "at": 1}


class Answering:
    """An HTTP client that answers every request with one status, and keeps the requests."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.requests: list[tuple[str, str, dict[str, Any]]] = []

    async def request(self, method: str, url: str, **kwargs: Any) -> Response:
        self.requests.append((method, url, kwargs))
        return Response(self.status, {}, b'{"success": true}', received=0.0)


# Which answers are accepted

@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
@pytest_twisted.ensureDeferred
async def test_every_2xx_answer_is_accepted(status: int) -> None:
    summary, resp = await altegio.perform(Answering(status), TENANT, act(RECORD, RECORD_PAYLOAD))
    assert resp.status == status


@pytest.mark.parametrize("status", [300, 301, 302, 304, 400, 405, 409, 413])
@pytest_twisted.ensureDeferred
async def test_a_3xx_or_an_unlisted_4xx_is_refused_for_good(status: int) -> None:
    """Altegio's API never redirects: a 300 or a 302 is not an acceptance, and only 408 and
    429 among the 4xx can pass by waiting."""
    with pytest.raises(Permanent) as raised:
        await altegio.perform(Answering(status), TENANT, act(RECORD, RECORD_PAYLOAD))
    assert raised.value.status == status
    assert raised.value.message.endswith(f": HTTP {status}")


@pytest.mark.parametrize("status", [408, 429, 500, 503, 599])
@pytest_twisted.ensureDeferred
async def test_a_408_a_429_and_every_5xx_are_retried(status: int) -> None:
    with pytest.raises(Retryable) as raised:
        await altegio.perform(Answering(status), TENANT, act(RECORD, RECORD_PAYLOAD))
    assert raised.value.status == status


# The request summary

@pytest_twisted.ensureDeferred
async def test_a_records_summary_names_the_command_the_type_and_its_call_id() -> None:
    summary, _ = await altegio.perform(Answering(202), TENANT, act(RECORD, RECORD_PAYLOAD))
    assert summary == f"POST {URL} history/incoming call_id=807-c1-S1"


@pytest_twisted.ensureDeferred
async def test_a_popups_summary_has_no_call_id() -> None:
    summary, _ = await altegio.perform(Answering(202), TENANT, act(POPUP, POPUP_PAYLOAD))
    assert summary == f"POST {URL} event/incoming"


@pytest_twisted.ensureDeferred
async def test_a_setups_summary_has_no_call_id() -> None:
    summary, _ = await altegio.perform(Answering(202), TENANT, act(SETUP, {"type": "disable"}))
    assert summary == f"POST {URL} setup/disable"


@pytest_twisted.ensureDeferred
async def test_a_refusal_starts_with_the_summary() -> None:
    with pytest.raises(Permanent) as raised:
        await altegio.perform(Answering(422), TENANT, act(POPUP, POPUP_PAYLOAD))
    assert raised.value.message == f"POST {URL} event/incoming: HTTP 422"


@pytest_twisted.ensureDeferred
async def test_the_request_is_a_post_with_altegios_accept_and_the_partner_token() -> None:
    http = Answering(202)
    await altegio.perform(http, TENANT, act(SETUP, {"type": "enable"}))
    [(method, url, kwargs)] = http.requests
    assert (method.upper(), url) == ("POST", URL)
    headers = {name.lower(): value for name, value in kwargs["headers"].items()}
    assert headers == {"accept": "application/vnd.api.v2+json",
                       "authorization": "Bearer partner"}
    assert kwargs["json"] == {"command": "setup", "type": "enable",
                              "crm_token": TENANT.crm.crm_token}


# The reason a request cannot be built

@pytest_twisted.ensureDeferred
async def test_a_record_without_a_client_number_fails_saying_altegio_requires_phone() -> None:
    with pytest.raises(Permanent) as raised:
        await altegio.perform(NoHttp(), TENANT, act(RECORD, dict(RECORD_PAYLOAD, client="")))
    assert raised.value.message == ("cannot build the request: ValueError: "
                                    "no client number: Altegio requires phone")


@pytest_twisted.ensureDeferred
async def test_the_reason_names_the_error_and_quotes_at_most_200_characters_of_it() -> None:
    zone = "Europe/" + "X" * 300
    tenant = attrs.evolve(TENANT, options={"timezone": zone})
    with pytest.raises(Permanent) as raised:
        await altegio.perform(NoHttp(), tenant, act(RECORD, RECORD_PAYLOAD))
    prefix = "cannot build the request: ZoneInfoNotFoundError: "
    assert raised.value.message.startswith(prefix)
    quoted = raised.value.message[len(prefix):]
    assert len(quoted) == 200
    assert quoted == f"'No time zone found with key {zone}'"[:200]


def test_an_error_without_a_message_is_reported_as_no_detail() -> None:
    assert altegio._reason(ValueError()) == "ValueError: no detail"
    assert altegio._reason(KeyError("type")) == "KeyError: 'type'"
