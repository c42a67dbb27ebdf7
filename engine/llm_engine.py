"""The synchronous engine core: requests in, one scheduled step at a time, deltas out.

One step is `scheduler.schedule()` → adapter slots made resident → `runner.execute()` →
`sampler.launch()` → `scheduler.update()` → stop checks and detokenization. Not thread-safe:
the async bridge (engine/async_engine.py) drives it from a single thread.

One step stays in flight (`EngineConfig.async_scheduling`): `step()` schedules and launches
step n+1 first, and only then waits for step n's tokens and post-processes them, so the host
work of a step runs while the device computes the next one instead of leaving it idle. Step
n+1 is scheduled before the host knows step n's tokens: each sequence's newest token is a
placeholder (engine/placeholders.py) that the runner reads from the device, and that is
patched when step n's tokens arrive, before anything on the host reads it. A sequence that
stopped at step n has computed one token too many, which is dropped. When a row of step n+1
samples from its own history on the host (penalties, a logits processor such as a grammar),
only that step's sampling waits: its forward is launched first, step n is completed (which
patches the placeholders and advances the grammars), then its sampling is launched, so the
forward still overlaps the host's work. Tensor parallelism runs one step at a time.

A request that asks for prompt logprobs takes no cached prefix blocks (its prefill must compute
every prompt position); the prefill scores the prompt (engine/prompt_logprobs.py) and the scores
come back with the request's first delta. With `max_tokens` 0 that delta is also its last.

With `tensor_parallel_size` N > 1 this process is rank 0 of N: everything above runs here, and
the model calls (each forward, each adapter copy) are repeated by N-1 worker processes that
hold the other shards (engine/tp_driver.py). `close()` stops them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.config import AdapterConfig
from adapters.loader import LoadPolicy, base_names
from adapters.registry import AdapterEntry, AdapterRef, AdapterRegistry
from adapters.sources import scan_root, source_from_operator
from engine import adapter_names
from engine.adapter_manager import AdapterLease, AdapterManager, gpu_slots_for_budget
from engine.config import EngineConfig
from engine.cuda_graphs import CAPTURE_LOCK
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import RequestTooLongError
from engine.grammar import Grammars
from engine.logits_processor import LogitsProcessor
from engine.lora.slots import FUSED_NAMES, LoraSlots
from engine.model_runner import ModelRunner
from engine.models.loader import load_model
from engine.outputs import RequestDelta, TokenLogprob
from engine.placeholders import placeholder
from engine.prompt_logprobs import PendingPromptLogprobs
from engine.sampler import PendingSample, Sampler, SamplerInput
from engine.sampling_params import SamplingParams
from engine.tokenizer import eos_token_ids, load_tokenizer
from engine.tp_driver import TensorParallelDriver, TensorParallelRunner
from engine.tp_worker import rank_device
from scheduler import Scheduler, SchedulerConfig, Sequence
from scheduler.scheduler import ScheduledBatch
from scheduler.sequence import BASE_ADAPTER_ID, SequenceStatus

log = logging.getLogger(__name__)

# Sampled in place of a row whose own parameters failed (its token is dropped).
_STAND_IN = SamplingParams(max_tokens=1, temperature=0.0)


@dataclass
class _Request:
    request_id: str
    seq: Sequence
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    logits_processor: LogitsProcessor | None
    eos_ids: list[int]
    arrived_at: float = 0.0
    queue_time: float | None = None  # seconds from arrival to its first scheduled step
    scores_prompt: bool = False  # prompt logprobs asked for and not computed yet
    adapter_ref: AdapterRef | None = None  # the registry reference this engine took for it, if any

    @property
    def reads_history(self) -> bool:
        """Whether sampling this request reads its tokens on the host (penalties, a logits
        processor): then its previous token must be known before its next step runs."""
        p = self.params
        return (
            self.logits_processor is not None
            or p.repetition_penalty != 1.0
            or p.frequency_penalty != 0.0
            or p.presence_penalty != 0.0
        )


@dataclass
class _InFlight:
    """A launched step whose sampled tokens have not been read on the host yet."""

    batch: ScheduledBatch
    requests: list[_Request]
    sample: PendingSample | None  # None: launched without its sampling yet (`LLMEngine._sample`)
    # Per row: where the row's placeholder sits in its sequence's output, or -1 (not appended).
    token_index: list[int]
    prompt: dict[int, PendingPromptLogprobs] = field(default_factory=dict)  # row -> its prompt's scores
    logits: torch.Tensor | None = None  # kept until the sampling is launched


class LLMEngine:
    """Owns the model, KV cache, LoRA slots, scheduler, sampler and request state."""

    def __init__(
        self,
        config: EngineConfig,
        adapters: Mapping[str, Path | str] | None = None,
        adapter_config: AdapterConfig | None = None,
    ) -> None:
        """`adapters`: NAME -> directory or `hf://org/repo[@rev]`, registered now and loaded on first use."""
        self.config = config
        self.adapter_config = adapter_config or AdapterConfig()
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        # Tensor parallelism: this process is rank 0 and keeps the scheduler, adapters and
        # sampling; the workers start now and load their shards while this one loads its own.
        self._tp: TensorParallelDriver | None = None
        if config.tensor_parallel_size > 1:
            self._tp = TensorParallelDriver.launch(config)
            self.device = rank_device(config, 0)
        try:
            self._build(adapters or {})
        except BaseException:
            self.close()
            raise

    def _build(self, adapters: Mapping[str, Path | str]) -> None:
        config = self.config
        loaded = load_model(config.model, self.dtype, self.device, config.load_format)
        self.model = loaded.model
        self.hf_config = loaded.hf_config
        self.model_dir = loaded.model_dir
        self.tokenizer = load_tokenizer(self.model_dir)
        self.eos_token_ids: set[int] = eos_token_ids(self.model_dir, self.hf_config, self.tokenizer)
        self.grammars = Grammars(self.tokenizer, self.eos_token_ids)  # constrained decoding, from grammar text
        self.max_model_len = min(config.max_model_len, _model_max_len(self.hf_config))

        num_slots = config.max_loras
        if self.adapter_config.max_gpu_adapter_memory > 0:
            num_slots = gpu_slots_for_budget(_lora_geometry(self.model), config.max_lora_rank,
                                             torch.empty((), dtype=self.dtype).element_size(),
                                             self.adapter_config.max_gpu_adapter_memory)
        self.runner: ModelRunner | TensorParallelRunner
        if self._tp is None:
            self.lora = LoraSlots(self.model, num_slots=num_slots, max_rank=config.max_lora_rank)
            self.runner = ModelRunner(self.model, config.block_size, self.device, kernels=config.kernels)
        else:  # the same objects, whose model calls are repeated on every worker
            self.lora = self._tp.lora_slots(self.model, num_slots, config.max_lora_rank)
            self.runner = self._tp.model_runner(self.model, config.block_size, self.device, config.kernels)
        # --- GPU set-up: KV pool sized after a warm-up forward, then decode CUDA graphs.
        num_blocks = _num_kv_blocks(config, self.hf_config, self.dtype, self.device, self.max_model_len,
                                    self.runner)
        self.runner.allocate_kv_cache(num_blocks, self.dtype)
        self.num_kv_blocks = num_blocks
        # A sequence must fit the pool alone, or it could wait forever.
        self.max_model_len = min(self.max_model_len, num_blocks * config.block_size)
        if self.runner.use_triton and not config.enforce_eager:
            self.runner.capture_decode_graphs(min(config.max_num_seqs, config.cuda_graph_max_batch),
                                              self.max_model_len)
        # --- end GPU set-up
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_blocks=num_blocks,
                block_size=config.block_size,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=max(config.max_num_batched_tokens, self.max_model_len),
                max_model_len=self.max_model_len,
                max_adapters_per_batch=num_slots,
                enable_prefix_caching=config.enable_prefix_caching,
                mixed_steps=config.mixed_steps,
            )
        )
        self.sampler = Sampler()
        self._requests: dict[str, _Request] = {}
        self._by_seq: dict[int, _Request] = {}
        self._inflight: _InFlight | None = None
        self._failed: list[RequestDelta] = []  # error deltas for the next step() to return
        self.num_failed_steps = 0
        self._next_seq_id = 0
        self.num_preemptions = 0
        self.identity = self._adapter_registry(adapters)
        self.adapters = self._adapter_manager()

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent; nothing to do on one device)."""
        if self._tp is not None:
            self._tp.close()

    # ----------------------------------------------------------------- adapters
    def _adapter_registry(self, adapters: Mapping[str, Path | str]) -> AdapterRegistry:
        """Adapter identity: the operator's adapters and those under the adapter root, by name.

        The synchronous engine answers names itself; the async bridge resolves them on the event
        loop and hands this core only references (ids)."""
        root = self.adapter_config.adapter_root
        registry = AdapterRegistry(root)
        model_path = Path(self.config.model)
        registry.reserve({n for n in (self.config.served_model_name, self.config.model,
                                      model_path.name if model_path.exists() else None) if n})
        for name, source in adapters.items():
            registry.register(name, source_from_operator(source))
        registry.add_discovered(scan_root(root))
        return registry

    def _adapter_manager(self) -> AdapterManager:
        """Adapter residency: host tier, GPU slots and pins, by id."""
        cfg = self.adapter_config
        num_slots = self.lora.num_slots
        policy = LoadPolicy(
            expected_shapes=self.lora.expected_shapes(),
            num_layers=self.lora.num_layers,
            max_rank=self.config.max_lora_rank,
            dtype=self.dtype,
            base_names=base_names(
                self.config.model,
                self.model_dir,
                getattr(self.hf_config, "_name_or_path", None),
                self.config.served_model_name,
            ),
            refuse_base_mismatch=cfg.refuse_base_mismatch,
            pin_memory=self.device.type == "cuda",
            pin_lock=CAPTURE_LOCK if self.device.type == "cuda" else None,
            prepare=getattr(self.lora, "prepare", None) if self.device.type == "cuda" else None,
            allow_dora=self._tp is None,
            hub_cache_dir=cfg.hub_cache_dir,
        )
        manager = AdapterManager(self.lora, cfg.max_cpu_adapters or max(64, num_slots), policy,
                                 self.scheduler.running_adapter_ids, on_failed=self.identity.fail)
        self.identity.on_retired = manager.forget
        return manager

    def add_adapter(self, name: str, path: Path | str) -> int:
        """Register an adapter and load it into host memory; returns its id.

        The synchronous engine loads inline and raises AdapterFailedError if it is invalid.
        """
        entry = self.identity.register(name, source_from_operator(path))
        done = self.adapters.load(entry.ref)
        if done.done() and done.exception() is not None:
            raise done.exception()  # type: ignore[misc]
        return entry.adapter_id

    def adapter_names(self) -> list[str]:
        """Adapters a request may name: registered and not failed (what /v1/models lists)."""
        return self.identity.servable_names()

    def has_adapter(self, name: str) -> bool:
        """Whether `name` is registered or found under the adapter root (which reads the disk)."""
        return self.identity.has(name) or self.identity.find(name) is not None

    def adapter_refcounts(self) -> dict[str, int]:
        return self.identity.refcounts()

    def adapter_infos(self, entries: list[AdapterEntry] | None = None) -> list[dict[str, Any]]:
        """The admin view of `entries` (default: every live adapter, by name): identity and residency."""
        if entries is None:
            entries = sorted(self.identity.live(), key=lambda e: e.name)
        return [entry.info(self.adapters.residency(entry.ref)) for entry in entries]

    # ----------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: str | None = None,
        logits_processor: LogitsProcessor | None = None,
        lease: AdapterLease | None = None,
        grammar: str | None = None,
    ) -> None:
        """Queue a request. `lease` (from `adapters.hold`) carries an adapter its caller resolved and
        loaded off the engine thread; without one the name is resolved and loaded here (inline).
        `grammar` (llguidance grammar text) is compiled here, inline: `AsyncEngine` compiles it on a
        worker thread and passes the processor instead."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        vocab = self.hf_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise RequestTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {total} tokens ({len(prompt_token_ids)} in the prompt, {params.max_tokens} "
                "for the completion). Please reduce the prompt or max_tokens."
            )
        if grammar is not None:
            logits_processor = self.grammars.processor(grammar)
        adapter_id, adapter_ref = self._take_adapter(adapter, lease) if adapter else (BASE_ADAPTER_ID, None)
        seq = Sequence(
            seq_id=self._next_seq_id,
            prompt_token_ids=list(prompt_token_ids),
            max_tokens=params.max_tokens,
            adapter_id=adapter_id,
            reuse_cached_prefix=params.prompt_logprobs is None,
        )
        self._next_seq_id += 1
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        eos = [] if params.ignore_eos else sorted(self.eos_token_ids)
        request = _Request(
            request_id=request_id,
            seq=seq,
            params=params,
            detokenizer=IncrementalDetokenizer(self.tokenizer, list(prompt_token_ids), params.stop),
            generator=generator,
            logits_processor=logits_processor,
            eos_ids=eos + list(params.stop_token_ids),
            arrived_at=time.monotonic(),
            scores_prompt=params.prompt_logprobs is not None,
            adapter_ref=adapter_ref,
        )
        self.scheduler.add(seq)
        self._requests[request_id] = request
        self._by_seq[seq.seq_id] = request

    def _take_adapter(self, name: str, lease: AdapterLease | None) -> tuple[int, AdapterRef | None]:
        """The adapter id for a request, and the registry reference taken here (None with a lease)."""
        if lease is not None:
            if lease.ref.name != name:
                raise ValueError(f"the lease is for adapter {lease.ref.name!r}, not {name!r}")
            return self.adapters.consume(lease), None
        self.identity.discover(name)  # the synchronous engine may read the disk for a root adapter
        ref = adapter_names.acquire(self.identity, name)
        lease = AdapterLease(ref)
        try:
            self.adapters.hold(lease)  # loads inline when it is not in host memory
            return self.adapters.consume(lease), ref
        except BaseException:
            self.adapters.release(lease)
            self.identity.release(ref)
            raise

    def abort(self, request_id: str) -> bool:
        request = self._requests.get(request_id)
        if request is None:
            return False
        self.scheduler.abort(request.seq.seq_id)
        self._release(request)
        return True

    def scheduler_preemptions(self) -> int:
        return self.num_preemptions

    def request_ids(self) -> list[str]:
        return list(self._requests)

    def has_unfinished(self) -> bool:
        """Requests in flight, or error deltas the next step still has to hand back."""
        return bool(self._requests or self._failed)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def stats(self) -> dict[str, int]:
        bm = self.scheduler.block_manager
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "num_free_blocks": bm.num_free_blocks,
            "num_total_blocks": self.num_kv_blocks,
            "num_requests": len(self._requests),
            **self.identity.totals(),
            **self.adapters.totals(),
        }

    # --------------------------------------------------------------------- step
    def step(self) -> list[RequestDelta]:
        """Launch the next step, then return the deltas of the step before it (one in flight).

        Without overlap (see the module docstring) the step launched here is also waited for,
        and its own deltas are returned.
        """
        prev, self._inflight = self._inflight, None
        try:
            deltas: list[RequestDelta] = self._failed
            self._failed = []
            if prev is not None and not self._overlap():
                deltas += self._complete(prev)
                prev = None
            launched = self._launch(prev)
            if prev is not None:
                deltas += self._complete(prev)  # while `launched` runs on the device
            if launched is not None and launched.sample is None:
                try:  # after step n: the tokens its rows read are known now
                    launched.sample = self._sample(launched)
                except Exception as exc:  # noqa: BLE001 - this batch fails; other requests go on
                    self._fail_batch(launched.batch, exc)
                    launched = None
            if launched is not None:
                self._commit(launched)
                if self._overlap():
                    self._inflight = launched
                else:
                    deltas += self._complete(launched)
            return deltas
        except BaseException:
            self._inflight = None
            raise

    def _overlap(self) -> bool:
        return self.config.async_scheduling and self._tp is None

    def _launch(self, prev: _InFlight | None) -> _InFlight | None:
        """Schedule and start a step; placeholders in it are read from `prev`'s tokens."""
        running = self.scheduler.running_adapter_ids()
        self.adapters.place_pinned(running)
        # Pinned adapters hold slots whether or not they run; the cap keeps a batch within the rest.
        self.scheduler.config.max_adapters_per_batch = self.adapters.scheduler_cap(running)
        batch = self.scheduler.schedule()
        self.num_preemptions += len(batch.preempted)
        if batch.is_empty:
            return None
        try:
            return self._start(batch, prev)
        except Exception as exc:  # noqa: BLE001 - this batch fails; the engine and other requests go on
            self._fail_batch(batch, exc)
            return None

    def _fail_batch(self, batch: ScheduledBatch, exc: Exception) -> None:
        if self._tp is not None:  # the ranks may disagree on where the step stopped
            raise exc
        log.exception("engine step failed; failing its %d requests", len(batch.seqs), exc_info=exc)
        self.num_failed_steps += 1
        self._fail([self._by_seq[s.seq_id] for s in batch.seqs if s.seq_id in self._by_seq], exc)

    def _start(self, batch: ScheduledBatch, prev: _InFlight | None) -> _InFlight:
        lora_slots = self.adapters.make_resident(
            [s.adapter_id for s in batch.seqs], self.scheduler.running_adapter_ids()
        )
        pending = prev.sample.token_ids if prev is not None else None
        requests = [self._by_seq[seq.seq_id] for seq in batch.seqs]
        scored = _prompt_logprobs_wanted(batch, requests)
        out = self.runner.execute_step(batch.seqs, batch.num_new_tokens, batch.is_prefill, lora_slots, pending,
                                       scored)
        logits = out.logits
        prompt = {i: PendingPromptLogprobs(scores) for i, scores in out.prompt_scores.items()}
        for i, _ in scored:
            requests[i].scores_prompt = False
            requests[i].seq.reuse_cached_prefix = True  # a recompute after preemption may hit the cache
        if batch.is_prefill:
            now = time.monotonic()
            for r in requests:
                if r.queue_time is None:
                    r.queue_time = now - r.arrived_at
        step = _InFlight(batch, requests, None, [], prompt, logits)
        if prev is None or not any(r.reads_history for r in requests):
            step.sample = self._sample(step)
        return step  # else `step()` samples it once `prev` is complete

    def _sample(self, step: _InFlight) -> PendingSample:
        """Launch the step's sampling (the host must know every token its rows read by now)."""
        requests, logits = step.requests, step.logits
        step.logits = None
        rows = [
            SamplerInput(
                params=r.params,
                prompt_token_ids=r.seq.prompt_token_ids,
                output_token_ids=r.seq.output_token_ids,
                generator=r.generator,
                eos_token_ids=r.eos_ids,
                logits_processor=r.logits_processor,
            )
            for r in requests
        ]
        try:
            return self.sampler.launch(logits, rows)
        except Exception as exc:  # noqa: BLE001 - find the rows whose parameters cause it
            return self._sample_without_bad_rows(logits, rows, requests, exc)

    def _sample_without_bad_rows(
        self, logits: torch.Tensor, rows: list[SamplerInput], requests: list[_Request], exc: Exception
    ) -> PendingSample:
        """Sampling the batch failed: fail the requests whose row fails alone, greedy-sample a
        stand-in for each of them (their token is dropped), and sample the rest as asked.
        If no row fails alone, the batch fails as a whole (the caller fails its requests)."""
        bad = []
        for i, row in enumerate(rows):
            state = row.generator.get_state() if row.generator is not None else None
            try:
                self.sampler.launch(logits[i : i + 1], [row]).result()
            except Exception as row_exc:  # noqa: BLE001
                bad.append((i, row_exc))
            finally:
                if state is not None:  # the probe must not use up a seeded row's draws
                    row.generator.set_state(state)  # type: ignore[union-attr]
        if not bad:
            raise exc
        for i, row_exc in bad:
            log.warning("request %s failed in sampling: %s", requests[i].request_id, row_exc)
            self._fail([requests[i]], row_exc)
            rows[i] = SamplerInput(params=_STAND_IN, prompt_token_ids=[], output_token_ids=[],
                                   generator=None, eos_token_ids=[])
        return self.sampler.launch(logits, rows)

    def _fail(self, requests: list[_Request], exc: BaseException) -> None:
        """End `requests` with an error delta (returned by the next `step`); others go on."""
        for request in requests:
            if self._requests.get(request.request_id) is not request:
                continue
            self.scheduler.abort(request.seq.seq_id)
            self._release(request)
            self._failed.append(RequestDelta(
                request_id=request.request_id, finish_reason="error", error=f"{type(exc).__name__}: {exc}",
                num_prompt_tokens=request.seq.num_prompt_tokens, num_output_tokens=request.seq.num_output_tokens,
            ))  # fmt: skip

    def _commit(self, step: _InFlight) -> None:
        """Append each live row's placeholder to its sequence (the scheduler's view moves on)."""
        seqs = step.batch.seqs
        step.token_index = [s.num_output_tokens if s.status is SequenceStatus.RUNNING else -1 for s in seqs]
        self.scheduler.update(step.batch, [placeholder(i) for i in range(len(seqs))])

    def _complete(self, step: _InFlight) -> list[RequestDelta]:
        """Wait for the step's tokens, patch them over the placeholders, post-process them."""
        out = step.sample.result()
        deltas = []
        for i, (request, token_id, logprob) in enumerate(
            zip(step.requests, out.token_ids, out.logprobs, strict=True)
        ):
            index = step.token_index[i]
            if index < 0 or self._by_seq.get(request.seq.seq_id) is not request:
                continue  # aborted, or stopped at the step before: this token is dropped
            request.seq.output_token_ids[index] = token_id
            delta = self._postprocess(request, token_id, logprob)
            scores = step.prompt.get(i)
            if scores is not None:
                delta.prompt_logprobs = scores.result(request.seq.prompt_token_ids)
            deltas.append(delta)
        return deltas

    def _postprocess(self, request: _Request, token_id: int, logprob: TokenLogprob | None) -> RequestDelta:
        seq, params = request.seq, request.params
        if params.max_tokens == 0:  # the prompt only is scored: the token sampled after it is dropped
            self.scheduler.finish(seq)
            self._release(request)
            return RequestDelta(request_id=request.request_id, finish_reason="length",
                                num_prompt_tokens=seq.num_prompt_tokens, queue_time=request.queue_time)
        finish: str | None = None
        text = ""
        if token_id in request.eos_ids:
            finish = "stop"
        else:
            if request.logits_processor is not None:
                request.logits_processor.accept(token_id)
            text = request.detokenizer.add(token_id)
            processor = request.logits_processor
            if request.detokenizer.stopped or (processor is not None and processor.is_finished()):
                finish = "stop"
            elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
                finish = "length"
        if finish is not None:
            text += request.detokenizer.flush()
            self.scheduler.finish(seq)
            self._release(request)
        return RequestDelta(
            request_id=request.request_id,
            token_ids=[token_id],
            text=text,
            logprobs=[logprob] if logprob is not None else [],
            finish_reason=finish,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            queue_time=request.queue_time if seq.num_output_tokens == 1 else None,
        )

    def _release(self, request: _Request) -> None:
        self._requests.pop(request.request_id, None)
        self._by_seq.pop(request.seq.seq_id, None)
        if request.seq.adapter_id != BASE_ADAPTER_ID:
            self.adapters.unhold(request.seq.adapter_id)
        if request.adapter_ref is not None:
            self.identity.release(request.adapter_ref)
            request.adapter_ref = None


