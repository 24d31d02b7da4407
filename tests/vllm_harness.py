"""Drive vLLM 0.33's real scheduler and WORKER-role connectors on the CPU, as vLLM's own
connector unit tests do: a VllmConfig on DeviceConfig("cpu") for a model directory holding
only a config.json, real Requests hashed by vLLM's block hasher, KV views from vLLM's
``allocate_kv_cache``, and a step loop that plays the model runner's connector calls.

The "forward" writes every scheduled token's KV cell with bytes derived from the token
prefix (and the rank, and the layer), so a block's content is a function of what it holds:
a block loaded from PegaFlow must match, bit for bit, the block that was saved.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm import SamplingParams
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, ParallelConfig, SchedulerConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_planning import get_kv_cache_config_from_groups
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, MLAAttentionSpec
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.worker.utils import allocate_kv_cache

from pegaflow.connector.worker_side import regions_from_kv_cache_config

BLOCK_SIZE = 16
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
NUM_KV_HEADS, HEAD_SIZE = 2, 16
MLA_HEAD = 576  # kv_lora_rank + qk_rope_head_dim
EOS_TOKEN = 2
_MODEL_DIR: str | None = None


def model_dir() -> str:
    """A directory holding only a tiny llama-like config.json (nothing is downloaded)."""
    global _MODEL_DIR
    if _MODEL_DIR is None:
        _MODEL_DIR = tempfile.mkdtemp(prefix="pf-model-")
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": NUM_KV_HEADS,
            "head_dim": HEAD_SIZE,
            "num_hidden_layers": len(LAYERS),
            "vocab_size": 1000,
            "max_position_embeddings": 4096,
            "torch_dtype": "bfloat16",
        }
        with open(f"{_MODEL_DIR}/config.json", "w") as f:
            json.dump(config, f)
    return _MODEL_DIR


@dataclass
class Setup:
    """One vLLM instance's configuration: layout, TP size, MLA or not, and its KV cache plan."""

    vllm_config: VllmConfig
    kv_cache_config: KVCacheConfig
    layout: str
    mla: bool


def make_setup(
    endpoint: str,
    *,
    layout: str = "LBNHC",
    tp: int = 1,
    mla: bool = False,
    num_blocks: int = 48,
    instance_id: str = "test",
    extra: dict[str, Any] | None = None,
    max_num_batched_tokens: int = 256,
) -> Setup:
    model = ModelConfig(model=model_dir(), skip_tokenizer_init=True, max_model_len=2048, dtype="bfloat16")
    cache = CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=True)
    cache.kv_cache_layout = layout  # connectors are built after layout resolution
    settings = {"endpoint": endpoint, "instance_id": instance_id, "rpc_timeout_s": 2.0, "transfer_timeout_s": 20.0}
    settings.update(extra or {})
    vc = VllmConfig(
        model_config=model,
        cache_config=cache,
        scheduler_config=SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=2048,
            is_encoder_decoder=False,
            async_scheduling=False,
        ),
        parallel_config=ParallelConfig(tensor_parallel_size=tp),
        device_config=DeviceConfig("cpu"),
        kv_transfer_config=KVTransferConfig(
            kv_connector="PegaKVConnector",
            kv_connector_module_path="pegaflow.connector",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config=settings,
        ),
    )
    if mla:
        spec = MLAAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=1, head_size=MLA_HEAD, dtype=torch.bfloat16)
    else:
        spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE, dtype=torch.bfloat16)
    groups = [KVCacheGroupSpec(list(LAYERS), spec)]
    kcc = get_kv_cache_config_from_groups(vc, groups, num_blocks * spec.page_size_bytes * len(LAYERS))
    kcc.kv_cache_layout = layout
    vc.cache_config.num_gpu_blocks = kcc.num_blocks
    return Setup(vc, kcc, layout, mla)


_NONE_HASH_READY = False


def make_request(req_id: str, prompt: list[int], max_tokens: int = 4) -> Request:
    """A request hashed with vLLM's own block hasher (sha256, as the engine core does)."""
    global _NONE_HASH_READY
    if not _NONE_HASH_READY:
        init_none_hash(sha256)
        _NONE_HASH_READY = True
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(
        request_id=req_id,
        prompt_token_ids=list(prompt),
        sampling_params=params,
        pooling_params=None,
        block_hasher=get_request_block_hasher(BLOCK_SIZE, sha256),
    )


