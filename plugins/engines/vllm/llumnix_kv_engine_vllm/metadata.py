"""What the scheduler-side connector tells its workers each step (pickled across processes)."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorHandshakeMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(frozen=True)
class LoadTask:
    """Decode side: pull ``transfer_id`` into ``blocks`` (per group), from block position ``start`` on."""

    req_id: str
    transfer_id: str
    addresses: tuple[str, ...]
    blocks: tuple[tuple[int, ...], ...]
    start_token: int


@dataclass(frozen=True)
class SaveStep:
    """Prefill side: this step computes tokens [computed_before, computed_after) of the request."""

    req_id: str
    transfer_id: str
    blocks: tuple[tuple[int, ...], ...]
    computed_before: int
    computed_after: int
    prompt_len: int


@dataclass(frozen=True)
class SaveFinished:
    """Prefill side: the request finished; keep its blocks for ``lease_s`` (or cancel when not ok).

    ``delayed`` says whether the engine waits for a finished_sending report before freeing them.
    """

    req_id: str
    transfer_id: str
    ok: bool
    lease_s: float
    delayed: bool


@dataclass
class LlumnixConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadTask] = field(default_factory=list)
    cancelled_loads: list[tuple[str, str]] = field(default_factory=list)
    saves: list[SaveStep] = field(default_factory=list)
    finished_saves: list[SaveFinished] = field(default_factory=list)
    preempted_saves: list[str] = field(default_factory=list)  # transfer ids whose blocks the engine takes back


@dataclass
class LlumnixHandshakeMetadata(KVConnectorHandshakeMetadata):
    """A worker's listen address, sent to the scheduler side to build ``remote_addresses``."""

    address: str
    signature_hash: str
