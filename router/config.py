"""Load the YAML policy into frozen dataclasses, with file:line errors.

The file is composed (not merely loaded) so that every value keeps its line.
All problems are collected and raised together as one ``ConfigError``; the
caller decides what to do with it (``check`` prints them, ``run`` refuses to
start, a reload keeps the last good policy).  Nothing here exits the process.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import Protocol

import yaml

from router.errors import ConfigError, InvalidNumber
from router.gcpolicy import paused_gc
from router.policy.model import (
    CallerIdMode,
    ControlSettings,
    Device,
    DeviceKind,
    Edge,
    Listen,
    LogSettings,
    MetricsSettings,
    Policy,
    Queue,
    ReceiveMethod,
    RegistrarSettings,
    Role,
    Routing,
    RoutingMode,
    Trunk,
    TrustedPeer,
    User,
    WebSettings,
)
from router.policy.numbers import canonical
from router.yamlnodes import Loader, MapReader, Place, Problems, place, scalar_text

DEFAULT_CONFIG = "config/router.yaml"
MIN_RING_TIMEOUT = 3.0
METHODS = [m.value for m in ReceiveMethod]
KINDS = [k.value for k in DeviceKind]
# Members by value: a dict lookup is several times cheaper than ``Enum(value)``, read per user.
_METHOD = {m.value: m for m in ReceiveMethod}
_KIND = {k.value: k for k in DeviceKind}
_ROLE = {r.value: r for r in Role}
_ROLES = list(_ROLE)
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_TOKEN = re.compile(r"^[A-Za-z0-9._~!$&'*+-]+$")  # safe in a SIP URI user part


def load_policy(path: str, parallel: bool = False) -> Policy:
    """Read and validate the policy file at ``path``; raise ``ConfigError``.

    ``parallel``: a long users list is read fast when written one user per line
    (``config_lines``), else on two cores (``config_split``); both fork: only for a
    process with no other threads, such as the CLI."""
    text = read_text(path)
    with paused_gc():
        if parallel:
            from router.config_lines import parse_lines  # imports this module
            found = parse_lines(text, path)
            if found is not None:
                return found[0]
            from router.config_split import parse_split  # imports this module
            policy = parse_split(text, path)
            if policy is not None:
                return policy
        return parse_policy(text, path)


def read_text(path: str) -> str:
    """The text of the file at ``path``; ``ConfigError`` when it cannot be read or is not UTF-8."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError([f"{path}:1: cannot read the file: {exc.strerror}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([f"{path}:{line}:{column}: byte 0x{data[exc.start]:02x} is not UTF-8 text; "
                           "save the file as UTF-8"]) from None
    return text


def parse_policy(text: str, filename: str = "<config>") -> Policy:
    return policy_from(compose(text, filename), filename)


def compose(text: str, filename: str) -> yaml.Node:
    """The node tree of ``text``; ``ConfigError`` (file:line:column) if it is not YAML."""
    try:
        root = yaml.compose(text, Loader=Loader)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_yaml_error(text, filename, exc)]) from None
    except yaml.reader.ReaderError as exc:      # a control character, before any token
        line = text[:exc.position].count("\n") + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)   # libyaml: a number
        raise ConfigError([f"{filename}:{line}:{column}: not valid YAML: character U+{code:04X} "
                           "is not allowed in the file"]) from None
    if root is None:
        raise ConfigError([f"{filename}:1: the file is empty"])
    return root


UsersReader = Callable[[list[yaml.Node], "Problems", str], tuple[list[User | None], Sequence[Place]]]


class MoreUsers(Protocol):
    """The rest of the users list, read elsewhere while this process reads the rest."""

    def begin(self, country: str, first: int) -> None:
        """Start reading, given the country and the index of the first of these users."""

    def end(self, problems: Problems, read_here: list[User | None]) -> tuple[list[User | None], list[Place]]:
        """The users (None for one with a problem; its problems go to ``problems``) and
        their places in the file.  ``read_here``: the users before them, which may be
        prepared (pickled) while the rest is still being read."""


