"""Tenant authentication: the keys that verify signed requests, `opstream keys`.

The signing scheme itself is part of the contract: `schemas.signing`.
"""

from consumer.auth.keys import (
    AuthSettings,
    KeyRing,
    SettingsWithAuth,
    TenantKey,
    append_key,
    auth_required,
    read_keys_file,
)

__all__ = [
    "AuthSettings",
    "KeyRing",
    "SettingsWithAuth",
    "TenantKey",
    "append_key",
    "auth_required",
    "read_keys_file",
]
