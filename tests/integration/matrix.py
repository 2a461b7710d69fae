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
import time
from typing import Any, Callable
from urllib.parse import urlencode

from gateway.protocols import callgear
from tests.fakes import callgear as callgear_fake
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


class MegaFonSide:
    """MegaFon's one CRM URL: every command a form with ``cmd`` and ``crm_token``."""

    kind = "megafon"
    TOKEN, API_KEY, CRM_TOKEN = "legacy-key-0123456789", "rest-key-0123456789", \
        "crm-token-0123456789abcdef"
    USERS = {"101": "ivanov", "102": "petrov"}

    def __init__(self, procs: Processes) -> None:
        self.fake = start_fake(procs, "megafon", "--token", self.TOKEN, "--api-key",
                               self.API_KEY, "--crm-token", self.CRM_TOKEN)

    def section(self) -> dict[str, Any]:
        return {"kind": "megafon", "login": LOGIN, "api_url": self.fake.url,
                "crm_token": self.CRM_TOKEN, "token": self.TOKEN, "api": "legacy"}

    def _steps(self, *commands: dict[str, str]) -> list[Step]:
        def post(fields: dict[str, str]) -> Step:
            return lambda gw, key: request(
                gw.port, "POST", f"/vats/{TENANT_ID}/crm/{LOGIN}",
                urlencode({**fields, "crm_token": self.CRM_TOKEN}).encode(),
                {"Content-Type": "application/x-www-form-urlencoded"})[0]
        return [post(c) for c in commands]

    def _call(self, caller: str, extension: str) -> tuple[str, Callable[..., dict[str, str]]]:
        callid = secrets.token_hex(8)

        def command(cmd: str, **fields: str) -> dict[str, str]:
            return {"cmd": cmd, "phone": digits(caller), "diversion": DEFAULT_NUMBER,
                    "user": self.USERS[extension], "ext": extension, "callid": callid,
                    **fields}
        return callid, command

    def answered(self, caller: str, extension: str) -> list[Step]:
        _, command = self._call(caller, extension)
        return self._steps(
            command("event", type="INCOMING"), command("event", type="ACCEPTED"),
            command("event", type="COMPLETED"),
            command("history", type="in", status="Success", start=utc_stamp(),
                    wait="3", duration="15"))

    def missed(self, caller: str, extension: str) -> list[Step]:
        _, command = self._call(caller, extension)
        return self._steps(
            command("event", type="INCOMING"), command("event", type="CANCELLED"),
            command("history", type="in", status="missed", start=utc_stamp(), wait="20",
                    duration="20"))

    def placed(self) -> list[tuple[str, str]]:
        users = {user: ext for ext, user in self.USERS.items()}
        return [(users.get(c["user"], c["user"]), digits(c["phone"]))
                for c in self.fake.state()["calls"]]


class CallGearSide:
    """CallGear's eight HTTP notifications (JSON from the customer's templates) and its
    Call API for click-to-call."""

    kind = "callgear"
    API_KEY = "cg-api-key-0123456789"
    EMPLOYEES = {"101": 5001, "102": 5002}

    def __init__(self, procs: Processes) -> None:
        self.fake = start_fake(procs, "callgear", "--api-key", self.API_KEY,
                               "--virtual-number", DEFAULT_NUMBER,
                               *(f"--employee={i}={ext}" for ext, i in self.EMPLOYEES.items()))

    def section(self) -> dict[str, Any]:
        return {"kind": "callgear", "login": LOGIN, "call_api_url": f"{self.fake.url}/v4.0",
                "data_api_url": f"{self.fake.url}/v2.0", "access_token": self.API_KEY,
                "virtual_number": DEFAULT_NUMBER,
                "extensions": {str(i): ext for ext, i in self.EMPLOYEES.items()}}

    @staticmethod
    def _steps(script: list[tuple[str, dict[str, Any]]]) -> list[Step]:
        def post(event: str, values: dict[str, Any]) -> Step:
            return lambda gw, key: request(
                gw.port, "POST", f"/notify/{TENANT_ID}/{event}/{LOGIN}?key={key}",
                callgear_fake.render(callgear.template(event), values),
                {"Content-Type": "application/json"})[0]
        return [post(event, values) for event, values in script]

    def answered(self, caller: str, extension: str) -> list[Step]:
        return self._steps(callgear_fake.answered_call(
            secrets.randbelow(10**9), digits(caller), DEFAULT_NUMBER,
            self.EMPLOYEES[extension], 15, day=time.strftime("%Y-%m-%d", time.gmtime())))

    def missed(self, caller: str, extension: str) -> list[Step]:
        return self._steps(callgear_fake.lost_call(
            secrets.randbelow(10**9), digits(caller), DEFAULT_NUMBER,
            [self.EMPLOYEES[extension]], day=time.strftime("%Y-%m-%d", time.gmtime())))

    def placed(self) -> list[tuple[str, str]]:
        extensions = {i: ext for ext, i in self.EMPLOYEES.items()}
        return [(extensions.get(c["params"]["employee"]["id"], "?"),
                 digits(c["params"]["contact"])) for c in self.fake.state()["calls"]]


def utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


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
                 h.get("user", "")) for h in self.fake.received("history")]

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


class PlanfixSide:
    """Planfix's telephony API: the gateway is its PBX (form-encoded both ways)."""

    kind = "planfix"
    PLANFIX_TOKEN, PBX_TOKEN = "pf-token-0123456789", "pbx-token-0123456789abcdef"

    def __init__(self, procs: Processes) -> None:
        self.fake = start_fake(procs, "planfix", "--planfix-token", self.PLANFIX_TOKEN,
                               "--pbx-token", self.PBX_TOKEN)

    def section(self) -> dict[str, Any]:
        return {"kind": "planfix", "planfix_url": f"{self.fake.url}/tel/api",
                "planfix_token": self.PLANFIX_TOKEN, "token": self.PBX_TOKEN}

    def enabled(self) -> bool:
        return any("cmd=ping" in r["raw"].split("&") and r["status"] == 200
                   for r in self.fake.state()["requests"])

    def records(self) -> list[tuple[str, str, str]]:
        """The final COMPLETED of each extension (Planfix's call history)."""
        out = []
        for finals in self.fake.state()["completed"].values():
            for f in finals:
                if f.get("status") in ("Success", "Missed"):
                    out.append(("answered" if f["status"] == "Success" else "missed",
                                digits(f.get("phone", "")), f.get("ext", "")))
        return out

    def click(self, gw: Gateway, key: str, extension: str, number: str) -> int:
        status, _ = request(gw.port, "POST", f"/crm/{TENANT_ID}/pbx/{LOGIN}", urlencode({
            "cmd": "makeCall", "from": extension, "to": number,
            "token": self.PBX_TOKEN}).encode(),
            {"Content-Type": "application/x-www-form-urlencoded"})
        return status


def plain_click(gw: Gateway, key: str, extension: str, number: str) -> int:
    """The gateway's own click-to-call form (a CRM button or robot configured with it)."""
    status, _ = request(gw.port, "POST", f"/crm/{TENANT_ID}/makecall/{LOGIN}?key={key}",
                        json.dumps({"employee": extension, "number": number}).encode(),
                        {"Content-Type": "application/json"})
    return status


PBXS: dict[str, type] = {"telphin": TelphinSide, "megafon": MegaFonSide,
                         "callgear": CallGearSide}
CRMS: dict[str, type] = {"altegio": AltegioSide, "megaplan": MegaplanSide,
                         "planfix": PlanfixSide}


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