def policy_from(root: yaml.Node, filename: str, more_users: MoreUsers | None = None,
                users_reader: UsersReader | None = None) -> Policy:
    """The policy in a composed file; ``ConfigError`` with every problem found.
    ``users_reader``: reads the users list's nodes (given the problems and the country)
    in place of ``read_users``, as ``config_reuse`` does for a list partly kept."""
    problems = Problems(filename)
    top = MapReader(root, "", problems)
    if not top.ok:
        raise ConfigError(problems.lines)
    policy = _build(top, filename, problems, more_users, users_reader)
    top.done()
    if problems.lines or policy is None:
        raise ConfigError(problems.lines)
    return policy


def _country(top: MapReader) -> str:
    return str(top.str("country", "VN")).upper()


def country_of(root: yaml.Node) -> str | None:
    """The country a composed file names (its users' phone numbers are read by it), or
    None when that setting has a problem."""
    problems = Problems("")
    top = MapReader(root, "", problems)
    if not top.ok:
        return None
    country = _country(top)
    return None if problems.lines else country


def _yaml_error(text: str, filename: str, exc: yaml.MarkedYAMLError) -> str:
    """``file:line:column: not valid YAML: ...``, pointing at a tab when one is the cause:
    PyYAML and libyaml name a tab in indentation only as a character that "cannot start
    any token", or mark the token before it."""
    mark = exc.problem_mark or exc.context_mark
    if mark is None:
        return f"{filename}:1: not valid YAML: {exc.problem}"
    line, column = mark.line, mark.column
    lines = text.split("\n")
    here = lines[line] if line < len(lines) else ""
    indent = here[:len(here) - len(here.lstrip(" \t"))]
    tab = here[column:column + 1] == "\t" or "\t" in indent or "tab" in (exc.problem or "")
    if tab and here[column:column + 1] != "\t" and "\t" in indent:
        column = indent.index("\t")
    hint = " (a tab: YAML indents with spaces only; replace it with spaces)" if tab else ""
    return f"{filename}:{line + 1}:{column + 1}: not valid YAML: {exc.problem}{hint}"


def _build(top: MapReader, filename: str, problems: Problems,
           more_users: MoreUsers | None, users_reader: UsersReader | None) -> Policy | None:
    domain = top.str("domain", required=True)
    country = _country(top)
    base = os.path.dirname(os.path.abspath(filename)) if not filename.startswith("<") else os.getcwd()
    state_dir = os.path.normpath(os.path.join(base, top.str("state_dir", "/var/lib/sip-router")))
    database = os.path.join(state_dir, top.str("database", "router.db"))
    listen = tuple(_listen(n, f"listen[{i}]", problems) for i, n in enumerate(top.list("listen")))
    if not listen:
        listen = (Listen(),)
    routing = _routing(top.sub("routing"), problems)
    registrar = _registrar(top.sub("registrar"), problems)
    log = _log(top.sub("log"))
    trunk = _trunk(top.sub("trunk"))
    peers = tuple(_peer(n, f"trusted_peers[{i}]", problems)
                  for i, n in enumerate(top.list("trusted_peers")))
    queues = tuple(_queue(n, f"queues[{i}]", problems, country, routing)
                   for i, n in enumerate(top.list("queues")))
    nodes = top.list("users")
    if more_users is not None:
        more_users.begin(country, len(nodes))
    places: Sequence[Place]
    if users_reader is not None:
        read, places = users_reader(nodes, problems, country)
    else:
        read, placed = read_users(nodes, 0, problems, country)
        if more_users is not None:
            more, more_places = more_users.end(problems, read)
            read += more
            placed += more_places
        places = placed
    users = tuple(read)
    edge = _edge(top.sub("edge"), state_dir, problems)
    web = _web(top.sub("web"), state_dir, problems)
    metrics = _metrics(top.sub("metrics"), problems)
    control = _control(top.sub("control"))
    workers = _workers(top, listen, problems)
    _cross_check(top, users, places, queues, trunk, routing, problems)
    if edge is not None:
        _check_edge(top, edge, listen, peers, problems)
    if any(x is None for x in (*listen, *peers, *queues, *users)) or domain is None:
        return None
    return Policy(source=filename, domain=domain, country=country, state_dir=state_dir,
                  database=database, listen=listen, users=users, queues=queues,  # type: ignore[arg-type]
                  trunk=trunk, trusted_peers=peers, routing=routing,  # type: ignore[arg-type]
                  registrar=registrar, log=log, edge=edge, web=web, metrics=metrics, control=control,
                  workers=workers)


