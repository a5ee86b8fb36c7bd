"""A self-signed certificate for the edge's TLS and WSS listeners, made with ``openssl``.

Browsers and phones reaching the edge before a real certificate is installed need
*something* to handshake with; the operator replaces it by naming real files in
``edge.certificate`` / ``edge.private_key``.  The pair is made only when missing, so
a certificate a browser has been told to accept stays the same across runs.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

from router.errors import RouterError

DAYS = 825          # the longest validity Apple's and Google's clients accept for a server certificate


class CertificateError(RouterError):
    """The self-signed pair could not be made (no openssl, unwritable directory...)."""


def _alt_names(names: Sequence[str]) -> str:
    out = []
    for name in names:
        try:
            ipaddress.ip_address(name)
            out.append(f"IP:{name}")
        except ValueError:
            out.append(f"DNS:{name}")
    return ",".join(dict.fromkeys(out))


def ensure_self_signed(certificate: str, private_key: str, names: Sequence[str],
                       openssl: str = "openssl", days: int = DAYS) -> bool:
    """Make a self-signed certificate for ``names`` (IP addresses or host names) and its
    RSA key at the given paths when either is missing; True when a pair was made.

    The key is mode 0600 from the moment it exists; both files appear only when both
    are complete (made beside their final names, then renamed)."""
    if os.path.isfile(certificate) and os.path.isfile(private_key):
        return False
    if not names:
        raise CertificateError("a self-signed certificate needs at least one address or name")
    binary = shutil.which(openssl)
    if binary is None:
        raise CertificateError(f"cannot make the edge's self-signed certificate: {openssl!r} is not "
                               "installed (Debian package openssl), or name your own certificate and "
                               "private_key in the edge section")
    for path in (certificate, private_key):
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
        except OSError as exc:
            raise CertificateError(f"cannot create {os.path.dirname(path)}: {exc.strerror}") from None
    made: list[str] = []
    try:
        key_fd, key_tmp = tempfile.mkstemp(prefix=".key-", dir=os.path.dirname(private_key) or ".")
        made.append(key_tmp)
        os.close(key_fd)                     # mkstemp made it 0600: openssl writes into it as it is
        cert_fd, cert_tmp = tempfile.mkstemp(prefix=".cert-", dir=os.path.dirname(certificate) or ".")
        made.append(cert_tmp)
        os.close(cert_fd)
        command = [binary, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", str(days),
                   "-keyout", key_tmp, "-out", cert_tmp, "-subj", f"/CN={names[0]}",
                   "-addext", f"subjectAltName={_alt_names(names)}"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CertificateError(f"openssl did not run: {exc}") from None
        if result.returncode != 0 or os.path.getsize(key_tmp) == 0 or os.path.getsize(cert_tmp) == 0:
            detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise CertificateError(f"openssl could not make the edge's certificate: {detail}")
        os.chmod(key_tmp, 0o600)
        os.chmod(cert_tmp, 0o644)
        os.replace(key_tmp, private_key)
        os.replace(cert_tmp, certificate)
        made.clear()
    except OSError as exc:
        raise CertificateError(f"cannot write the edge's certificate: {exc.strerror} "
                               f"({exc.filename or certificate})") from None
    finally:
        for leftover in made:
            try:
                os.unlink(leftover)
            except OSError:
                pass
    return True
