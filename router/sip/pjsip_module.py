"""The router's own PJSIP module: every raw pointer the router touches lives here.

pjsua2 has no hook for REGISTER or for proxying, so the router registers a
``pjsip_module`` of its own into the running endpoint (priority 31, see
``MODULE_PRIORITY``) and takes every incoming request, and every response
that no PJSIP transaction claims, there.
The callback only copies the packet and its source out of ``pjsip_rx_data``
and hands them on; it never keeps a pointer past its own return, except the
transport handle of a TCP connection, which is reference-counted by
``hold``/``release``.  Sending is ``pjsip_endpt_send_raw`` over UDP, or over a
held TCP transport so a phone's own connection is reused.

The struct offsets below belong to PJSIP 2.15.1 as built in the wheel
``pjsua2-python==2.15.1.post1`` (x86-64, PJSIP_MAX_PKT_LEN 4000).
``check_startup`` and ``check_packet`` verify them at run time; on a mismatch
the router refuses to run rather than read the wrong memory.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from collections.abc import Callable
from typing import NamedTuple

import pjsua2

from router.errors import RouterError

# --- pjsip_rx_data (PJSIP 2.15.1, x86-64) -----------------------------------
RX_TRANSPORT = 8
RX_PACKET = 320
PKT_MAX = 4000
RX_PKT_LEN = 4328
RX_SRC_ADDR = 4336
RX_SRC_ADDR_LEN = 4364
RX_SRC_NAME = 4368
RX_SRC_NAME_LEN = 46
RX_SRC_PORT = 4416
RX_MSG_BUF = 4424
RX_MSG_LEN = 4432
RX_MSG = 4440
RX_INFO = 4448
# --- pjsip_transport, pjsip_msg ---------------------------------------------
TP_KEY_TYPE = 80
TP_TYPE_NAME = 120
MSG_TYPE = 0
MSG_METHOD_NAME = 16
# --- constants ---------------------------------------------------------------
TRANSPORT_UDP, TRANSPORT_TCP, TRANSPORT_IPV6 = 1, 2, 128
TPSELECTOR_TRANSPORT = 1
# Just before PJSIP's UA layer (32): it swallows 2xx responses that match none of
# its dialogs ("strayed 2xx"), and every 2xx the proxy forwards is such a one.
# After the transaction layer (16), so pjsua's own transactions (the trunk
# registration) still get their responses.
MODULE_PRIORITY = 31
AF_INET, AF_INET6 = 2, 10


class LayoutMismatch(RouterError):
    """The loaded PJSIP does not have the struct layout this module was written for."""


class PjStr(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("slen", ctypes.c_ssize_t)]


RxCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


class PjsipModule(ctypes.Structure):
    _fields_ = [("prev", ctypes.c_void_p), ("next", ctypes.c_void_p), ("name", PjStr),
                ("id", ctypes.c_int), ("priority", ctypes.c_int),
                ("load", ctypes.c_void_p), ("start", ctypes.c_void_p),
                ("stop", ctypes.c_void_p), ("unload", ctypes.c_void_p),
                ("on_rx_request", RxCallback), ("on_rx_response", RxCallback),
                ("on_tx_request", ctypes.c_void_p), ("on_tx_response", ctypes.c_void_p),
                ("on_tsx_state", ctypes.c_void_p)]


class TpSelector(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("disable_connection_reuse", ctypes.c_int),
                ("transport", ctypes.c_void_p)]


class Packet(NamedTuple):
    """One received message, copied out of PJSIP's buffers."""

    data: bytes
    host: str
    port: int
    transport: str       # "udp" or "tcp"
    conn: int            # the pjsip_transport pointer (meaningful for TCP only)