def cell_bytes(rank: int, layer: int, tokens: tuple[int, ...], nbytes: int) -> bytes:
    """The KV bytes of the last token of ``tokens`` in one layer: a function of the prefix."""
    seed = hashlib.sha256(repr((rank, layer, tokens)).encode()).digest()
    return random.Random(seed).randbytes(nbytes)


class Worker:
    """One WORKER-role PegaKVConnector with its KV cache (vLLM's views over one buffer)."""

    def __init__(self, setup: Setup, rank: int = 0) -> None:
        self.setup = setup
        self.rank = rank
        parallel = setup.vllm_config.parallel_config
        parallel.rank = rank
        try:
            self.connector = KVConnectorFactory.create_connector(
                setup.vllm_config, KVConnectorRole.WORKER, setup.kv_cache_config
            )
        finally:
            parallel.rank = 0
        self.kv_caches = allocate_kv_cache(setup.kv_cache_config, torch.device("cpu"), KVCacheLayout[setup.layout])
        backing = next(iter(self.kv_caches.values()))
        torch.empty(0, dtype=torch.uint8).set_(backing.untyped_storage()).random_(0, 256)  # vLLM zeroes it
        self.regions = regions_from_kv_cache_config(self.kv_caches, setup.kv_cache_config)
        self.connector.register_kv_caches(self.kv_caches)
        # Test hooks, called right after the step's loads / save were handed to the server.
        self.after_loads: Callable[[], None] | None = None
        self.after_save: Callable[[], None] | None = None

    def scramble(self) -> None:
        """Fresh random bytes everywhere: stale content can no longer pass for a load."""
        backing = next(iter(self.kv_caches.values()))
        torch.empty(0, dtype=torch.uint8).set_(backing.untyped_storage()).random_(0, 256)

    def block_bytes(self, block_id: int) -> bytes:
        """Block ``block_id``'s bytes in every region, back to back."""
        return b"".join(r.pages(self.regions.num_blocks)[block_id].numpy().tobytes() for r in self.regions.regions)

    def forward(self, scheduled: dict[str, int], requests: dict[str, Request], tables: dict[str, list[int]]) -> None:
        """Write the KV cell of every scheduled token in every layer."""
        content_rank = 0 if self.setup.mla else self.rank  # MLA pages are the same on every rank
        for req_id, n in scheduled.items():
            request = requests[req_id]
            end = request.num_computed_tokens  # already advanced by the scheduler
            tokens = tuple(request.all_token_ids)
            for pos in range(end - n, end):
                block, offset = tables[req_id][pos // BLOCK_SIZE], pos % BLOCK_SIZE
                for layer, name in enumerate(LAYERS):
                    cell = self.kv_caches[name].view(torch.uint8)[block, :, offset, :]
                    data = cell_bytes(content_rank, layer, tokens[: pos + 1], cell.numel())
                    cell.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8).view(cell.shape))

    def run_connector(self, scheduler_output: Any, forward: Callable[[], None]) -> KVConnectorOutput:
        """The model runner's connector calls for one step, in vLLM 0.33's order."""
        c = self.connector
        meta = scheduler_output.kv_connector_metadata
        c.handle_preemptions(meta)
        c.bind_connector_metadata(meta)
        c.start_load_kv(None)  # async loads start after the forward launch; none are sync
        if self.after_loads is not None and meta.loads:
            self.after_loads()
        forward()
        c.wait_for_save()
        if self.after_save is not None and meta.save is not None:
            self.after_save()
        results = c.get_transfer_results(scheduler_output.finished_req_ids)
        output = KVConnectorOutput(
            finished_sending=results.finished_sending or None,
            finished_recving=results.finished_recving or None,
            failed_recving=results.failed_recving,
            invalid_block_ids=c.get_block_ids_with_load_errors(),
            kv_connector_stats=c.get_kv_connector_stats(),
            kv_connector_worker_meta=c.build_connector_worker_meta(),
        )
        c.clear_connector_metadata()
        return output

    def wait_for_completions(self, timeout_s: float) -> None:
        """Block until the server pushes a completion or ``timeout_s`` passes (idle steps)."""
        worker = self.connector._worker
        if worker is not None and worker.has_pending() and worker.link.available():
            worker.collect(wait_s=timeout_s)


@dataclass
class StepLog:
    scheduled: list[dict[str, int]] = field(default_factory=list)
    loaded: list[set[str]] = field(default_factory=list)


