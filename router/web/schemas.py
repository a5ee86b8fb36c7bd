"""The JSON API's request and response bodies (they make the OpenAPI document)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Problem(BaseModel):
    """A refusal: what was wrong, which field to fix, and what to type instead."""

    error: str = Field(description="what is wrong, in words a person can act on")
    field: str | None = Field(None, description="the request field to fix, when one is to blame")
    hint: str | None = Field(None, description="what to type instead, e.g. the canonical number 84987654321")


class Throttle(Problem):
    retry_after: int = Field(description="seconds to wait (also in the Retry-After header)")


class LoginIn(BaseModel):
    user: str = Field(description="user id or extension", examples=["minh"])
    password: str


class LoginOut(BaseModel):
    token: str = Field(description="send as `Authorization: Bearer TOKEN`; it is shown only once")
    expires_at: float = Field(description="Unix time when the token stops working")
    user: str


class Device(BaseModel):
    id: str
    kind: str = Field(description="web, app or ip_phone")
    registered: bool = Field(description="logged in (registered) right now")


class Change(BaseModel):
    id: int
    at: float
    user: str
    field: str = Field(description="receive_method, agent_phone or password_hash (shown only as '(set)')")
    old: str | None
    new: str | None
    by: str
    via: str = Field(description="cli or api")


class User(BaseModel):
    id: str
    name: str
    extension: str | None
    role: str
    receive_method: str
    receive_method_source: str = Field(description="yaml or runtime: the last writer wins")
    receive_method_since: float | None
    agent_phone: str | None
    agent_phone_source: str
    fallback: list[str]
    default_queue: str | None
    devices: list[Device]
    registered: dict[str, list[str]] = Field(description="devices logged in now, by kind")
    has_password: bool
    last_change: Change | None


class DeviceState(BaseModel):
    id: str
    kind: str
    registered: bool
    rings: bool
    why_not: str | None = Field(description="not_registered, not_this_kind or phone_number; null when it rings")


class WouldRing(BaseModel):
    """What a call through the user's default queue would do right now (the `explain` logic)."""

    action: str = Field(description="ring, phone, redirect or unavailable")
    method: str | None = Field(description="the receive method or fallback step that acts")
    fallback_step: bool
    devices: list[DeviceState]
    number: str | None
    caller_id: str | None
    queue: str | None
    ring_timeout: float | None
    reason: str | None
    notes: list[str]


class Me(User):
    would_ring: WouldRing
    csrf_token: str | None = Field(None, description="for a browser session: send it as X-CSRF-Token on changes")


class ReceiveMethodIn(BaseModel):
    method: str | None = Field(None, description="all_devices, app, ip_phone or agent_phone",
                               examples=["agent_phone"])
    agent_phone: str | None = Field(None, description="84xxxxxxxxx; set before the method, in one request",
                                    examples=["84987654321"])


class ReceiveMethodOut(BaseModel):
    user: str
    receive_method: str
    receive_method_source: str
    agent_phone: str | None
    agent_phone_source: str
    fallback: list[str]
    changes: list[Change] = Field(description="what this request wrote (empty: nothing differed)")
    would_ring: WouldRing


class PasswordIn(BaseModel):
    current: str
    new: str


class PasswordOut(BaseModel):
    changed: bool
    other_sessions_ended: bool = Field(description="every other login of the user now needs the new password")


class Registration(BaseModel):
    user: str
    device: str
    kind: str
    contact: str
    source: str
    transport: str
    via: str
    expires_in: int
    user_agent: str | None
    registered_at: float


class Call(BaseModel):
    call_id: str
    started_at: float | None
    caller: str | None
    user: str | None
    queue: str | None
    method: str | None
    branches: list[str]
    answered_by: str | None
    status: int | None
    reason: str | None
    answered_at: float | None
    ended_at: float | None
    duration: float | None
    in_progress: bool = Field(description="answered and no hang-up seen yet")
