"""``otp``: the operator's and producer's command line.

Every failure ends as one line on stderr and a non-zero exit, never a traceback: the CLI is
used in scripts and health probes, where a line is read and a traceback is noise.
Exit codes: 0 success; 1 a negative answer (not issued/confirmed, a failed check) or an
unreachable broker, a timeout; 2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import signal
import sys
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from aio_pika.exceptions import AMQPError
from pydantic import BaseModel, ValidationError

from contracts.client import OtpClient, OtpError
from contracts.commands import ConfirmCode, IssueCode
from contracts.replies import ConfirmResult, IssueResult
from contracts.topology import CONFIRM_ROUTING_KEY, ISSUE_ROUTING_KEY
from worker.health import describe

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


class UsageError(Exception):
    """Bad arguments: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def main(argv: Sequence[str] | None = None) -> int:
    logging.getLogger().addHandler(logging.NullHandler())  # aio-pika's warnings are not ours
    try:
        args = build_parser().parse_args(argv)
        if not hasattr(args, "handler"):
            build_parser().print_help(sys.stderr)
            return 2
        handler: Handler = args.handler
        return asyncio.run(handler(args))
    except UsageError as exc:
        return _fail(str(exc), 2)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return _fail(*_explain(exc))


def _explain(exc: Exception) -> tuple[str, int]:
    from worker.settings import ConfigError

    if isinstance(exc, ConfigError):
        return f"configuration error: {exc}", 2
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'command'}: {e['msg']}" for e in exc.errors()
        )
        return f"invalid command: {problems}", 2
    if isinstance(exc, OtpError):
        return str(exc), 1
    if isinstance(exc, (AMQPError, OSError, TimeoutError)):
        where = f" at {masked(_USED_URL[0])}" if _USED_URL else ""
        return f"broker unavailable{where}: {describe(exc)}", 1
    return f"unexpected error: {type(exc).__name__}: {describe(exc)}", 1


def _fail(message: str, code: int) -> int:
    print(f"otp: {message}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="otp", description="Issue and confirm one-time codes; operate them.")
    common = _Parser(add_help=False)
    common.add_argument("--url", help="broker URL (default: OTP_AMQP_URL)")
    common.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)

    issue = sub.add_parser("issue", parents=[common], help="issue (or resend) a code")
    _scope(issue)
    issue.add_argument("--channel", choices=["email", "sms", "none"], default="none")
    issue.add_argument("--destination")
    issue.add_argument("--ttl", type=int, dest="ttl_seconds", metavar="SECONDS")
    issue.add_argument("--force-new", action="store_true")
    issue.add_argument("--reveal", action="store_true", help="return the plaintext code")
    issue.add_argument("--locale", default="en")
    issue.add_argument("--context", action="append", type=_pair, default=[], metavar="K=V")
    issue.set_defaults(handler=_issue)

    confirm = sub.add_parser("confirm", parents=[common], help="confirm a code")
    _scope(confirm)
    confirm.add_argument("--code", required=True)
    confirm.set_defaults(handler=_confirm)

    events = sub.add_parser("events", parents=[common], help="print events as they happen")
    events.add_argument("--pattern", default="#", help="topic pattern, e.g. 'code.*'")
    until = events.add_mutually_exclusive_group(required=True)
    until.add_argument("--follow", action="store_true", help="until interrupted")
    until.add_argument("--count", type=int, metavar="N", help="exit after N events")
    events.set_defaults(handler=_events)

    dead = sub.add_parser("dead-letters", help="inspect or replay otp.dead-letter")
    dead_sub = dead.add_subparsers(title="actions", metavar="ACTION", parser_class=_Parser)
    listing = dead_sub.add_parser("list", parents=[common], help="show them; all stay queued")
    listing.add_argument("--limit", type=int, default=10_000)
    listing.set_defaults(handler=_dead_list)
    replay = dead_sub.add_parser("replay", parents=[common], help="re-publish to otp.commands")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true")
    which.add_argument("--message-id", metavar="ID", help="message_id (or command_id)")
    replay.add_argument("--limit", type=int, default=10_000)
    replay.set_defaults(handler=_dead_replay)

    keys = sub.add_parser("keys", help="generate OTP_SECRET_KEY and OTP_DELIVERY_KEY")
    keys.add_argument("--json", action="store_true")
    keys.set_defaults(handler=_keys)

    asyncapi = sub.add_parser("asyncapi", help="print the AsyncAPI 3.0 document")
    asyncapi.add_argument("--format", choices=["yaml", "json"], default="yaml")
    asyncapi.set_defaults(handler=_asyncapi)

    check = sub.add_parser("check", parents=[common], help="health check: exit 0 or 1")
    check.add_argument("--database-url", help="default: OTP_DATABASE_URL")
    check.add_argument("--max-backlog", type=int, default=1000, metavar="N")
    check.set_defaults(handler=_check)
    return parser


