"""Fixtures of the scheduler suite: vLLM's own Scheduler with our connector, per role, no model run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def instance(tiny_model: Path) -> Callable[..., Any]:
    """``instance(role, num_blocks=40, hybrid=False, **config) -> SchedulerInstance``.

    ``config``: ``make_vllm_config`` options; ``hybrid``: a GDN state group besides the attention group.
    """
    from llumnix_kv_engine_vllm.scheduler_harness import SchedulerInstance
    from llumnix_kv_engine_vllm.scheduler_harness import attention_cache_config
    from llumnix_kv_engine_vllm.scheduler_harness import hybrid_cache_config
    from llumnix_kv_engine_vllm.scheduler_harness import make_vllm_config

    def make(role: str, num_blocks: int = 40, hybrid: bool = False, **config: Any) -> SchedulerInstance:
        vllm_config = make_vllm_config(tiny_model, role, **config)
        groups = hybrid_cache_config if hybrid else attention_cache_config
        return SchedulerInstance(vllm_config, groups(vllm_config, num_blocks))

    return make
