"""The descriptor socket (SCM_RIGHTS over an abstract Unix socket): real sockets, real memfds, real processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import socket
import threading

import fd_testkit
import pytest
from llumnix_kv_transport_shm.fd_channel import FDS_PER_MESSAGE
from llumnix_kv_transport_shm.fd_channel import FdOffer
from llumnix_kv_transport_shm.fd_channel import peer_credentials
from llumnix_kv_transport_shm.fd_channel import receive_fds
from shm_testkit import child_message
from shm_testkit import reap

from llumnix_kv_core.errors import TransferError

CTX = mp.get_context("spawn")
WAIT_S = 30.0
NOBODY = 65534


@pytest.fixture
def memfd_name():
    """A memfd name of this test; no descriptor of it may stay open in this process afterwards."""
    name = f"lkv-fdtest-{secrets.token_hex(4)}"
    yield name
    assert fd_testkit.open_memfds(name) == 0, "a descriptor stayed open"
    left = [t.name for t in threading.enumerate() if t.name.startswith("lkv-shm-fds")]
    assert not left, f"offer threads still running: {left}"


def test_more_descriptors_than_one_message_arrive_in_order(memfd_name):
    n = FDS_PER_MESSAGE + 17
    contents = [f"file {i}".encode() * (i % 5 + 1) for i in range(n)]
    offer = FdOffer([fd_testkit.memfd_with(memfd_name, c) for c in contents], timeout_s=10.0)
    try:
        fds = receive_fds(offer.name, n, os.getpid(), timeout_s=10.0)
        try:
            assert [fd_testkit.read_all(fd) for fd in fds] == contents
        finally:
            for fd in fds:
                os.close(fd)
        assert offer.served.wait(5.0)
    finally:
        offer.close()
    with pytest.raises(TransferError, match="cannot reach the shm peer's descriptor socket"):
        receive_fds(offer.name, n, os.getpid(), timeout_s=1.0)  # served once, then gone


def test_descriptors_cross_processes_and_the_offer_cleans_up(memfd_name):
    q = CTX.Queue()
    contents = [b"alpha" * 1000, b"beta", b"gamma" * 7]
    p = CTX.Process(target=fd_testkit.offer_main, args=(q, memfd_name, contents, 20.0), daemon=True)
    p.start()
    try:
        _, name, pid = child_message(q, "offer", WAIT_S)
        assert pid == p.pid
        with pytest.raises(TransferError, match=f"belongs to pid {pid}, not to the peer"):
            receive_fds(name, len(contents), pid + 1, timeout_s=5.0)  # hangs up without asking: offer stays
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:  # asks for the wrong count: offer stays
            s.settimeout(5.0)
            s.connect("\0" + name)
            assert fd_testkit.ask_raw(s, len(contents) + 1) == (b"", [])
        fds = receive_fds(name, len(contents), pid, timeout_s=5.0)
        try:
            assert [fd_testkit.read_all(fd) for fd in fds] == contents
            os.pwrite(fds[1], b"BETA", 0)  # one file behind both descriptors
        finally:
            for fd in fds:
                os.close(fd)
        _, served, still_open = child_message(q, "served", WAIT_S)
        assert served
        assert still_open == 0, "the offering process kept descriptors open after handing them over"
    finally:
        reap(p)


def test_an_offer_bound_to_a_pid_refuses_other_processes(memfd_name):
    q = CTX.Queue()
    contents = [b"only for the child"]
    offer_fds = [fd_testkit.memfd_with(memfd_name, c) for c in contents]
    # The offer names the child's pid, so the child starts first and connects once told the socket.
    gate = CTX.Queue()
    child = CTX.Process(target=fd_testkit.take_after_gate_main, args=(gate, q, len(contents), os.getpid()),
                        daemon=True)
    child.start()
    offer = FdOffer(offer_fds, timeout_s=20.0, peer_pid=child.pid)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:  # this process is not the peer
            s.settimeout(5.0)
            s.connect("\0" + offer.name)
            assert peer_credentials(s)[0] == os.getpid()
            assert fd_testkit.ask_raw(s, 1) == (b"", [])  # asks properly, is not the named peer: nothing
        gate.put(offer.name)
        assert child_message(q, "take", WAIT_S) == ("took", contents)
        assert offer.served.wait(5.0)
    finally:
        offer.close()
        reap(child)


@pytest.mark.skipif(os.geteuid() != 0, reason="running a process as another user needs root")
def test_another_user_is_refused_on_both_ends(memfd_name):
    contents = [b"secret"]
    offer = FdOffer([fd_testkit.memfd_with(memfd_name, c) for c in contents], timeout_s=20.0)
    q = CTX.Queue()
    try:
        importer = CTX.Process(target=fd_testkit.take_main, args=(q, offer.name, 1, os.getpid(), NOBODY),
                               daemon=True)
        importer.start()
        kind, why = child_message(q, "take as another user", WAIT_S)
        reap(importer)
        assert kind == "refused"
        assert f"runs as uid {os.getuid()}, this process as uid {NOBODY}" in why
        raw = CTX.Process(target=fd_testkit.raw_take_main, args=(q, offer.name, NOBODY), daemon=True)
        raw.start()
        assert child_message(q, "raw take", WAIT_S) == ("raw", 0, 0)  # the offering side hands nothing to another user
        reap(raw)
        assert not offer.served.is_set()
        fds = receive_fds(offer.name, 1, os.getpid(), timeout_s=5.0)  # still there for its own user
        assert [fd_testkit.read_all(fd) for fd in fds] == contents
        for fd in fds:
            os.close(fd)
    finally:
        offer.close()


def test_an_offer_nobody_takes_ends_at_its_deadline_or_on_close(memfd_name):
    late = FdOffer([fd_testkit.memfd_with(memfd_name, b"x")], timeout_s=0.3)
    closed = FdOffer([fd_testkit.memfd_with(memfd_name, b"y")], timeout_s=60.0)
    closed.close()
    late._thread.join(5.0)
    assert not late._thread.is_alive()
    assert not late.served.is_set()
    for offer in (late, closed):
        with pytest.raises(TransferError, match="cannot reach"):
            receive_fds(offer.name, 1, os.getpid(), timeout_s=1.0)
    late.close()


def test_an_offer_that_closes_early_fails_the_receiver_clearly(memfd_name):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    name = f"lkv-fdtest-{secrets.token_hex(6)}"
    listener.bind("\0" + name)
    listener.listen(1)

    def serve_one_then_close() -> None:
        conn, _ = listener.accept()
        conn.recv(64)  # the request
        fd = fd_testkit.memfd_with(memfd_name, b"first")
        socket.send_fds(conn, [b"LKVF" + (0).to_bytes(4, "little") + (3).to_bytes(4, "little")], [fd])
        os.close(fd)
        conn.close()

    t = threading.Thread(target=serve_one_then_close)
    t.start()
    try:
        with pytest.raises(TransferError, match="closed its descriptor socket after 1 of 3"):
            receive_fds(name, 3, os.getpid(), timeout_s=5.0)
    finally:
        t.join(5.0)
        listener.close()
