"""A tiny authoritative DNS server on loopback, for the trunk's SRV and A records in tests."""

from __future__ import annotations

import socket
import threading

import dns.message
import dns.rrset


class DnsServer:
    def __init__(self, records: dict[tuple[str, str], list[str]]) -> None:
        """``records``: (name, type) -> rdata texts, e.g. ("_sip._udp.x.test.", "SRV") -> ["10 5 5080 pstn.x.test."]."""
        self.records = records
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.queries: list[tuple[str, str]] = []
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> DnsServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()

    def _serve(self) -> None:
        while self.running:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                continue
            query = dns.message.from_wire(data)
            reply = dns.message.make_response(query)
            for question in query.question:
                name, kind = question.name.to_text(), dns.rdatatype.to_text(question.rdtype)
                self.queries.append((name, kind))
                texts = self.records.get((name, kind))
                if texts:
                    reply.answer.append(dns.rrset.from_text_list(name, 60, "IN", kind, texts))
            self.sock.sendto(reply.to_wire(), peer)
