"""The transport conformance suite: the tests every transport passes, whoever wrote it.

A transport plugin gets the whole suite with a short ``test_conformance.py``::

    from llumnix_kv_core.testing.transport import TransportConformance

    class TestTcpConformance(TransportConformance):
        transport_name = "tcp"           # its provider name in the plugin registry
        killed_sender_error = "lost|closed"

pytest collects the subclass (its name starts with ``Test``) with every test below. The
transport is built through the registry by ``transport_name``; a transport that is not
registered also sets ``transport_factory`` (a class or module-level function, since the
multi-process tests pickle it). Where transports legitimately differ, the subclass says so
with attributes and hooks of :class:`~llumnix_kv_core.testing.transport.base.ConformanceBase`
(``options``, ``refusal_hint``, ``killed_sender_error``, ``sender_checks_regions``,
``address_pattern``, ``dead_address()``, ``check_process_left_nothing(pid)``, ...); tests
that need a capability the transport lacks (``supports_processes``, ``raw_socket_frames``)
skip, naming the attribute. One transport run with different options is one subclass per
option set.

Parts: :mod:`.data` (addresses, control and DATA frames), :mod:`.lifecycle` (closing,
failed connects, timeouts, error messages), :mod:`.malformed` (garbage on a raw socket),
:mod:`.processes` (between spawned processes; their entry points live there).
"""

from __future__ import annotations

from llumnix_kv_core.testing.transport.base import ConformanceBase
from llumnix_kv_core.testing.transport.base import Pair
from llumnix_kv_core.testing.transport.base import TransportSpec
from llumnix_kv_core.testing.transport.data import DataTests
from llumnix_kv_core.testing.transport.lifecycle import LifecycleTests
from llumnix_kv_core.testing.transport.malformed import HEADER_CASES
from llumnix_kv_core.testing.transport.malformed import WIRE_REGION_BYTES
from llumnix_kv_core.testing.transport.malformed import MalformedFrameTests
from llumnix_kv_core.testing.transport.processes import ProcessTests

__all__ = ["HEADER_CASES", "WIRE_REGION_BYTES", "ConformanceBase", "Pair", "TransportConformance", "TransportSpec"]


class TransportConformance(DataTests, LifecycleTests, MalformedFrameTests, ProcessTests):
    """Every conformance test; subclass it as ``Test<Transport>Conformance`` (see the module docstring)."""
