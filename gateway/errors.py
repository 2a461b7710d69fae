"""The errors the gateway's parts raise to each other, as values a caller can act on."""

import attrs


@attrs.define
class BadRequest(Exception):
    """Input from outside (a webhook, an admin request) is wrong; ``field`` names what."""

    field: str
    message: str
    status: int = 400

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


@attrs.define
class Retryable(Exception):
    """A remote call failed in a way that may pass later (network, timeout, 5xx, 429)."""

    message: str
    status: int | None = None
    answer: str = ""
    retry_after: float | None = None

    def __str__(self) -> str:
        return self.message


@attrs.define
class Permanent(Exception):
    """A remote service refused the request for good (most 4xx); retrying will not help."""

    message: str
    status: int | None = None
    answer: str = ""

    def __str__(self) -> str:
        return self.message
