"""Telling a repeat of a command from another command that reuses its ``command_id``.

The contract's repeat "returns the first reply and has no further effect". A command with the
same id and other content is not a repeat: replaying the first reply to it would hand one
user's ``confirmed`` (or a revealed code) to whoever reused the id. So every stored reply
keeps a keyed fingerprint of the command it answered, and a command under a used id gets that
reply only when its fingerprint matches; otherwise it is rejected (``command_id_reused``).
"""

from __future__ import annotations

import orjson

from contracts.replies import ErrorInfo
from worker.domain.codes import CodeHasher
from worker.parsing import Command, Rejection, kind_of
from worker.store.base import StoredReply

PURPOSE = "command"
REUSED_MESSAGE = (
    "command_id was already used for a different command; a new command needs a new command_id"
)


def canonical(command: Command) -> bytes:
    """Every field of the parsed command, defaults filled in, keys sorted: two bodies that
    parse to the same command encode the same, whatever their key order or omitted defaults."""
    fields = command.model_dump(mode="json")
    return orjson.dumps({"kind": kind_of(command), **fields}, option=orjson.OPT_SORT_KEYS)


def fingerprint(hasher: CodeHasher, command: Command) -> bytes:
    """HMAC-SHA256 under the secret key: the content holds a candidate code or a destination,
    which an unkeyed hash would give away to anyone reading the replies table."""
    return hasher.fingerprint(PURPOSE, canonical(command))


def is_repeat(hasher: CodeHasher, command: Command, stored: StoredReply) -> bool:
    """Rows stored before fingerprints were kept have none: they are replayed as before."""
    if stored.fingerprint is None:
        return True
    return hasher.fingerprint_matches(PURPOSE, canonical(command), stored.fingerprint)


def reused(command: Command) -> Rejection:
    """The refusal says nothing of the command that first used the id."""
    return Rejection(
        kind_of(command),
        command.command_id,
        ErrorInfo(type="command_id_reused", message=REUSED_MESSAGE),
    )
