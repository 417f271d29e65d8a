"""The deploy files agree with the code, and the broker users are really least-privilege.

Users and permissions are read from deploy/rabbitmq/definitions.json and imported with
rabbitmqctl into a fresh vhost (user names get a random suffix: users are broker-wide).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aio_pika
import aiormq.exceptions
import orjson
import promql_parser
import pytest
import yaml

from contracts.client import OtpClient
from contracts.topology import (
    COMMAND_QUEUE,
    COMMANDS_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    EXCHANGES,
    SUBSCRIBER_QUEUE_PREFIX,
)
from tests.conftest import make_settings
from tests.support import BROKER, ROOT, delete_vhost, rabbitmqctl
from worker.app import SHUTDOWN_GRACE_SECONDS as WORKER_SHUTDOWN_GRACE_SECONDS
from worker.app import Worker
from worker.metrics import NotifierMetrics, WorkerMetrics
from worker.notifier.app import shutdown_grace
from worker.settings import Keys, Settings

DEPLOY = ROOT / "deploy"
IMAGE = "otp-service:0.1.0"
DEFINITIONS = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
Refused = aiormq.exceptions.ChannelAccessRefused


@pytest.fixture(scope="module")
def broker_users() -> Iterator[dict[str, str]]:
    """role (``producer`` …) → AMQP URL of that role's user in a fresh vhost.

    Module-scoped and in parallel: each rabbitmqctl call boots an Erlang VM (~1 s)."""
    suffix = uuid.uuid4().hex[:8]
    vhost = f"otp-deploy-{suffix}"
    rabbitmqctl("add_vhost", vhost)
    names = {p["user"]: f"{p['user']}-{suffix}" for p in DEFINITIONS["permissions"]}
    passwords = {user: secrets.token_hex(16) for user in names}  # never a leading "-"

    def add(permission: dict[str, str]) -> None:
        user = permission["user"]
        rabbitmqctl("add_user", names[user], passwords[user])
        rabbitmqctl(
            "set_permissions", "-p", vhost, names[user],
            permission["configure"], permission["write"], permission["read"],
        )  # fmt: skip

    try:
        with ThreadPoolExecutor(len(names)) as pool:
            list(pool.map(add, DEFINITIONS["permissions"]))
        yield {
            user.removeprefix("otp-"): BROKER.replace(
                "guest:guest@", f"{names[user]}:{passwords[user]}@"
            )
            + f"/{vhost}"
            for user in names
        }
    finally:
        with ThreadPoolExecutor(len(names)) as pool:
            list(pool.map(lambda n: delete_user(n), names.values()))
        delete_vhost(vhost)


def delete_user(name: str) -> None:
    subprocess.run(
        ["rabbitmqctl", "-q", "delete_user", name], check=False, capture_output=True, timeout=60
    )


@pytest.fixture
async def worker_as_worker_user(
    broker_users: dict[str, str], database_url: str, tmp_path: Path
) -> AsyncIterator[Worker]:
    """The worker declares its whole topology with nothing but the worker user's rights."""
    settings = make_settings(
        broker_users["worker"], database_url, tmp_path, reveal_clients="test-app"
    )
    worker = Worker(settings, Keys(settings))
    await worker.start()
    yield worker
    await worker.stop()


async def call(channel: aio_pika.abc.AbstractChannel, key: str, body: dict[str, Any]) -> Any:
    """Request/reply over direct reply-to, publishing to the exchange without declaring it."""
    replies: aio_pika.abc.AbstractQueue = await channel.get_queue(
        "amq.rabbitmq.reply-to", ensure=False
    )
    async with replies.iterator(no_ack=True) as incoming:
        exchange = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                orjson.dumps(body),
                content_type="application/json",
                reply_to="amq.rabbitmq.reply-to",
                correlation_id="c1",
            ),
            routing_key=key,
        )
        async for message in incoming:
            return orjson.loads(message.body)


async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """A consumer callback for consumes that must never be allowed."""


def consume(name: str) -> Any:
    """An action for ``refused``: consuming the queue ``name``."""

    async def action(ch: aio_pika.abc.AbstractChannel) -> None:
        queue = await ch.get_queue(name, ensure=False)
        await queue.consume(ignore)

    return action


async def refused(connection: aio_pika.abc.AbstractConnection, action: Any) -> bool:
    channel = await connection.channel()
    try:
        await action(channel)
    except Refused:
        return True
    return False


