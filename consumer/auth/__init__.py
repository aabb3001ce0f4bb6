"""Tenant authentication: HMAC-signed requests, the keys that verify them, `opstream keys`."""

from consumer.auth.keys import (
    AuthSettings,
    KeyRing,
    SettingsWithAuth,
    TenantKey,
    append_key,
    auth_required,
    read_keys_file,
)
from consumer.auth.signature import (
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    SIGNATURE_HEADERS,
    TIMESTAMP_HEADER,
    VERSION_HEADER,
    sign,
    signing_input,
    signing_input_v2,
)

__all__ = [
    "KEY_ID_HEADER",
    "SIGNATURE_HEADER",
    "SIGNATURE_HEADERS",
    "TIMESTAMP_HEADER",
    "VERSION_HEADER",
    "AuthSettings",
    "KeyRing",
    "SettingsWithAuth",
    "TenantKey",
    "append_key",
    "auth_required",
    "read_keys_file",
    "sign",
    "signing_input",
    "signing_input_v2",
]
