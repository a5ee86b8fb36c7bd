"""Web app passwords: argon2id hashes (RFC 9106), made and checked here only.

A user's password hash comes from the YAML (``password_hash``) or from a run-time
change (``set-password``, or the user in the web app), whichever was written last,
like the other per-user values (``router.policy.effective``).  The password itself
is never stored or logged.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 256          # argon2 takes any length; a megabyte "password" is an attack
_HASHER = PasswordHasher()         # argon2id with the library's RFC 9106 low-memory profile


class WeakPassword(ValueError):
    """A password refused before hashing, with the reason."""


def check_strength(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPassword(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise WeakPassword(f"a password may have at most {MAX_PASSWORD_LENGTH} characters")


def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` (raises ``WeakPassword`` for one too short or long)."""
    check_strength(password)
    return _HASHER.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Does ``password`` match?  False for no hash, a malformed hash or an oversized password."""
    if not password_hash or len(password) > MAX_PASSWORD_LENGTH:
        return False
    try:
        return _HASHER.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