MAX_WORKERS = 32


def _workers(top: MapReader, listen: tuple[Listen | None, ...], problems: Problems) -> int:
    """``workers: N`` or ``auto`` (one per CPU core).  Several workers share each UDP
    port, and worker k also listens on port+1+k (its own port in Via and Record-Route),
    so those ports must be free; TCP stays with a single worker."""
    node = top.raw("workers")
    if node is None:
        return 1
    text = scalar_text(node)
    if text == "auto":
        count = max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    else:
        count = top.number("workers", 1, integer=True, minimum=1, maximum=MAX_WORKERS)
    if count > 1:
        tcp = [x for x in listen if x is not None and x.transport == "tcp"]
        if tcp:
            problems.add(node, "workers", f"{count} workers share UDP ports only: the tcp listener on "
                                          f"port {tcp[0].port} needs `workers: 1` (put TCP on the edge)")
        ports = {x.port for x in listen if x is not None}
        for x in listen:
            if x is None:
                continue
            clash = sorted(ports & set(range(x.port + 1, x.port + 1 + count)))
            if clash:
                problems.add(node, "workers", f"worker ports {x.port + 1}-{x.port + count} (listen port "
                                              f"{x.port} + 1 + worker) include listen port {clash[0]}: "
                                              "space the listen ports further apart")
    return int(count)


def _listen(node: yaml.Node, path: str, problems: Problems) -> Listen | None:
    m = MapReader(node, path, problems)
    if not m.ok:
        return None
    address = m.str("address", "127.0.0.1")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        problems.add(m.node_of("address"), f"{path}.address", f"{address!r} is not an IP address")
    result = Listen(address=address,
                    port=m.number("port", 5060, integer=True, minimum=1, maximum=65535),
                    transport=m.choice("transport", ["udp", "tcp"], "udp"),
                    advertise=m.str("advertise"))
    if address in ("0.0.0.0", "::") and result.advertise is None:
        problems.add(m.node, path, f"listening on {address} needs `advertise:`, the address phones "
                                   "and peers reach this router at (it goes into Via and Record-Route)")
    m.done()
    return result


