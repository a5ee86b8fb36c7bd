"""Login sessions of the web app, kept in the router's state database.

A session is a random token handed to the browser (as a cookie) or to an API client
(as a bearer token).  Only its SHA-256 is stored, so a copy of the database does not
let anyone log in.  Each session also remembers a fingerprint of the password hash in
force when it was made: when the password changes (in the web app, with
``set-password`` or in the YAML) every older session stops working.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from dataclasses import dataclass

SCHEMA = """
CREATE TABLE IF NOT EXISTS web_sessions (
    token_hash TEXT PRIMARY KEY, user_id TEXT NOT NULL, kind TEXT NOT NULL, csrf TEXT NOT NULL,
    credential TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS web_sessions_user ON web_sessions (user_id);
CREATE INDEX IF NOT EXISTS web_sessions_expiry ON web_sessions (expires_at);
"""

COOKIE = "cookie"    # a browser's session: changes need the CSRF token too
BEARER = "bearer"    # an API client's token in ``Authorization: Bearer``


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def credential_of(password_hash: str | None) -> str:
    """A fingerprint of the password hash in force (not the hash itself)."""
    return hashlib.sha256((password_hash or "").encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Session:
    token_hash: str
    user_id: str
    kind: str
    csrf: str
    credential: str
    created_at: float
    expires_at: float


@dataclass(frozen=True)
class NewSession:
    token: str           # shown once, to the client; never stored or logged
    session: Session


class SqliteSessionStore:
    """The ``web_sessions`` table; created when missing.  Callers serialize access."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        conn.executescript(SCHEMA)

    def create(self, user_id: str, kind: str, credential: str, now: float, lifetime: float) -> NewSession:
        token = secrets.token_urlsafe(32)
        session = Session(token_hash(token), user_id, kind, secrets.token_urlsafe(24), credential,
                          now, now + lifetime)
        with self.conn:
            self.conn.execute(
                "INSERT INTO web_sessions (token_hash, user_id, kind, csrf, credential, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (session.token_hash, user_id, kind, session.csrf, credential, now, session.expires_at))
        return NewSession(token, session)

    def find(self, token: str, kind: str, now: float) -> Session | None:
        """The live session of ``token`` used as ``kind``, or None."""
        row = self.conn.execute(
            "SELECT token_hash, user_id, kind, csrf, credential, created_at, expires_at FROM web_sessions "
            "WHERE token_hash = ? AND kind = ? AND expires_at > ?", (token_hash(token), kind, now)).fetchone()
        return Session(*row) if row else None

    def delete(self, hashed: str) -> None:
        with self.conn:
            self.conn.execute("DELETE FROM web_sessions WHERE token_hash = ?", (hashed,))

    def delete_user(self, user_id: str, keep: str | None = None) -> int:
        """End every session of ``user_id`` except the one whose hash is ``keep``."""
        with self.conn:
            cur = self.conn.execute("DELETE FROM web_sessions WHERE user_id = ? AND token_hash != ?",
                                    (user_id, keep or ""))
        return cur.rowcount

    def set_credential(self, hashed: str, credential: str) -> None:
        with self.conn:
            self.conn.execute("UPDATE web_sessions SET credential = ? WHERE token_hash = ?", (credential, hashed))

    def purge_expired(self, now: float) -> int:
        with self.conn:
            cur = self.conn.execute("DELETE FROM web_sessions WHERE expires_at <= ?", (now,))
        return cur.rowcount