def _lib() -> ctypes.PyDLL:
    # PyDLL keeps the GIL across calls: the callbacks run inside libHandleEvents on
    # the Python thread that polls, and releasing the GIL there starves nothing
    # but costs a lock round-trip per call.
    lib = ctypes.PyDLL(pjsua2._pjsua2.__file__)
    sigs: dict[str, tuple[object, list[object]]] = {
        "pjsua_get_pjsip_endpt": (ctypes.c_void_p, []),
        "pjsip_endpt_register_module": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]),
        "pjsip_endpt_unregister_module": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]),
        "pjsip_endpt_send_raw": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                                ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                                ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]),
        "pjsip_rx_data_get_info": (ctypes.c_void_p, [ctypes.c_void_p]),
        "pjsip_transport_get_type_name": (ctypes.c_char_p, [ctypes.c_int]),
        "pjsip_transport_add_ref": (ctypes.c_int, [ctypes.c_void_p]),
        "pjsip_transport_dec_ref": (ctypes.c_int, [ctypes.c_void_p]),
        "pj_strerror": (PjStr, [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


# --- SO_ATTACH_REUSEPORT_CBPF (linux/filter.h, asm-generic/socket.h) -----------
SO_ATTACH_REUSEPORT_CBPF = 51
_BPF_LD_W_ABS, _BPF_ALU_MOD_K, _BPF_RET_A = 0x20, 0x94, 0x16
_SKF_AD_RANDOM = (-0x1000 + 56) & 0xFFFFFFFF       # SKF_AD_OFF + SKF_AD_RANDOM


def spread_at_random(sock: socket.socket, members: int) -> None:
    """Make the kernel hand each datagram of ``sock``'s SO_REUSEPORT group to a member
    chosen at random, not by the sender's address: one busy sender (an ACD, a
    trunk) then loads every worker alike instead of the one its address hashes to.
    A classic BPF program of three instructions: A = random; A %= members; return A."""
    program = ctypes.create_string_buffer(
        struct.pack("<HBBI", _BPF_LD_W_ABS, 0, 0, _SKF_AD_RANDOM)
        + struct.pack("<HBBI", _BPF_ALU_MOD_K, 0, 0, members)
        + struct.pack("<HBBI", _BPF_RET_A, 0, 0, 0), 24)
    fprog = struct.pack("<H6xQ", 3, ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)   # the kernel copies it


def quiet_until_configured() -> None:
    """PJSIP logs to stdout while the library is created, before the LogWriter
    exists; keep it to errors until ``libInit`` installs the real settings."""
    lib = ctypes.PyDLL(pjsua2._pjsua2.__file__)
    lib.pj_log_set_level.argtypes = [ctypes.c_int]
    lib.pj_log_set_level.restype = None
    lib.pj_log_set_level(1)


def _sockaddr(host: str, port: int) -> tuple[ctypes.Array[ctypes.c_char], int]:
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        raw = AF_INET.to_bytes(2, "little") + port.to_bytes(2, "big") + ip.packed + bytes(8)
    else:
        raw = (AF_INET6.to_bytes(2, "little") + port.to_bytes(2, "big") + bytes(4)
               + ip.packed + bytes(4))
    return ctypes.create_string_buffer(raw, len(raw)), len(raw)


class RouterModule:
    """Registers the module, receives requests, sends raw messages."""

    def __init__(self, on_packet: Callable[[Packet], None],
                 on_response: Callable[[Packet], None] | None = None) -> None:
        self.lib = _lib()
        self.endpt = self.lib.pjsua_get_pjsip_endpt()
        if not self.endpt:
            raise LayoutMismatch("pjsua has no SIP endpoint; start the library first")
        self.on_packet = on_packet
        self.on_response = on_response
        self.checked = False
        self._name = ctypes.create_string_buffer(b"mod-sip-router")
        self._rx_request = RxCallback(self._rx_request_cb)
        self._rx_response = RxCallback(self._rx_response_cb)
        self.module = PjsipModule()
        self.module.name = PjStr(ctypes.cast(self._name, ctypes.c_void_p), len(b"mod-sip-router"))
        self.module.id = -1
        self.module.priority = MODULE_PRIORITY
        self.module.on_rx_request = self._rx_request
        self.module.on_rx_response = self._rx_response
        self.registered = False
        self.held: dict[int, int] = {}      # TCP transport pointer -> our reference count
        self.errors: list[str] = []

    def register(self) -> None:
        status = self.lib.pjsip_endpt_register_module(self.endpt, ctypes.byref(self.module))
        if status != 0:
            raise LayoutMismatch(f"pjsip_endpt_register_module failed: {self.strerror(status)}")
        if self.module.id < 0:       # PJSIP writes the id at offset 32: proves that layout
            raise LayoutMismatch("PJSIP did not assign a module id; the module layout differs")
        self.registered = True

    def unregister(self) -> None:
        for conn in list(self.held):
            while self.held.get(conn):
                self.release(conn)
        if self.registered:
            self.lib.pjsip_endpt_unregister_module(self.endpt, ctypes.byref(self.module))
            self.registered = False

    def strerror(self, status: int) -> str:
        buf = ctypes.create_string_buffer(160)
        text = self.lib.pj_strerror(status, buf, len(buf))
        return ctypes.string_at(text.ptr, text.slen).decode(errors="replace") if text.ptr else str(status)

    # ------------------------------------------------------------ receiving
    def _read(self, rdata: int) -> Packet:
        if not self.checked:
            self.check_packet(rdata)
        buf = ctypes.c_void_p.from_address(rdata + RX_MSG_BUF).value
        length = ctypes.c_int.from_address(rdata + RX_MSG_LEN).value
        data = ctypes.string_at(buf, length) if buf and length > 0 else b""
        name = ctypes.string_at(rdata + RX_SRC_NAME, RX_SRC_NAME_LEN).split(b"\0", 1)[0].decode()
        port = ctypes.c_int.from_address(rdata + RX_SRC_PORT).value
        tp = ctypes.c_void_p.from_address(rdata + RX_TRANSPORT).value or 0
        kind = ctypes.c_int.from_address(tp + TP_KEY_TYPE).value & ~TRANSPORT_IPV6 if tp else 1
        return Packet(data, name, port, "tcp" if kind == TRANSPORT_TCP else "udp", tp)

    def _rx_request_cb(self, rdata: int) -> int:
        try:
            packet = self._read(rdata)
            self.on_packet(packet)
        except LayoutMismatch as exc:
            self.errors.append(str(exc))
            return 0
        return 1

    def _rx_response_cb(self, rdata: int) -> int:
        if self.on_response is None:
            return 0
        try:
            self.on_response(self._read(rdata))
        except LayoutMismatch as exc:
            self.errors.append(str(exc))
            return 0
        return 1

    def check_packet(self, rdata: int) -> None:
        """First-packet layout self-check (PJSIP-NOTES §2)."""
        buf = ctypes.c_void_p.from_address(rdata + RX_MSG_BUF).value or 0
        length = ctypes.c_int.from_address(rdata + RX_MSG_LEN).value
        pkt_len = ctypes.c_ssize_t.from_address(rdata + RX_PKT_LEN).value
        if not (rdata + RX_PACKET <= buf < rdata + RX_PACKET + PKT_MAX):
            raise LayoutMismatch("msg_info.msg_buf does not point into pkt_info.packet")
        if not (0 < length <= pkt_len <= PKT_MAX):
            raise LayoutMismatch(f"message length {length} / packet length {pkt_len} are not plausible")
        info = self.lib.pjsip_rx_data_get_info(rdata)
        if info != ctypes.c_void_p.from_address(rdata + RX_INFO).value:
            raise LayoutMismatch("pjsip_rx_data_get_info() differs from msg_info.info")
        tp = ctypes.c_void_p.from_address(rdata + RX_TRANSPORT).value
        if not tp:
            raise LayoutMismatch("rdata has no transport")
        key_type = ctypes.c_int.from_address(tp + TP_KEY_TYPE).value
        type_name = ctypes.c_char_p.from_address(tp + TP_TYPE_NAME).value
        if type_name != self.lib.pjsip_transport_get_type_name(key_type):
            raise LayoutMismatch("transport key.type and type_name disagree")
        msg = ctypes.c_void_p.from_address(rdata + RX_MSG).value
        if not msg:
            raise LayoutMismatch("rdata has no parsed message")
        first_line = ctypes.string_at(buf, min(length, 64)).split(b" ", 1)[0]
        if ctypes.c_int.from_address(msg + MSG_TYPE).value == 0:    # a request
            name = PjStr.from_address(msg + MSG_METHOD_NAME)
            if ctypes.string_at(name.ptr, name.slen) != first_line:
                raise LayoutMismatch("the parsed method differs from the request line")
        port = ctypes.c_int.from_address(rdata + RX_SRC_PORT).value
        if not 0 < port < 65536:
            raise LayoutMismatch(f"source port {port} is not plausible")
        self.checked = True

    # ------------------------------------------------------------ sending
    def send(self, data: bytes, host: str, port: int, transport: str = "udp", conn: int = 0) -> int:
        """Send raw bytes; returns the PJSIP status (0 = accepted for sending)."""
        addr, addr_len = _sockaddr(host, port)
        v6 = TRANSPORT_IPV6 if addr_len > 16 else 0
        if transport == "tcp" and conn:
            sel = TpSelector(TPSELECTOR_TRANSPORT, 0, conn)
            return int(self.lib.pjsip_endpt_send_raw(self.endpt, TRANSPORT_TCP | v6, ctypes.byref(sel),
                                                     data, len(data), addr, addr_len, None, None))
        kind = TRANSPORT_TCP if transport == "tcp" else TRANSPORT_UDP
        return int(self.lib.pjsip_endpt_send_raw(self.endpt, kind | v6, None, data, len(data),
                                                 addr, addr_len, None, None))

    def hold(self, conn: int) -> None:
        """Keep a TCP transport alive while a binding uses it."""
        if conn:
            self.lib.pjsip_transport_add_ref(conn)
            self.held[conn] = self.held.get(conn, 0) + 1

    def release(self, conn: int) -> None:
        if conn and self.held.get(conn):
            self.held[conn] -= 1
            if not self.held[conn]:
                del self.held[conn]
            self.lib.pjsip_transport_dec_ref(conn)


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``).

    Building a large policy or loading 100,000 bindings leaves freed temporaries
    (the parsed file, pickles, query rows) scattered through the heap; glibc keeps
    those pages unless asked.  After start-up and after a reload they are not
    needed again: with 100,000 users this returns about 9 MiB per process."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return                     # not glibc: nothing to ask
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