def _edge(m: MapReader | None, state_dir: str, problems: Problems) -> Edge | None:
    if m is None or not m.ok:
        return None
    d = Edge()
    address = _ip(m, "address", d.address, problems)
    internal = _ip(m, "internal_address", d.internal_address, problems)
    certificate = m.str("certificate", "self-signed")
    self_signed = certificate == "self-signed"
    if self_signed:       # made by `sip-router edge-config` when missing
        certificate = os.path.join(state_dir, "edge", "cert.pem")
        key = os.path.join(state_dir, "edge", "key.pem")
        if m.has("private_key"):
            problems.add(m.node_of("private_key"), f"{m.path}.private_key",
                         "a self-signed certificate comes with its own key: remove private_key, "
                         "or name both certificate and private_key files")
            m.str("private_key")
    else:
        key = m.str("private_key", required=True) or ""
        certificate = os.path.join(state_dir, certificate)   # absolute paths stay as they are
        key = os.path.join(state_dir, key)
    rtpengine = _hostport(m, "rtpengine", "127.0.0.1:22222", problems)
    ports = m.list("rtp_ports") if "rtp_ports" in m.items else []
    low, high = d.rtp_port_min, d.rtp_port_max
    if ports:
        values = [scalar_text(n) or "" for n in ports]
        if len(values) != 2 or not all(v.isdigit() for v in values) \
                or not 1024 <= int(values[0]) < int(values[1]) <= 65535:
            problems.add(m.node_of("rtp_ports"), f"{m.path}.rtp_ports",
                         "must be [first, last]: two port numbers, 1024 <= first < last <= 65535")
        else:
            low, high = int(values[0]), int(values[1])
    media = m.str("media_address")
    if media is not None:
        try:
            ipaddress.ip_address(media)
        except ValueError:
            problems.add(m.node_of("media_address"), f"{m.path}.media_address",
                         f"{media!r} is not an IP address")
    result = Edge(address=address, advertise=m.str("advertise"),
                  udp_port=_listener(m, "udp", d.udp_port, problems),
                  tcp_port=_listener(m, "tcp", d.tcp_port, problems),
                  tls_port=_listener(m, "tls", d.tls_port, problems),
                  wss_port=_listener(m, "wss", d.wss_port, problems),
                  internal_address=internal,
                  internal_port=m.number("internal_port", d.internal_port, integer=True, minimum=1,
                                         maximum=65535),
                  certificate=certificate, private_key=key, self_signed=self_signed,
                  rtpengine=rtpengine, media_address=media, rtp_port_min=low, rtp_port_max=high)
    if address in ("0.0.0.0", "::") and result.advertise is None:
        problems.add(m.node, m.path, f"an edge listening on {address} needs `advertise:`, the address "
                                     "phones and browsers reach it at")
    if not any((result.udp_port, result.tcp_port, result.tls_port, result.wss_port)):
        problems.add(m.node, m.path, "every listener is off: turn on at least one of udp, tcp, tls, wss")
    m.done()
    return result


def _ip(m: MapReader, key: str, default: str, problems: Problems) -> str:
    value = m.str(key, default) or default
    try:
        ipaddress.ip_address(value)
    except ValueError:
        problems.add(m.node_of(key), f"{m.path}.{key}", f"{value!r} is not an IP address")
    return value


def _listener(m: MapReader, key: str, default: int | None, problems: Problems) -> int | None:
    """A listener's port, or None when it is ``off``."""
    if key not in m.items:
        return default
    node = m.items[key][1]
    m.used.add(key)
    text = (scalar_text(node) or "").lower()
    if text in ("off", "false", "no", "~", "null", ""):
        return None
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        problems.add(node, f"{m.path}.{key}", f"{text!r} is not a port number (1-65535) or off")
        return default
    return int(text)


def _hostport(m: MapReader, key: str, default: str, problems: Problems) -> tuple[str, int] | None:
    """``ip:port`` (``[v6]:port``), or None when ``off``."""
    if key in m.items and (scalar_text(m.items[key][1]) or "").lower() in ("off", "false", "no", "~", "null", ""):
        m.used.add(key)
        return None
    value = m.str(key, default) or default
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError
    except ValueError:
        problems.add(m.node_of(key), f"{m.path}.{key}", f"{value!r} is not ip:port (or off)")
        return None
    return host, int(port)