def _prompt_logprobs_wanted(batch: ScheduledBatch, requests: list[_Request]) -> list[tuple[int, int]]:
    """(row, alternatives) for the rows whose prompt this prefill scores: each computes its whole
    prompt (it took no cached blocks and has no output yet)."""
    if not batch.is_prefill:
        return []
    wanted = []
    for i, request in enumerate(requests):
        if request.scores_prompt:
            seq, k = request.seq, request.params.prompt_logprobs
            if seq.num_computed_tokens or seq.num_output_tokens or batch.num_new_tokens[i] != seq.num_prompt_tokens:
                raise RuntimeError(f"request {request.request_id}: scoring its prompt needs a prefill of all of it, "
                                   f"got {batch.num_new_tokens[i]} of {seq.num_prompt_tokens} tokens")
            wanted.append((i, k or 0))
    return wanted


def _lora_geometry(model: nn.Module) -> list[tuple[int, list[int]]]:
    """(in_features, output_sizes) of every projection LoRA wraps, to size slots from a byte budget."""
    return [
        (int(module.in_features), [int(n) for n in module.output_sizes])
        for layer in model.model.layers
        for path, module in layer.named_modules()
        if path.rpartition(".")[2] in FUSED_NAMES
    ]


def _model_max_len(hf_config) -> int:
    return int(getattr(hf_config, "max_position_embeddings", 0) or 1 << 20)


