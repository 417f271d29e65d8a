"""Replies the worker sends to a command's ``reply_to``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from contracts._base import OpenMessage, UtcDatetime

ErrorType = Literal[
    "invalid_json", "validation_error", "too_large", "reveal_not_permitted", "command_id_reused"
]
IssueStatus = Literal["issued", "rate_limited", "rejected"]
ConfirmStatus = Literal["confirmed", "invalid", "locked", "expired", "not_found", "rejected"]


class FieldError(OpenMessage):
    loc: str
    msg: str


class ErrorInfo(OpenMessage):
    type: ErrorType
    message: str
    fields: list[FieldError] = []


class _Reply(OpenMessage):
    command_id: str | None

    def to_wire(self) -> dict[str, Any]:
        """The JSON object on the wire: absent fields are left out, ``command_id`` never is."""
        data = BaseModel.model_dump(self, mode="json", exclude_none=True)
        data.setdefault("command_id", None)
        return data


class IssueResult(_Reply):
    status: IssueStatus
    code_id: str | None = None
    expires_at: UtcDatetime | None = None
    resent: bool | None = None
    code: str | None = None
    retry_after_seconds: int | None = None
    error: ErrorInfo | None = None


class ConfirmResult(_Reply):
    status: ConfirmStatus
    code_id: str | None = None
    attempts_left: int | None = None
    error: ErrorInfo | None = None


REPLY_TYPES = {"IssueResult": IssueResult, "ConfirmResult": ConfirmResult}