def _check_edge(top: MapReader, edge: Edge, listen: tuple[Listen | None, ...],
                peers: tuple[TrustedPeer | None, ...], problems: Problems) -> None:
    node = top.items["edge"][1]
    internal = ipaddress.ip_address(edge.internal_address)
    for peer in peers:
        if peer is not None and internal in peer.net:
            problems.add(node, "edge.internal_address",
                         f"{edge.internal_address} is inside trusted peer {peer.name!r} ({peer.network}): "
                         "every client of the edge would be trusted; give the edge its own address")
    if internal.is_loopback:        # the edge is on this host: nobody else should reach the router
        for x in listen:
            if x is not None and not _is_loopback(x.address):
                problems.add(node, "edge", f"with the edge on this host the router listens on loopback only, "
                                           f"not {x.address}: phones and browsers reach it through the edge")
    udp = [x for x in listen if x is not None and x.transport == "udp"]
    if not udp:
        problems.add(node, "edge", "the edge relays to the router over UDP: add a udp entry to `listen:`")
    taken = {(edge.address, p) for p in (edge.udp_port, edge.tcp_port, edge.tls_port, edge.wss_port) if p}
    taken.add((edge.internal_address, edge.internal_port))
    for x in listen:
        if x is not None and ((x.address, x.port) in taken
                              or (edge.address in ("0.0.0.0", "::") and x.port in
                                  (edge.udp_port, edge.tcp_port, edge.tls_port, edge.wss_port))):
            problems.add(node, "edge", f"the router's listen {x.address}:{x.port} is also an edge "
                                       "listener: give one of them another port")


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return True          # not an address at all: reported where it is read


def _routing(m: MapReader | None, problems: Problems) -> Routing:
    if m is None or not m.ok:
        return Routing()
    fallback = _methods(m, "fallback", problems)
    result = Routing(mode=RoutingMode(m.choice("mode", ["proxy", "redirect"], "proxy")),
                     queue_header=m.str("queue_header", "X-Queue"),
                     default_fallback=fallback or (),
                     default_ring_timeout=m.number("ring_timeout", 15.0, minimum=MIN_RING_TIMEOUT))
    m.done()
    return result


def _methods(m: MapReader, key: str, problems: Problems) -> tuple[ReceiveMethod, ...] | None:
    if not m.has(key) and key not in m.items:
        m.used.add(key)
        return None
    out: list[ReceiveMethod] = []
    for node in m.list(key):
        text = scalar_text(node)
        if text in ("none", ""):
            continue
        if text not in METHODS:
            problems.add(node, f"{m.path}.{key}", f"{text!r} is not a receive method ({', '.join(METHODS)})")
        elif ReceiveMethod(text) in out:
            problems.add(node, f"{m.path}.{key}", f"{text!r} is listed twice")
        else:
            out.append(ReceiveMethod(text))
    return tuple(out)


def _registrar(m: MapReader | None, problems: Problems) -> RegistrarSettings:
    if m is None or not m.ok:
        return RegistrarSettings()
    d = RegistrarSettings()
    result = RegistrarSettings(
        min_expires=m.number("min_expires", d.min_expires, integer=True, minimum=1),
        max_expires=m.number("max_expires", d.max_expires, integer=True, minimum=1),
        default_expires=m.number("default_expires", d.default_expires, integer=True, minimum=1),
        max_bindings_per_device=m.number("max_bindings_per_device", d.max_bindings_per_device,
                                         integer=True, minimum=1, maximum=10),
        max_bindings_per_aor=m.number("max_bindings_per_aor", d.max_bindings_per_aor,
                                      integer=True, minimum=1, maximum=20),
        nonce_ttl=m.number("nonce_ttl", d.nonce_ttl, integer=True, minimum=10),
        max_auth_failures=m.number("max_auth_failures", d.max_auth_failures, integer=True, minimum=1),
        source_failures_per_minute=m.number("source_failures_per_minute",
                                            d.source_failures_per_minute, integer=True, minimum=1),
        algorithms=_algorithms(m, d.algorithms),
        md5_only_agents=tuple(scalar_text(n) or "" for n in m.list("md5_only_agents"))
        if "md5_only_agents" in m.items else d.md5_only_agents,
        keepalive_interval=m.number("keepalive_interval", d.keepalive_interval, integer=True, minimum=0),
        keepalive_max_missed=m.number("keepalive_max_missed", d.keepalive_max_missed, integer=True,
                                      minimum=1, maximum=100),
    )
    if not result.min_expires <= result.default_expires <= result.max_expires:
        problems.add(m.node, m.path, "needs min_expires <= default_expires <= max_expires")
    m.done()
    return result


