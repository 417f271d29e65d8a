"""``otp``: the operator's and producer's command line.

Every failure ends as one line on stderr and a non-zero exit, never a traceback: the CLI is
used in scripts and health probes, where a line is read and a traceback is noise.
Exit codes: 0 success; 1 a negative answer (not issued/confirmed, a failed check) or an
unreachable broker, a timeout; 2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

from aio_pika.exceptions import AMQPError
from pydantic import ValidationError

from contracts.client import OtpError
from worker import cli_commands as commands
from worker.cli_commands import USED_URL, fail, masked
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
        if getattr(args, "broker_user", None) and not args.reveal:
            raise UsageError("--broker-user is only sent with --reveal: add --reveal, or drop it")
        if not hasattr(args, "handler"):
            build_parser().print_help(sys.stderr)
            return 2
        handler: Handler = args.handler
        return asyncio.run(handler(args))
    except UsageError as exc:
        return fail(str(exc), 2)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`otp dead-letters list | head -1`): not the broker's doing.
        # Quiet, as other tools are, and with stdout pointed away so the exit's flush of
        # what was left does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as exc:
        return fail(*_explain(exc))


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
        where = f" at {masked(USED_URL[0])}" if USED_URL else ""
        return f"broker unavailable{where}: {describe(exc)}", 1
    return f"unexpected error: {type(exc).__name__}: {describe(exc)}", 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="otp", description="Issue and confirm one-time codes; operate them.")
    common = _Parser(add_help=False)
    common.add_argument("--url", type=_broker_url, help="broker URL (default: OTP_AMQP_URL)")
    common.add_argument("--timeout", type=_seconds, default=10.0, help="seconds (default 10)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)

    issue = sub.add_parser("issue", parents=[common], help="issue (or resend) a code")
    _scope(issue)
    issue.add_argument("--channel", choices=["email", "sms", "none"], default="none")
    issue.add_argument("--destination")
    issue.add_argument("--ttl", type=int, dest="ttl_seconds", metavar="SECONDS")
    issue.add_argument("--force-new", action="store_true")
    issue.add_argument("--reveal", action="store_true", help="return the plaintext code")
    issue.add_argument(
        "--broker-user",
        metavar="NAME",
        help="the broker user this connection logs in as, sent with --reveal "
        "(default: the URL's login; needed with auth=external)",
    )
    issue.add_argument("--locale", default="en")
    issue.add_argument("--context", action="append", type=_pair, default=[], metavar="K=V")
    issue.set_defaults(handler=commands.issue)

    confirm = sub.add_parser("confirm", parents=[common], help="confirm a code")
    _scope(confirm)
    confirm.add_argument(
        "--code",
        required=True,
        help="the code, or - to read it from stdin (an argument shows in the process list)",
    )
    confirm.set_defaults(handler=commands.confirm)

    events = sub.add_parser("events", parents=[common], help="print events as they happen")
    events.add_argument("--pattern", default="#", help="topic pattern, e.g. 'code.*'")
    until = events.add_mutually_exclusive_group(required=True)
    until.add_argument("--follow", action="store_true", help="until interrupted")
    until.add_argument("--count", type=_at_least(1), metavar="N", help="exit after N events")
    events.set_defaults(handler=commands.events)

    dead = sub.add_parser("dead-letters", help="inspect or replay otp.dead-letter")
    dead_sub = dead.add_subparsers(title="actions", metavar="ACTION", parser_class=_Parser)
    listing = dead_sub.add_parser("list", parents=[common], help="show them; all stay queued")
    listing.add_argument("--limit", type=_at_least(1), default=10_000)
    listing.set_defaults(handler=commands.dead_list)
    replay = dead_sub.add_parser("replay", parents=[common], help="re-publish to otp.commands")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true")
    which.add_argument("--message-id", metavar="ID", help="message_id (or command_id)")
    replay.add_argument("--limit", type=_at_least(1), default=10_000)
    replay.set_defaults(handler=commands.dead_replay)

    keys = sub.add_parser("keys", help="generate OTP_SECRET_KEY and OTP_DELIVERY_KEY")
    keys.add_argument("--json", action="store_true")
    keys.set_defaults(handler=commands.keys)

    asyncapi = sub.add_parser("asyncapi", help="print the AsyncAPI 3.0 document")
    asyncapi.add_argument("--format", choices=["yaml", "json"], default="yaml")
    asyncapi.set_defaults(handler=commands.asyncapi)

    check = sub.add_parser("check", parents=[common], help="health check: exit 0 or 1")
    check.add_argument("--database-url", type=_database_url, help="default: OTP_DATABASE_URL")
    check.add_argument("--max-backlog", type=_at_least(0), default=1000, metavar="N")
    check.set_defaults(handler=commands.check)
    return parser


def _scope(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", required=True)
    parser.add_argument("--client", required=True)
    parser.add_argument("--purpose", default="login")
    parser.add_argument("--retries", type=_at_least(0), default=0, help="re-publish on timeout")


def _broker_url(value: str) -> str:
    """Checked as OTP_AMQP_URL is: aio-pika retries a URL without a host for ever, whatever
    ``--timeout`` says."""
    from worker.settings import amqp_url_problem

    return _checked(value, amqp_url_problem(value))


def _database_url(value: str) -> str:
    from worker.settings import database_url_problem

    return _checked(value, database_url_problem(value))


def _checked(value: str, problem: str | None) -> str:
    if problem:
        raise argparse.ArgumentTypeError(problem)  # never the value: it may hold a password
    return value


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds above 0, got {value!r}")
    return seconds


def _at_least(lowest: int) -> Callable[[str], int]:
    def whole(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
        if number < lowest:
            raise argparse.ArgumentTypeError(f"expected {lowest} or more, got {value!r}")
        return number

    return whole


def _pair(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected K=V, got {value!r}")
    return key, val


if __name__ == "__main__":
    sys.exit(main())
