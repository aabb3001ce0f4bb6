"""Where the Kafka brokers are and how to reach them: one object every Kafka client takes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from consumer.settings.kafka import KafkaSecuritySettings


@dataclass(frozen=True, slots=True)
class KafkaConnection:
    """Bootstrap servers plus the TLS/SASL arguments, built once from settings and passed
    whole to every producer, consumer and admin client (instead of each argument apart)."""

    bootstrap_servers: str
    security: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, bootstrap_servers: str, security: KafkaSecuritySettings) -> KafkaConnection:
        """The connection for these servers with the security `security` configures."""
        from consumer.bus.security import aiokafka_security_kwargs

        return cls(bootstrap_servers, aiokafka_security_kwargs(security))

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient."""
        return {"bootstrap_servers": self.bootstrap_servers, **self.security}
