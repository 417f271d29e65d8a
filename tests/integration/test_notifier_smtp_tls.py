"""SMTP with STARTTLS and a login (CONTRACT §6), against an aiosmtpd server that insists on both.

The service has no setting of its own for the relay's CA: aiosmtplib verifies the certificate
against OpenSSL's default trust store, which ``SSL_CERT_FILE`` points elsewhere (for the
process). The test does the same with a certificate it makes itself, so verification stays on.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from structlog.testing import capture_logs

from tests.integration.conftest import NotifierFactory
from tests.integration.notifier_support import SmtpServer, crafted_event, publish_event
from tests.support import EventLog, event_log

USERNAME, PASSWORD = "mailer", "relay-password-7f3a"
STARTTLS_LOGIN = {"smtp_starttls": True, "smtp_username": USERNAME, "smtp_password": PASSWORD}
"""How the notifier is set up to reach the TLS relay, short of its port."""


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own issuer, and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "otp test relay")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "relay.crt", folder / "relay.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def authenticate(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    good = isinstance(auth_data, LoginPassword) and auth_data == LoginPassword(
        USERNAME.encode(), PASSWORD.encode()
    )
    return AuthResult(success=good, auth_data=USERNAME if good else None)


@pytest.fixture
async def tls_smtp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SmtpServer]:
    cert, key = self_signed_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the notifier's trust store, this test only
    server = SmtpServer(
        tls_context=context,
        require_starttls=True,
        auth_required=True,
        auth_require_tls=True,
        authenticator=authenticate,
    )
    server.start()
    yield server
    server.stop()


def settled(events: EventLog) -> bool:
    return bool(events.named("code.delivered") or events.named("code.delivery_failed"))


async def test_mail_goes_through_starttls_and_a_login(
    amqp_url: str, start_notifier: NotifierFactory, tls_smtp: SmtpServer
) -> None:
    with capture_logs() as logs:
        await start_notifier(smtp_port=tls_smtp.port, **STARTTLS_LOGIN)
        async with event_log(amqp_url) as events:
            await publish_event(amqp_url, crafted_event("428571"))
            await events.wait_for(settled)
    assert not events.named("code.delivery_failed")
    assert [d["attempts"] for d in events.named("code.delivered")] == [1]
    [mail] = tls_smtp.mails
    assert "428571" in mail.text
    assert mail.tls, "the mail was sent before STARTTLS"
    assert mail.login == USERNAME
    assert PASSWORD not in repr(logs)


async def test_a_relay_certificate_nobody_trusts_gets_no_mail(
    amqp_url: str,
    start_notifier: NotifierFactory,
    tls_smtp: SmtpServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "other").mkdir()
    other, _ = self_signed_certificate(tmp_path / "other")
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    await start_notifier(
        notifier_max_attempts=1,  # a verification failure counts as transient: no waiting
        smtp_port=tls_smtp.port,
        **STARTTLS_LOGIN,
    )
    async with event_log(amqp_url) as events:
        await publish_event(amqp_url, crafted_event("857142"))
        await events.wait_for(settled)
    assert tls_smtp.mails == []
    [failed] = events.named("code.delivery_failed")
    assert "SSLCertVerificationError" in failed["reason"]
