"""The handlers behind ``otp``'s commands; ``worker.cli`` parses and maps errors to lines.

Handlers print results on stdout (JSON with ``--json``) and return the exit code; anything
they raise becomes one line on stderr in ``worker.cli``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import signal
import sys
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel

from contracts.client import OtpClient
from contracts.commands import ConfirmCode, IssueCode
from contracts.replies import ConfirmResult, IssueResult
from contracts.topology import CONFIRM_ROUTING_KEY, ISSUE_ROUTING_KEY


def fail(message: str, code: int) -> int:
    print(f"otp: {message}", file=sys.stderr)
    return code


USED_URL: list[str] = []
"""The broker URL this run connects to, for the one-line error when it cannot."""


def _amqp_url(args: argparse.Namespace) -> str:
    if args.url:
        url = str(args.url)
    else:
        from worker.settings import load_settings

        url = load_settings().amqp_url
    USED_URL[:] = [url]
    return url


def masked(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _emit(args: argparse.Namespace, data: dict[str, Any], line: str) -> None:
    print(json.dumps(data) if args.json else line, flush=True)


def _reply_line(reply: BaseModel) -> str:
    data = reply.model_dump(mode="json", exclude_none=True)
    status = data.pop("status")
    error = data.pop("error", None)
    fields = " ".join(f"{k}={v}" for k, v in data.items())
    if error:
        detail = "; ".join(f"{f['loc']}: {f['msg']}" for f in error["fields"])
        fields += f" error={error['type']}: {error['message']}" + (f" ({detail})" if detail else "")
    return f"{status} {fields}"


async def issue(args: argparse.Namespace) -> int:
    command = IssueCode(  # validated before any connection: bad input needs no broker
        command_id=str(uuid.uuid4()),
        user=args.user,
        client=args.client,
        purpose=args.purpose,
        channel=args.channel,
        destination=args.destination,
        ttl_seconds=args.ttl_seconds,
        locale=args.locale,
        context=dict(args.context),
        force_new=args.force_new,
        reveal=args.reveal,
    )
    url = _amqp_url(args)
    async with OtpClient.connect(url, timeout=args.timeout, broker_user=args.broker_user) as otp:
        reply = await otp.call(ISSUE_ROUTING_KEY, command, IssueResult, retries=args.retries)
    _emit(args, reply.to_wire(), _reply_line(reply))
    return 0 if reply.status == "issued" else 1


async def confirm(args: argparse.Namespace) -> int:
    # "-": the first line of stdin, so the candidate is not in argv for `ps` to show.
    code = sys.stdin.readline().strip() if args.code == "-" else args.code
    command = ConfirmCode(
        command_id=str(uuid.uuid4()),
        user=args.user,
        client=args.client,
        purpose=args.purpose,
        code=code,
    )
    async with OtpClient.connect(_amqp_url(args), timeout=args.timeout) as otp:
        reply = await otp.call(CONFIRM_ROUTING_KEY, command, ConfirmResult, retries=args.retries)
    _emit(args, reply.to_wire(), _reply_line(reply))
    return 0 if reply.status == "confirmed" else 1


async def events(args: argparse.Namespace) -> int:
    from worker.eventlines import event_line

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def follow(otp: OtpClient) -> None:
        async with otp.subscribe(args.pattern) as stream:
            print(f"otp: listening on otp.events for {args.pattern!r}", file=sys.stderr, flush=True)
            printed = 0
            async for event in stream:
                _emit(args, event.model_dump(mode="json"), event_line(event))
                printed += 1
                if args.count is not None and printed >= args.count:
                    return

    async with OtpClient.connect(_amqp_url(args), timeout=args.timeout) as otp:
        task = asyncio.create_task(follow(otp))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        else:
            task.result()
    return 0


async def dead_list(args: argparse.Namespace) -> int:
    from worker.deadletters import list_dead_letters

    letters = await list_dead_letters(_amqp_url(args), limit=args.limit, timeout=args.timeout)
    if args.json:
        print(json.dumps([letter.as_json() for letter in letters]), flush=True)
    for letter in [] if args.json else letters:
        flag = " (code redacted)" if letter.redacted else ""
        why = letter.reason or ""
        if not why.startswith(f"{letter.error_type}:"):  # the worker's reasons already do
            why = f"{letter.error_type}: {why}"
        print(
            f"{letter.message_id or '-'} {letter.routing_key} command_id={letter.command_id} "
            f"{why}{flag}",
            flush=True,
        )
    print(f"otp: {len(letters)} dead letter(s)", file=sys.stderr)
    return 0


async def dead_replay(args: argparse.Namespace) -> int:
    from worker.deadletters import replay_dead_letters

    wanted = None if args.all else args.message_id
    report = await replay_dead_letters(
        _amqp_url(args), wanted=wanted, limit=args.limit, timeout=args.timeout
    )
    for letter in report.replayed:
        _emit(
            args,
            {"replayed": letter.message_id, "command_id": letter.command_id},
            f"replayed {letter.message_id or letter.command_id} to {letter.routing_key}",
        )
    for letter, why in report.skipped:
        print(f"otp: skipped {letter.message_id or letter.command_id}: {why}", file=sys.stderr)
    if wanted is not None and not report.found:
        return fail(f"no dead letter with message_id or command_id {wanted!r}", 1)
    return 1 if report.skipped else 0


async def keys(args: argparse.Namespace) -> int:
    from cryptography.fernet import Fernet

    keys = {
        "OTP_SECRET_KEY": secrets.token_urlsafe(32),
        "OTP_DELIVERY_KEY": Fernet.generate_key().decode(),
    }
    text = "\n".join(f"{name}={value}" for name, value in keys.items())
    print(json.dumps(keys) if args.json else text, flush=True)
    return 0


def render_asyncapi(fmt: str = "yaml") -> str:
    """The text of docs/asyncapi.yaml (a test compares the committed file with this)."""
    import yaml

    from contracts.asyncapi import build_document

    document = build_document()
    if fmt == "json":
        return json.dumps(document, indent=2) + "\n"
    return str(yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100))


async def asyncapi(args: argparse.Namespace) -> int:
    sys.stdout.write(render_asyncapi(args.format))
    return 0


async def check(args: argparse.Namespace) -> int:
    from worker.health import run_checks
    from worker.settings import load_settings

    settings = None if (args.url and args.database_url) else load_settings()
    amqp_url = args.url or (settings.amqp_url if settings else "")
    USED_URL[:] = [amqp_url]
    database_url = args.database_url or (settings.database_url if settings else "")
    checks = await run_checks(
        amqp_url, database_url, max_backlog=args.max_backlog, timeout=args.timeout
    )
    healthy = all(check.ok for check in checks)
    if args.json:
        print(json.dumps({"ok": healthy, "checks": [c.as_json() for c in checks]}), flush=True)
    else:
        for check in checks:
            print(check.line(), flush=True)
    return 0 if healthy else 1
