"""The README's worked example, run as written: real processes, the real CLI, the test vhost.

The commands and the outputs that matter are read from the README's marked blocks
(``<!-- walkthrough:NAME -->`` before a command, ``<!-- walkthrough-output:NAME -->`` before
what it prints), so the README and this test cannot drift apart silently. The only
substitutions are the ones a reader makes too: the broker (``OTP_AMQP_URL`` in the
environment: the test's own vhost) and the code in ``otp confirm`` (the one just delivered).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest

from tests.support import AUDIT, ROOT
from worker.settings import Settings

README = ROOT / "README.md"
BLOCK = re.compile(
    r"<!-- walkthrough(?P<output>-output)?:(?P<name>[\w-]+) -->\s*\n"
    r"```[^\n]*\n(?P<body>.*?)\n```",
    re.DOTALL,
)
WAIT = 60.0  # a hang guard, not a performance claim


def readme_blocks() -> tuple[dict[str, list[str]], dict[str, str]]:
    """(commands by step, expected output by step) from the README's marked blocks."""
    commands: dict[str, list[str]] = {}
    outputs: dict[str, str] = {}
    for match in BLOCK.finditer(README.read_text(encoding="utf-8")):
        name, body = match["name"], match["body"]
        if match["output"]:
            outputs[name] = body
        else:
            lines = [line for line in body.splitlines() if line.strip()]
            assert len(lines) == 1, f"walkthrough step {name!r} must be exactly one command"
            commands[name] = shlex.split(lines[0], comments=True)
    return commands, outputs


def otp_argv(words: list[str]) -> list[str]:
    """``.venv/bin/otp …`` as this interpreter's ``otp`` (the same entry point, any venv)."""
    assert words[0] == ".venv/bin/otp", f"expected an otp command, got {shlex.join(words)}"
    script = Path(sys.executable).parent / "otp"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "worker.cli"]
    return [*head, *words[1:]]


def with_code(words: list[str], code: str) -> list[str]:
    at = words.index("--code")
    return [*words[: at + 1], code, *words[at + 2 :]]


def dev_env(amqp_url: str) -> dict[str, str]:
    """What ``make run`` gives its processes, pointed at the test vhost; nothing inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTP_")}
    env.update(OTP_DEV="true", OTP_AMQP_URL=amqp_url, PYTHONPATH=str(ROOT))
    return env


@contextmanager
def service(module: str, env: dict[str, str], cwd: Path, name: str) -> Iterator[Path]:
    """``python -m <module>`` in ``cwd``: stderr (the log) to ``<name>.log``, stdout to
    ``<name>.console.log``. Interrupted like Ctrl-C at the end; it must exit 0."""
    log, console = cwd.parent / f"{name}.log", cwd.parent / f"{name}.console.log"
    with log.open("wb") as err, console.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", module], env=env, cwd=cwd, stdout=out, stderr=err
        )
        try:
            yield log
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=WAIT) == 0, f"{module} did not stop cleanly"
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=WAIT)


async def wait_for_text(path: Path, pattern: str) -> re.Match[str]:
    async def poll() -> re.Match[str]:
        while not (found := re.search(pattern, path.read_text(errors="replace"), re.M)):
            await asyncio.sleep(0.02)
        return found

    try:
        return await asyncio.wait_for(poll(), WAIT)
    except TimeoutError:
        pytest.fail(f"{path.name} never showed {pattern!r}:\n{path.read_text(errors='replace')}")


async def run_cli(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), WAIT)
    log.write_bytes(out + err)  # audited like every other log: no code, no full destination
    assert process.returncode is not None
    return process.returncode, out.decode()


@asynccontextmanager
async def following(
    argv: list[str], env: dict[str, str], cwd: Path, log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``otp events --follow``, yielded once it listens; Ctrl-C at the end must exit 0."""
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    try:
        line = await asyncio.wait_for(process.stderr.readline(), WAIT)
        assert b"listening" in line, line
        yield process
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), WAIT) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def read_lines(process: asyncio.subprocess.Process, count: int, log: Path) -> list[str]:
    assert process.stdout is not None
    lines: list[str] = []
    with log.open("a", encoding="utf-8") as copy:
        while len(lines) < count:
            raw = await asyncio.wait_for(process.stdout.readline(), WAIT)
            assert raw, f"otp events ended after {lines}"
            lines.append(raw.decode().rstrip("\n"))
            copy.write(lines[-1] + "\n")
    return lines


