"""TLS and SASL for every Kafka connection: settings, aiokafka kwargs, FastStream `security=`."""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka.helpers import create_ssl_context
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from consumer.settings.kafka import KafkaSecuritySettings

_SASL_CLASSES: dict[str, type[SASLPlaintext] | type[SASLScram256] | type[SASLScram512]] = {
    "PLAIN": SASLPlaintext,
    "SCRAM-SHA-256": SASLScram256,
    "SCRAM-SHA-512": SASLScram512,
}


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
