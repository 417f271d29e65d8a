"""The AsyncAPI 3.0 document of the wire contract, built from the contract's own models.

Pure: it returns a JSON-compatible dict (no YAML dependency here, so the bare install stays
aio-pika + pydantic); ``otp asyncapi`` dumps it as YAML into docs/asyncapi.yaml. Generating it
from the pydantic models means the document cannot drift from what the worker validates; a
test fails when the committed file is older than the models.

The document describes the service itself: it *receives* commands and *sends* replies and
events, so a producer reads the operations the other way round.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from contracts.commands import ConfirmCode, IssueCode
from contracts.events import EVENT_TYPES
from contracts.replies import ConfirmResult, IssueResult
from contracts.topology import (
    COMMANDS,
    CONFIRM_ROUTING_KEY,
    DEAD_LETTER_QUEUE,
    ERROR_TYPE_HEADER,
    EVENTS,
    ISSUE_ROUTING_KEY,
    REASON_HEADER,
    REDACTED_HEADER,
    ROUTING_KEY_HEADER,
    ExchangeSpec,
    event_routing_key,
)

ASYNCAPI_VERSION = "3.0.0"
CONTRACT_VERSION = "1.0.0"
AMQP_BINDING = "0.3.0"
SCHEMA_REF = "#/components/schemas/{model}"

COMMAND_MODELS: tuple[type[BaseModel], ...] = (IssueCode, ConfirmCode)
REPLY_MODELS: tuple[type[BaseModel], ...] = (IssueResult, ConfirmResult)


def build_document() -> dict[str, Any]:
    """The whole document, in a stable key order (the committed YAML is compared verbatim)."""
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "One-time-code service",
            "version": CONTRACT_VERSION,
            "description": (
                "Wire contract version 1 (docs/CONTRACT.md). Producers publish commands to "
                f"`{COMMANDS.name}` and await one reply per distinct `command_id` on their "
                f"`reply_to`; subscribers bind their own queue to `{EVENTS.name}`. A repeat "
                "(the same `command_id` with the same content) gets the first reply again; "
                "another command under a used `command_id` is rejected with error type "
                "`command_id_reused` and has no effect. Generated from the pydantic models in "
                "`contracts/` by `otp asyncapi`."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "broker": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "RabbitMQ; the vhost is the path of OTP_AMQP_URL.",
            }
        },
        "channels": _channels(),
        "operations": _operations(),
        "components": {"schemas": _schemas(), "messages": _messages()},
    }


def _schemas() -> dict[str, Any]:
    models = (*COMMAND_MODELS, *REPLY_MODELS, *EVENT_TYPES)
    _, top = models_json_schema(
        [(model, "validation") for model in models], ref_template=SCHEMA_REF
    )
    schemas = dict(top["$defs"])
    for event in EVENT_TYPES:
        # Every event body has its name (CONTRACT.md §4); the models only default it, so
        # that code building an event need not repeat it.
        required = schemas[event.__name__].setdefault("required", [])
        if "event" not in required:
            required.insert(0, "event")
    return schemas


def _message(model: type[BaseModel], summary: str) -> dict[str, Any]:
    return {
        "name": model.__name__,
        "title": model.__name__,
        "summary": summary,
        "contentType": "application/json",
        "payload": {"$ref": SCHEMA_REF.format(model=model.__name__)},
        "bindings": {"amqp": {"messageType": model.__name__, "bindingVersion": AMQP_BINDING}},
    }


def _event_key(model: type[BaseModel]) -> str:
    name = str(model.model_fields["event"].default)
    head, _, tail = name.partition(".")
    return head + "".join(part.capitalize() for part in tail.split("_"))


def _messages() -> dict[str, Any]:
    messages = {
        "IssueCode": _message(IssueCode, "Issue (or resend) the one active code of a scope."),
        "ConfirmCode": _message(ConfirmCode, "Check a candidate against the active code."),
        "IssueResult": _message(IssueResult, "The reply to IssueCode."),
        "ConfirmResult": _message(ConfirmResult, "The reply to ConfirmCode."),
        "DeadLetteredCommand": {
            "name": "DeadLetteredCommand",
            "summary": "A command the service could not process, unchanged but for any "
            "candidate code, which is replaced by `[redacted]`.",
            "contentType": "application/json",
            "headers": {
                "type": "object",
                "properties": {
                    REASON_HEADER: {"type": "string", "description": "Why it was rejected."},
                    ERROR_TYPE_HEADER: {
                        "type": "string",
                        "description": "The reply's `error.type` (e.g. `command_id_reused`), "
                        "or `internal_error` / `delivery_limit` for commands without a reply.",
                    },
                    ROUTING_KEY_HEADER: {
                        "type": "string",
                        "description": "The routing key it was published with.",
                    },
                    REDACTED_HEADER: {
                        "type": "string",
                        "description": "`code` when a candidate code (a `code` member or, "
                        "in a body of the wrong shape, any run of digits) was replaced by "
                        "`[redacted]`. Such a command is never replayed.",
                    },
                },
            },
            "payload": {
                "type": "object",
                "description": "The original command body, as it came (not always JSON).",
            },
        },
    }
    for model in EVENT_TYPES:
        name = model.model_fields["event"].default
        messages[_event_key(model)] = _message(model, f"The `{name}` event.")
    return messages


def _exchange_binding(spec: ExchangeSpec) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {
                "name": spec.name,
                "type": spec.type,
                "durable": spec.durable,
                "autoDelete": False,
                "vhost": "/",
            },
            "bindingVersion": AMQP_BINDING,
        }
    }


def _ref(section: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/{section}/{name}"}


def _channels() -> dict[str, Any]:
    channels: dict[str, Any] = {
        "codeIssue": {
            "address": ISSUE_ROUTING_KEY,
            "title": f"{COMMANDS.name} / {ISSUE_ROUTING_KEY}",
            "messages": {"IssueCode": _ref("components/messages", "IssueCode")},
            "bindings": _exchange_binding(COMMANDS),
        },
        "codeConfirm": {
            "address": CONFIRM_ROUTING_KEY,
            "title": f"{COMMANDS.name} / {CONFIRM_ROUTING_KEY}",
            "messages": {"ConfirmCode": _ref("components/messages", "ConfirmCode")},
            "bindings": _exchange_binding(COMMANDS),
        },
        "reply": {
            "address": None,
            "title": "reply_to",
            "description": "The command's `reply_to` on the default exchange, e.g. direct "
            "reply-to (`amq.rabbitmq.reply-to`); `correlation_id` is copied from the command.",
            "messages": {
                "IssueResult": _ref("components/messages", "IssueResult"),
                "ConfirmResult": _ref("components/messages", "ConfirmResult"),
            },
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {"name": "", "type": "default"},
                    "bindingVersion": AMQP_BINDING,
                }
            },
        },
        "deadLetters": {
            "address": DEAD_LETTER_QUEUE,
            "title": DEAD_LETTER_QUEUE,
            "messages": {"DeadLetteredCommand": _ref("components/messages", "DeadLetteredCommand")},
            "bindings": {
                "amqp": {
                    "is": "queue",
                    "queue": {"name": DEAD_LETTER_QUEUE, "durable": True, "exclusive": False},
                    "bindingVersion": AMQP_BINDING,
                }
            },
        },
    }
    for model in EVENT_TYPES:
        key = _event_key(model)
        name = str(model.model_fields["event"].default)
        channels[key] = {
            "address": event_routing_key(name),
            "title": f"{EVENTS.name} / {name}",
            "messages": {key: _ref("components/messages", key)},
            "bindings": _exchange_binding(EVENTS),
        }
    return channels


def _command_operation(channel: str, command: str, reply: str, summary: str) -> dict[str, Any]:
    return {
        "action": "receive",
        "channel": _ref("channels", channel),
        "summary": summary,
        "messages": [_ref(f"channels/{channel}/messages", command)],
        "reply": {
            "address": {
                "location": "$message.header#/reply_to",
                "description": "The AMQP `reply_to` property of the command.",
            },
            "channel": _ref("channels", "reply"),
            "messages": [_ref("channels/reply/messages", reply)],
        },
        "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING}},
    }


def _operations() -> dict[str, Any]:
    operations: dict[str, Any] = {
        "issueCode": _command_operation(
            "codeIssue", "IssueCode", "IssueResult", "Issue or resend a code."
        ),
        "confirmCode": _command_operation(
            "codeConfirm", "ConfirmCode", "ConfirmResult", "Confirm a code."
        ),
        "deadLetter": {
            "action": "send",
            "channel": _ref("channels", "deadLetters"),
            "summary": "Park a command that can never succeed, with the reason in headers.",
            "messages": [_ref("channels/deadLetters/messages", "DeadLetteredCommand")],
        },
    }
    for model in EVENT_TYPES:
        key = _event_key(model)
        operations["publish" + key[0].upper() + key[1:]] = {
            "action": "send",
            "channel": _ref("channels", key),
            "summary": f"Publish {model.model_fields['event'].default} (at least once; "
            "subscribers deduplicate on event_id).",
            "messages": [_ref(f"channels/{key}/messages", key)],
            "bindings": {"amqp": {"deliveryMode": 2, "bindingVersion": AMQP_BINDING}},
        }
    return operations