def _algorithms(m: MapReader, default: tuple[str, ...]) -> tuple[str, ...]:
    nodes = m.list("algorithms")
    if not nodes:
        return default
    out: list[str] = []
    for node in nodes:
        text = (scalar_text(node) or "").upper()
        if text not in ("MD5", "SHA-256"):
            m.problems.add(node, f"{m.path}.algorithms", f"{text!r} is not MD5 or SHA-256")
        elif text not in out:
            out.append(text)
    return tuple(out) or default


def _log(m: MapReader | None) -> LogSettings:
    if m is None or not m.ok:
        return LogSettings()
    result = LogSettings(level=m.choice("level", ["debug", "info", "warning", "error"], "info"),
                         format=m.choice("format", ["auto", "json", "console"], "auto"),
                         pjsip_level=m.number("pjsip_level", 2, integer=True, minimum=0, maximum=6))
    m.done()
    return result


def _trunk(m: MapReader | None) -> Trunk | None:
    if m is None or not m.ok:
        return None
    result = Trunk(host=m.str("address", required=True) or "",
                   port=m.number("port", 5060, integer=True, minimum=1, maximum=65535),
                   transport=m.choice("transport", ["udp", "tcp"], "udp"),
                   caller_id=CallerIdMode(m.choice("caller_id", ["pai", "from"], "pai")),
                   username=m.str("username"), password=m.str("password"), realm=m.str("realm"),
                   srv=m.choice("srv", ["true", "false", "yes", "no"], "false") in ("true", "yes"),
                   nameserver=m.str("nameserver"))
    if result.nameserver is not None:
        host, _, port = result.nameserver.rpartition(":") if result.nameserver.count(":") == 1 \
            else (result.nameserver, "", "53")
        try:
            ipaddress.ip_address(host or result.nameserver)
            if port and not (port.isdigit() and 0 < int(port) < 65536):
                raise ValueError
        except ValueError:
            m.problems.add(m.node_of("nameserver"), f"{m.path}.nameserver",
                           f"{result.nameserver!r} is not an IP address with an optional :port")
    if (result.username is None) != (result.password is None):
        m.problems.add(m.node, m.path, "username and password go together")
    m.done()
    return result


def _peer(node: yaml.Node, path: str, problems: Problems) -> TrustedPeer | None:
    m = MapReader(node, path, problems)
    if not m.ok:
        return None
    address = m.str("address", required=True)
    if address is not None:
        try:
            address = str(ipaddress.ip_network(address, strict=False))
        except ValueError:
            problems.add(m.node_of("address"), f"{path}.address",
                         f"{address!r} is not an address or network (e.g. 10.0.0.5 or 10.0.0.0/24)")
    mode = m.choice("mode", ["proxy", "redirect"])
    result = TrustedPeer(name=m.str("name", address or "peer"), network=address or "",
                         mode=RoutingMode(mode) if mode else None)
    m.done()
    return result


def _number(m: MapReader, key: str, country: str, required: bool = False) -> str | None:
    raw = m.str(key, required=required)
    if raw is None:
        return None
    try:
        return canonical(raw, country)
    except InvalidNumber as exc:
        m.problems.add(m.node_of(key), f"{m.path}.{key}", str(exc))
        return None


def _queue(node: yaml.Node, path: str, problems: Problems, country: str,
           routing: Routing) -> Queue | None:
    m = MapReader(node, path, problems)
    if not m.ok:
        return None
    qid = m.str("id", required=True)
    dids: list[str] = []
    for n in m.list("dids"):
        text = scalar_text(n) or ""
        try:
            dids.append(canonical(text, country))
        except InvalidNumber as exc:
            problems.add(n, f"{path}.dids", str(exc))
    result = Queue(id=qid or "", name=m.str("name", qid or ""),
                   hotline=_number(m, "hotline", country), dids=tuple(dids),
                   ring_timeout=m.number("ring_timeout", routing.default_ring_timeout,
                                         minimum=MIN_RING_TIMEOUT))
    m.done()
    return result