def mail_header(text: str, name: str) -> str:
    found = re.search(rf"^{name}: (.+)$", text, re.M)
    assert found, f"no {name}: line in\n{text}"
    return found[1]


def test_make_run_starts_what_this_test_starts() -> None:
    """The test starts the two processes itself; this is what ``make run`` does too."""
    commands, _ = readme_blocks()
    assert commands["run"] == ["make", "run"]
    makefile = (ROOT / "Makefile").read_text()
    run_recipe = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "OTP_DEV=$${OTP_DEV:-true}" in run_recipe
    assert "scripts/run_dev.sh" in run_recipe
    script = (ROOT / "scripts" / "run_dev.sh").read_text()
    assert '"$PY" -m worker &' in script
    assert '"$PY" -m worker.notifier &' in script


async def test_readme_walkthrough(amqp_url: str, tmp_path: Path) -> None:
    commands, expected = readme_blocks()
    assert {"run", "events", "issue", "confirm"} <= commands.keys()
    assert {"issue", "delivery", "confirm", "events"} <= expected.keys()
    clone = tmp_path / "clone"  # the reader's checkout: var/ is created inside it
    clone.mkdir()
    env = dev_env(amqp_url)
    destination = mail_header(expected["delivery"], "To")
    AUDIT.destinations.add(destination)

    with (
        service("worker", env, clone, "worker") as worker_log,
        service("worker.notifier", env, clone, "notifier") as notifier_log,
    ):
        await wait_for_text(worker_log, "worker consuming")
        await wait_for_text(notifier_log, "notifier consuming")
        console = tmp_path / "notifier.console.log"

        events_log = tmp_path / "otp-events.log"
        async with following(otp_argv(commands["events"]), env, clone, events_log) as events:
            status, issued = await run_cli(
                otp_argv(commands["issue"]), env, clone, tmp_path / "otp-issue.log"
            )
            assert (status, issued.split()[0]) == (0, expected["issue"].split()[0]), issued
            code_id = re.search(r"code_id=(\S+)", issued)
            assert code_id, issued

            mail = await wait_for_text(
                console, rf"^To: {re.escape(destination)}\n(?:.*\n)*?-{{72}}$"
            )
            code = re.search(r"^\s+(\d{6,10})\s*$", mail[0], re.M)
            assert code, mail[0]
            AUDIT.codes.add(code[1])
            subject = mail_header(expected["delivery"], "Subject")
            assert mail_header(mail[0], "Subject") == subject

            status, confirmed = await run_cli(
                with_code(otp_argv(commands["confirm"]), code[1]),
                env,
                clone,
                tmp_path / "otp-confirm.log",
            )
            assert (status, confirmed.split()[0]) == (0, expected["confirm"].split()[0])
            assert f"code_id={code_id[1]}" in confirmed

            wanted = [line.split()[1] for line in expected["events"].splitlines()]
            lines = await read_lines(events, len(wanted), events_log)
        # The notifier may publish code.delivered just after the confirmation: any order.
        assert sorted(line.split()[1] for line in lines) == sorted(wanted)
        assert all(f"code_id={code_id[1]}" in line for line in lines), lines

    assert (clone / "var" / "secret_key").exists()  # dev mode: keys generated into var/
    assert (clone / "var" / "delivery_key").exists()
    assert (clone / "var" / "otp.db").exists()


def test_readme_lists_every_setting() -> None:
    """The configuration table names every OTP_ variable the processes read."""
    text = README.read_text(encoding="utf-8")
    table = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    missing = [
        f"OTP_{name.upper()}"
        for name in Settings.model_fields
        if not re.search(rf"`OTP_{name.upper()}`", table)
    ]
    assert not missing, f"README configuration table lacks {missing}"
