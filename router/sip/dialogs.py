"""Dialogs the router record-routed, and the requests inside them (RFC 3261 §16.12); pure.

Theory of operation.  When a branch answers 2xx, the proxy opens a ``Dialog``
keyed by Call-ID and the callee's tag (a forked INVITE answered by two phones
makes two dialogs, and the caller's ACK and BYE for each reach the right
phone).  A dialog has two ends: the caller (the source of the INVITE) and the
callee (where the answering branch was sent).  Each end is a ``Party``: an
address, and what the router knows the end to be -- a trusted peer (any
address of that peer's network speaks for it) or a registered device (any
address that device holds a live registration from speaks for it).  The
recorded host speaks for its end from any port: a NAT binding or a TCP
connection may change during a long call.

An in-dialog request (ACK, BYE, re-INVITE, REFER ...) is accepted only from
the end its tags say it comes from; it is forwarded to the other end, never
to an address the request names.  A request from anyone else is a
``Stranger``: the core answers 403 and nothing is forwarded, so knowing a
Call-ID and the tags is not enough to hang up or redirect someone's call.
Behind the edge every phone speaks from the edge's address; the edge names
the device's own address in ``X-Edge-Client`` and that is what is compared.

The caller-ID rewrite and the CSeq step of an authenticated PSTN leg are
applied to requests toward the trunk and undone on responses coming back.
The BYE of the answered dialog completes the call record; ended and aged
dialogs are forgotten by ``sweep``, which the core runs as housekeeping.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, replace

from router.records import CallRecord
from router.sip.callrules import restore, rewrite_headers, summary
from router.sip.commands import Log, SaveCall, Send, Source, send_to
from router.sip.forward import Local, dialog_branch, forward_request, strip_top_via, via_destination
from router.sip.message import SipMessage

DIALOG_TTL = 12 * 3600.0
ENDED_LINGER = 32.0            # an ended dialog still relays the BYE's retransmissions and 200


@dataclass(frozen=True)
class Party:
    """One end of a dialog."""

    source: Source                 # where its requests come from, and where ours go
    peer: str | None = None        # the trusted peer it was admitted as
    device: str | None = None      # the registered device it is


@dataclass
class Dialog:
    call_id: str
    caller_tag: str
    callee_tag: str
    caller: Party
    callee: Party
    expires_at: float
    record: CallRecord | None                  # None for a second answer of a forked call
    rewrite: tuple[str, str] | None = None     # (caller's From, the hotline From) when From is rewritten
    cseq_offset: int = 0                       # added to the caller's CSeq toward the callee
    ended: bool = False

    @property
    def key(self) -> tuple[str, str]:
        """Its key in ``Dialogs.table``: the Call-ID and the callee's tag."""
        return self.call_id, self.callee_tag


@dataclass(frozen=True)
class Stranger:
    """An in-dialog request from neither end of the dialog."""

    detail: str


Emit = list[Send | SaveCall | Log]
PeerOf = Callable[[str], str | None]                        # address -> trusted peer name
DeviceAt = Callable[[str, str, int, float], bool]           # device, host, port, now -> registered there


