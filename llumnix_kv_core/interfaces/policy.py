"""Scenario policy contract: per request, what is loaded from where and what is sent where."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from dataclasses import field
from typing import Any


@dataclass(frozen=True)
class LoadPlan:
    """This instance receives ``num_tokens`` prompt tokens of KV from a remote sender."""

    transfer_id: str
    remote_addresses: tuple[str, ...]  # one per sender rank
    remote_engine_id: str
    extra: dict[str, Any] = field(default_factory=dict)
    # Where the KV comes from, as engines count cache hits: "p2p" (another instance), "host", "disk".
    source: str = "p2p"


@dataclass(frozen=True)
class SavePlan:
    """This instance keeps the request's KV and sends it to whoever asks for ``transfer_id``."""

    transfer_id: str
    lease_s: float
    extra: dict[str, Any] = field(default_factory=dict)


class ScenarioPolicy(abc.ABC):
    """Decides, in the scheduler process, what a request needs. Pure and side-effect free."""

    name: str

    @abc.abstractmethod
    def load_plan(self, params: dict[str, Any] | None) -> LoadPlan | None:
        """A plan when the request's ``kv_transfer_params`` ask to load remote KV."""

    @abc.abstractmethod
    def save_plan(self, params: dict[str, Any] | None) -> SavePlan | None:
        """A plan when the request's ``kv_transfer_params`` ask to hand its KV on."""

    @abc.abstractmethod
    def output_params(self, plan: SavePlan, addresses: list[str], engine_id: str) -> dict[str, Any]:
        """``kv_transfer_params`` returned with the finished request, for the next instance."""
