"""The connector configuration: one frozen record, the only source of option defaults.

Engine adapters build it from the engine's free-form option dict (vLLM:
``kv_transfer_config.kv_connector_extra_config``) with :meth:`ConnectorConfig.from_extra`,
which refuses unknown keys and bad values with an error naming the key, what was given,
and what is accepted. The README's option table is checked against :data:`OPTIONS`.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from llumnix_kv_core.errors import ConfigError
from llumnix_kv_core.interfaces.transport import TransportConfig


def _option(default: Any, doc: str, **kw: Any) -> Any:
    if isinstance(default, Mapping):  # a read-only mapping per instance
        return field(default_factory=lambda: types.MappingProxyType(dict(default)), metadata={"doc": doc, **kw})
    return field(default=default, metadata={"doc": doc, **kw})


def default_of(f: dataclasses.Field) -> Any:
    """The default value of option ``f``."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


@dataclass(frozen=True)
class ConnectorConfig:
    """What a connector instance does and how it reaches its peers (same keys for every engine)."""

    scenario: str = _option("pd", "scenario policy plugin")
    transport: str = _option("tcp", "transport plugin (`llumnix-kv plugins` lists them): `tcp`, or `shm` between "
                             "processes of one host (host memory; GPU caches through CUDA IPC)")
    transport_options: Mapping[str, Any] = _option(
        {}, "options of the transport (e.g. shm `host_path`; see its README)")
    host: str = _option("127.0.0.1", "P's listen address")
    port: int = _option(0, "P's listen port; worker rank r listens on `port + r` (0: ephemeral)", lo=0, hi=65535)
    connections_per_peer: int = _option(2, "parallel connections D opens to each P worker", lo=1, hi=64)
    transfer_timeout_s: float = _option(60.0, "a transfer without progress for this long fails (D reports the "
                                        "blocks; vLLM's `kv_load_failure_policy` decides)", lo=0.001)
    connect_timeout_s: float = _option(10.0, "deadline to open a connection", lo=0.001)
    io_timeout_s: float = _option(30.0, "a send or receive without progress for this long fails the channel",
                                  lo=0.001)
    lease_s: float = _option(120.0, "how long P keeps an unclaimed request's blocks", lo=0.001, hi=86400.0)
    digest: bool = _option(True, "XXH3-64 of every DATA segment, checked by D before it acknowledges; a mismatch "
                           "fails the load like any other (tcp; set it alike on P and D; shm carries none, see "
                           "its README)")

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> ConnectorConfig:
        """Validate ``extra`` and fill in defaults; raises ConfigError naming the first bad key."""
        extra = dict(extra or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            msg = (f"unknown connector option(s) {', '.join(map(repr, unknown))}; known options: "
                   f"{', '.join(sorted(known))}")
            raise ConfigError(msg)
        return cls(**{k: _coerce(known[k], v) for k, v in extra.items()})

    def transport_config(self) -> TransportConfig:
        """The knobs every transport honours, with this config's transport options."""
        return TransportConfig(connect_timeout_s=self.connect_timeout_s, io_timeout_s=self.io_timeout_s,
                               connections_per_peer=self.connections_per_peer, digest=self.digest,
                               extra=tuple(sorted(self.transport_options.items())))


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """``value`` as the type of option ``f``, within its bounds."""
    default = default_of(f)
    bad = f"connector option {f.name!r} = {value!r}"
    if isinstance(default, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{bad}: expected a JSON object (dict)")
        return types.MappingProxyType(dict(value))
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{bad}: expected true or false")
        return value
    if isinstance(default, str):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{bad}: expected a non-empty string")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{bad}: expected a number")
    try:
        number = type(default)(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{bad}: expected {type(default).__name__}") from None
    if isinstance(default, int) and number != float(value):
        raise ConfigError(f"{bad}: expected a whole number")
    lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
    if not math.isfinite(number) or (lo is not None and number < lo) or (hi is not None and number > hi):
        raise ConfigError(f"{bad}: expected a finite number in [{lo}, {hi if hi is not None else 'inf'}]")
    return number


OPTIONS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(ConnectorConfig)}
