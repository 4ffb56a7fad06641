"""Options of the shm transport, and what makes two processes "on one host"."""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass
from typing import Any

from llumnix_kv_core.errors import TransferError
from llumnix_kv_core.streams.sockets import options_from_extra
from llumnix_kv_core.streams.sockets import parse_address

DEFAULT_SLOT_BYTES = 4 << 20
DEFAULT_SLOTS = 4


@dataclass(frozen=True)
class ShmOptions:
    """Transport-specific options, read from ``TransportConfig.extra``.

    :param slot_bytes: bytes of one slot of a host-memory ring (one pipelined chunk).
    :param slots: slots per ring; the sender fills one while the receiver drains another.
    :param copy_threads: threads of each native ring copy, on each side (0: one per core, capped).
    :param ring_dir: directory of the shared-memory files (tmpfs); unlinked once both sides mapped them.
    :param host_path: how host memory moves: ``"cma"`` (one copy by the kernel straight into the
        receiver's registered memory, Linux cross-memory attach), ``"ring"`` (two pipelined copies
        through the shared ring) or ``"auto"`` (cma where this process may access the peer, else ring).
    :param cma_threads: threads of a cross-memory copy (0: one per core, capped).
    """

    slot_bytes: int = DEFAULT_SLOT_BYTES
    slots: int = DEFAULT_SLOTS
    copy_threads: int = 1
    ring_dir: str = "/dev/shm"
    host_path: str = "auto"
    cma_threads: int = 0

    @classmethod
    def from_extra(cls, extra: tuple[tuple[str, Any], ...]) -> ShmOptions:
        known = {"slot_bytes", "slots", "copy_threads", "ring_dir", "host_path", "cma_threads"}
        given = options_from_extra("shm", extra, known)
        opts = cls(**{k: (str(v) if k in ("ring_dir", "host_path") else int(v)) for k, v in given.items()})
        if opts.host_path not in ("auto", "cma", "ring"):
            msg = f"host_path must be 'auto', 'cma' or 'ring', got {opts.host_path!r}"
            raise ValueError(msg)
        if opts.slot_bytes < 4096 or opts.slot_bytes % 4096:
            msg = f"slot_bytes must be a positive multiple of 4096, got {opts.slot_bytes}"
            raise ValueError(msg)
        if not 2 <= opts.slots <= 64:
            msg = f"slots must be between 2 and 64 (the ring pipelines two copies), got {opts.slots}"
            raise ValueError(msg)
        if opts.copy_threads < 0 or opts.cma_threads < 0:
            msg = f"copy_threads and cma_threads must be 0 (one per core) or positive, got {given}"
            raise ValueError(msg)
        return opts


@functools.cache
def host_identity() -> str:
    """Hostname and kernel boot id: equal for exactly the processes that can share memory with us."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


def _is_local_ip(family: int, ip: str) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


def check_local(address: str) -> tuple[str, int]:
    """(host, port) of ``address`` if it names this host; TransferError naming the fix otherwise."""
    host, port = parse_address(address, "shm")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        msg = f"cannot connect to shm peer {address}: host {host!r} does not resolve ({exc})"
        raise TransferError(msg) from exc
    if not any(_is_local_ip(fam, sa[0]) for fam, _, _, _, sa in infos):
        msg = (
            f"shm peer {address} is not on this host ({socket.gethostname()}): shared memory and CUDA IPC reach "
            "only processes of one host. Give a local address (e.g. 127.0.0.1:port), or use the tcp transport "
            "for a peer on another host"
        )
        raise TransferError(msg)
    return host, port
