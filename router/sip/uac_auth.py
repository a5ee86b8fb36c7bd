"""Answering a digest challenge as a client (the trunk challenging a forwarded INVITE); pure.

Kamailio's uac_auth() does the same for a proxy: pick a challenge we can
answer (SHA-256 or MD5, qop=auth or none), compute the response with the
trunk's credentials, and send the request again with the next CSeq.
"""

from __future__ import annotations

from router.sip import digest, ids
from router.sip.message import SipMessage, auth_params


def credentials_header(challenge: SipMessage, method: str, uri: str, username: str,
                       password: str, realm_wanted: str | None = None) -> tuple[str, str] | None:
    """(header name, value) answering ``challenge``, or None if we cannot answer it."""
    name, reply_name = (("www-authenticate", "Authorization") if challenge.status == 401
                        else ("proxy-authenticate", "Proxy-Authorization"))
    offers = []
    for value in challenge.all(name):
        scheme, params = auth_params(value)
        algorithm = params.get("algorithm", "MD5").upper()
        if scheme != "digest" or algorithm not in digest.ALGORITHMS or "nonce" not in params:
            continue
        if realm_wanted and params.get("realm") != realm_wanted:
            continue
        offers.append((0 if algorithm == "SHA-256" else 1, algorithm, params))
    if not offers:
        return None
    _, algorithm, params = min(offers, key=lambda o: o[0])
    realm, nonce = params.get("realm", ""), params["nonce"]
    qop = "auth" if "auth" in [q.strip() for q in params.get("qop", "").split(",")] else None
    cnonce, nc = ids.token_hex(8), "00000001"
    ha1 = digest.ha1(algorithm, username, realm, password)
    response = digest.response(algorithm, ha1, nonce, method, uri, qop, nc, cnonce)
    value = (f'Digest username="{username}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
             f'response="{response}", algorithm={algorithm}')
    if qop:
        value += f', qop={qop}, nc={nc}, cnonce="{cnonce}"'
    if "opaque" in params:
        value += f', opaque="{params["opaque"]}"'
    return reply_name, value