class Dialogs:
    def __init__(self, local: Local, peer_of: PeerOf, device_at: DeviceAt) -> None:
        self.local = local
        self.peer_of = peer_of
        self.device_at = device_at
        self.table: dict[tuple[str, str], Dialog] = {}
        # (expires_at, key) for ``sweep``: it takes what is due, never scans the table.  An entry
        # whose dialog has since been given a later expiry is skipped; the later one is here too.
        self._expiry: list[tuple[float, tuple[str, str]]] = []

    def open(self, dialog: Dialog) -> bool:
        """Record an answered dialog; False if it was already open (a 2xx retransmission)."""
        key = dialog.key
        if key in self.table:
            return False
        self.table[key] = dialog
        heapq.heappush(self._expiry, (dialog.expires_at, key))
        return True

    def find(self, msg: SipMessage) -> tuple[Dialog, bool] | None:
        """The dialog ``msg`` belongs to, and whether it comes from the caller's side."""
        from_tag, to_tag = msg.tag("from"), msg.tag("to")
        dialog = self.table.get((msg.call_id, to_tag))
        if dialog is not None and dialog.caller_tag == from_tag:
            return dialog, True
        dialog = self.table.get((msg.call_id, from_tag))
        if dialog is not None and dialog.caller_tag == to_tag:
            return dialog, False
        return None

    def __len__(self) -> int:
        return len(self.table)

    def sweep(self, now: float) -> None:
        """Forget ended and aged dialogs (housekeeping: they age out in seconds to hours)."""
        while self._expiry and self._expiry[0][0] <= now:
            _, key = heapq.heappop(self._expiry)
            dialog = self.table.get(key)
            if dialog is not None and dialog.expires_at <= now:
                del self.table[key]

    # ------------------------------------------------------------------ requests
    def on_request(self, msg: SipMessage, source: Source, now: float) -> Emit | Stranger | None:
        """Forward an in-dialog request to the other end; None for an unknown dialog."""
        found = self.find(msg)
        if found is None:
            return None
        dialog, from_caller = found
        sender, toward = (dialog.caller, dialog.callee) if from_caller else (dialog.callee, dialog.caller)
        if not self.speaks_for(sender, source, now):
            return Stranger(f"{msg.method} from {source.host}:{source.port}, which is not the "
                            f"{'caller' if from_caller else 'callee'} of this dialog")
        rewritten = rewrite_headers(msg, dialog.rewrite, from_caller) or {}
        if dialog.cseq_offset and from_caller:
            number, method = msg.cseq
            rewritten["cseq"] = f"{number + dialog.cseq_offset} {method}"
        dest = toward.source
        data = forward_request(msg, msg.uri, self.local, dialog_branch(self.local), dest.transport,
                               (source.host, source.port), record_route=False, replace=rewritten)
        out: Emit = [send_to(dest, data)]
        if msg.method == "BYE" and not dialog.ended:
            dialog.ended = True
            dialog.expires_at = now + ENDED_LINGER
            heapq.heappush(self._expiry, (dialog.expires_at, dialog.key))
            if dialog.record is None:
                return out
            record = replace(dialog.record, ended_at=now)
            out += [SaveCall(record),
                    Log("call.completed", (*summary(record), ("ended_by", "caller" if from_caller else "callee")))]
        return out

    def speaks_for(self, party: Party, source: Source, now: float) -> bool:
        """Is a request from ``source`` from ``party``?  Behind the edge every request comes
        from the edge's address, so the device's own address (``origin``) is compared."""
        if source.origin_host == party.source.origin_host and source.via_edge == party.source.via_edge:
            return True
        if party.peer is not None and self.peer_of(source.origin_host) == party.peer:
            return True
        return party.device is not None and \
            self.device_at(party.device, source.origin_host, source.origin_port, now)

    # ------------------------------------------------------------------ responses
    def on_response(self, msg: SipMessage) -> Emit:
        """A response to an in-dialog request we forwarded: relay it by its next Via."""
        vias = msg.all("via")
        if len(vias) < 2:
            return []
        try:
            host, port = via_destination(vias[1])
        except ValueError as exc:
            return [Log("sip.response.unroutable", (("call_id", msg.call_id), ("detail", str(exc))), "debug")]
        found = self.find(msg)
        undo = None
        if found is not None:
            dialog, toward_caller = found        # a response to the caller's request goes back to it
            undo = restore(msg, dialog.rewrite, None, dialog.cseq_offset if toward_caller else 0)
        transport = vias[1].split()[0].rsplit("/", 1)[-1].lower()
        return [Send(strip_top_via(msg, undo), host, port, "tcp" if transport == "tcp" else "udp")]