def _num_kv_blocks(
    config: EngineConfig, hf_config, dtype: torch.dtype, device: torch.device, max_len: int,
    runner: ModelRunner | TensorParallelRunner,
) -> int:
    from engine.kv_cache import kv_cache_bytes_per_block

    if config.num_kv_blocks > 0:
        return config.num_kv_blocks
    per_block = kv_cache_bytes_per_block(hf_config, config.block_size, dtype, config.tensor_parallel_size)
    if config.kv_cache_memory > 0:
        budget = config.kv_cache_memory
    elif device.type == "cuda":
        budget = runner.kv_cache_budget(config.gpu_memory_utilization,
                                        max(config.max_num_batched_tokens, max_len), max_len, config.max_num_seqs)
    else:
        # CPU: room for every sequence at full length, capped at 2 GiB.
        want = config.max_num_seqs * (-(-max_len // config.block_size)) * per_block
        budget = min(want, 2 << 30)
    blocks = budget // per_block
    needed = -(-max_len // config.block_size)
    if blocks < needed:
        raise ValueError(
            f"the KV cache budget ({budget} bytes) holds {blocks} blocks, fewer than the {needed} "
            f"one sequence of max_model_len={max_len} needs; lower max_model_len or raise the budget"
        )
    return int(blocks)