def _scope(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", required=True)
    parser.add_argument("--client", required=True)
    parser.add_argument("--purpose", default="login")
    parser.add_argument("--retries", type=int, default=0, help="re-publish on timeout")


def _pair(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected K=V, got {value!r}")
    return key, val


_USED_URL: list[str] = []
"""The broker URL this run connects to, for the one-line error when it cannot."""


def _amqp_url(args: argparse.Namespace) -> str:
    if args.url:
        url = str(args.url)
    else:
        from worker.settings import load_settings

        url = load_settings().amqp_url
    _USED_URL[:] = [url]
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


async def _issue(args: argparse.Namespace) -> int:
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
    async with OtpClient.connect(_amqp_url(args), timeout=args.timeout) as otp:
        reply = await otp.call(ISSUE_ROUTING_KEY, command, IssueResult, retries=args.retries)
    _emit(args, reply.to_wire(), _reply_line(reply))
    return 0 if reply.status == "issued" else 1


async def _confirm(args: argparse.Namespace) -> int:
    command = ConfirmCode(
        command_id=str(uuid.uuid4()),
        user=args.user,
        client=args.client,
        purpose=args.purpose,
        code=args.code,
    )
    async with OtpClient.connect(_amqp_url(args), timeout=args.timeout) as otp:
        reply = await otp.call(CONFIRM_ROUTING_KEY, command, ConfirmResult, retries=args.retries)
    _emit(args, reply.to_wire(), _reply_line(reply))
    return 0 if reply.status == "confirmed" else 1


async def _events(args: argparse.Namespace) -> int:
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


async def _dead_list(args: argparse.Namespace) -> int:
    from worker.deadletters import list_dead_letters

    letters = await list_dead_letters(_amqp_url(args), limit=args.limit, timeout=args.timeout)
    if args.json:
        print(json.dumps([letter.as_json() for letter in letters]), flush=True)
    for letter in [] if args.json else letters:
        flag = " (code redacted)" if letter.redacted else ""
        print(
            f"{letter.message_id or '-'} {letter.routing_key} command_id={letter.command_id} "
            f"{letter.error_type}: {letter.reason}{flag}",
            flush=True,
        )
    print(f"otp: {len(letters)} dead letter(s)", file=sys.stderr)
    return 0


async def _dead_replay(args: argparse.Namespace) -> int:
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
        return _fail(f"no dead letter with message_id or command_id {wanted!r}", 1)
    return 1 if report.skipped else 0


async def _keys(args: argparse.Namespace) -> int:
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


async def _asyncapi(args: argparse.Namespace) -> int:
    sys.stdout.write(render_asyncapi(args.format))
    return 0


async def _check(args: argparse.Namespace) -> int:
    from worker.health import run_checks
    from worker.settings import load_settings

    settings = None if (args.url and args.database_url) else load_settings()
    amqp_url = args.url or (settings.amqp_url if settings else "")
    _USED_URL[:] = [amqp_url]
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


if __name__ == "__main__":
    sys.exit(main())
