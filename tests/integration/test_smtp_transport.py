"""The SMTP transport's connection reuse, against a real aiosmtpd server."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.notifier_support import SmtpServer, relay_config
from worker.notifier.render import Email
from worker.notifier.transports import (
    PermanentDeliveryError,
    SmtpTransport,
    TransientDeliveryError,
)

MAIL = Email(subject="Your code", text="plain", html="<p>html</p>")


def transport(smtp: SmtpServer, pool_size: int = 4, idle_seconds: float = 60.0) -> SmtpTransport:
    return SmtpTransport(relay_config(smtp, pool_size=pool_size, idle_seconds=idle_seconds))


async def test_mails_in_turn_share_one_connection(smtp: SmtpServer) -> None:
    email = transport(smtp)
    for n in range(3):
        await email.send_email(f"user{n}@example.org", MAIL, f"code-{n}")
    assert smtp.quits == 0
    await email.close()  # says goodbye on the kept connection
    assert [m.to for m in smtp.mails] == [[f"user{n}@example.org"] for n in range(3)]
    assert smtp.sessions == 1
    assert smtp.quits == 1


async def test_a_connection_idle_too_long_is_closed_without_waiting_for_a_mail(
    smtp: SmtpServer,
) -> None:
    # Long enough that a slow host does not stretch the gap between two sends past it.
    email = transport(smtp, idle_seconds=1.5)
    await email.send_email("a@example.org", MAIL, "code-1")
    await email.send_email("b@example.org", MAIL, "code-2")
    assert smtp.quits == 0  # reused, not yet idle for long
    await smtp.wait_for(lambda: smtp.quits == 1)  # no mail came: QUIT all the same
    await email.send_email("c@example.org", MAIL, "code-3")  # a new connection
    await email.close()
    assert smtp.sessions == 2
    assert smtp.quits == 2


async def test_a_connection_the_server_dropped_is_replaced_before_the_mail_goes(
    smtp: SmtpServer,
) -> None:
    email = transport(smtp)
    await email.send_email("before@example.org", MAIL, "code-1")
    smtp.restart()  # the idle connection is gone; the next send must not fail for it
    await email.send_email("after@example.org", MAIL, "code-2")
    await email.close()
    assert [m.to for m in smtp.mails] == [["before@example.org"], ["after@example.org"]]
    assert smtp.sessions == 2


async def test_overlapping_mails_never_wait_and_only_pool_size_stay_open(
    smtp: SmtpServer,
) -> None:
    email = transport(smtp, pool_size=1)

    async def overlapping(count: int) -> None:
        smtp.hold(after=len(smtp.mails))
        held = smtp.held
        sends = [
            asyncio.create_task(email.send_email(f"u{n}@example.org", MAIL, f"c{n}"))
            for n in range(count)
        ]
        # Every send reached DATA at once: none waited for another's connection.
        await smtp.wait_for(lambda: smtp.held == held + count)
        smtp.release(accept=True)
        await asyncio.gather(*sends)

    await overlapping(3)
    assert smtp.sessions == 3
    await overlapping(2)  # one connection was kept from the first round, one more is opened
    assert smtp.sessions == 4
    await email.close()
    assert len(smtp.mails) == 5


async def test_pool_size_zero_opens_a_connection_per_mail(smtp: SmtpServer) -> None:
    email = transport(smtp, pool_size=0)
    await email.send_email("a@example.org", MAIL, "code-1")
    await email.send_email("b@example.org", MAIL, "code-2")
    assert len(smtp.mails) == 2
    assert smtp.sessions == 2


async def test_a_failed_mail_leaves_no_connection_behind(smtp: SmtpServer) -> None:
    email = transport(smtp)
    smtp.answers = ["451 4.3.0 try again later"]
    with pytest.raises(TransientDeliveryError, match="451"):
        await email.send_email("a@example.org", MAIL, "code-1")
    await email.send_email("a@example.org", MAIL, "code-1")
    await email.close()
    assert len(smtp.mails) == 1
    assert smtp.sessions == 2


async def test_a_server_without_smtputf8_fails_a_non_ascii_address_for_good() -> None:
    # Retrying could only fail the same way, until the attempts ran out.
    server = SmtpServer(enable_SMTPUTF8=False)
    server.start()
    try:
        email = transport(server)
        with pytest.raises(PermanentDeliveryError, match="smtputf8"):
            await email.send_email("jörg@example.de", MAIL, "code-1")
        await email.close()
    finally:
        server.stop()
    assert server.mails == []


async def test_a_send_cancelled_while_checking_a_kept_connection_closes_it(
    smtp: SmtpServer,
) -> None:
    # The claim's lease cuts a send off by cancelling it, NOOP included.
    email = transport(smtp)
    await email.send_email("a@example.org", MAIL, "code-1")
    [(kept, _)] = email._idle
    smtp.hold(noops=True)
    send = asyncio.create_task(email.send_email("b@example.org", MAIL, "code-2"))
    await smtp.wait_for(lambda: smtp.noops_held == 1)
    send.cancel()
    with pytest.raises(asyncio.CancelledError):
        await send
    assert not kept.is_connected
    assert email._idle == []
    smtp.release()
    await email.close()
    assert [m.to for m in smtp.mails] == [["a@example.org"]]
