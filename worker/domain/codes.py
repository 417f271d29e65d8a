"""Generating codes and proving knowledge of them without keeping them."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Sequence

MIN_CODE_LENGTH = 6
MAX_CODE_LENGTH = 10


def generate_code(length: int, randbelow: Callable[[int], int] = secrets.randbelow) -> str:
    """A uniformly random string of ``length`` decimal digits from the OS CSPRNG."""
    if not MIN_CODE_LENGTH <= length <= MAX_CODE_LENGTH:
        raise ValueError(f"code length must be {MIN_CODE_LENGTH}..{MAX_CODE_LENGTH}")
    return str(randbelow(10**length)).zfill(length)


def key_id_of(key: bytes) -> str:
    """A short public fingerprint naming which key produced a digest (for rotation)."""
    return hashlib.sha256(b"otp-key-id:" + key).hexdigest()[:12]


class CodeHasher:
    """HMAC-SHA256 of (code_id, code) under the current key; earlier keys still verify.

    Binding the digest to ``code_id`` means a digest copied to another row proves nothing.
    """

    def __init__(self, current: bytes, previous: Sequence[bytes] = ()) -> None:
        self._current = current
        self._keys = {key_id_of(k): k for k in (*previous, current)}
        self.current_key_id = key_id_of(current)

    def digest(self, code_id: str, code: str) -> bytes:
        return _mac(self._current, code_id, code)

    def verify(self, code_id: str, candidate: str, key_id: str, digest: bytes) -> bool:
        key = self._keys.get(key_id)
        if key is None:
            # A digest under an unknown key never matches; spend the same work regardless.
            hmac.compare_digest(_mac(self._current, code_id, candidate), digest)
            return False
        return hmac.compare_digest(_mac(key, code_id, candidate), digest)

    def pseudonym(self, purpose: str, value: str) -> str:
        """A keyed, stable stand-in for a personal value (destinations in rate-limit rows)."""
        return _pseudonym(self._current, purpose, value)

    @property
    def has_previous_keys(self) -> bool:
        return len(self._keys) > 1

    def earlier_pseudonyms(self, purpose: str, value: str) -> list[str]:
        """The value's pseudonyms under the previous keys: rows written before a rotation
        still name it so (an empty list when there was none)."""
        return [
            _pseudonym(key, purpose, value) for key in self._keys.values() if key != self._current
        ]

    def fingerprint(self, purpose: str, value: bytes) -> bytes:
        """A keyed digest of a value that is only ever compared, never read back (a command's
        content, which may hold a candidate code: unkeyed, a 6-digit one falls to 10⁶ hashes)."""
        return _fingerprint(self._current, purpose, value)

    def fingerprint_matches(self, purpose: str, value: bytes, fingerprint: bytes) -> bool:
        """Under the current or any previous key: a fingerprint outlives a key rotation."""
        matched = False
        for key in self._keys.values():
            matched |= hmac.compare_digest(_fingerprint(key, purpose, value), fingerprint)
        return matched


def _pseudonym(key: bytes, purpose: str, value: str) -> str:
    return hmac.new(key, f"{purpose}\x00{value}".encode(), hashlib.sha256).hexdigest()[:32]


def _mac(key: bytes, code_id: str, code: str) -> bytes:
    return hmac.new(key, f"{code_id}\x00{code}".encode(), hashlib.sha256).digest()


def _fingerprint(key: bytes, purpose: str, value: bytes) -> bytes:
    return hmac.new(key, purpose.encode() + b"\x00" + value, hashlib.sha256).digest()
