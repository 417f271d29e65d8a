"""The wire contract of the one-time-code service (CONTRACT.md, version 1).

Importable without the worker's dependencies: producers and subscribers need only this package.
"""

from contracts.commands import ConfirmCode, IssueCode
from contracts.events import (
    CodeAttemptFailed,
    CodeConfirmed,
    CodeDelivered,
    CodeDeliveryFailed,
    CodeIssued,
    CodeLocked,
    Event,
    parse_event,
)
from contracts.replies import ConfirmResult, ErrorInfo, FieldError, IssueResult

__all__ = [
    "CodeAttemptFailed",
    "CodeConfirmed",
    "CodeDelivered",
    "CodeDeliveryFailed",
    "CodeIssued",
    "CodeLocked",
    "ConfirmCode",
    "ConfirmResult",
    "ErrorInfo",
    "Event",
    "FieldError",
    "IssueCode",
    "IssueResult",
    "parse_event",
]