def _device(node: yaml.Node, path: str, problems: Problems) -> Device | None:
    m = MapReader(node, path, problems)
    if not m.ok:
        return None
    did = m.str("id", required=True)
    username = m.str("username", did)
    if username is not None and not _TOKEN.match(username):
        problems.add(m.node_of("username"), f"{path}.username",
                     f"{username!r} may hold only letters, digits and . _ ~ - +")
    password, ha1, ha1_256 = m.str("password"), m.str("ha1"), m.str("ha1_sha256")
    if password is None and ha1 is None:
        problems.add(m.node, path, "needs a password or an ha1 (MD5 of username:realm:password)")
    if password is not None and (ha1 is not None or ha1_256 is not None):
        problems.add(m.node, path, "give a password or ha1/ha1_sha256, not both")
    if ha1 is not None and not _HEX32.match(ha1):
        problems.add(m.node_of("ha1"), f"{path}.ha1", "must be 32 hex digits (an MD5 digest)")
    if ha1_256 is not None and not _HEX64.match(ha1_256):
        problems.add(m.node_of("ha1_sha256"), f"{path}.ha1_sha256", "must be 64 hex digits")
    kind = m.choice("kind", KINDS, required=True)
    m.done()
    if did is None or kind is None or username is None:
        return None
    if username == did:
        username = did          # one string object for both (100,000 devices: 5 MB per process)
    return Device(id=did, kind=_KIND[kind], auth_username=username, password=password,
                  ha1_md5=ha1.lower() if ha1 else None,
                  ha1_sha256=ha1_256.lower() if ha1_256 else None)


def read_users(nodes: list[yaml.Node], first: int, problems: Problems,
               country: str) -> tuple[list[User | None], list[Place]]:
    """The users in ``nodes`` (``users[first]`` onwards; None for one with a problem) and
    where each is in the file."""
    return ([_user(n, f"users[{first + i}]", problems, country) for i, n in enumerate(nodes)],
            [place(n) for n in nodes])


def _user(node: yaml.Node, path: str, problems: Problems, country: str) -> User | None:
    m = MapReader(node, path, problems)
    if not m.ok:
        return None
    uid = m.str("id", required=True)
    if uid is not None and not _TOKEN.match(uid):
        problems.add(m.node_of("id"), f"{path}.id", f"{uid!r} may hold only letters, digits and . _ ~ - +")
    devices = [_device(n, f"{path}.devices[{i}]", problems) for i, n in enumerate(m.list("devices"))]
    method = m.choice("receive_method", METHODS, "all_devices")
    result = User(
        id=uid or "", display_name=m.str("display_name", uid or ""),
        extension=m.str("extension"), role=_ROLE[m.choice("role", _ROLES, "agent")],
        receive_method=_METHOD[method], agent_phone=_number(m, "agent_phone", country),
        default_queue=m.str("default_queue"),
        devices=tuple([d for d in devices if d is not None]),
        fallback=_methods(m, "fallback", problems),
        ring_timeout=m.number("ring_timeout", None, minimum=MIN_RING_TIMEOUT),
        password_hash=_password_hash(m, path, problems))
    m.done()
    return result if uid is not None else None


def _password_hash(m: MapReader, path: str, problems: Problems) -> str | None:
    value = m.str("password_hash")
    if value is not None and not value.startswith("$argon2id$"):
        problems.add(m.node_of("password_hash"), f"{path}.password_hash",
                     "is not an argon2id hash: make one with `sip-router hash-password` "
                     "(never put the password itself here)")
        return None
    return str(value) if value is not None else None


