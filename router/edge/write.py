"""Put the rendered edge files in place, and ask Kamailio whether it accepts them."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping

from router.edge.render import EdgeConfigError


def write_files(files: Mapping[str, str], directory: str) -> list[str]:
    """Write each file into ``directory`` atomically (a reader sees the old file or the
    new one, never half of one); the paths written, in order."""
    try:
        os.makedirs(directory, mode=0o750, exist_ok=True)
    except OSError as exc:
        raise EdgeConfigError(f"cannot create {directory}: {exc.strerror}") from None
    paths = []
    for name, text in files.items():
        path = os.path.join(directory, name)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise EdgeConfigError(f"cannot write {path}: {exc.strerror}") from None
        paths.append(path)
    return paths


def kamailio_binary() -> str | None:
    """Kamailio's path when it is installed (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    return shutil.which("kamailio") or shutil.which("kamailio", path="/usr/sbin:/usr/local/sbin")


def check_config(path: str, kamailio: str = "kamailio", timeout: float = 60.0) -> tuple[bool, str]:
    """``kamailio -c -f path``: (accepted, what Kamailio said about it)."""
    try:
        result = subprocess.run([kamailio, "-c", "-f", path], capture_output=True, text=True,
                                timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"kamailio did not run: {exc}"
    output = (result.stdout + result.stderr).strip()
    return result.returncode == 0, output
