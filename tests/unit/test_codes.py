"""Code generation, HMAC and sealing: pure, no I/O."""

from __future__ import annotations

import hashlib
import hmac
import inspect
import math
import random
import secrets
from collections import Counter

import pytest
from cryptography.fernet import Fernet, InvalidToken

from worker.domain.codes import CodeHasher, generate_code, key_id_of
from worker.domain.sealing import Sealer


@pytest.mark.parametrize("length", range(6, 11))
def test_codes_have_the_configured_length_and_only_digits(length: int) -> None:
    for _ in range(200):
        code = generate_code(length)
        assert len(code) == length
        assert code.isdigit()


@pytest.mark.parametrize("length", [5, 11, 0])
def test_lengths_outside_6_to_10_are_refused(length: int) -> None:
    with pytest.raises(ValueError, match=r"6\.\.10"):
        generate_code(length)


def test_leading_zeros_are_kept() -> None:
    assert generate_code(6, randbelow=lambda _: 42) == "000042"


def test_the_default_source_is_the_os_csprng() -> None:
    default = inspect.signature(generate_code).parameters["randbelow"].default
    assert default is secrets.randbelow


def chi_square(codes: list[str], position: int) -> float:
    counts = Counter(code[position] for code in codes)
    expected = len(codes) / 10
    return sum((counts.get(str(d), 0) - expected) ** 2 / expected for d in range(10))


def chi2_df9_survival(x: float) -> float:
    """P(X > x) for chi-square with 9 degrees of freedom (closed form for odd degrees)."""
    series = 1 + x / 3 + x**2 / 15 + x**3 / 105
    return math.erfc(math.sqrt(x / 2)) + math.sqrt(2 * x / math.pi) * math.exp(-x / 2) * series


def chi2_df9_quantile(tail: float) -> float:
    low, high = 0.0, 200.0
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if chi2_df9_survival(middle) > tail else (low, middle)
    return low


POSITIONS_TESTED = 6 + 10
CHI2_LIMIT = chi2_df9_quantile(1e-6 / POSITIONS_TESTED)
"""About 51.3. Bonferroni over every position the next test checks: a uniform source fails
a run about once in a million (with each position at 0.001 it was one run in sixty)."""


@pytest.mark.parametrize("length", [6, 10])
def test_digits_are_uniform_chi_square(length: int) -> None:
    """300,000 codes: every position's digits pass a chi-square test of uniformity.

    Enough codes that a naive modulo bias on one position (expected statistic ~120, see the
    next test) fails it, yet a uniform source passes all but once in a million runs.
    """
    codes = [generate_code(length) for _ in range(300_000)]
    for position in range(length):
        assert chi_square(codes, position) < CHI2_LIMIT, f"position {position}"