def _web(m: MapReader | None, state_dir: str, problems: Problems) -> WebSettings:
    if m is None or not m.ok:
        return WebSettings()
    d = WebSettings()
    certificate, key = m.str("certificate"), m.str("private_key")
    if (certificate is None) != (key is None):
        problems.add(m.node, m.path, "HTTPS needs both certificate and private_key")
        certificate = key = None
    result = WebSettings(
        address=_ip(m, "address", d.address, problems),
        port=m.number("port", d.port, integer=True, minimum=1, maximum=65535),
        certificate=os.path.join(state_dir, certificate) if certificate else None,
        private_key=os.path.join(state_dir, key) if key else None,
        session_lifetime=m.number("session_lifetime", d.session_lifetime, integer=True, minimum=60),
        max_login_failures=m.number("max_login_failures", d.max_login_failures, integer=True, minimum=1),
        address_failures_per_minute=m.number("address_failures_per_minute", d.address_failures_per_minute,
                                             integer=True, minimum=1))
    m.done()
    return result


def _metrics(m: MapReader | None, problems: Problems) -> MetricsSettings:
    if m is None or not m.ok:
        return MetricsSettings()
    d = MetricsSettings()
    result = MetricsSettings(
        enabled=m.choice("enabled", ["true", "false", "yes", "no", "on", "off"], "true") in ("true", "yes", "on"),
        address=_ip(m, "address", d.address, problems),
        port=m.number("port", d.port, integer=True, minimum=1, maximum=65535))
    m.done()
    return result


def _control(m: MapReader | None) -> ControlSettings:
    if m is None or not m.ok:
        return ControlSettings()
    result = ControlSettings(socket=m.str("socket", ControlSettings.socket))
    m.done()
    return result


def _duplicates(problems: Problems, what: str, values: list[str],
                entries: Callable[[], Iterable[tuple[str, Place, str]]]) -> None:
    """Report each repeat of a value at the repeat, naming where it was first used.
    ``values`` alone settle the usual case, no repeat; ``entries`` (value, place, path)
    are made only when there is one to report."""
    if len(set(values)) == len(values):
        return
    first: dict[str, str] = {}
    for value, where, path in entries():
        if value in first:
            problems.add_at(where, path, f"{what} {value!r} is already used by {first[value]}")
        else:
            first[value] = path


def _cross_check(top: MapReader, users: tuple[User | None, ...], places: Sequence[Place],
                 queues: tuple[Queue | None, ...], trunk: Trunk | None, routing: Routing,
                 problems: Problems) -> None:
    placed = [u for u in users if u is not None]

    def at() -> Iterable[tuple[User, Place, str]]:
        return ((u, places[i], f"users[{i}]") for i, u in enumerate(users) if u is not None)
    queue_ids = {q.id for q in queues if q is not None}
    _duplicates(problems, "user id or extension",
                [u.id for u in placed] + [u.extension for u in placed if u.extension],
                lambda: chain(((u.id, n, p) for u, n, p in at()),
                              ((u.extension, n, p) for u, n, p in at() if u.extension)))
    _duplicates(problems, "device id", [d.id for u in placed for d in u.devices],
                lambda: ((d.id, n, p) for u, n, p in at() for d in u.devices))
    _duplicates(problems, "device username", [d.auth_username for u in placed for d in u.devices],
                lambda: ((d.auth_username, n, p) for u, n, p in at() for d in u.devices))
    queue_nodes = top.list("queues")
    _duplicates(problems, "queue id", [q.id for q in queues if q is not None],
                lambda: ((q.id, place(queue_nodes[i]), f"queues[{i}]")
                         for i, q in enumerate(queues) if q is not None))
    agent = ReceiveMethod.AGENT_PHONE
    by_default = agent in routing.default_fallback
    for i, u in enumerate(users):
        if u is None:
            continue
        if u.receive_method is agent or (by_default if u.fallback is None else agent in u.fallback):
            if u.agent_phone is None:
                problems.add_at(places[i], f"users[{i}].agent_phone",
                                f"user {u.id!r} may ring agent_phone but has no valid agent_phone number")
            if trunk is None:
                problems.add_at(places[i], f"users[{i}]",
                                f"user {u.id!r} may ring agent_phone but no trunk is configured")
        if u.default_queue is not None and u.default_queue not in queue_ids:
            problems.add_at(places[i], f"users[{i}].default_queue", f"no queue with id {u.default_queue!r}")
