"""The sealed code: a Fernet token only the holder of the delivery key can open."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

__all__ = ["InvalidToken", "Sealer"]


class Sealer:
    """Seals under the current delivery key; opens tokens of the previous keys too."""

    def __init__(self, current: bytes, previous: Sequence[bytes] = ()) -> None:
        self._fernet = MultiFernet([Fernet(current), *(Fernet(k) for k in previous)])

    def seal(self, code: str) -> str:
        return self._fernet.encrypt(code.encode()).decode()

    def unseal(self, token: str, ttl: int | None = None) -> str:
        return self._fernet.decrypt(token.encode(), ttl=ttl).decode()

    def reseal(self, token: str) -> str:
        """The same code under the current key (a resend after a key rotation)."""
        return self._fernet.rotate(token.encode()).decode()
