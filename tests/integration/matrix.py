"""The PBX and CRM sides of the matrix test (test_matrix.py), one driver a module.

A PBX driver starts its fake, gives the tenant's ``pbx`` section, sends the webhooks of an
answered and of a missed incoming call as its PBX would, and reads the calls its fake was
asked to place (click-to-call).  A CRM driver starts its fake, gives the tenant's ``crm``
section, asks for a click-to-call as its CRM would, and reads what its fake holds as
neutral records: ``(outcome, caller digits, extension)``, outcome ``answered`` or
``missed``, extension "" where the CRM keeps none.  A new module is a driver here and a line
in ``PBXS`` or ``CRMS``; the test itself does not change.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Callable

from tests.integration.harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    CRM_TOKEN,
    LOGIN,
    PARTNER_TOKEN,
    TENANT_ID,
    Gateway,
    Processes,
    TelphinCall,
    request,
    start_fake,
    wait_for,
)

# The employees every matrix tenant has: extension → CRM user id.
EMPLOYEES = {"101": "1000005", "102": "1000006"}
DEFAULT_NUMBER = "74951234567"

Step = Callable[[Gateway, str], int]  # sends one webhook; its HTTP status


def digits(number: str) -> str:
    return "".join(c for c in number if c.isdigit())


# PBXs


class TelphinSide:
    kind = "telphin"

    def __init__(self, procs: Processes) -> None:
        self.fake = start_fake(procs, "telphin", "--client", f"{CLIENT_ID}:{CLIENT_SECRET}")
        self.fake.setup(extensions={"200501": "7001*101", "200502": "7001*102"})

    def section(self) -> dict[str, Any]:
        return {"kind": "telphin", "login": LOGIN, "api_url": self.fake.url,
                "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                "extension_ids": {"101": "200501", "102": "200502"}}

    @staticmethod
    def _steps(call: TelphinCall, *steps: tuple[str, dict[str, str]]) -> list[Step]:
        return [lambda gw, key, s=s: gw.event(s[0], s[1], key) for s in steps]

    def answered(self, caller: str, extension: str) -> list[Step]:
        call = TelphinCall(ext=extension, ext_id=f"2005{extension[1:]}", caller=caller)
        return self._steps(call, call.dial_in(), call.answer(),
                           call.hangup("ANSWER", duration_us=12_400_000))

    def missed(self, caller: str, extension: str) -> list[Step]:
        call = TelphinCall(ext=extension, ext_id=f"2005{extension[1:]}", caller=caller)
        return self._steps(call, call.dial_in(), call.hangup("NOANSWER"))

    def placed(self) -> list[tuple[str, str]]:
        """(extension, number) of every click-to-call the fake was asked for."""
        return [(c["extension_name"].split("*")[-1], digits(c["dst_num"]))
                for c in self.fake.state()["callbacks"]]


# CRMs


class AltegioSide:
    kind = "altegio"

    def __init__(self, procs: Processes) -> None:
        self.fake = start_fake(procs, "altegio", "--partner-token", PARTNER_TOKEN)

    def section(self) -> dict[str, Any]:
        return {"kind": "altegio", "api_url": self.fake.url, "partner_token": PARTNER_TOKEN,
                "crm_token": CRM_TOKEN}

    def enabled(self) -> bool:
        return CRM_TOKEN in self.fake.state()["enabled"]

    def records(self) -> list[tuple[str, str, str]]:
        return [("answered" if h["status"] == "success" else "missed", digits(h["phone"]),
                 h["user"]) for h in self.fake.received("history")]

    def click(self, gw: Gateway, key: str, extension: str, number: str) -> int:
        return plain_click(gw, key, extension, number)


class MegaplanSide:
    kind = "megaplan"
    USER, PASSWORD = "robot@acme.ru", "S3cret-of-the-robot"

    def __init__(self, procs: Processes) -> None:
        self.fake = start_fake(procs, "megaplan", "--username", self.USER,
                               "--password", self.PASSWORD)
        self.fake.setup(employees=[
            {"id": user, "name": f"Employee {ext}", "internalNumber": ext}
            for ext, user in EMPLOYEES.items()])

    def section(self) -> dict[str, Any]:
        return {"kind": "megaplan", "domain": self.fake.domain, "login": self.USER,
                "password": self.PASSWORD, "create_client": True}

    def enabled(self) -> bool:
        return any(r["path"] == "/api/v3/callUserConfig"
                   for r in self.fake.state()["requests"])

    def records(self) -> list[tuple[str, str, str]]:
        """Finished CallInfos: ``in`` answered, ``miss`` missed (each ringing employee's
        card, and the history of a call nobody took)."""
        users = {user: ext for ext, user in EMPLOYEES.items()}
        out = []
        for call in self.fake.calls():
            entity = call["entity"]
            if entity.get("state") != "finished" or entity.get("type") not in ("in", "miss"):
                continue
            user = (entity.get("toUser") or {}).get("id", "")
            out.append(("answered" if entity["type"] == "in" else "missed",
                        digits(entity.get("fromPhone") or ""), users.get(user, "")))
        return out

    def click(self, gw: Gateway, key: str, extension: str, number: str) -> int:
        return plain_click(gw, key, extension, number)


def plain_click(gw: Gateway, key: str, extension: str, number: str) -> int:
    """The gateway's own click-to-call form (a CRM button or robot configured with it)."""
    status, _ = request(gw.port, "POST", f"/crm/{TENANT_ID}/makecall/{LOGIN}?key={key}",
                        json.dumps({"employee": extension, "number": number}).encode(),
                        {"Content-Type": "application/json"})
    return status


PBXS: dict[str, type] = {"telphin": TelphinSide}
CRMS: dict[str, type] = {"altegio": AltegioSide, "megaplan": MegaplanSide}


class Pair:
    """A gateway with tenant 807 wired to one PBX fake and one CRM fake."""

    def __init__(self, procs: Processes, pbx: str, crm: str) -> None:
        self.pbx = PBXS[pbx](procs)
        self.crm = CRMS[crm](procs)
        self.gateway = Gateway(procs, procs.tmp,
                               env={"GATEWAY_ALLOW_LOOPBACK_CRM": "1"}).start()
        self.key = secrets.token_urlsafe(24)
        status, body = self.gateway.admin("POST", "/api/v1/tenants", {
            "id": TENANT_ID, "name": "ACME", "key": self.key, "pbx": self.pbx.section(),
            "crm": self.crm.section(), "employees": EMPLOYEES,
            "options": {"default_number": DEFAULT_NUMBER}})
        assert status == 201, body
        wait_for(self.crm.enabled, 15, f"the {crm} integration switched on")

    def send(self, steps: list[Step]) -> None:
        for step in steps:
            status = step(self.gateway, self.key)
            assert status == 200, status

    def settled(self, timeout: float) -> dict[str, Any]:
        """Until nothing is left to fold or deliver and nothing is in flight, twice."""
        seen: list[bool] = []

        def quiet() -> dict[str, Any] | None:
            status, body = self.gateway.healthz()
            seen.append(status == 200 and body["outbox_depth"] == 0
                        and body["fold_lag_events"] == 0 and body["in_flight"] == 0)
            return body if seen[-2:] == [True, True] else None
        return wait_for(quiet, timeout, "the outbox to drain", interval=0.3)
