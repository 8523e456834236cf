"""What listens at a Ray address, asked over a plain socket in about a second (no gRPC library:
Ray does not install one): a Ray GCS, another gRPC server (e.g. a raylet's port, which Ray took
~24 s and 23 lines of C++ warnings to refuse), or something else. One unary call of the GCS's
``NodeInfoGcsService/GetClusterId`` over HTTP/2: a GCS answers with a message (a DATA frame), any
other gRPC server with trailers only (UNIMPLEMENTED)."""

from __future__ import annotations

import socket
import time

GCS, GRPC, OTHER, UNSURE = "gcs", "grpc", "other", "unsure"
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST, _SETTINGS, _GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x7
_END_STREAM, _END_HEADERS, _ACK = 0x1, 0x4, 0x1
PATH = "/ray.rpc.NodeInfoGcsService/GetClusterId"


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _literal(name: str, value: str) -> bytes:
    """An HPACK header field without indexing, its name and value as plain strings (< 127 bytes)."""
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def _read_frame(sock: socket.socket) -> tuple[int, int, int, bytes] | None:
    head = _read(sock, 9)
    if head is None:
        return None
    payload = _read(sock, int.from_bytes(head[:3], "big"))
    if payload is None:
        return None
    return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload


def _read(sock: socket.socket, n: int) -> bytes | None:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            return None
        out += chunk
    return out


def probe(sock: socket.socket, authority: str, timeout: float) -> str:
    """``sock`` connected to the address: :data:`GCS`, :data:`GRPC` (another gRPC server),
    :data:`OTHER` (not HTTP/2), or :data:`UNSURE` (no verdict in ``timeout``: let Ray decide)."""
    deadline = time.monotonic() + timeout
    try:  # an HTTP/2 server (every gRPC server) answers the preface with its SETTINGS
        sock.settimeout(timeout)
        sock.sendall(_PREFACE + _frame(_SETTINGS, 0, 0))
        first = _read_frame(sock)
    except OSError:  # silent until the timeout, or reset
        return OTHER
    if first is None or first[0] != _SETTINGS:
        return OTHER
    try:
        headers = b"".join(
            _literal(k, v)
            for k, v in (
                (":method", "POST"),
                (":scheme", "http"),
                (":path", PATH),
                (":authority", authority),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            )
        )
        sock.sendall(
            _frame(_SETTINGS, _ACK, 0)
            + _frame(_HEADERS, _END_HEADERS, 1, headers)
            + _frame(_DATA, _END_STREAM, 1, b"\x00\x00\x00\x00\x00")  # an empty request message
        )
        while time.monotonic() < deadline:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            frame = _read_frame(sock)
            if frame is None:  # closed without an answer to the call: no verdict, let Ray decide
                return UNSURE
            kind, flags, stream, payload = frame
            if kind == _DATA and stream == 1 and payload:
                return GCS
            if kind == _HEADERS and stream == 1 and flags & _END_STREAM:
                return _verdict(payload)
            if kind in (_RST, _GOAWAY):
                return UNSURE
    except OSError:
        pass
    return UNSURE


def _verdict(trailers: bytes) -> str:
    """Trailers only: ``grpc-status`` 12 (UNIMPLEMENTED) is another gRPC server; another status
    (e.g. 16, a GCS that wants Ray's auth token) is a GCS; a status HPACK hid from a plain read,
    unsure."""
    at = trailers.find(b"grpc-status")
    if at < 0:
        return UNSURE
    size = trailers[at + 11] if at + 11 < len(trailers) else 0
    status = trailers[at + 12 : at + 12 + size] if size < 0x80 else b""
    if not status.isdigit():
        return UNSURE
    return GRPC if status == b"12" else GCS
