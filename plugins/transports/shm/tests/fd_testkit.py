"""Process entry points of the descriptor-socket tests (importable by name in spawned processes)."""

from __future__ import annotations

import os
import socket
import traceback

from llumnix_kv_transport_shm.fd_channel import FdOffer
from llumnix_kv_transport_shm.fd_channel import receive_fds


def memfd_with(name: str, data: bytes) -> int:
    """A new memfd named ``name`` holding ``data``."""
    fd = os.memfd_create(name)
    os.write(fd, data)
    return fd


def read_all(fd: int) -> bytes:
    return os.pread(fd, 1 << 20, 0)


def open_memfds(name: str) -> int:
    """How many descriptors of this process refer to memfds called ``name``."""
    n = 0
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}") == f"/memfd:{name} (deleted)":
                n += 1
        except OSError:
            continue
    return n


def ask_raw(s: socket.socket, count: int) -> tuple[bytes, list[int]]:
    """Send a well-formed request for ``count`` descriptors on a connected socket; what came back.

    An offer that refuses the asker closes without reading, which the asker sees as EOF or a reset.
    """
    try:
        s.sendall(b"LKVR" + count.to_bytes(4, "little"))
        data, fds, _, _ = socket.recv_fds(s, 64, 16)
    except (ConnectionResetError, BrokenPipeError):
        return b"", []
    return data, fds


def offer_main(q, name: str, contents: list[bytes], timeout_s: float) -> None:
    """Offer one memfd per item of ``contents``; report the socket, then whether it was served."""
    try:
        offer = FdOffer([memfd_with(name, c) for c in contents], timeout_s)
        q.put(("offer", offer.name, os.getpid()))
        served = offer.served.wait(timeout_s)
        offer.close()
        q.put(("served", served, open_memfds(name)))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def take_main(q, name: str, count: int, pid: int, uid: int | None) -> None:
    """Take the offer (as ``uid`` if given); report the contents, or the error."""
    try:
        if uid is not None:
            os.setgid(uid)
            os.setuid(uid)
        try:
            fds = receive_fds(name, count, pid, 5.0)
        except Exception as exc:
            q.put(("refused", f"{type(exc).__name__}: {exc}"))
            return
        q.put(("took", [read_all(fd) for fd in fds]))
        for fd in fds:
            os.close(fd)
    except BaseException:
        q.put(("error", traceback.format_exc()))


def take_after_gate_main(gate, q, count: int, pid: int) -> None:
    """``take_main`` of the socket that arrives on ``gate``."""
    take_main(q, gate.get(timeout=30.0), count, pid, None)


def raw_take_main(q, name: str, uid: int) -> None:
    """Connect as ``uid`` without checking the offering side; report how many descriptors came."""
    try:
        os.setgid(uid)
        os.setuid(uid)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(5.0)
            s.connect("\0" + name)
            data, fds = ask_raw(s, 1)
        for fd in fds:
            os.close(fd)
        q.put(("raw", len(data), len(fds)))
    except BaseException:
        q.put(("error", traceback.format_exc()))