class Engine:
    """The real Scheduler (creating the SCHEDULER-role connector) and the workers."""

    def __init__(self, setup: Setup, workers: list[Worker]) -> None:
        self.setup = setup
        self.workers = workers
        vc = setup.vllm_config
        self.scheduler = Scheduler(
            vllm_config=vc,
            kv_cache_config=setup.kv_cache_config,
            structured_output_manager=StructuredOutputManager(vc),
            block_size=BLOCK_SIZE,
            log_stats=True,
        )
        self.aggregator = KVOutputAggregator(len(workers))
        self.log = StepLog()
        self.on_loads_done: Callable[[set[str]], None] | None = None
        self.stats: list[dict[str, Any]] = []
        self.tables: dict[str, list[int]] = {}  # each request's latest block table

    @property
    def connector(self) -> Any:
        return self.scheduler.connector

    def add(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def step(self) -> Any:
        sched = self.scheduler
        so = sched.schedule()
        tables = {r: list(sched.kv_cache_manager.get_block_ids(r)[0]) for r in so.num_scheduled_tokens}
        self.tables.update(tables)
        outputs = []
        for w in self.workers:
            kv_out = w.run_connector(so, lambda w=w: w.forward(so.num_scheduled_tokens, sched.requests, tables))
            req_ids = list(so.num_scheduled_tokens)
            sampled = []
            for r in req_ids:
                req = sched.requests[r]
                done_prefill = req.num_computed_tokens >= req.num_tokens
                sampled.append([100 + req.num_output_tokens] if done_prefill else [])
            outputs.append(
                ModelRunnerOutput(
                    req_ids=req_ids,
                    req_id_to_index={r: i for i, r in enumerate(req_ids)},
                    sampled_token_ids=sampled,
                    kv_connector_output=kv_out,
                )
            )
        out = self.aggregator.aggregate(outputs)
        loaded = set(out.kv_connector_output.finished_recving or ()) if out.kv_connector_output else set()
        if loaded and self.on_loads_done is not None:
            self.on_loads_done(loaded)  # before vLLM's next forward may overwrite anything
        engine_outputs = sched.update_from_output(so, out)
        for eo in engine_outputs.values():
            if eo.scheduler_stats is not None and eo.scheduler_stats.kv_connector_stats:
                self.stats.append(eo.scheduler_stats.kv_connector_stats)
        self.log.scheduled.append(dict(so.num_scheduled_tokens))
        self.log.loaded.append(loaded)
        if not so.num_scheduled_tokens:
            for w in self.workers:
                w.wait_for_completions(0.05)
        return so

    def busy(self) -> bool:
        sched = self.scheduler
        return bool(sched.requests) or sched.has_requests()

    def run(self, until: Callable[[], bool] | None = None, max_s: float = 30.0) -> int:
        """Step until ``until()`` holds (default: nothing left to do, no save pinning a block);
        returns the steps taken. Waiting on a deadline spins empty steps, as vLLM would."""
        until = until or (lambda: not self.busy() and not self.connector._scheduler.has_pending_saves())
        start, n = time.monotonic(), 0
        while not until():
            if time.monotonic() - start > max_s:
                raise AssertionError(f"not done after {n} steps / {max_s} s; requests: {self.waiting_states()}")
            self.step()
            n += 1
        return n

    def waiting_states(self) -> dict[str, str]:
        return {r.request_id: r.status.name for r in self.scheduler.requests.values()}

    def status(self, req_id: str) -> RequestStatus | None:
        req = self.scheduler.requests.get(req_id)
        return req.status if req is not None else None


def assert_scheduler_empty(engine: Engine) -> None:
    """No request, no pinned block, no leaked reference: every block back in the free pool."""
    sched = engine.scheduler
    assert not sched.requests, engine.waiting_states()
    assert not sched.running and len(sched.waiting) == 0
    assert not sched.finished_recving_kv_req_ids and not sched.failed_recving_kv_req_ids
    pool = sched.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # all but the null block
    assert all(b.ref_cnt == 0 for b in pool.blocks if not b.is_null)
    assert not engine.connector.has_pending_push_work()


class HeldCompletions:
    """Wraps a worker's client: completions are kept from the connector until released, so
    a test can hold saves and loads "in flight" for as many steps as it needs."""

    def __init__(self, worker: Worker) -> None:
        link = worker.connector._worker.link
        if link._client is None:
            link._client = link._factory(link.settings)
        self._client = link._client
        link._client = self
        self.held: list[Any] = []
        self.holding = True

    def poll_completions(self, timeout_s: float = 0.0) -> list[Any]:
        got = self._client.poll_completions(0.0)
        if self.holding:
            self.held.extend(got)
            return []
        out, self.held = self.held + got, []
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)
