"""One readable line per event for ``otp events``: time, name, scope, then what is special.

Destinations are masked and the sealed code left out: the line is for eyes and terminals,
``--json`` gives the event as published.
"""

from __future__ import annotations

from typing import Any

from contracts._base import format_utc
from worker.masking import mask_destination

_IN_HEAD = {"event", "event_id", "occurred_at", "code_id", "user", "client", "purpose"}
_HIDDEN = _IN_HEAD | {"sealed_code"}


def event_line(event: Any) -> str:
    data: dict[str, Any] = event.model_dump(mode="json")
    extras = []
    for key, value in data.items():
        if key in _HIDDEN or value in (None, {}, []):
            continue
        if key == "destination":
            value = mask_destination(value)
        if isinstance(value, bool):
            value = str(value).lower()
        extras.append(f"{key}={value}")
    head = (
        f"{format_utc(event.occurred_at)} {event.event} code_id={event.code_id} "
        f"user={event.user} client={event.client} purpose={event.purpose}"
    )
    return " ".join([head, *extras])
