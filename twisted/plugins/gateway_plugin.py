"""The ``twistd gateway`` plugin: no logic, see gateway/tap.py."""

from twisted.application.service import ServiceMaker

gateway = ServiceMaker("PBX-CRM gateway", "gateway.tap",
                       "Telephony integration gateway (PBX events to CRMs)", "gateway")
