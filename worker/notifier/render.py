"""Messages from templates, per channel, purpose and locale, in a sandboxed Jinja2.

Operators write templates, and the values inside them come from other services (``context``,
``user``), so templates run in an immutable sandbox with HTML autoescaping and strict
undefined values: a typo in a template fails loudly instead of sending a half-empty message.

Template names are ``<locale>/<channel>/<purpose>.<part>``; the operator's directory is
searched before the built-in one. A missing purpose falls back to ``default``, a missing
locale to its language (``de-AT`` → ``de``) and then to English.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import ChoiceLoader, FileSystemLoader, StrictUndefined, TemplateNotFound
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import select_autoescape

from contracts.events import CodeIssued

BUILTIN_TEMPLATES = Path(__file__).parent / "templates"
DEFAULT_LOCALE = "en"
DEFAULT_PURPOSE = "default"


class TemplateProblem(Exception):
    """A template is missing or broken: retrying cannot help, so delivery fails permanently."""


@dataclass(frozen=True)
class Email:
    subject: str
    text: str
    html: str


@dataclass(frozen=True)
class Sms:
    text: str


def locale_chain(locale: str) -> list[str]:
    """``de-AT`` → ``["de-at", "de", "en"]``: most specific first, English last."""
    tag = locale.strip().replace("_", "-").lower()
    chain: list[str] = []
    if tag and all(part.isalnum() for part in tag.split("-")):
        parts = tag.split("-")
        chain = ["-".join(parts[:n]) for n in range(len(parts), 0, -1)]
    if DEFAULT_LOCALE not in chain:
        chain.append(DEFAULT_LOCALE)
    return chain


class Renderer:
    def __init__(self, templates_dir: Path | None = None) -> None:
        search = [FileSystemLoader(str(templates_dir))] if templates_dir else []
        search.append(FileSystemLoader(str(BUILTIN_TEMPLATES)))
        self._env = ImmutableSandboxedEnvironment(
            loader=ChoiceLoader(search),
            autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
            undefined=StrictUndefined,
            trim_blocks=True,
            keep_trailing_newline=False,
        )

    def email(self, event: CodeIssued, code: str, now: datetime) -> Email:
        values = self._values(event, code, now)
        return Email(
            subject=" ".join(self._render(event, "email", "subject.txt", values).split()),
            text=self._render(event, "email", "txt", values),
            html=self._render(event, "email", "html", values),
        )

    def sms(self, event: CodeIssued, code: str, now: datetime) -> Sms:
        text = self._render(event, "sms", "txt", self._values(event, code, now))
        return Sms(" ".join(text.split()))

    def _render(self, event: CodeIssued, channel: str, part: str, values: dict[str, Any]) -> str:
        purposes = dict.fromkeys((event.purpose, DEFAULT_PURPOSE))
        names = [
            f"{locale}/{channel}/{purpose}.{part}"
            for locale in locale_chain(event.locale)
            for purpose in purposes
        ]
        try:
            template = self._env.select_template(names)
            return template.render(values).strip()
        except TemplateNotFound as exc:
            raise TemplateProblem(f"no template among {names[-1]!r} and its fallbacks") from exc
        except Exception as exc:  # a broken operator template: name the error, not the values
            reason = f"template for {channel}.{part} failed: {type(exc).__name__}"
            raise TemplateProblem(reason) from exc

    @staticmethod
    def _values(event: CodeIssued, code: str, now: datetime) -> dict[str, Any]:
        left = (event.expires_at - now).total_seconds()
        return {
            "code": code,
            "user": event.user,
            "client": event.client,
            "purpose": event.purpose,
            "locale": event.locale,
            "expires_at": event.expires_at,
            "minutes_left": max(1, math.ceil(left / 60)),
            "context": dict(event.context),
        }
