"""``sip-router web``: the web app in one process under uvicorn.

Listens where the YAML's ``web:`` section says (127.0.0.1:8080 by default), with HTTPS
when it names a certificate and key.  SIGTERM or Ctrl-C stops it cleanly.  The socket
is bound before uvicorn starts, so an address in use or a bad certificate is one line
naming the cause, not a traceback.
"""

from __future__ import annotations

import signal
import socket
import ssl

import uvicorn

from router import log
from router.config_child import load_policy_apart
from router.errors import RouterError
from router.web.app import create_app
from router.web.backend import Backend


class WebStartError(RouterError):
    """The web app cannot start: the address is taken, or the TLS files are unusable."""


def _bind(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        raise WebStartError(f"cannot listen on {address}:{port}: {exc.strerror or exc}; "
                            "change web.address or web.port in the YAML, or stop what uses it") from None
    sock.set_inheritable(True)
    return sock


def _check_tls(certificate: str, private_key: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certificate, private_key)
    except (OSError, ssl.SSLError) as exc:
        raise WebStartError(f"HTTPS: cannot use web.certificate {certificate} with web.private_key "
                            f"{private_key}: {getattr(exc, 'strerror', None) or exc}") from None


def url_of(address: str, port: int, tls: bool) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{'https' if tls else 'http'}://{host}:{port}/"


def run(config_path: str) -> int:
    policy = load_policy_apart(config_path)
    log.configure(policy.log.level, policy.log.format)
    web = policy.web
    if web.certificate and web.private_key:
        _check_tls(web.certificate, web.private_key)
    sock = _bind(web.address, web.port)
    try:
        backend = Backend(config_path, policy=policy)
    except BaseException:
        sock.close()
        raise
    app = create_app(backend, tls=web.tls)
    config = uvicorn.Config(
        app, host=web.address, port=web.port, log_config=None, access_log=False, server_header=False,
        # the client address is the TCP peer: login throttling must not trust a forwarded header
        proxy_headers=False, lifespan="off", ssl_certfile=web.certificate, ssl_keyfile=web.private_key,
        timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    url = url_of(web.address, web.port, web.tls)
    log.get("sip-router.web").info("web.started", url=url, database=policy.database, users=len(policy.users))
    # uvicorn stops gracefully on SIGTERM/SIGINT and then raises the signal again for the
    # handler it found: this one lets the process end with status 0, like the router (and
    # a signal that comes before uvicorn listens for its own still stops it).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        backend.close()
    log.get("sip-router.web").info("web.stopped")
    return 0
