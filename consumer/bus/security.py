"""TLS and SASL for every Kafka connection: settings, aiokafka kwargs, FastStream `security=`."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

from aiokafka.helpers import create_ssl_context
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

_TLS_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})
_SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})
_SASL_CLASSES: dict[str, type[SASLPlaintext] | type[SASLScram256] | type[SASLScram512]] = {
    "PLAIN": SASLPlaintext,
    "SCRAM-SHA-256": SASLScram256,
    "SCRAM-SHA-512": SASLScram512,
}


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
        if tls_fields and self.security_protocol not in _TLS_PROTOCOLS:
            raise ValueError(
                f"{', '.join(tls_fields)} set but security_protocol is {self.security_protocol};"
                " use SSL or SASL_SSL"
            )
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("ssl_keyfile needs ssl_certfile")
        if self.security_protocol in _SASL_PROTOCOLS and (
            not self.sasl_username or self.sasl_password is None
        ):
            raise ValueError(f"{self.security_protocol} needs sasl_username and sasl_password")
        return self

    @property
    def uses_tls(self) -> bool:
        """Whether connections are encrypted."""
        return self.security_protocol in _TLS_PROTOCOLS

    @property
    def uses_sasl(self) -> bool:
        """Whether the client authenticates with SASL."""
        return self.security_protocol in _SASL_PROTOCOLS


def build_ssl_context(settings: KafkaSecuritySettings) -> ssl.SSLContext:
    """A client TLS context: broker CA, optional client certificate, hostname checking."""
    password = settings.ssl_password.get_secret_value() if settings.ssl_password else None
    context = create_ssl_context(
        cafile=settings.ssl_cafile,
        certfile=settings.ssl_certfile,
        keyfile=settings.ssl_keyfile,
        password=password,
    )
    # Off only for brokers reached by a name their certificate lacks (e.g. an IP); the
    # chain is still verified against the CA (verify_mode stays CERT_REQUIRED).
    context.check_hostname = settings.ssl_check_hostname
    return context


def aiokafka_security_kwargs(settings: KafkaSecuritySettings) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient."""
    kwargs: dict[str, Any] = {"security_protocol": settings.security_protocol}
    if settings.uses_tls:
        kwargs["ssl_context"] = build_ssl_context(settings)
    if settings.uses_sasl:
        assert settings.sasl_password is not None  # the validator guarantees it
        # aiokafka takes SCRAM credentials through the sasl_plain_* arguments too.
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    return kwargs


def faststream_security(settings: KafkaSecuritySettings) -> BaseSecurity | None:
    """The `security=` object for `KafkaBroker`; None for PLAINTEXT."""
    if settings.security_protocol == "PLAINTEXT":
        return None
    context = build_ssl_context(settings) if settings.uses_tls else None
    if not settings.uses_sasl:
        return BaseSecurity(ssl_context=context, use_ssl=True)
    assert settings.sasl_username is not None and settings.sasl_password is not None
    sasl_class = _SASL_CLASSES[settings.sasl_mechanism]
    return sasl_class(
        username=settings.sasl_username,
        password=settings.sasl_password.get_secret_value(),
        ssl_context=context,
        use_ssl=settings.uses_tls,
    )