async def test_producer_may_only_command_and_read_its_replies(
    broker_users: dict[str, str], worker_as_worker_user: Worker
) -> None:
    connection = await aio_pika.connect(broker_users["producer"])
    try:
        channel = await connection.channel()
        issued = await call(
            channel,
            "code.issue",
            {"command_id": "d1", "user": "u", "client": "test-app", "channel": "none"}
            | {"reveal": True},
        )
        assert issued["status"] == "issued"
        # An exclusive server-named reply queue works too.
        own = await channel.declare_queue("", exclusive=True)
        assert own.name.startswith("amq.gen-")
        confirmed = await call(
            channel, "code.confirm", {"command_id": "d2", "user": "u", "client": "test-app"}
            | {"code": issued["code"]},
        )  # fmt: skip
        assert confirmed["status"] == "confirmed"

        async def bind_to_events(ch: aio_pika.abc.AbstractChannel) -> None:
            queue = await ch.declare_queue("", exclusive=True)
            await queue.bind(EVENTS_EXCHANGE, "#")

        async def publish_event(ch: aio_pika.abc.AbstractChannel) -> None:
            exchange = await ch.get_exchange(EVENTS_EXCHANGE, ensure=False)
            await exchange.publish(aio_pika.Message(b"{}"), routing_key="code.issued")

        async def declare_named(ch: aio_pika.abc.AbstractChannel) -> None:
            await ch.declare_queue("producer-owned", auto_delete=True)

        assert await refused(connection, bind_to_events)
        assert await refused(connection, consume(COMMAND_QUEUE))
        assert await refused(connection, consume(DEAD_LETTER_QUEUE))
        assert await refused(connection, publish_event)
        assert await refused(connection, declare_named)
    finally:
        await connection.close()


async def test_subscriber_may_bind_its_own_queue_to_events_only(
    broker_users: dict[str, str], worker_as_worker_user: Worker
) -> None:
    connection = await aio_pika.connect(broker_users["subscriber"])
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{SUBSCRIBER_QUEUE_PREFIX}audit", exclusive=True)
        await queue.bind(EVENTS_EXCHANGE, "code.#")

        async def bind_to_commands(ch: aio_pika.abc.AbstractChannel) -> None:
            q = await ch.declare_queue(f"{SUBSCRIBER_QUEUE_PREFIX}sneaky", exclusive=True)
            await q.bind(COMMANDS_EXCHANGE, "code.issue")

        async def declare_server_named(ch: aio_pika.abc.AbstractChannel) -> None:
            await ch.declare_queue("", exclusive=True)  # amq.gen-…: the producers' names

        assert await refused(connection, bind_to_commands)
        assert await refused(connection, declare_server_named)
    finally:
        await connection.close()


async def test_the_client_works_with_only_the_producer_and_subscriber_rights(
    broker_users: dict[str, str], worker_as_worker_user: Worker
) -> None:
    async with (
        OtpClient.connect(broker_users["subscriber"]) as watcher,
        watcher.subscribe("code.issued") as stream,
        OtpClient.connect(broker_users["producer"]) as producer,
    ):
        issued = await producer.issue(user="u", client="test-app", channel="none")
        assert issued.status == "issued"
        async for event in stream:
            assert event.code_id == issued.code_id
            break


async def test_producer_and_subscriber_cannot_read_each_others_queues(
    broker_users: dict[str, str], worker_as_worker_user: Worker
) -> None:
    """Even a queue left non-exclusive by mistake: a reply with ``reveal`` holds a code."""
    producer = await aio_pika.connect(broker_users["producer"])
    subscriber = await aio_pika.connect(broker_users["subscriber"])
    try:
        events = await (await subscriber.channel()).declare_queue(
            f"{SUBSCRIBER_QUEUE_PREFIX}shared", auto_delete=True
        )
        await events.bind(EVENTS_EXCHANGE, "#")
        replies = await (await producer.channel()).declare_queue("", auto_delete=True)

        assert await refused(producer, consume(events.name))
        assert await refused(subscriber, consume(replies.name))
    finally:
        await producer.close()
        await subscriber.close()


async def test_keda_may_only_read_the_command_queue_depth(
    broker_users: dict[str, str], worker_as_worker_user: Worker
) -> None:
    """KEDA's AMQP scaler declares the queue passively for its depth; it needs nothing more."""
    connection = await aio_pika.connect(broker_users["keda"])
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(COMMAND_QUEUE, passive=True)
        assert queue.declaration_result.message_count == 0

        async def publish_command(ch: aio_pika.abc.AbstractChannel) -> None:
            exchange = await ch.get_exchange(COMMANDS_EXCHANGE, ensure=False)
            await exchange.publish(aio_pika.Message(b"{}"), routing_key="code.issue")

        async def declare_any(ch: aio_pika.abc.AbstractChannel) -> None:
            await ch.declare_queue(f"{SUBSCRIBER_QUEUE_PREFIX}keda", exclusive=True)

        assert await refused(connection, consume(COMMAND_QUEUE))
        assert await refused(connection, publish_command)
        assert await refused(connection, declare_any)
    finally:
        await connection.close()


