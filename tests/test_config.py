"""ConnectorConfig: the only source of defaults, strict about keys and values, documented in the README."""

from __future__ import annotations

import math
import pathlib
import re

import pytest

from llumnix_kv_core.config import OPTIONS
from llumnix_kv_core.config import ConnectorConfig
from llumnix_kv_core.config import default_of
from llumnix_kv_core.errors import ConfigError

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_options() -> dict[str, tuple[str, str]]:
    """The README's option table: key -> (default, meaning)."""
    text = README.read_text()
    section = text[text.index("`kv_connector_extra_config` options"):]
    rows = {}
    for line in section.splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        m = re.fullmatch(r"\| `(\w+)` \| `([^`]*)` \| (.+) \|", line)
        if m:
            rows[m[1]] = (m[2], m[3])
    return rows


def test_readme_table_lists_every_option_with_its_default_and_meaning():
    rows = readme_options()
    assert list(rows) == list(OPTIONS), "README rows must follow ConnectorConfig's fields, in order"
    for name, f in OPTIONS.items():
        default = default_of(f)
        shown = "{}" if isinstance(default, type(ConnectorConfig().transport_options)) else str(default)
        assert rows[name] == (shown, f.metadata["doc"]), name


def test_defaults_come_from_the_dataclass_alone():
    assert ConnectorConfig.from_extra(None) == ConnectorConfig() == ConnectorConfig.from_extra({})
    cfg = ConnectorConfig.from_extra({"transport": "shm", "port": "15500", "lease_s": 5,
                                      "transport_options": {"host_path": "ring"}})
    assert (cfg.transport, cfg.port, cfg.lease_s) == ("shm", 15500, 5.0)
    assert isinstance(cfg.port, int)
    assert isinstance(cfg.lease_s, float)
    assert cfg.transport_config().extra == (("host_path", "ring"),)
    assert cfg.transport_config().io_timeout_s == 30.0
    with pytest.raises(TypeError):
        cfg.transport_options["x"] = 1  # read-only, like the rest of the record
    with pytest.raises(AttributeError):
        cfg.port = 1  # type: ignore[misc]


def test_unknown_key_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError) as exc:
        ConnectorConfig.from_extra({"prot": 15500, "lease": 3})
    msg = str(exc.value)
    assert "'lease', 'prot'" in msg
    for name in OPTIONS:
        assert name in msg


@pytest.mark.parametrize(("key", "value", "why"), [
    ("port", -1, "in \\[0, 65535\\]"),
    ("port", 70000, "in \\[0, 65535\\]"),
    ("port", 1.5, "whole number"),
    ("connections_per_peer", 0, "in \\[1, 64\\]"),
    ("lease_s", math.nan, "finite"),
    ("lease_s", 1e18, "finite"),
    ("transfer_timeout_s", "soon", "expected float"),
    ("io_timeout_s", True, "expected a number"),
    ("transport", "", "non-empty string"),
    ("scenario", 3, "non-empty string"),
    ("transport_options", ["host_path"], "JSON object"),
    ("digest", "yes", "expected true or false"),
    ("digest", 1, "expected true or false"),
])
def test_bad_values_name_the_key_the_value_and_what_is_accepted(key, value, why):
    with pytest.raises(ConfigError, match=f"connector option '{key}' = .*{why}"):
        ConnectorConfig.from_extra({key: value})


def test_digest_is_on_by_default_and_reaches_the_transport():
    assert ConnectorConfig().digest is True
    assert ConnectorConfig().transport_config().digest is True
    off = ConnectorConfig.from_extra({"digest": False})
    assert off.digest is False
    assert off.transport_config().digest is False
