"""Hook specifications: the only place plugin hooks are declared.

A plugin is a module (found through the ``llumnix_kv`` entry-point group) that
implements some of these hooks with ``@llumnix_kv_core.hookimpl``. Every hook is
called once per process when the registry is built; the objects the hooks return
are then used directly, so nothing on the per-block path goes through pluggy.
A plugin module must not import heavy optional dependencies at import time: do it
inside the factories it returns, and declare them through ``is_available``.

The registry is strict, and a plugin that breaks a rule is listed as ``failed`` by
``llumnix-kv plugins`` with the reason (other plugins load regardless): every
``@hookimpl`` must name a hook declared here (``optionalhook=True`` exempts one, which
is then ignored); a function named like a hook must carry ``@hookimpl``; wrapper
hookimpls are not supported; each hook returns an iterable (a list; ``[]`` for none)
of its kind's records from :mod:`llumnix_kv_core.providers`, each with a non-empty
``name`` unique within its kind and ``commands`` a tuple of ``PluginCommand``.

Each spec's ``Example::`` is a complete plugin module; the tests run every one.
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
        returns a :class:`~llumnix_kv_core.interfaces.transport.Transport`. A ``bench``
        command is what ``llumnix-kv bench --transport NAME`` runs.

    Called in: every process that builds the registry (engine workers, CLI).

    Example::

        from llumnix_kv_core import hookimpl
        from llumnix_kv_core.providers import PluginCommand
        from llumnix_kv_core.providers import TransportProvider


        def make_udp(config):
            from my_udp.transport import UdpTransport  # imported when a transport is built

            return UdpTransport(config)


        @hookimpl
        def llumnix_kv_register_transports():
            return [TransportProvider("udp", make_udp, description="frames over UDP", memory_kinds=("cpu",),
                                      commands=(PluginCommand("bench", "UDP rates", "my_udp.bench:main"),))]
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

    Example::

        from llumnix_kv_core import hookimpl
        from llumnix_kv_core.interfaces.layout import LayoutParser
        from llumnix_kv_core.providers import LayoutProvider


        class PagedParser(LayoutParser):
            name = "my_paged"

            def parse(self, desc):
                if desc.backend != "MY_PAGED":
                    return None  # another family: the next parser tries
                from my_engine.layout import to_kv_layout

                return to_kv_layout(desc)


        @hookimpl
        def llumnix_kv_register_layouts():
            return [LayoutProvider("my_paged", PagedParser(), engines=("vllm",))]
    """


@hookspec
def llumnix_kv_register_engines() -> Iterable[EngineAdapterProvider]:
    """Register engine adapters (vLLM connector, SGLang backend, ...).

    :return: EngineAdapterProvider records: engine name, supported versions and the
        ``module:attr`` of the class the engine instantiates. The engine itself
        imports that class; this hook only makes the adapter visible (CLI, checks).
        A ``demo`` command is what ``llumnix-kv demo --engine NAME`` runs.

    Called in: every process that builds the registry.

    Example::

        from llumnix_kv_core import hookimpl
        from llumnix_kv_core.providers import EngineAdapterProvider
        from llumnix_kv_core.providers import PluginCommand


        @hookimpl
        def llumnix_kv_register_engines():
            return [EngineAdapterProvider(
                "myengine", engine="myengine", versions=">=1.0,<2", entry="my_engine_kv.connector:Connector",
                commands=(PluginCommand("demo", "PD on two engines", "my_engine_kv.demo:main"),))]
    """


@hookspec
def llumnix_kv_register_scenarios() -> Iterable[ScenarioPolicyProvider]:
    """Register scenario policies (``pd``, later ``kvstore``, ``migration``).

    :return: ScenarioPolicyProvider records; ``factory(ConnectorConfig)`` returns a
        :class:`~llumnix_kv_core.interfaces.policy.ScenarioPolicy` that decides,
        per request and in the scheduler process, what the engine adapter loads
        and saves.

    Called in: the engine's scheduler process, once at connector creation.

    Example::

        from llumnix_kv_core import hookimpl
        from llumnix_kv_core.providers import ScenarioPolicyProvider


        def make_migration(config):  # a llumnix_kv_core.config.ConnectorConfig
            from my_migration.policy import MigrationPolicy

            return MigrationPolicy(config)


        @hookimpl
        def llumnix_kv_register_scenarios():
            return [ScenarioPolicyProvider("migration", make_migration, "moves a running request's KV")]
    """