def test_definitions_declare_the_code_topology() -> None:
    declared = {(e["name"], e["type"], e["durable"]) for e in DEFINITIONS["exchanges"]}
    assert declared == {(e.name, e.type, e.durable) for e in EXCHANGES}
    users = {u["name"] for u in DEFINITIONS["users"]}
    assert {"otp-producer", "otp-worker", "otp-notifier", "otp-subscriber"} <= users
    assert {p["user"] for p in DEFINITIONS["permissions"]} <= users


def otp_env_names(env: dict[str, Any] | list[dict[str, Any]]) -> set[str]:
    names = set(env) if isinstance(env, dict) else {e["name"] for e in env}
    return {n for n in names if n.startswith("OTP_")}


def assert_settings(names: set[str]) -> None:
    assert names
    unknown = {n for n in names if n.removeprefix("OTP_").lower() not in Settings.model_fields}
    assert not unknown, f"not Settings fields: {unknown}"


def test_compose_matches_the_code() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert services["worker"]["command"] == ["python", "-m", "worker"]
    assert services["notifier"]["command"] == ["python", "-m", "worker.notifier"]
    assert services["worker"]["deploy"]["replicas"] == 2
    assert {"rabbitmq", "postgres", "mailpit"} <= set(services)
    for name in ("worker", "notifier"):
        service = services[name]
        assert service["image"] == IMAGE
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert_settings(otp_env_names(service["environment"]))
        assert service["environment"]["OTP_DATABASE_URL"].startswith("postgresql://")
        probed = re.search(r":(\d+)/readyz", " ".join(service["healthcheck"]["test"]))
        assert probed is not None
        assert probed.group(1) == service["environment"]["OTP_METRICS_PORT"]
        amqp = re.fullmatch(
            r"amqp://([^:]+):([^@]+)@[^/]+/(.+)", service["environment"]["OTP_AMQP_URL"]
        )
        assert amqp is not None
        user, password, vhost = amqp.groups()
        assert user == f"otp-{name}"
        assert vhost == DEFINITIONS["vhosts"][0]["name"]
        assert rabbit_password_matches(user, password)
    # The HMAC key that checks codes is the worker's alone.
    assert "OTP_SECRET_KEY" in services["worker"]["environment"]
    assert "OTP_SECRET_KEY" not in services["notifier"]["environment"]
    volumes = " ".join(services["rabbitmq"]["volumes"])
    assert "definitions.json" in volumes


