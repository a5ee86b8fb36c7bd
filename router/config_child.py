"""Load the YAML policy in a short-lived child process, for the long-running processes.

Composing YAML keeps a node and two position marks per scalar: about 600 MB of
short-lived objects for 100,000 users.  Built in the router's own heap, the frozen
policy ends up interleaved with them, and the allocator can hand none of those
arenas back: the router would keep the parse's peak (~800 MB) for its whole life.
The child parses and validates (a long users list on two cores: ``config_split``),
then sends the policy (a few tens of MB) back pickled; the parent unpickles it into
compact, contiguous memory.  The child is the same interpreter running this module,
so the pickle never crosses a trust boundary.

After a good parse of a big file the child keeps its users by their text in the
cache (``config_reuse``), and the next parse of an edited file reads only the users
whose text changed.

``check`` and the other short CLI commands load in-process: they exit straight away.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import select
import subprocess
import sys
import time
from collections.abc import Callable

from router import forked, policy_cache
from router.config import compose, load_policy, policy_from, read_text
from router.config_items import Chunks, items_of, write_all
from router.config_lines import parse_lines
from router.config_reuse import Pairing, Previous, parse_reusing, record
from router.config_split import parse_split
from router.errors import ConfigError
from router.gcpolicy import paused_gc
from router.policy.model import Policy, User


def load_policy_apart(path: str, timeout: float = 300.0) -> Policy:
    """Like ``load_policy`` (same result, same ``ConfigError``), parsed in a child."""
    parsed = parse_apart(path, timeout)
    policy = policy_of(parsed) if parsed is not None else None
    return policy if policy is not None else load_policy(path)


def parse_apart(path: str, timeout: float = 300.0, meanwhile: Callable[[], object] | None = None,
                fork: bool = False) -> bytes | None:
    """The child's answer for ``path`` as it came (see ``policy_of``); None when the
    child could not run (killed, no interpreter): not the file's fault.  A big file
    that has not changed since it was last parsed is not parsed again (``policy_cache``).
    ``meanwhile``: work for this process while the child parses (called once, either way).
    ``fork``: the child is a fork of this process, which has the parser's modules loaded
    already (~0.15 s sooner than a new interpreter); only for a process that runs no
    other thread yet, native ones included (a router that has not started PJSIP)."""
    key, kept = _kept(path)
    if kept is not None:
        if meanwhile is not None:
            meanwhile()
        return kept
    started = _fork_child(path) if fork else None
    if started is not None:
        answer = _forked_answer(*started, time.monotonic() + timeout, meanwhile)
    else:
        answer = _spawned_answer(path, timeout, meanwhile)
    if answer is not None and key is not None:
        _keep(path, key, answer)
    return answer


def _spawned_answer(path: str, timeout: float, meanwhile: Callable[[], object] | None) -> bytes | None:
    """The answer of a child started as a new interpreter, once ``meanwhile`` has run here."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    try:
        child = subprocess.Popen([sys.executable, "-m", "router.config_child", path],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    except OSError:
        child = None
    try:
        if meanwhile is not None:
            meanwhile()
    finally:
        answer = _answer(child, timeout) if child is not None else None
    return answer


def _fork_child(path: str) -> tuple[forked.Forked, int] | None:
    """The forked child parsing ``path``, and the read end of its answer; None when no
    process or pipe can be had, or a thread runs (then a new interpreter is tried, as
    without ``fork``)."""
    try:
        read_end, write_end = os.pipe()
    except OSError:
        return None
    try:
        child = forked.fork(lambda: _child(path, write_end), {}, [write_end])
    except (OSError, forked.ThreadsRunning):
        os.close(read_end)
        os.close(write_end)
        return None
    os.close(write_end)
    return child, read_end


def _forked_answer(child: forked.Forked, read_end: int, deadline: float,
                   meanwhile: Callable[[], object] | None) -> bytes | None:
    """The forked child's answer, read by ``deadline`` (the child is killed past it, and
    waited for either way), once ``meanwhile`` has run here.  A child reaped by someone
    else (SIGCHLD ignored by whoever started us) gives its answer, whole, as it is."""
    answer: bytes | None = None
    try:
        if meanwhile is not None:
            meanwhile()
    finally:
        try:
            answer = _read_all(read_end, deadline)
        finally:
            os.close(read_end)
            try:         # it keeps what it read after answering, briefly
                status = child.wait(max(0.0, deadline - time.monotonic()) if answer is not None else 0.0)
            except subprocess.TimeoutExpired:
                child.kill()
                status = child.wait()
    return answer if status == 0 or child.lost else None


def _read_all(fd: int, deadline: float) -> bytes | None:
    """Everything written to ``fd`` until its end, or None if that takes past ``deadline``."""
    chunks: list[bytes] = []
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    return None


def _answer(child: subprocess.Popen[bytes], timeout: float) -> bytes | None:
    try:
        out, _ = child.communicate(timeout=timeout)
    except subprocess.SubprocessError:
        child.kill()
        child.communicate()
        return None
    return out if child.returncode == 0 else None


def _kept(path: str) -> tuple[bytes | None, bytes | None]:
    """The file's cache key and the answer kept for it.  The cache only ever saves time:
    whatever goes wrong in it is a miss."""
    try:
        key = policy_cache.file_key(path)
        return key, (policy_cache.load(path, key) if key is not None else None)
    except Exception:  # noqa: BLE001 -- a miss, never a failed start
        return None, None


def _keep(path: str, key: bytes, answer: bytes) -> None:
    try:
        if policy_cache.file_key(path) == key:        # not edited while it was read
            policy_cache.store(path, key, answer)
    except Exception:  # noqa: BLE001 -- not kept, never a failed start
        pass


def policy_of(parsed: bytes, users: bool = True) -> Policy | None:
    """The policy in a child's answer (``users=False``: without its users, which stay
    pickled); ``ConfigError`` for a file that does not validate; None if unreadable.
    The supervisor of several workers reads the head only and hands the same bytes to
    each worker, so the file is parsed once however many workers there are."""
    try:
        with paused_gc():
            kind, payload = pickle.loads(parsed)
            if kind == "ok":
                payload = _assemble(*payload) if users else payload[0]
    except Exception:  # noqa: BLE001 -- not this version's answer (an upgrade under way), or damaged
        return None
    if kind == "error" and isinstance(payload, list):
        raise ConfigError(payload)
    return payload if kind == "ok" and isinstance(payload, Policy) else None


def _assemble(head: Policy, chunks: list[bytes]) -> Policy:
    """The users come in chunks, unpickled one by one in a Python loop: one pickle of
    100,000 users would be a single 300 ms call holding the GIL, and on a reload the
    PJSIP thread would wait that long for it."""
    users: list[User] = []
    for chunk in chunks:
        users.extend(pickle.loads(chunk))
    return dataclasses.replace(head, users=tuple(users))


def _child(path: str, out: int | None = None) -> int:
    """Parse ``path`` and write the answer to ``out`` (standard output by default)."""
    keep: Previous | None = None
    try:
        text = read_text(path)
        policy, chunks, keep = _parse(text, path)
        # A new object without the users, nor the lookup indexes the checks built.
        result: tuple[str, object] = ("ok", (dataclasses.replace(policy, users=()), chunks.pickled))
    except ConfigError as exc:
        result = ("error", exc.problems)
    if out is None:
        sys.stdout.flush()
    write_all(sys.stdout.fileno() if out is None else out, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    if out is not None:
        os.close(out)             # the answer is whole: the caller stops reading here
    if keep is not None:
        try:
            policy_cache.store_items(path, keep.dumps())
        except Exception:  # noqa: BLE001 -- not kept: the next parse reads every user
            pass
    return 0


def _parse(text: str, path: str) -> tuple[Policy, Chunks, Previous | None]:
    """The policy, its users in chunks, and (for a big file) what to keep of it.
    A file that was parsed before keeps the users whose text has not changed."""
    big = len(text) >= policy_cache.MIN_SIZE
    previous = _previous(path) if big else None
    items = items_of(text) if big else None
    with paused_gc():
        if previous is not None:
            try:
                found = parse_reusing(text, path, previous, items=items)
            except ConfigError:
                raise
            except Exception:  # noqa: BLE001 -- a fault in what was kept: read every user, keep anew
                policy_cache.forget_items(path)
                found = None
            if found is not None:
                return found
        if items is not None:
            found = parse_lines(text, path, items)
            if found is not None:
                return found
        chunks = Chunks()
        policy = parse_split(text, path, chunks)       # its halves confirm each user's item
        confirmed = policy is not None
        if policy is None:
            pairing = Pairing(text, items)
            policy = policy_from(compose(text, path), path, users_reader=pairing.read)
            confirmed = pairing.paired
            chunks.add(policy.users)
    return policy, chunks, record(text, items, policy, chunks) if big and confirmed else None


def _previous(path: str) -> Previous | None:
    try:
        kept = policy_cache.load_items(path)
    except Exception:  # noqa: BLE001 -- the cache only ever saves time
        return None
    return Previous.loads(kept) if kept is not None else None


if __name__ == "__main__":
    # Straight out once the answer is written: tearing the interpreter down would free
    # every user one by one while the router waits for this process to end.
    os._exit(_child(sys.argv[1]))
