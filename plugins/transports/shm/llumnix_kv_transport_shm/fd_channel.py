"""File descriptors between processes of one host: SCM_RIGHTS over an abstract Unix socket.

Exported virtual GPU memory travels as POSIX file descriptors, which the channel's TCP loopback
connection cannot carry. The exporting side opens an :class:`FdOffer` (a listening
``SOCK_SEQPACKET`` socket with a random name in the abstract namespace), announces its name in
the handshake and hands the descriptors to the first process of its own user that connects and asks
for them; the importing side calls :func:`receive_fds`, which checks the offering process with
``SO_PEERCRED`` (same uid, the pid its handshake announced) before it asks. A receiver that refuses
the offering side hangs up without asking, and the offer keeps waiting for its real peer. The
request is ``(magic, count)``; each answer carries up to :data:`FDS_PER_MESSAGE` descriptors and a
header ``(magic, index of its first descriptor, total)``.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import threading
import time

from llumnix_kv_core.errors import TransferError

log = logging.getLogger(__name__)

FDS_PER_MESSAGE = 250  # the kernel's SCM_MAX_FD is 253
_HEADER = struct.Struct("<4sII")
_MAGIC = b"LKVF"
_REQUEST = struct.Struct("<4sI")
_REQUEST_MAGIC = b"LKVR"
_POLL_S = 0.05  # how often a waiting offer looks at its deadline and close flag


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _same_user(uid: int, what: str) -> None:
    if uid != os.getuid():
        msg = (f"{what} runs as uid {uid}, this process as uid {os.getuid()}: exported GPU memory (POSIX file "
               "descriptors) passes only between processes of one user; run both processes as one user")
        raise TransferError(msg)


class FdOffer:
    """Descriptors offered once, to the first process of this user (and ``peer_pid``, if given) that connects.

    Owns ``fds`` from construction: they are closed once handed over, when ``timeout_s`` passes,
    or on :meth:`close`, whichever comes first.
    """

    def __init__(self, fds: list[int], timeout_s: float, peer_pid: int | None = None) -> None:
        self._fds = list(fds)
        self._peer_pid = peer_pid
        self._deadline = time.monotonic() + timeout_s
        self._stop = threading.Event()
        self.name = f"llumnix-kv-fds-{os.getpid()}-{secrets.token_hex(12)}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._listener.bind("\0" + self.name)
            self._listener.listen(4)
            self._listener.settimeout(_POLL_S)
        except BaseException:
            self._listener.close()
            self._close_fds()
            raise
        self.served = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"lkv-shm-fds-{self.name[-8:]}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                try:
                    conn, _ = self._listener.accept()
                except (TimeoutError, BlockingIOError):
                    continue
                except OSError:
                    return  # closed
                with conn:
                    if self._hand_over(conn):
                        self.served.set()
                        return
        finally:
            self._listener.close()
            self._close_fds()

    def _hand_over(self, conn: socket.socket) -> bool:
        pid, uid, _ = peer_credentials(conn)
        if uid != os.getuid() or (self._peer_pid is not None and pid != self._peer_pid):
            log.warning("shm descriptor socket %s: refused a connection from pid %d uid %d (expected uid %d%s)",
                        self.name, pid, uid, os.getuid(),
                        "" if self._peer_pid is None else f", pid {self._peer_pid}")
            return False
        conn.settimeout(max(self._deadline - time.monotonic(), _POLL_S))
        total = len(self._fds)
        try:
            request = conn.recv(_REQUEST.size)
            if len(request) != _REQUEST.size or _REQUEST.unpack(request) != (_REQUEST_MAGIC, total):
                log.warning("shm descriptor socket %s: pid %d hung up or asked for something else (%r); still "
                            "waiting for the peer", self.name, pid, request)
                return False
            for first in range(0, max(total, 1), FDS_PER_MESSAGE):
                batch = self._fds[first:first + FDS_PER_MESSAGE]
                socket.send_fds(conn, [_HEADER.pack(_MAGIC, first, total)], batch)
        except OSError as exc:
            log.warning("shm descriptor socket %s: sending to pid %d failed: %s", self.name, pid, exc)
            return False
        return True

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def close(self) -> None:
        """Stop offering (a descriptor in flight stays valid for its receiver) and close ours."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


def receive_fds(name: str, count: int, peer_pid: int, timeout_s: float) -> list[int]:
    """The ``count`` descriptors the process ``peer_pid`` offers as ``name``; the caller closes them.

    TransferError when the socket cannot be reached, belongs to another user or process, or
    closes before every descriptor arrived.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout_s)
    fds: list[int] = []
    try:
        try:
            sock.connect("\0" + name)
        except OSError as exc:
            msg = (f"cannot reach the shm peer's descriptor socket {name!r} ({exc}): both processes must run on "
                   "one host, in one network namespace (abstract Unix sockets)")
            raise TransferError(msg) from exc
        pid, uid, _ = peer_credentials(sock)
        _same_user(uid, f"the shm peer's descriptor socket (pid {pid})")
        if pid != peer_pid:
            msg = f"the shm descriptor socket {name!r} belongs to pid {pid}, not to the peer (pid {peer_pid})"
            raise TransferError(msg)
        sock.sendall(_REQUEST.pack(_REQUEST_MAGIC, count))
        while len(fds) < count:
            try:
                data, got, flags, _ = socket.recv_fds(sock, _HEADER.size, FDS_PER_MESSAGE)
            except ConnectionResetError:
                data, got, flags = b"", [], 0  # it hung up without reading our request: closed early
            except OSError as exc:
                msg = f"receiving GPU memory descriptors from the shm peer (pid {pid}) failed: {exc}"
                raise TransferError(msg) from exc
            fds.extend(got)
            if not data:
                msg = (f"the shm peer (pid {pid}) closed its descriptor socket after {len(fds)} of {count} "
                       "descriptors; see its log")
                raise TransferError(msg)
            magic, first, total = _HEADER.unpack(data)
            if magic != _MAGIC or total != count or first != len(fds) - len(got) or flags & socket.MSG_CTRUNC:
                msg = (f"malformed descriptor message from the shm peer (pid {pid}): first {first}, total {total}, "
                       f"expected {count}, flags 0x{flags:x}")
                raise TransferError(msg)
        return fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        sock.close()
