"""Rendering from the built-in and operator templates, with no I/O beyond the template files."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from contracts.events import CodeIssued
from worker.notifier.render import Renderer, TemplateProblem, locale_chain

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

# GSM 03.38 basic character set; anything outside it (or in the extension table) would push a
# message to UCS-2 or cost two septets.
GSM7 = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)


def issued(**overrides: Any) -> CodeIssued:
    values: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "occurred_at": NOW,
        "code_id": str(uuid.uuid4()),
        "user": "alice",
        "client": "test-app",
        "purpose": "login",
        "channel": "email",
        "destination": "alice@example.org",
        "locale": "en",
        "context": {},
        "expires_at": NOW + timedelta(minutes=5),
        "resent": False,
        "sealed_code": "sealed",
    }
    values.update(overrides)
    return CodeIssued(**values)


@pytest.mark.parametrize(
    ("locale", "chain"),
    [
        ("de-AT", ["de-at", "de", "en"]),
        ("en", ["en"]),
        ("fr", ["fr", "en"]),
        ("../../etc", ["en"]),
        ("", ["en"]),
    ],
)
def test_locale_chain(locale: str, chain: list[str]) -> None:
    assert locale_chain(locale) == chain


def test_english_email_has_code_subject_and_both_parts() -> None:
    mail = Renderer().email(issued(context={"app_name": "Acme"}), "123456", NOW)
    assert mail.subject == "Your Acme verification code"
    assert "123456" in mail.text
    assert "123456" in mail.html
    assert "5 minutes" in mail.text
    assert "<html" in mail.html


@pytest.mark.parametrize("locale", ["de", "de-AT", "DE_ch"])
def test_german_locales_fall_back_to_german(locale: str) -> None:
    mail = Renderer().email(issued(locale=locale), "654321", NOW)
    assert mail.subject == "Ihr Bestätigungscode für test-app"
    assert "654321" in mail.text


def test_unknown_locale_falls_back_to_english() -> None:
    mail = Renderer().email(issued(locale="fr-FR"), "111111", NOW)
    assert mail.subject.startswith("Your ")


def test_html_escapes_values_from_other_services() -> None:
    mail = Renderer().email(issued(user="<script>x</script>"), "123456", NOW)
    assert "<script>" not in mail.html
    assert "&lt;script&gt;" in mail.html
    assert "<script>x</script>" in mail.text


@pytest.mark.parametrize("locale", ["en", "de"])
def test_builtin_sms_fits_one_gsm7_message(locale: str) -> None:
    worst = issued(
        channel="sms",
        locale=locale,
        user="u" * 256,
        client="c" * 128,
        context={"app_name": "A" * 256},
        expires_at=NOW + timedelta(days=1),
    )
    text = Renderer().sms(worst, "9" * 10, NOW).text
    assert "9" * 10 in text
    assert len(text) <= 160
    assert set(text) <= GSM7, set(text) - GSM7


def test_operator_templates_override_per_purpose(tmp_path: Path) -> None:
    (tmp_path / "en" / "sms").mkdir(parents=True)
    (tmp_path / "en" / "sms" / "reset.txt").write_text("Reset {{ code }} for {{ context.app }}")
    renderer = Renderer(tmp_path)
    reset = renderer.sms(issued(purpose="reset", context={"app": "Acme"}), "123456", NOW)
    assert reset.text == "Reset 123456 for Acme"
    login = renderer.sms(issued(purpose="login"), "123456", NOW)
    assert login.text.startswith("123456 is your test-app code")


def test_sandbox_and_strict_undefined_fail_permanently(tmp_path: Path) -> None:
    (tmp_path / "en" / "sms").mkdir(parents=True)
    (tmp_path / "en" / "sms" / "typo.txt").write_text("{{ cod }}")
    (tmp_path / "en" / "sms" / "evil.txt").write_text("{{ ''.__class__.__mro__ }}")
    renderer = Renderer(tmp_path)
    for purpose in ("typo", "evil"):
        with pytest.raises(TemplateProblem):
            renderer.sms(issued(purpose=purpose), "123456", NOW)
