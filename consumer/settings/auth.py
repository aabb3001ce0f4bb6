"""How requests prove their tenant: signing keys, the accepted clock skew, scheme versions."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter

# Twelve hours: so a signature may age half a day, by the consumer's clock, before it
# outlives the replay guard (`consumer.auth.keys.REPLAY_MEMORY_S`).
MAX_SKEW_S = 12 * 3600

IdStr = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]


class TenantKey(BaseModel):
    """One signing key of a tenant. A tenant has several while a key is rotated."""

    # A failed validation must not echo a secret back into a log or a terminal.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    key_id: IdStr
    # Length is checked by `KeyRing`, not here: a failed field check would print the value.
    secret: SecretStr
    created_at: datetime | None = None


TenantKeys = dict[IdStr, list[TenantKey]]
TENANT_KEYS = TypeAdapter(TenantKeys, config=ConfigDict(hide_input_in_errors=True))


class AuthSettings(BaseModel):
    """How requests prove their tenant (`Settings.auth`, env `OPSTREAM_AUTH__*`).

    `keys` is tenant → [{key_id, secret}], e.g.
    `OPSTREAM_AUTH__KEYS='{"acme": [{"key_id": "key_1", "secret": "..."}]}'`; it is merged
    with `keys_file` (same shape, TOML or JSON). Key ids are unique across all tenants.
    """

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    required: bool = Field(
        default=True, description="False disables signature checks; only the dev profile may."
    )
    keys_file: Path | None = Field(
        default=None, description="TOML or JSON file: tenant → list of {key_id, secret}."
    )
    keys: TenantKeys = Field(default_factory=dict)
    max_skew_s: int = Field(
        default=300,
        ge=1,
        le=MAX_SKEW_S,
        description="Accepted difference, ± seconds, between a request's signature timestamp "
        "and its record's Kafka timestamp (and how far ahead of the consumer's clock it may be).",
    )
    accept_v1_signatures: bool = Field(
        default=True,
        description="Accept scheme opstream-hmac-v1 (does not sign the reply route) during "
        "the migration to v2; set false once every producer signs v2.",
    )
