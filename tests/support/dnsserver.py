"""A small authoritative DNS server for tests: UDP on 127.0.0.1, an ephemeral port.

It answers A and AAAA questions from ``records`` (name -> list of IPs), which the test
changes while the daemon runs; built with dnspython's message API. ``mode`` makes it
misbehave: ``"servfail"`` answers SERVFAIL, ``"drop"`` never answers (a dead server).
A name it does not know gets NXDOMAIN. ``queries`` counts the questions it got.

Fixture ``dns_server`` starts one per test and stops it at the end.
"""

from __future__ import annotations

import ipaddress
import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

TTL = 1


class DnsServer:
    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.mode = "answer"
        self.queries = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)

    @property
    def address(self) -> str:
        """As ``upstreams.*.resolvers`` takes it."""
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, *ips: str) -> None:
        """Answer ``name`` with ``ips`` from now on (none: the name exists, no address)."""
        self.records = {**self.records, _absolute(name): list(ips)}

    def start(self) -> DnsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            self.queries += 1
            if self.mode == "drop":
                continue
            self._sock.sendto(self._answer(query).to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        records = self.records
        for question in query.question:
            name = question.name.to_text()
            if name not in records:
                response.set_rcode(dns.rcode.NXDOMAIN)
                continue
            version = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(question.rdtype)
            ips = [ip for ip in records[name] if ipaddress.ip_address(ip).version == version]
            if ips:
                rdtype = dns.rdatatype.to_text(question.rdtype)
                response.answer.append(dns.rrset.from_text(name, TTL, "IN", rdtype, *ips))
        return response


def _absolute(name: str) -> str:
    return name if name.endswith(".") else name + "."


@pytest.fixture
def dns_server():
    server = DnsServer().start()
    yield server
    server.stop()
