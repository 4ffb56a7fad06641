"""A TCP proxy that flips one payload byte of the first DATA frames it forwards: corruption in flight.

Every connection to :attr:`CorruptingProxy.address` is relayed to ``target``; bytes from the client
pass unchanged, bytes back from the target are parsed frame by frame (:mod:`llumnix_kv_core.wire`)
and the middle byte of the payload of each of the first ``frames`` DATA frames with a payload is
inverted. Headers, tables, epochs and digests pass as they are, so only a digest check can tell.
"""

from __future__ import annotations

import socket
import threading

from llumnix_kv_core import wire
from llumnix_kv_core.wire import Kind


def _exact(sock: socket.socket, n: int) -> bytes | None:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(n - len(out), 1 << 20))
        if not chunk:
            return None
        out += chunk
    return bytes(out)


class CorruptingProxy:
    """Relays connections to ``target`` (``host:port``), corrupting the first ``frames`` DATA payloads."""

    def __init__(self, target: str, frames: int = 1) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._left = frames
        self.corrupted = 0  # DATA frames changed so far
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = False
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, name="corrupting-proxy", daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, upstream]
            for fn, args in ((self._pipe, (client, upstream)), (self._frames, (upstream, client))):
                th = threading.Thread(target=fn, args=args, name="corrupting-proxy-relay", daemon=True)
                th.start()
                self._threads.append(th)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(1 << 20):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            _shut(dst)

    def _take(self) -> bool:
        with self._lock:
            if self._left <= 0:
                return False
            self._left -= 1
            self.corrupted += 1
            return True

    def _frames(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while (raw := _exact(src, wire.HEADER_SIZE)) is not None:
                h = wire.unpack_header(raw)
                rest = h.body_len
                if h.kind == Kind.DATA:
                    rest += h.n_segments * wire.TABLE_DTYPE.itemsize + wire.data_ext_size(h)
                head = raw + (_exact(src, rest) or b"") if rest else raw
                payload = _exact(src, h.payload_len) if h.payload_len else b""
                if payload is None:
                    return
                if payload and self._take():
                    changed = bytearray(payload)
                    changed[len(changed) // 2] ^= 0xFF
                    payload = bytes(changed)
                dst.sendall(head + payload)
        except OSError:
            pass
        finally:
            _shut(dst)

    def close(self) -> None:
        self._stop = True
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                _shut(s)
                s.close()
        for th in self._threads:
            th.join(5.0)

    def __enter__(self) -> CorruptingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
