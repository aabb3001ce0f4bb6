"""Kafka TLS/SASL settings become the right aiokafka kwargs and FastStream security objects."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from faststream.kafka.security import parse_security
from faststream.security import SASLPlaintext, SASLScram256, SASLScram512
from pydantic import ValidationError

from consumer.bus.security import (
    KafkaSecuritySettings,
    aiokafka_security_kwargs,
    build_ssl_context,
    faststream_security,
)

KEY_PASSWORD = "client-key-passphrase"


class Pki:
    """A throwaway CA, a server certificate for `localhost` and a client certificate."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_cert = root / "ca.pem"
        self.ca_key = root / "ca.key"
        self.server_cert = root / "server.pem"
        self.server_key = root / "server.key"
        self.client_cert = root / "client.pem"
        self.client_key = root / "client.key"


def openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    pki = Pki(tmp_path_factory.mktemp("pki"))
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")
    openssl("req", "-x509", *ec, "-nodes", "-keyout", pki.ca_key, "-out", pki.ca_cert,
            "-days", "2", "-subj", "/CN=opstream test CA", cwd=pki.root)  # fmt: skip
    for name, subject, key_args in (
        ("server", "/CN=localhost", ("-nodes",)),
        ("client", "/CN=opstream-client", ("-passout", f"pass:{KEY_PASSWORD}")),
    ):
        openssl("req", *ec, *key_args, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", subject, cwd=pki.root)  # fmt: skip
        (pki.root / f"{name}.ext").write_text("subjectAltName=DNS:localhost\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", pki.ca_cert, "-CAkey", pki.ca_key,
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                "-out", f"{name}.pem", cwd=pki.root)  # fmt: skip
    return pki


def tls_settings(pki: Pki, **overrides: Any) -> KafkaSecuritySettings:
    fields: dict[str, Any] = {
        "security_protocol": "SSL",
        "ssl_cafile": pki.ca_cert,
        "ssl_certfile": pki.client_cert,
        "ssl_keyfile": pki.client_key,
        "ssl_password": KEY_PASSWORD,
    }
    return KafkaSecuritySettings(**(fields | overrides))


def test_plaintext_is_the_default_and_adds_nothing() -> None:
    settings = KafkaSecuritySettings()
    assert aiokafka_security_kwargs(settings) == {"security_protocol": "PLAINTEXT"}
    assert faststream_security(settings) is None


@pytest.mark.parametrize(
    ("mechanism", "expected_class"),
    [("PLAIN", SASLPlaintext), ("SCRAM-SHA-256", SASLScram256), ("SCRAM-SHA-512", SASLScram512)],
)
def test_sasl_plaintext_passes_mechanism_and_credentials(
    mechanism: str, expected_class: type
) -> None:
    settings = KafkaSecuritySettings(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=mechanism,
        sasl_username="opstream",
        sasl_password="broker-password",
    )
    assert aiokafka_security_kwargs(settings) == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "opstream",
        "sasl_plain_password": "broker-password",
    }
    security = faststream_security(settings)
    assert type(security) is expected_class
    # FastStream turns its object into the same aiokafka arguments.
    assert parse_security(security) == {
        **aiokafka_security_kwargs(settings),
        "ssl_context": None,
    }


def test_ssl_builds_a_context_with_the_ca_and_client_certificate(pki: Pki) -> None:
    kwargs = aiokafka_security_kwargs(tls_settings(pki))
    assert kwargs["security_protocol"] == "SSL"
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    subjects = [str(ca["subject"]) for ca in context.get_ca_certs()]
    assert any("opstream test CA" in subject for subject in subjects)


def test_sasl_ssl_gives_context_and_credentials_to_both_clients(pki: Pki) -> None:
    settings = tls_settings(
        pki,
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="opstream",
        sasl_password="broker-password",
    )
    kwargs = aiokafka_security_kwargs(settings)
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    parsed = parse_security(faststream_security(settings))
    assert parsed["security_protocol"] == "SASL_SSL"
    assert parsed["sasl_mechanism"] == "SCRAM-SHA-512"
    assert isinstance(parsed["ssl_context"], ssl.SSLContext)


def test_ssl_without_sasl_is_faststream_base_security_with_tls(pki: Pki) -> None:
    parsed = parse_security(faststream_security(tls_settings(pki)))
    assert parsed["security_protocol"] == "SSL"
    assert isinstance(parsed["ssl_context"], ssl.SSLContext)


def test_wrong_client_key_passphrase_fails_to_load(pki: Pki) -> None:
    with pytest.raises(ssl.SSLError):
        build_ssl_context(tls_settings(pki, ssl_password="wrong-passphrase"))


async def handshake(pki: Pki, client: ssl.SSLContext, server_hostname: str) -> bytes:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki.ca_cert)
    server_context.load_cert_chain(pki.server_cert, pki.server_key)
    server_context.verify_mode = ssl.CERT_REQUIRED  # mTLS: the client must present its cert

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=server_hostname),
            timeout=5,
        )
        data = await asyncio.wait_for(reader.read(5), timeout=5)
        writer.close()
        return data
    finally:
        server.close()


async def test_tls_context_completes_a_mutual_tls_handshake(pki: Pki) -> None:
    assert await handshake(pki, build_ssl_context(tls_settings(pki)), "localhost") == b"hello"


async def test_hostname_is_checked_unless_switched_off(pki: Pki) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(pki, build_ssl_context(tls_settings(pki)), "broker.example")
    relaxed = build_ssl_context(tls_settings(pki, ssl_check_hostname=False))
    assert await handshake(pki, relaxed, "broker.example") == b"hello"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"security_protocol": "SASL_SSL"}, "needs sasl_username"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_username": "u"}, "sasl_password"),
        ({"ssl_cafile": "/etc/ca.pem"}, "security_protocol is PLAINTEXT"),
        ({"security_protocol": "SSL", "ssl_keyfile": "/k.pem"}, "needs ssl_certfile"),
    ],
)
def test_half_configured_security_is_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        KafkaSecuritySettings(**fields)


def test_passwords_do_not_appear_in_reprs_or_errors() -> None:
    settings = KafkaSecuritySettings(
        security_protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password="broker-password"
    )
    assert "broker-password" not in repr(settings)
    with pytest.raises(ValidationError) as caught:
        KafkaSecuritySettings(sasl_password="broker-password", security_protocol="BOGUS")
    assert "broker-password" not in str(caught.value)
