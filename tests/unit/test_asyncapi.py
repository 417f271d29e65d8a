"""The AsyncAPI document: up to date with the models, valid AsyncAPI 3.0, refs all resolve."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest
import yaml

from contracts.asyncapi import build_document
from contracts.events import EVENT_NAMES
from contracts.topology import COMMAND_ROUTING_KEYS, COMMANDS_EXCHANGE, EVENTS_EXCHANGE
from tests.support import ROOT
from worker.cli_commands import render_asyncapi

COMMITTED = ROOT / "docs" / "asyncapi.yaml"
SCHEMA = ROOT / "docs" / "schemas" / "asyncapi-3.0.0.json"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    assert schema["$id"] == "http://asyncapi.com/definitions/3.0.0/asyncapi.json"
    return jsonschema.Draft7Validator(schema)


def test_committed_document_is_up_to_date() -> None:
    assert COMMITTED.read_text() == render_asyncapi(), (
        "docs/asyncapi.yaml is stale: run `.venv/bin/otp asyncapi > docs/asyncapi.yaml`"
    )


def test_committed_document_is_valid_asyncapi_3(validator: jsonschema.Draft7Validator) -> None:
    document = yaml.safe_load(COMMITTED.read_text())
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(document)]
    assert errors == []


def test_validator_rejects_a_broken_document(validator: jsonschema.Draft7Validator) -> None:
    document = copy.deepcopy(build_document())
    document["operations"]["issueCode"]["action"] = "publish"  # AsyncAPI 2 wording
    assert not validator.is_valid(document)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def test_every_reference_resolves() -> None:
    document = build_document()
    refs = _refs(document)
    assert refs
    for ref in refs:
        assert ref.startswith("#/"), ref
        node: Any = document
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]


def test_every_contract_message_has_a_channel_and_a_schema() -> None:
    document = build_document()
    addresses = {c["address"]: c for c in document["channels"].values()}
    for key in COMMAND_ROUTING_KEYS:
        assert addresses[key]["bindings"]["amqp"]["exchange"]["name"] == COMMANDS_EXCHANGE
    for name in EVENT_NAMES:
        assert addresses[name]["bindings"]["amqp"]["exchange"]["name"] == EVENTS_EXCHANGE
    schemas = document["components"]["schemas"]
    assert schemas["IssueCode"]["additionalProperties"] is False
    assert set(schemas["ConfirmResult"]["properties"]["status"]["enum"]) >= {"confirmed", "locked"}
    replies = document["operations"]["issueCode"]["reply"]["messages"]
    assert replies == [{"$ref": "#/channels/reply/messages/IssueResult"}]


def test_every_event_schema_requires_its_name() -> None:
    # CONTRACT.md §4: every event body has `event`; subscribers dispatch on it.
    schemas = yaml.safe_load(COMMITTED.read_text())["components"]["schemas"]
    events = [name for name, schema in schemas.items() if "event" in schema.get("properties", {})]
    assert len(events) == 6
    for name in events:
        assert "event" in schemas[name]["required"], name
