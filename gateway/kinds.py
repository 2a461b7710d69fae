"""A registry of modules by ``kind``: one for PBXs (gateway/protocols), one for CRMs
(gateway/crm).  Modules are imported when first asked for, so importing a registry (model.py
does) imports no PBX or CRM module.  Stored tenants keep each side's config as plain JSON;
``load_config`` turns it back into the value the module's schema built."""

from __future__ import annotations

import importlib
from typing import Any

import attrs

from gateway.errors import BadRequest


@attrs.frozen
class Registry:
    section: str  # the tenant field it validates: "pbx" or "crm"
    kinds: dict[str, str]  # kind → "module:class"

    def type(self, kind: str) -> Any:
        """The class registered for ``kind`` (KeyError if none)."""
        module, name = self.kinds[kind].split(":")
        return getattr(importlib.import_module(module), name)

    def parse_config(self, section: Any) -> Any:
        """A tenant's section validated by its kind's module."""
        if not isinstance(section, dict):
            raise BadRequest(self.section, "required: an object")
        kind = section.get("kind")
        if not isinstance(kind, str) or kind not in self.kinds:
            raise BadRequest(f"{self.section}.kind", f"must be one of {', '.join(self.kinds)}")
        return self.type(kind).parse_config(section)

    def load_config(self, data: dict[str, Any]) -> Any:
        """A stored section (trusted: it was validated when written)."""
        return load(self.type(data["kind"]).config_type, data)


def load(cls: Any, data: dict[str, Any]) -> Any:
    """An attrs config value from its JSON form: lists become tuples where the class says
    tuple, and fields the class no longer has are ignored."""
    fields = {f.name: f for f in attrs.fields(cls)}
    values = {}
    for name, value in data.items():
        if name in fields:
            if isinstance(value, list) and fields[name].default is not attrs.NOTHING \
                    and isinstance(fields[name].default, tuple):
                value = tuple(value)
            values[name] = value
    return cls(**values)