def rabbit_password_matches(user: str, password: str) -> bool:
    """Checks ``password`` against the user's hash in definitions.json
    (``rabbit_password_hashing_sha256``: base64 of a 4-byte salt and SHA-256(salt + password))."""
    (entry,) = [u for u in DEFINITIONS["users"] if u["name"] == user]
    assert entry["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    raw = base64.b64decode(entry["password_hash"])
    return hashlib.sha256(raw[:4] + password.encode()).digest() == raw[4:]


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def test_kubernetes_manifests_match_the_code() -> None:
    docs = manifests()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {"otp-worker", "otp-notifier"}
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert_settings(set(config["data"]))
    for name, module in (("otp-worker", "worker"), ("otp-notifier", "worker.notifier")):
        (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        assert container["image"] == IMAGE
        assert container["command"] == ["python", "-m", module]
        assert_settings(otp_env_names(container["env"]))
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        port = container["ports"][0]["containerPort"]
        assert str(port) == config["data"]["OTP_METRICS_PORT"]
    secrets_of = {
        name: {e["name"] for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
        for name, d in deployments.items()
    }
    assert "OTP_SECRET_KEY" in secrets_of["otp-worker"]
    assert "OTP_SECRET_KEY" not in secrets_of["otp-notifier"]  # it only unseals
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "otp-worker"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == COMMAND_QUEUE
    assert trigger["metadata"]["vhostName"] == DEFINITIONS["vhosts"][0]["name"]
    # The Secret's recipe (config.yaml's header) gives KEDA its own read-nothing user.
    recipe = (DEPLOY / "k8s" / "config.yaml").read_text()
    keda = re.search(r"KEDA_RABBITMQ_HOST=amqp://([^:]+):", recipe)
    assert keda is not None and keda.group(1) == "otp-keda"
    (rights,) = [p for p in DEFINITIONS["permissions"] if p["user"] == "otp-keda"]
    assert (rights["configure"], rights["write"], rights["read"]) == ("^$", "^$", "^$")


def grace_seconds(value: str | int) -> float:
    text = str(value)
    return float(text.removesuffix("s"))


def test_orchestrators_wait_out_each_process_s_own_shutdown() -> None:
    # Killed before its own grace is up, the notifier drops a send the server may already
    # have taken (it goes out again), the worker its relay's last events.
    defaults = Settings.model_construct()  # the deploy files leave the lease at its default
    notifier = shutdown_grace(defaults)
    assert notifier > 0.9 * defaults.notifier_claim_lease_seconds
    needed = {"worker": WORKER_SHUTDOWN_GRACE_SECONDS + 5, "notifier": notifier + 5}
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    deployments = {d["metadata"]["name"]: d for d in manifests() if d["kind"] == "Deployment"}
    for name, seconds in needed.items():
        assert grace_seconds(services[name]["stop_grace_period"]) >= seconds, name
        spec = deployments[f"otp-{name}"]["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] >= seconds, name


def test_dockerfile_builds_one_non_root_image() -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in {"0", "root"}
    assert lines[-1] == 'CMD ["python", "-m", "worker"]'
    text = (DEPLOY / "Dockerfile").read_text()
    metrics_port = re.search(r"OTP_METRICS_PORT=(\d+)", text)
    assert metrics_port is not None
    assert f"EXPOSE {metrics_port.group(1)}" in lines


def exported_series() -> set[str]:
    """Every series name the worker and the notifier put on /metrics."""
    exported: set[str] = set()
    for registry in (WorkerMetrics().registry, NotifierMetrics().registry):
        for family in registry.collect():
            suffixes = {
                "counter": ("_total",),
                "histogram": ("_bucket", "_count", "_sum"),
                "gauge": ("",),
            }[family.type]
            exported |= {family.name + s for s in suffixes}
    return exported


def series_of(expr: str) -> set[str]:
    """The series a PromQL expression selects; a syntax error fails the test."""
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def test_dashboard_queries_only_exported_metrics() -> None:
    exported = exported_series()
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in series_of(expr)}
    assert used
    assert used <= exported, used - exported
    assert {"otp_consuming", "otp_notifier_consuming"} <= used
    # Every worker reports the whole outbox table: a sum over workers would multiply it.
    summed_outbox = [e for e in exprs if re.search(r"\bsum\b[^()]*\(\s*otp_outbox_", e)]
    assert not summed_outbox


def test_alert_rules_parse_and_watch_only_exported_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    (group,) = rules["groups"]
    alerts = group["rules"]
    names = [rule["alert"] for rule in alerts]
    assert len(names) == len(set(names))
    used: set[str] = set()
    for rule in alerts:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", rule["for"])
        used |= series_of(rule["expr"])
    assert used <= exported_series(), used - exported_series()
    # What the README tells an operator to alert on, each watched by a rule.
    assert {
        "otp_consuming",
        "otp_notifier_consuming",
        "otp_outbox_oldest_age_seconds",
        "otp_store_retries_total",
        "otp_dead_letter_messages",
        "otp_command_queue_messages",
        "otp_commands_total",
        "otp_deliveries_total",
        "otp_event_loop_lag_seconds_bucket",
    } <= used


async def test_notifier_runs_with_only_the_notifier_users_rights(
    broker_users: dict[str, str], worker_as_worker_user: Worker, database_url: str, tmp_path: Path
) -> None:
    """The notifier declares its topology, consumes, delivers and reports as otp-notifier."""
    from worker.notifier.app import Notifier

    settings = make_settings(
        broker_users["notifier"], database_url, tmp_path, notifier_console=True
    )
    notifier = Notifier(settings, Keys(settings, need_secret=False))
    await notifier.start()
    try:
        events = await aio_pika.connect(broker_users["subscriber"])
        channel = await events.channel()
        queue = await channel.declare_queue(f"{SUBSCRIBER_QUEUE_PREFIX}n", exclusive=True)
        await queue.bind("otp.events", "code.delivered")
        arrived: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if not arrived.done():
                arrived.set_result(message.body)

        await queue.consume(on_event, no_ack=True)
        producer = await aio_pika.connect(broker_users["producer"])
        issued = await call(
            await producer.channel(),
            "code.issue",
            {"command_id": "n1", "user": "n", "client": "test-app", "channel": "email"}
            | {"destination": "n@example.org"},
        )
        assert issued["status"] == "issued"
        delivered = await asyncio.wait_for(arrived, 20)
        assert json.loads(delivered)["code_id"] == issued["code_id"]
        await producer.close()
        await events.close()
    finally:
        await notifier.stop()
