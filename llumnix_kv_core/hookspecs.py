"""Hook specifications: the only place plugin hooks are declared.

A plugin is a module (found through the ``llumnix_kv`` entry-point group) that
implements some of these hooks with ``@llumnix_kv_core.hookimpl``. Every hook is
called once per process when the registry is built; the objects the hooks return
are then used directly, so nothing on the per-block path goes through pluggy.
A plugin module must not import heavy optional dependencies at import time: do it
inside the factories it returns, and declare them through ``is_available``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from llumnix_kv_core.markers import hookspec

if TYPE_CHECKING:
    from llumnix_kv_core.providers import EngineAdapterProvider
    from llumnix_kv_core.providers import LayoutProvider
    from llumnix_kv_core.providers import ScenarioPolicyProvider
    from llumnix_kv_core.providers import TransportProvider


@hookspec
def llumnix_kv_register_transports() -> Iterable[TransportProvider]:
    """Register transports.

    :return: TransportProvider records. ``name`` is what users put in
        ``kv_connector_extra_config["transport"]``; it must be unique across plugins.
        ``factory(TransportConfig)`` is called once per engine worker process and
        returns a :class:`~llumnix_kv_core.interfaces.transport.Transport`.

    Called in: every process that builds the registry (engine workers, CLI).

    Example::

        @hookimpl
        def llumnix_kv_register_transports():
            return [TransportProvider("udp", lambda cfg: UdpTransport(cfg))]
    """


@hookspec
def llumnix_kv_register_layouts() -> Iterable[LayoutProvider]:
    """Register layout parsers.

    :return: LayoutProvider records. Each ``parser.parse(description)`` receives an
        engine's own description of one cache group (a
        :class:`~llumnix_kv_core.layout.CacheGroupDescription`) and returns a
        :class:`~llumnix_kv_core.layout.KVLayout` or None to decline. The first
        parser, in load order (entry-point order), that accepts wins. A parser must decline what it
        does not recognise, so order matters only between parsers claiming the same family.

    Called in: engine worker processes, once at KV-cache registration.
    """


@hookspec
def llumnix_kv_register_engines() -> Iterable[EngineAdapterProvider]:
    """Register engine adapters (vLLM connector, SGLang backend, ...).

    :return: EngineAdapterProvider records: engine name, supported versions and the
        ``module:attr`` of the class the engine instantiates. The engine itself
        imports that class; this hook only makes the adapter visible (CLI, checks).

    Called in: every process that builds the registry.
    """


@hookspec
def llumnix_kv_register_scenarios() -> Iterable[ScenarioPolicyProvider]:
    """Register scenario policies (``pd``, later ``kvstore``, ``migration``).

    :return: ScenarioPolicyProvider records; ``factory(ConnectorConfig)`` returns a
        :class:`~llumnix_kv_core.interfaces.policy.ScenarioPolicy` that decides,
        per request and in the scheduler process, what the engine adapter loads
        and saves.

    Called in: the engine's scheduler process, once at connector creation.
    """
