"""``otp`` as a subprocess against the real broker and an in-process worker.

The subprocesses run through asyncio so the in-process worker keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage

from contracts.client import OtpClient
from contracts.topology import COMMAND_QUEUE
from tests.conftest import WorkerFactory, make_settings
from tests.support import AUDIT, ROOT, event_log, producer
from worker.app import Worker
from worker.settings import Keys
from worker.store import open_store
from worker.store.base import OutboxEvent, Writes

UNREACHABLE = "amqp://guest:secret@127.0.0.1:1/"


@dataclass
class Run:
    rc: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


def cli_env(amqp_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTP_")}
    env.update(OTP_AMQP_URL=amqp_url, PYTHONPATH=str(ROOT), **extra)
    return env


async def otp(*args: str, env: dict[str, str], cwd: Path, stdin: str | None = None) -> Run:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        *args,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE if stdin is not None else None,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    given = stdin.encode() if stdin is not None else None
    out, err = await asyncio.wait_for(process.communicate(given), 60)
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


async def own_worker(amqp_url: str, database_url: str, tmp_path: Path) -> Worker:
    """A worker the test stops itself (the fixture stops its own at teardown, and only once)."""
    settings = make_settings(amqp_url, database_url, tmp_path)
    worker = Worker(settings, Keys(settings))
    await worker.start()
    return worker


def assert_one_error_line(run: Run, rc: int, starts: str) -> None:
    assert run.rc == rc, run
    assert len(run.err_lines) == 1, run.err
    assert run.err_lines[0].startswith(starts), run.err
    assert "Traceback" not in run.err


async def test_issue_and_confirm(
    amqp_url: str, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    await start_worker(reveal_clients="test-app")
    env = cli_env(amqp_url)
    scope = ("--user", "alice", "--client", "test-app")
    issued = await otp("issue", *scope, "--reveal", "--context", "app_name=Demo", "--json",
                       env=env, cwd=tmp_path)  # fmt: skip
    assert issued.rc == 0, issued
    reply = json.loads(issued.out)
    assert reply["status"] == "issued"
    assert reply["code"].isdigit()
    AUDIT.codes.add(reply["code"])

    # "--code -" reads it from stdin, out of the process list; --code VALUE is used below.
    nothing = await otp("confirm", *scope, "--code", "-", env=env, cwd=tmp_path, stdin="")
    assert_one_error_line(nothing, 2, "otp: invalid command: code")
    confirmed = await otp(
        "confirm", *scope, "--code", "-", env=env, cwd=tmp_path, stdin=f"{reply['code']}\n"
    )
    assert confirmed.rc == 0, confirmed
    assert confirmed.out.startswith("confirmed command_id=")
    assert f"code_id={reply['code_id']}" in confirmed.out

    again = await otp("confirm", *scope, "--code", reply["code"], env=env, cwd=tmp_path)
    assert again.rc == 1
    assert again.out.startswith("not_found ")

    by_mail = await otp("issue", "--user", "bob", "--client", "test-app", "--channel", "email",
                        "--destination", "bob@example.org", env=env, cwd=tmp_path)  # fmt: skip
    assert by_mail.rc == 0, by_mail
    assert by_mail.out.startswith("issued ")
    assert "code=" not in by_mail.out


async def test_bad_arguments_are_one_line(amqp_url: str, tmp_path: Path) -> None:
    env = cli_env(amqp_url)
    missing = await otp("issue", "--user", "alice", env=env, cwd=tmp_path)
    assert_one_error_line(missing, 2, "otp: the following arguments are required: --client")
    invalid = await otp("issue", "--user", "a", "--client", "c", "--channel", "sms",
                        "--destination", "12345", env=env, cwd=tmp_path)  # fmt: skip
    assert_one_error_line(invalid, 2, "otp: invalid command: destination")
    context = await otp("issue", "--user", "a", "--client", "c", "--context", "novalue",
                        env=env, cwd=tmp_path)  # fmt: skip
    assert_one_error_line(context, 2, "otp: argument --context")
    unused = await otp("issue", "--user", "a", "--client", "c", "--broker-user", "shop",
                       env=env, cwd=tmp_path)  # fmt: skip
    assert_one_error_line(unused, 2, "otp: --broker-user is only sent with --reveal")


async def test_config_error_is_one_line(tmp_path: Path) -> None:
    env = cli_env(UNREACHABLE, OTP_MAX_TTL_SECONDS="forever")
    run = await otp("check", env=env, cwd=tmp_path)
    assert_one_error_line(run, 2, "otp: configuration error: OTP_MAX_TTL_SECONDS")


@pytest.mark.parametrize(
    ("amqp_url", "args", "named"),
    [
        ("notaurl", ["issue"], "OTP_AMQP_URL"),
        (UNREACHABLE, ["issue", "--url", "amqp//guest:s3cret@127.0.0.1/"], "--url"),
        (UNREACHABLE, ["dead-letters", "list", "--url", "amqp://guest:s3cret/"], "--url"),
        (UNREACHABLE, ["check", "--database-url", "mysql://otp:s3cret@db/otp"], "--database-url"),
    ],
)
def test_a_bad_url_is_one_line(amqp_url: str, args: list[str], named: str, tmp_path: Path) -> None:
    # A broker URL without a host used to hang `otp issue` for ever, --timeout or not.
    if args[0] == "issue":
        args = [*args, "--user", "a", "--client", "c"]
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", *args, "--timeout", "2"],
        env=cli_env(amqp_url),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert_one_error_line(Run(result.returncode, result.stdout, result.stderr), 2, "otp: ")
    assert named in result.stderr and "s3cret" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["issue", "--user", "a", "--client", "c", "--timeout", "-1"], "--timeout"),
        (["issue", "--user", "a", "--client", "c", "--timeout", "nan"], "--timeout"),
        (["events", "--count", "0"], "--count"),  # used to wait for ever
        (["dead-letters", "list", "--limit", "-1"], "--limit"),  # said "0 dead letter(s)"
        (
            ["confirm", "--user", "a", "--client", "c", "--code", "1", "--retries", "-3"],
            "--retries",
        ),
        (["check", "--max-backlog", "-1"], "--max-backlog"),
    ],
)
async def test_a_number_out_of_range_is_a_usage_error(
    args: list[str], named: str, tmp_path: Path
) -> None:
    run = await otp(*args, env=cli_env(UNREACHABLE), cwd=tmp_path)
    assert_one_error_line(run, 2, f"otp: argument {named}: expected")


async def test_unreachable_broker_is_one_line(tmp_path: Path) -> None:
    env = cli_env(UNREACHABLE)
    run = await otp("issue", "--user", "a", "--client", "c", env=env, cwd=tmp_path)
    assert_one_error_line(run, 1, "otp: broker unavailable at amqp://guest:***@127.0.0.1:1/")
    assert "secret" not in run.err
    listing = await otp("dead-letters", "list", env=env, cwd=tmp_path)
    assert_one_error_line(listing, 1, "otp: broker unavailable")


async def test_a_vhost_the_broker_will_not_open_is_named(amqp_url: str, tmp_path: Path) -> None:
    # aiormq reports the broker's refusal as an unexpected frame: "Expected one of
    # ['Connection.OpenOk'], got <Connection.Close object at 0x...>".
    env = cli_env(amqp_url.rsplit("/", 1)[0] + "/otp-no-such-vhost")
    named = "the broker would not open vhost 'otp-no-such-vhost'"
    run = await otp("issue", "--user", "a", "--client", "c", env=env, cwd=tmp_path)
    assert_one_error_line(run, 1, "otp: broker unavailable")
    assert named in run.err
    listing = await otp("dead-letters", "list", env=env, cwd=tmp_path)
    assert_one_error_line(listing, 1, "otp: broker unavailable")
    assert named in listing.err
    check = await otp(
        "check", "--database-url", f"sqlite:///{tmp_path}/x.db", env=env, cwd=tmp_path
    )
    assert check.rc == 1
    assert f"FAIL broker reachable: {named}" in check.out


async def test_events_follow(amqp_url: str, start_worker: WorkerFactory, tmp_path: Path) -> None:
    await start_worker()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.cli", "events", "--follow", "--pattern", "code.*",
        env=cli_env(amqp_url), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    try:
        ready = await asyncio.wait_for(process.stderr.readline(), 30)
        assert b"listening on otp.events" in ready
        async with OtpClient.connect(amqp_url) as client:
            await client.issue(user="carol", client="c", channel="email",
                               destination="carol@example.org")  # fmt: skip
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert " code.issued " in line
        assert "user=carol" in line
        assert "destination=c***@example.org" in line
        assert "sealed_code" not in line
    finally:
        process.terminate()
        rc = await asyncio.wait_for(process.wait(), 30)
    assert rc == 0


async def test_dead_letters_list_and_replay(
    amqp_url: str, database_url: str, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    """A reveal the operator had not allowed yet: allowed now, replayed, issued; none lost."""
    strict = await own_worker(amqp_url, database_url, tmp_path)
    env = cli_env(amqp_url)
    async with producer(amqp_url) as p:
        refused = await p.issue(user="dave", reveal=True)
        assert refused["error"]["type"] == "reveal_not_permitted"
        confirm = await p.confirm(user="dave", code="123456", extra="x")
        assert confirm["status"] == "rejected"
    await strict.stop()

    for _ in range(2):  # listing twice shows the same two: listing takes nothing away
        listing = await otp("dead-letters", "list", "--json", env=env, cwd=tmp_path)
        assert listing.rc == 0, listing
        letters = json.loads(listing.out)
        assert sorted(d["error_type"] for d in letters) == [
            "reveal_not_permitted",
            "validation_error",
        ]
    assert [d["redacted"] for d in letters if d["routing_key"] == "code.confirm"] == [True]
    human = await otp("dead-letters", "list", env=env, cwd=tmp_path)
    assert len(human.out.splitlines()) == 2
    assert "(code redacted)" in human.out

    await start_worker(reveal_clients="test-app")
    async with event_log(amqp_url, "code.issued") as events:
        replay = await otp("dead-letters", "replay", "--all", env=env, cwd=tmp_path)
        assert replay.rc == 1, replay  # one was skipped, and says why
        assert replay.out.startswith("replayed ")
        assert "redacted" in replay.err
        await events.wait_for(lambda e: e.named("code.issued"))
        assert events.named("code.issued")[0]["user"] == "dave"

    left = json.loads((await otp("dead-letters", "list", "--json", env=env, cwd=tmp_path)).out)
    assert [d["routing_key"] for d in left] == ["code.confirm"]
    missing = await otp("dead-letters", "replay", "--message-id", "nope", env=env, cwd=tmp_path)
    assert_one_error_line(missing, 1, "otp: no dead letter")


async def test_a_confirm_that_is_not_json_is_listed_redacted_and_never_replayed(
    amqp_url: str, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    await start_worker()
    env = cli_env(amqp_url)
    body = b'{"command_id":"raw-1","user":"J\xfcrgen","client":"c","code":"424242"}'
    async with producer(amqp_url) as p:
        assert (await p.call("code.confirm", body))["status"] == "rejected"

    listing = await otp("dead-letters", "list", "--json", env=env, cwd=tmp_path)
    assert listing.rc == 0, listing
    (letter,) = json.loads(listing.out)
    assert letter["redacted"] is True
    assert "424242" not in listing.out and "[redacted]" in letter["body"]
    replay = await otp("dead-letters", "replay", "--all", env=env, cwd=tmp_path)
    assert replay.rc == 1 and "redacted" in replay.err, replay
    left = await otp("dead-letters", "list", "--json", env=env, cwd=tmp_path)
    assert len(json.loads(left.out)) == 1


async def test_keys(tmp_path: Path) -> None:
    run = await otp("keys", env=cli_env(UNREACHABLE), cwd=tmp_path)
    assert run.rc == 0
    lines = dict(line.split("=", 1) for line in run.out.splitlines())
    assert set(lines) == {"OTP_SECRET_KEY", "OTP_DELIVERY_KEY"}
    assert len(lines["OTP_SECRET_KEY"]) >= 32
    assert len(base64.urlsafe_b64decode(lines["OTP_DELIVERY_KEY"])) == 32
    second = await otp("keys", env=cli_env(UNREACHABLE), cwd=tmp_path)
    assert second.out != run.out


async def test_asyncapi_prints_the_committed_document(tmp_path: Path) -> None:
    run = await otp("asyncapi", env=cli_env(UNREACHABLE), cwd=tmp_path)
    assert run.rc == 0
    assert run.out == (ROOT / "docs" / "asyncapi.yaml").read_text()


def test_a_reader_that_goes_away_is_not_reported_as_the_broker(tmp_path: Path) -> None:
    # `otp dead-letters list | head -1` said "broker unavailable ...: [Errno 32] Broken pipe".
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "asyncapi"],  # ~24 KB: more than one write
        env=cli_env(UNREACHABLE),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=60) == 128 + signal.SIGPIPE
    assert err == b""


@pytest.mark.parametrize("worker_running", [True, False])
async def test_check(
    amqp_url: str,
    database_url: str,
    start_worker: WorkerFactory,
    tmp_path: Path,
    worker_running: bool,
) -> None:
    if worker_running:
        await start_worker()
    else:
        await (await own_worker(amqp_url, database_url, tmp_path)).stop()
    env = cli_env(amqp_url, OTP_DATABASE_URL=database_url)
    run = await otp("check", env=env, cwd=tmp_path)
    lines = run.out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "ok   broker reachable",
        "ok   worker consuming" if worker_running else "FAIL worker consuming",
        "ok   store reachable",
        "ok   outbox backlog",
    ]
    assert run.rc == (0 if worker_running else 1)
    as_json = json.loads((await otp("check", "--json", env=env, cwd=tmp_path)).out)
    assert as_json["ok"] is worker_running


async def test_check_creates_and_migrates_nothing(
    amqp_url: str, database_url: str, tmp_path: Path
) -> None:
    """A store no worker has opened yet: the check says so, and leaves it as it found it."""
    env = cli_env(amqp_url)
    urls = [database_url]
    if database_url.startswith("sqlite:"):
        urls.append(f"sqlite:///{tmp_path / 'no' / 'such' / 'otp.db'}")
    for url in urls:
        run = await otp("check", "--database-url", url, env=env, cwd=tmp_path)
        lines = [line.split(":")[0] for line in run.out.splitlines()]
        assert lines[2:] == ["FAIL store reachable", "FAIL outbox backlog"], run
        assert run.rc == 1
    if database_url.startswith("sqlite:"):
        assert sorted(p.name for p in tmp_path.iterdir()) == []
    else:
        conn = await asyncpg.connect(database_url)
        try:
            tables = await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        finally:
            await conn.close()
        assert tables == []


async def test_check_refuses_a_foreign_sqlite_file(amqp_url: str, tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
        db.commit()
    before = path.read_bytes()
    run = await otp("check", "--database-url", f"sqlite:///{path}",
                    env=cli_env(amqp_url), cwd=tmp_path)  # fmt: skip
    assert "FAIL store reachable: not an OTP database" in run.out, run
    assert run.rc == 1
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]


async def stand_in_consumer(message: AbstractIncomingMessage) -> None:
    await message.reject(requeue=True)


async def test_check_fails_over_the_backlog_bound(
    amqp_url: str, database_url: str, tmp_path: Path
) -> None:
    """One event the relay has not published, and a consumer on the command queue (a stand-in:
    a worker would relay the event), so that the bound alone decides the exit code."""
    await (await own_worker(amqp_url, database_url, tmp_path)).stop()
    store = await open_store(database_url)
    try:
        async with store.transaction() as tx:
            await tx.write(
                Writes(events=[OutboxEvent("e-1", "code.issued", b"{}", "code.issued")]),
                datetime.now(UTC),
            )
    finally:
        await store.close()
    env = cli_env(amqp_url, OTP_DATABASE_URL=database_url)
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(COMMAND_QUEUE, passive=True)
        await queue.consume(stand_in_consumer)
        over = await otp("check", "--max-backlog", "0", env=env, cwd=tmp_path)
        within = await otp("check", "--max-backlog", "1", env=env, cwd=tmp_path)
    finally:
        await connection.close()
    assert [line.split(":")[0] for line in over.out.splitlines()] == [
        "ok   broker reachable",
        "ok   worker consuming",
        "ok   store reachable",
        "FAIL outbox backlog",
    ], over
    assert over.out.splitlines()[3] == "FAIL outbox backlog: 1 event(s) waiting (bound 0)"
    assert over.rc == 1
    assert within.out.splitlines()[3] == "ok   outbox backlog: 1 event(s) waiting (bound 1)"
    assert within.rc == 0, within
    if database_url.startswith("sqlite:"):  # nobody had it open: read as it was, no -wal made
        assert sorted(p.name for p in tmp_path.glob("otp.db*")) == ["otp.db"]


BARE_INSTALL = """
import importlib.abc, pkgutil, sys
WORKER_ONLY = set(sys.argv[1].split(","))
class Missing(importlib.abc.MetaPathFinder):  # as if only `pip install .` had run
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in WORKER_ONLY:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Missing())
entry_point = pkgutil.resolve_name(sys.argv[2])  # what the `otp` script calls
sys.argv = ["otp", *sys.argv[3:]]
sys.exit(entry_point())
"""

# The worker extra's distributions, by the module each one is imported as. aiormq and pamqp
# are left out: aio-pika depends on them, so a bare install has them too.
WORKER_EXTRA_MODULES = {
    "aiosqlite": "aiosqlite",
    "asyncpg": "asyncpg",
    "pydantic-settings": "pydantic_settings",
    "structlog": "structlog",
    "cryptography": "cryptography",
    "orjson": "orjson",
    "uvloop": "uvloop",
    "jinja2": "jinja2",
    "aiosmtplib": "aiosmtplib",
    "httpx": "httpx",
    "prometheus-client": "prometheus_client",
    "pyyaml": "yaml",
}


@pytest.mark.parametrize("args", [["--help"], ["keys"], []])
async def test_otp_without_the_worker_extra_says_what_to_install(
    args: list[str], tmp_path: Path
) -> None:
    # `pip install .` (producers only) installs the `otp` script too; it used to end in
    # "ModuleNotFoundError: No module named 'orjson'" and a traceback.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = {
        re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()
        for requirement in project["optional-dependencies"]["worker"]
    }
    assert extra - {"aiormq", "pamqp"} == set(WORKER_EXTRA_MODULES), "keep the list in step"
    blocked = ",".join(WORKER_EXTRA_MODULES.values())
    script = [BARE_INSTALL, blocked, project["scripts"]["otp"]]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        *script,
        *args,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    run = Run(process.returncode or 0, "", err.decode())
    assert_one_error_line(run, 2, "otp: ")
    assert "[worker]" in run.err and "pip install" in run.err, run.err
