"""Tenant authentication: the keys that verify signed requests, `opstream keys`.

The signing scheme itself is part of the contract: `schemas.signing`. Names are imported
from their modules on first use (PEP 562), so importing the package stays cheap.
"""

from __future__ import annotations

from consumer.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "AuthSettings": "consumer.settings.auth",
    "KeyRing": "consumer.auth.keys",
    "SettingsWithAuth": "consumer.auth.keys",
    "TenantKey": "consumer.settings.auth",
    "append_key": "consumer.auth.keys_file",
    "auth_required": "consumer.auth.keys",
    "is_private": "consumer.auth.keys_file",
    "read_keys_file": "consumer.auth.keys_file",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
