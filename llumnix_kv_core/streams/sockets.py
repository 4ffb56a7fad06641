"""Address strings and TCP socket setup of socket-based transports.

Every function that can fail takes ``transport``, the name of the transport in use, so its
messages say which transport failed (tcp and shm share this code).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.errors import TransferTimeoutError

DEFAULT_SOCKET_BUFFER = 4 << 20


@dataclass(frozen=True)
class SocketOptions:
    """How sockets are set up.

    :param socket_buffer_bytes: SO_SNDBUF / SO_RCVBUF asked for on every socket
        (the kernel caps it at ``net.core.[rw]mem_max``); 0 leaves the kernel's autotuning.
    :param listen_backlog: backlog of listening sockets.
    """

    socket_buffer_bytes: int = DEFAULT_SOCKET_BUFFER
    listen_backlog: int = 128


def options_from_extra(transport: str, extra: tuple[tuple[str, Any], ...], known: set[str]) -> dict[str, Any]:
    """``TransportConfig.extra`` as a dict; ValueError naming what the ``transport`` transport understands."""
    given = dict(extra)
    unknown = sorted(set(given) - known)
    if unknown:
        msg = (
            f"unknown {transport} transport option(s) {', '.join(unknown)}; "
            f"the {transport} transport understands {', '.join(sorted(known))}"
        )
        raise ValueError(msg)
    return given


def parse_address(address: str, transport: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[ipv6]:port"`` -> (host, port); TransferError naming ``transport`` otherwise."""
    bad = f"bad {transport} address {address!r}: expected host:port, e.g. 127.0.0.1:5555 or [::1]:5555"
    if not isinstance(address, str):
        raise TransferError(bad)
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
        if not sep:
            raise TransferError(bad)
    else:
        host, sep, port = address.rpartition(":")
        if not sep or ":" in host:
            raise TransferError(bad + " (put IPv6 addresses in brackets)" if ":" in host else bad)
    try:
        num = int(port)
    except ValueError:
        raise TransferError(bad) from None
    if not 0 <= num <= 65535 or not host:
        raise TransferError(bad)
    return host, num


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def sockaddr_str(addr: Any) -> str:
    """A socket address tuple as an address string."""
    return format_address(addr[0], addr[1])


def tune(sock: socket.socket, opts: SocketOptions) -> None:
    """TCP_NODELAY, keepalive and large buffers. Call before connect / listen."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if opts.socket_buffer_bytes > 0:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, opts.socket_buffer_bytes)
            except OSError:  # pragma: no cover - a kernel that refuses the size keeps its default
                pass


def _hint(address: str) -> str:
    return f"check that the peer is running and listening on {address}, and that the address/port are right"


def open_listener(host: str, port: int, opts: SocketOptions, transport: str) -> socket.socket:
    """A bound, listening socket for ``host:port`` (port 0: ephemeral); TransferError naming ``transport``."""
    address = format_address(host, port)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        msg = (f"{transport} transport cannot listen on {address}: host {host!r} does not resolve ({exc}); "
               "use a local IP address")
        raise TransferError(msg) from exc
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tune(sock, opts)
        sock.bind(sockaddr)
        sock.listen(opts.listen_backlog)
    except OSError as exc:
        sock.close()
        msg = (f"{transport} transport cannot listen on {address}: {exc}; pick a free port (or port 0) and a local "
               "address")
        raise TransferError(msg) from exc
    return sock


def open_connection(address: str, timeout_s: float, opts: SocketOptions, transport: str) -> socket.socket:
    """A connected, tuned socket to ``address``; TransferError / TransferTimeoutError naming it and ``transport``."""
    host, port = parse_address(address, transport)
    deadline = time.monotonic() + timeout_s
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        msg = f"cannot connect to {transport} peer {address}: host {host!r} does not resolve ({exc}); "
        msg += _hint(address)
        raise TransferError(msg) from exc
    last: OSError | None = None
    for family, type_, proto, _, sockaddr in infos:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, type_, proto)
        try:
            tune(sock, opts)
            sock.settimeout(left)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    if last is None or isinstance(last, TimeoutError):
        msg = f"connecting to {transport} peer {address} timed out after {timeout_s:g} s; {_hint(address)}"
        raise TransferTimeoutError(msg) from last
    if isinstance(last, ConnectionRefusedError):
        msg = f"{transport} peer {address} refused the connection (nothing listens there); {_hint(address)}"
        raise TransferError(msg) from last
    msg = f"cannot connect to {transport} peer {address}: {last}; {_hint(address)}"
    raise TransferError(msg) from last