def test_the_uniformity_check_catches_a_modulo_bias() -> None:
    """What a naive ``random_byte % 10`` does to the leading digit: 0..5 come up more often.

    The bias is small (26/256 against 25/256), so over 100,000 codes the statistic fell
    under the threshold in about one run of ten: this source is seeded and draws 300,000,
    where the expected statistic is about 120, far past the threshold, every time."""
    rng = random.Random(20261125)
    codes = [
        generate_code(
            6,
            randbelow=lambda n: (rng.randrange(256) % 10) * (n // 10) + rng.randrange(n // 10),
        )
        for _ in range(300_000)
    ]
    assert chi_square(codes, 0) > CHI2_LIMIT
    assert chi_square(codes, 5) < CHI2_LIMIT


def test_the_chi_square_tail_is_the_textbook_one() -> None:
    """The closed form against the tables: 27.88 is chi-square(9)'s 99.9 % quantile."""
    assert chi2_df9_survival(27.88) == pytest.approx(0.001, rel=0.01)
    assert chi2_df9_survival(16.92) == pytest.approx(0.05, rel=0.01)
    assert 51 < CHI2_LIMIT < 52


def test_hmac_verifies_only_the_right_code_for_its_code_id() -> None:
    hasher = CodeHasher(b"k" * 32)
    digest = hasher.digest("id-1", "123456")
    assert hasher.verify("id-1", "123456", hasher.current_key_id, digest)
    assert not hasher.verify("id-1", "123457", hasher.current_key_id, digest)
    assert not hasher.verify("id-2", "123456", hasher.current_key_id, digest)
    assert digest != b"123456" and b"123456" not in digest


def test_the_digest_is_hmac_sha256_of_code_id_and_code_under_the_key() -> None:
    key = b"k" * 32
    expected = hmac.new(key, b"id-1\x00123456", hashlib.sha256).digest()
    assert CodeHasher(key).digest("id-1", "123456") == expected
    assert CodeHasher(b"j" * 32).digest("id-1", "123456") != expected


def spy_on_compare_digest(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("worker.domain.codes.hmac.compare_digest", spy)
    return calls


def test_verify_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    hasher = CodeHasher(b"k" * 32)
    digest = hasher.digest("id-1", "123456")
    calls = spy_on_compare_digest(monkeypatch)
    assert not hasher.verify("id-1", "123457", hasher.current_key_id, digest)
    assert calls == [(hasher.digest("id-1", "123457"), digest)]


def test_verify_under_an_unknown_key_spends_a_constant_time_compare(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hasher = CodeHasher(b"k" * 32)
    digest = hasher.digest("id-1", "123456")
    calls = spy_on_compare_digest(monkeypatch)
    assert not hasher.verify("id-1", "123456", "unknown-key", digest)
    assert calls == [(digest, digest)]


def test_fingerprints_are_compared_in_constant_time_under_every_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hasher = CodeHasher(b"new-key-0123456789", previous=[b"old-key-0123456789"])
    mark = hasher.fingerprint("command", b"x")
    calls = spy_on_compare_digest(monkeypatch)
    assert hasher.fingerprint_matches("command", b"x", mark)
    assert len(calls) == 2 and all(b == mark for _, b in calls)


def test_previous_keys_still_verify_after_rotation() -> None:
    old = CodeHasher(b"old-key-0123456789")
    digest = old.digest("id", "654321")
    rotated = CodeHasher(b"new-key-0123456789", previous=[b"old-key-0123456789"])
    assert rotated.current_key_id == key_id_of(b"new-key-0123456789")
    assert rotated.verify("id", "654321", old.current_key_id, digest)
    assert not rotated.verify("id", "000000", old.current_key_id, digest)
    forgotten = CodeHasher(b"new-key-0123456789")
    assert not forgotten.verify("id", "654321", old.current_key_id, digest)


def test_pseudonyms_are_stable_and_keyed() -> None:
    a, b = CodeHasher(b"a" * 20), CodeHasher(b"b" * 20)
    assert a.pseudonym("destination", "x@example.org") == a.pseudonym(
        "destination", "x@example.org"
    )
    assert a.pseudonym("destination", "x@example.org") != b.pseudonym(
        "destination", "x@example.org"
    )
    assert "example" not in a.pseudonym("destination", "x@example.org")


def test_earlier_pseudonyms_are_those_the_previous_keys_gave() -> None:
    old, new = b"o" * 32, b"n" * 32
    rotated = CodeHasher(new, previous=[old])
    assert rotated.earlier_pseudonyms("destination", "x@example.org") == [
        CodeHasher(old).pseudonym("destination", "x@example.org")
    ]
    assert CodeHasher(new).earlier_pseudonyms("destination", "x@example.org") == []
    # The current key listed as a previous one too (a rotation half done) adds nothing.
    assert CodeHasher(new, previous=[new]).earlier_pseudonyms("destination", "x") == []


def test_fingerprints_are_keyed_and_outlive_a_rotation() -> None:
    value = b'{"code":"123456"}'
    old = CodeHasher(b"old-key-0123456789")
    mark = old.fingerprint("command", value)
    assert mark != hashlib.sha256(value).digest() and b"123456" not in mark
    assert old.fingerprint_matches("command", value, mark)
    assert not old.fingerprint_matches("command", b'{"code":"123457"}', mark)
    assert not old.fingerprint_matches("other", value, mark)
    rotated = CodeHasher(b"new-key-0123456789", previous=[b"old-key-0123456789"])
    assert rotated.fingerprint("command", value) != mark
    assert rotated.fingerprint_matches("command", value, mark)
    assert not CodeHasher(b"new-key-0123456789").fingerprint_matches("command", value, mark)


def test_sealed_code_opens_only_with_the_delivery_key() -> None:
    key = Fernet.generate_key()
    sealer = Sealer(key)
    token = sealer.seal("123456")
    assert "123456" not in token
    assert sealer.unseal(token) == "123456"
    with pytest.raises(InvalidToken):
        Sealer(Fernet.generate_key()).unseal(token)


def test_reseal_moves_a_token_to_the_current_key() -> None:
    old, new = Fernet.generate_key(), Fernet.generate_key()
    token = Sealer(old).seal("999999")
    rotated = Sealer(new, previous=[old])
    assert rotated.unseal(token) == "999999"
    moved = rotated.reseal(token)
    assert Sealer(new).unseal(moved) == "999999"
