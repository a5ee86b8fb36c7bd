"""The policy model: users, devices, queues, trunk and routing settings.

Everything here is a frozen dataclass built once by ``router.config`` from the
YAML file.  Run-time changes never mutate these objects; they are layered on top
by ``router.policy.effective``.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import os.path
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from router.policy.numbers import dialled


class ReceiveMethod(enum.StrEnum):
    """How a call for a user reaches them (the customer's four methods)."""

    ALL_DEVICES = "all_devices"
    APP = "app"
    IP_PHONE = "ip_phone"
    AGENT_PHONE = "agent_phone"


class DeviceKind(enum.StrEnum):
    """What a registered device is; decided by its credentials."""

    WEB = "web"
    APP = "app"
    IP_PHONE = "ip_phone"


class Role(enum.StrEnum):
    ADMIN = "admin"
    AGENT = "agent"


class RoutingMode(enum.StrEnum):
    """Fork ourselves (stateful proxy) or answer 302 and let upstream fork."""

    PROXY = "proxy"
    REDIRECT = "redirect"


class CallerIdMode(enum.StrEnum):
    """How the queue hotline is presented on the PSTN leg."""

    PAI = "pai"    # P-Asserted-Identity carries the hotline; From untouched
    FROM = "from"  # From is rewritten to the hotline (restored on the way back)


# The mapping from the brief, section 2.  agent_phone rings no device.
DEVICE_KINDS: dict[ReceiveMethod, frozenset[DeviceKind]] = {
    ReceiveMethod.ALL_DEVICES: frozenset({DeviceKind.WEB, DeviceKind.APP, DeviceKind.IP_PHONE}),
    ReceiveMethod.APP: frozenset({DeviceKind.WEB, DeviceKind.APP}),
    ReceiveMethod.IP_PHONE: frozenset({DeviceKind.IP_PHONE}),
    ReceiveMethod.AGENT_PHONE: frozenset(),
}


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    kind: DeviceKind
    auth_username: str
    password: str | None = None
    ha1_md5: str | None = None
    ha1_sha256: str | None = None

    def __reduce__(self) -> tuple[Callable[..., Device], tuple[object, ...]]:
        # Pickled in bulk (the YAML is parsed in a child process, and every worker
        # unpickles every user): see ``build_device``.
        return (build_device, (self.id, self.kind, self.auth_username, self.password, self.ha1_md5,
                                    self.ha1_sha256))


@dataclass(frozen=True, slots=True)
class User:
    id: str
    display_name: str
    extension: str | None
    role: Role
    receive_method: ReceiveMethod
    agent_phone: str | None = None
    default_queue: str | None = None
    devices: tuple[Device, ...] = ()
    fallback: tuple[ReceiveMethod, ...] | None = None  # None: use the default
    ring_timeout: float | None = None                  # None: use the queue's
    password_hash: str | None = None                   # the web app's login (argon2id), None: none in the YAML

    def __reduce__(self) -> tuple[Callable[..., User], tuple[object, ...]]:
        return (build_user, (self.id, self.display_name, self.extension, self.role, self.receive_method,
                                  self.agent_phone, self.default_queue, self.devices, self.fallback,
                                  self.ring_timeout, self.password_hash))


# Unpickling sets the slots straight: the frozen dataclass's constructor goes through
# ``object.__setattr__`` once per field, which made unpickling 100,000 users take twice
# as long (0.4 s against 0.2 s, in the parse child and in every worker).  What is set is
# what was pickled, or what the reader of one-line users (``config_lines``) checked as
# the YAML reader does: values already checked (and for bindings, ``build_binding``,
# what the registrar stored).  Written out setter by setter: a loop
# over the setters costs half as much again per object.
_new = object.__new__
_USER_SLOTS = tuple(User.__dict__[f.name].__set__ for f in dataclasses.fields(User))
_DEVICE_SLOTS = tuple(Device.__dict__[f.name].__set__ for f in dataclasses.fields(Device))


def build_user(id_: str, display_name: str, extension: str | None, role: Role,
                    receive_method: ReceiveMethod, agent_phone: str | None, default_queue: str | None,
                    devices: tuple[Device, ...], fallback: tuple[ReceiveMethod, ...] | None,
                    ring_timeout: float | None, password_hash: str | None) -> User:
    user = _new(User)
    s = _USER_SLOTS
    s[0](user, id_)
    s[1](user, display_name)
    s[2](user, extension)
    s[3](user, role)
    s[4](user, receive_method)
    s[5](user, agent_phone)
    s[6](user, default_queue)
    s[7](user, devices)
    s[8](user, fallback)
    s[9](user, ring_timeout)
    s[10](user, password_hash)
    return user


def build_device(id_: str, kind: DeviceKind, auth_username: str, password: str | None,
                      ha1_md5: str | None, ha1_sha256: str | None) -> Device:
    device = _new(Device)
    s = _DEVICE_SLOTS
    s[0](device, id_)
    s[1](device, kind)
    s[2](device, auth_username)
    s[3](device, password)
    s[4](device, ha1_md5)
    s[5](device, ha1_sha256)
    return device


@dataclass(frozen=True)
class Queue:
    id: str
    name: str
    hotline: str | None = None
    dids: tuple[str, ...] = ()
    ring_timeout: float = 15.0


@dataclass(frozen=True)
class Trunk:
    host: str
    port: int = 5060
    transport: str = "udp"
    caller_id: CallerIdMode = CallerIdMode.PAI
    username: str | None = None
    password: str | None = None
    realm: str | None = None
    srv: bool = False                  # look up _sip._udp.<address> (or _tcp) SRV records
    nameserver: str | None = None      # "ip[:port]" of the DNS server to ask; None: the system's

    def uri_for(self, number: str) -> str:
        """The Request-URI that reaches ``number`` through this trunk."""
        port = "" if self.port == 5060 or self.srv else f":{self.port}"   # SRV: no port (RFC 3263)
        params = "" if self.transport == "udp" else f";transport={self.transport}"
        return f"sip:{number}@{self.host}{port}{params}"


@dataclass(frozen=True)
class TrustedPeer:
    name: str
    network: str                       # an address or CIDR, e.g. 10.0.0.5 or 10.0.0.0/24
    mode: RoutingMode | None = None    # None: the deployment's mode

    @cached_property
    def net(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.network, strict=False)


@dataclass(frozen=True)
class Listen:
    address: str = "127.0.0.1"
    port: int = 5060
    transport: str = "udp"
    advertise: str | None = None   # the address put in Via/Record-Route when listening on 0.0.0.0


@dataclass(frozen=True)
class RegistrarSettings:
    min_expires: int = 60
    max_expires: int = 3600
    default_expires: int = 3600
    max_bindings_per_device: int = 3
    max_bindings_per_aor: int = 10
    nonce_ttl: int = 300
    max_auth_failures: int = 5
    source_failures_per_minute: int = 60
    # Challenge order.  MD5 first by default: many desk phones (and SIPp) answer
    # only the first WWW-Authenticate; SHA-256-capable phones still find theirs.
    algorithms: tuple[str, ...] = ("MD5", "SHA-256")
    # User-Agent prefixes challenged with MD5 alone: these abort on a challenge
    # they cannot answer instead of skipping it (measured: baresip 1.0 says
    # "Register: Function not implemented" when SHA-256 is offered too).
    # JsSIP (browser softphones) keeps only the last WWW-Authenticate and aborts unless it is MD5.
    md5_only_agents: tuple[str, ...] = ("baresip v0.", "baresip v1.", "JsSIP")
    # NAT keep-alive: a binding reached at its source rather than its Contact gets an
    # OPTIONS every ``keepalive_interval`` seconds (0: never) and is dropped after
    # ``keepalive_max_missed`` pings in a row go unanswered.
    keepalive_interval: int = 30
    keepalive_max_missed: int = 3


@dataclass(frozen=True)
class Routing:
    mode: RoutingMode = RoutingMode.PROXY
    queue_header: str = "X-Queue"
    default_fallback: tuple[ReceiveMethod, ...] = ()
    default_ring_timeout: float = 15.0


EDGE_CLIENT_HEADER = "X-Edge-Client"   # "host:port;transport=ws": the client the edge relays for


@dataclass(frozen=True)
class Edge:
    """The Kamailio edge in front of the router: it owns every TCP, TLS and WebSocket
    connection (and rtpengine the WebRTC media) and relays to the router over UDP.

    The edge is not a trusted peer: its clients authenticate as everywhere else.  The
    router believes the ``X-Edge-Client`` header (the client's own address) only in
    requests from ``internal_address``.
    """

    address: str = "0.0.0.0"               # where the edge listens for phones and browsers
    advertise: str | None = None           # the public address, when ``address`` is a wildcard
    udp_port: int | None = 5060            # None: that listener is off
    tcp_port: int | None = 5060
    tls_port: int | None = 5061
    wss_port: int | None = 8443
    internal_address: str = "127.0.0.2"    # the edge's own address toward the router
    internal_port: int = 5062
    certificate: str = ""                  # absolute paths; generated when ``self_signed``
    private_key: str = ""
    self_signed: bool = True
    rtpengine: tuple[str, int] | None = ("127.0.0.1", 22222)   # ng control socket; None: no media relay
    media_address: str | None = None       # the address rtpengine puts in SDP (default: advertise/address)
    rtp_port_min: int = 30000
    rtp_port_max: int = 40000

    @property
    def public_address(self) -> str:
        return self.advertise or self.address


@dataclass(frozen=True)
class WebSettings:
    """The agents' and admins' web app (``sip-router web``)."""

    address: str = "127.0.0.1"
    port: int = 8080
    certificate: str | None = None         # with private_key: HTTPS, and Secure cookies
    private_key: str | None = None
    session_lifetime: int = 8 * 3600       # seconds a login lasts (cookie and bearer token)
    max_login_failures: int = 5            # bad passwords for one user in 15 minutes before it must wait
    address_failures_per_minute: int = 20  # bad logins from one address per minute before it must wait

    @property
    def tls(self) -> bool:
        return self.certificate is not None


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "auto"  # auto | json | console
    pjsip_level: int = 2  # PJSIP's own log detail, 0-6; above 3 only for debugging


@dataclass(frozen=True)
class MetricsSettings:
    """The Prometheus endpoint the router serves from its own thread (``/metrics``)."""

    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 9060


@dataclass(frozen=True)
class ControlSettings:
    """The control socket that ``sip-router status``, ``calls --live``, ``unregister``
    and ``reload`` talk to."""

    socket: str = "control.sock"           # relative to state_dir, or absolute


@dataclass(frozen=True)
class Policy:
    """The whole validated configuration, as loaded from one YAML file."""

    source: str
    domain: str
    country: str
    state_dir: str
    database: str
    listen: tuple[Listen, ...]
    users: tuple[User, ...]
    queues: tuple[Queue, ...]
    trunk: Trunk | None
    trusted_peers: tuple[TrustedPeer, ...]
    routing: Routing = field(default_factory=Routing)
    registrar: RegistrarSettings = field(default_factory=RegistrarSettings)
    log: LogSettings = field(default_factory=LogSettings)
    edge: Edge | None = None
    web: WebSettings = field(default_factory=WebSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    control: ControlSettings = field(default_factory=ControlSettings)
    workers: int = 1        # router processes sharing the listen ports (``router.workers``)

    @property
    def control_socket(self) -> str:
        """Where the running router serves its control socket."""
        return os.path.join(self.state_dir, self.control.socket)

    # Lookups are indexed once; the policy is immutable, so the index never goes stale.
    @cached_property
    def _users_by_key(self) -> dict[str, User]:
        index: dict[str, User] = {}
        for u in self.users:
            if u.extension is not None:
                index[u.extension] = u
        for u in self.users:
            index[u.id] = u
        return index

    @cached_property
    def _devices_by_auth(self) -> dict[str, User]:
        # The user only: a (user, device) pair per credential would cost 64 bytes more
        # each (6 MB at 100,000 users), and a user has only a few devices to look through.
        return {d.auth_username: u for u in self.users for d in u.devices}

    def replacing_users(self, replaced: Mapping[str, User]) -> Policy:
        """This policy with some users (by id) swapped for new copies of themselves (same
        id, extension and devices).  The others are shared, and the lookup indexes are
        carried over and patched instead of being rebuilt over every user."""
        if not replaced:
            return self
        users = tuple(replaced.get(u.id, u) for u in self.users)
        policy = dataclasses.replace(self, users=users)
        by_key = dict(self._users_by_key)
        by_auth = dict(self._devices_by_auth)
        for user in replaced.values():
            for key in (user.extension, user.id):
                if key is not None and by_key.get(key) is not None and by_key[key].id == user.id:
                    by_key[key] = user
            for device in user.devices:
                by_auth[device.auth_username] = user
        policy.__dict__["_users_by_key"] = by_key       # cached_property's own slot
        policy.__dict__["_devices_by_auth"] = by_auth
        return policy

    def user(self, key: str) -> User | None:
        """The user whose id or extension is ``key``."""
        return self._users_by_key.get(key)

    def queue(self, queue_id: str) -> Queue | None:
        for q in self.queues:
            if q.id == queue_id:
                return q
        return None

    @cached_property
    def _queues_by_number(self) -> dict[str, Queue]:
        index: dict[str, Queue] = {}
        for q in self.queues:                 # the first queue listing a number keeps it
            for number in (q.hotline, *q.dids):
                if number is not None:
                    index.setdefault(number, q)
        return index

    def queue_for_number(self, number: str) -> Queue | None:
        """The queue whose hotline or DID list contains ``number``, written in any
        form ``numbers.dialled`` reads (``+84...``, ``028...``, ``tel:...``)."""
        queue = self._queues_by_number.get(number)
        if queue is None:
            canonical_form = dialled(number, self.country)
            if canonical_form is not None and canonical_form != number:
                queue = self._queues_by_number.get(canonical_form)
        return queue

    def device_by_auth(self, auth_username: str) -> tuple[User, Device] | None:
        """The user and device that own the SIP credential ``auth_username``."""
        user = self._devices_by_auth.get(auth_username)
        if user is None:
            return None
        for device in user.devices:
            if device.auth_username == auth_username:
                return user, device
        return None


@dataclass(frozen=True, slots=True)
class Binding:
    """One registered contact of one device, as the registrar stored it.

    ``source_*`` and ``transport`` say where the REGISTER came from: a phone
    behind NAT is reached there, over the same transport (RFC 3261 §10.3 with
    the usual rport/NAT practice of Kamailio's ``fix_nated_register``).
    """

    user_id: str
    device_id: str
    kind: DeviceKind
    contact: str
    expires_at: float
    q: float = 1.0
    call_id: str = ""
    cseq: int = 0
    source_host: str = ""
    source_port: int = 0
    transport: str = "udp"
    user_agent: str = ""
    registered_at: float = 0.0
    instance: str = ""  # +sip.instance, when the phone sends one
    conn: int = 0       # the TCP connection it registered over, while it lives (never stored)
    # Via the edge (RFC 3327): the Path the edge put in the REGISTER becomes the Route
    # of every request to this binding, so it reaches the device over its own flow.
    path: tuple[str, ...] = ()
    flow: str = ""      # the device's own transport (ws, wss, tls, tcp, udp); "" = ``transport``
    client: str = ""    # the device's own "host:port" as the edge saw it; "" = the source
    at_contact: bool = False   # reachable at the Contact as written (no NAT seen); else at the source

    @property
    def via_edge(self) -> bool:
        return bool(self.path)

    @property
    def device_transport(self) -> str:
        """How the device itself is connected: ws, wss, tls, tcp or udp."""
        return self.flow or self.transport

    @property
    def device_address(self) -> str:
        """The device's own address: behind an edge, as the edge saw it."""
        if self.client:
            return self.client
        host = f"[{self.source_host}]" if ":" in self.source_host else self.source_host
        return f"{host}:{self.source_port}"


_BINDING_SLOTS = tuple(Binding.__dict__[f.name].__set__ for f in dataclasses.fields(Binding))


def build_binding(user_id: str, device_id: str, kind: DeviceKind, contact: str, expires_at: float, q: float,
                  call_id: str, cseq: int, source_host: str, source_port: int, transport: str, user_agent: str,
                  registered_at: float, instance: str, conn: int, path: tuple[str, ...], flow: str, client: str,
                  at_contact: bool) -> Binding:
    """A binding read back from the state database (values as the registrar stored them):
    100,000 of them at a start, so set as ``build_user`` sets a user's slots."""
    binding = _new(Binding)
    s = _BINDING_SLOTS
    s[0](binding, user_id)
    s[1](binding, device_id)
    s[2](binding, kind)
    s[3](binding, contact)
    s[4](binding, expires_at)
    s[5](binding, q)
    s[6](binding, call_id)
    s[7](binding, cseq)
    s[8](binding, source_host)
    s[9](binding, source_port)
    s[10](binding, transport)
    s[11](binding, user_agent)
    s[12](binding, registered_at)
    s[13](binding, instance)
    s[14](binding, conn)
    s[15](binding, path)
    s[16](binding, flow)
    s[17](binding, client)
    s[18](binding, at_contact)
    return binding
