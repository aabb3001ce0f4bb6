"""How to reach the broker: addresses, consumer-group timing, TLS and SASL."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class KafkaSettings(BaseModel):
    """How to reach the broker. Security (TLS/SASL) lives in `security`."""

    model_config = ConfigDict(extra="forbid")

    bootstrap_servers: str | None = Field(
        default=None,
        description="host:port[,host:port]. Unset: `opstream dev` starts an embedded broker.",
    )
    client_id: str = "opstream"
    group_id: str = "opstream"
    # Real Kafka answers a fetch as soon as data arrives; the local Tansu broker
    # waits the whole interval, so dev and tests keep this small.
    fetch_max_wait_ms: int = Field(default=500, ge=0, le=30_000)
    session_timeout_ms: int = Field(default=10_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=1_000)
    request_timeout_ms: int = Field(default=40_000, ge=1_000)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"


TLS_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})
SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})


class KafkaSecuritySettings(BaseModel):
    """How opstream authenticates to and encrypts traffic with the broker (`Settings.security`).

    Env: `OPSTREAM_SECURITY__SECURITY_PROTOCOL=SASL_SSL`, `OPSTREAM_SECURITY__SASL_USERNAME`, ….
    TLS fields are refused under a plaintext protocol so a half-configured TLS setup fails
    loudly instead of silently sending in the clear.
    """

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    security_protocol: SecurityProtocol = "PLAINTEXT"
    ssl_cafile: Path | None = Field(
        default=None, description="CA bundle (PEM) for the broker; unset: the system's CAs."
    )
    ssl_certfile: Path | None = Field(default=None, description="client certificate (PEM, mTLS)")
    ssl_keyfile: Path | None = Field(default=None, description="client private key (PEM, mTLS)")
    ssl_password: SecretStr | None = Field(default=None, description="client key passphrase")
    ssl_check_hostname: bool = True
    sasl_mechanism: SaslMechanism = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSecuritySettings:
        tls_fields = [
            name
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password")
            if getattr(self, name) is not None
        ]
        if tls_fields and self.security_protocol not in TLS_PROTOCOLS:
            raise ValueError(
                f"{', '.join(tls_fields)} set but security_protocol is {self.security_protocol};"
                " use SSL or SASL_SSL"
            )
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("ssl_keyfile needs ssl_certfile")
        if self.security_protocol in SASL_PROTOCOLS and (
            not self.sasl_username or self.sasl_password is None
        ):
            raise ValueError(f"{self.security_protocol} needs sasl_username and sasl_password")
        return self

    @property
    def uses_tls(self) -> bool:
        """Whether connections are encrypted."""
        return self.security_protocol in TLS_PROTOCOLS

    @property
    def uses_sasl(self) -> bool:
        """Whether the client authenticates with SASL."""
        return self.security_protocol in SASL_PROTOCOLS
