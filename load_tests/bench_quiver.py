"""Quiver's offline driver for `load_tests/bench.py`: random-weight models of real shapes, no disk.

The loop is `LLMEngine.step` without the parts a benchmark of forced-length random tokens has
no use for (detokenizer, stop strings, adapter registry): scheduler → runner → sampler →
scheduler update, with one step in flight as the engine runs it (step n+1 is launched before
step n's tokens are read; engine/placeholders.py). Adapters go straight into GPU slots
(adapter id = slot + 1); every adapter a run uses is resident, as after a warm server's
first requests.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import time

import numpy as np
import torch

from engine.kv_cache import allocate_kv_cache, kv_cache_bytes_per_block
from engine.lora.slots import LoraSlots
from engine.model_runner import ModelRunner
from engine.models import build_model
from engine.placeholders import placeholder
from engine.sampler import Sampler, SamplerInput
from engine.sampling_params import SamplingParams
from load_tests.gpu_timing import replay_ms
from scheduler import Scheduler, SchedulerConfig, Sequence
from scheduler.sequence import SequenceStatus

BLOCK_SIZE = 16
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = (*QKVO, "gate_proj", "up_proj", "down_proj")

SHAPES = {
    "llama-1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama-8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}


def hf_config(shape: str, num_layers: int | None = None):
    """A LlamaConfig of a real shape (vocab 128256, rope theta 500000), no EOS: lengths are forced."""
    from transformers import LlamaConfig

    kwargs = dict(SHAPES[shape])
    if num_layers is not None:
        kwargs["num_hidden_layers"] = num_layers
    cfg = LlamaConfig(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None, **kwargs)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


@dataclasses.dataclass
class Request:
    prompt: list[int]
    output_len: int
    slot: int = -1  # LoRA slot, -1 = base


def make_requests(n: int, seed: int, vocab: int, prompt_range: tuple[int, int],
                  output_range: tuple[int, int]) -> list[Request]:
    """Prompt and output lengths uniform on the closed ranges; random token ids."""
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(prompt_range[0], prompt_range[1] + 1, n)
    output_lens = rng.integers(output_range[0], output_range[1] + 1, n)
    return [Request(rng.integers(0, vocab, int(p)).tolist(), int(o)) for p, o in zip(prompt_lens, output_lens, strict=True)]


def assign_adapters(requests: list[Request], num_adapters: int, alpha: float, seed: int) -> list[Request]:
    """S-LoRA popularity: numpy.random.power(alpha) scaled to N (alpha 1 = uniform)."""
    if num_adapters == 0:
        return [dataclasses.replace(r, slot=-1) for r in requests]
    rng = np.random.default_rng(seed)
    picks = np.minimum((rng.power(alpha, len(requests)) * num_adapters).astype(int), num_adapters - 1)
    return [dataclasses.replace(r, slot=int(s)) for r, s in zip(requests, picks, strict=True)]


@dataclasses.dataclass
class _Weights:
    name: str
    modules: dict
    max_rank: int


class QuiverOffline:
    """Model + LoRA slots + KV pool + decode graphs, set up as `LLMEngine` does on CUDA."""

    def __init__(self, cfg, *, num_slots: int, max_rank: int, max_num_seqs: int, max_model_len: int,
                 max_batched_tokens: int, graph_max_batch: int, enforce_eager: bool = False,
                 utilization: float = 0.85, seed: int = 0) -> None:
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        self.cfg = cfg
        self.model = build_model(cfg, torch.bfloat16, "cuda")
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
        self.lora = LoraSlots(self.model, num_slots=num_slots, max_rank=max_rank)
        self.runner = ModelRunner(self.model, BLOCK_SIZE, "cuda")
        self.max_num_seqs, self.max_model_len, self.max_batched = max_num_seqs, max_model_len, max_batched_tokens
        t1 = time.perf_counter()
        budget = self.runner.kv_cache_budget(utilization, max_batched_tokens, max_model_len, max_num_seqs)
        per_block = kv_cache_bytes_per_block(cfg, BLOCK_SIZE, torch.bfloat16)
        need = max_num_seqs * -(-max_model_len // BLOCK_SIZE)
        self.num_blocks = min(budget // per_block, need)
        allocate_kv_cache(self.model, self.num_blocks, BLOCK_SIZE, torch.bfloat16, "cuda")
        t2 = time.perf_counter()
        if not enforce_eager:
            self.runner.capture_decode_graphs(min(graph_max_batch, max_num_seqs), max_model_len)
        t3 = time.perf_counter()
        self.setup = dict(build_s=t1 - t0, profile_and_kv_s=t2 - t1, graph_capture_s=t3 - t2,
                          kv_budget_bytes=int(budget), kv_blocks=int(self.num_blocks),
                          kv_blocks_budget=int(budget // per_block),
                          gpu_mem_allocated=int(torch.cuda.memory_allocated()))

    def load_adapters(self, num: int, ranks: list[int], targets: tuple[str, ...], seed: int = 1) -> float:
        """Random adapters into slots 0..num-1 (slot i gets rank ranks[i % len(ranks)]); seconds taken."""
        t0 = time.perf_counter()
        gen = torch.Generator(device="cuda").manual_seed(seed)
        shapes = self.lora.expected_shapes()
        pools = {}
        for rank in sorted(set(ranks)):
            for short in targets:
                d_in, d_out = shapes[short]
                a = torch.randn(4, rank, d_in, generator=gen, device="cuda") / d_in**0.5
                b = torch.randn(4, d_out, rank, generator=gen, device="cuda") * 0.5 / rank**0.5
                pools[(rank, short)] = (a.to(torch.bfloat16), b.to(torch.bfloat16))
        for i in range(num):
            rank = ranks[i % len(ranks)]
            modules = {(layer, short): (pools[(rank, short)][0][(i + layer) % 4], pools[(rank, short)][1][i % 4])
                       for layer in range(self.cfg.num_hidden_layers) for short in targets}
            self.lora.load(i, _Weights(f"adapter-{i}", modules, rank))
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def run(self, requests: list[Request], time_limit_s: float = 1e9, overlap: bool = True) -> dict:
        """All requests at once, greedy, forced lengths; output tokens/s over the whole run.

        `overlap`: one step in flight, as `LLMEngine` runs by default; False waits for every
        step's tokens before scheduling the next. The host time of each decode step (schedule,
        launch, then reading the previous step's tokens and updating) is split in
        `decode_split_ms`; with overlap the device works through most of it.
        """
        sched = Scheduler(SchedulerConfig(
            num_blocks=int(self.num_blocks), block_size=BLOCK_SIZE, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_batched, max_model_len=self.max_model_len,
            max_adapters_per_batch=self.lora.num_slots, enable_prefix_caching=True,
        ))  # fmt: skip
        sampler = Sampler()
        rows: dict[int, SamplerInput] = {}
        seqs = []
        for i, r in enumerate(requests):
            seq = Sequence(seq_id=i, prompt_token_ids=list(r.prompt), max_tokens=r.output_len, adapter_id=r.slot + 1)
            params = SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
            rows[i] = SamplerInput(params, seq.prompt_token_ids, seq.output_token_ids, None, [])
            sched.add(seq)
            seqs.append(seq)
        torch.cuda.synchronize()
        start = time.perf_counter()
        prefill_s = decode_s = 0.0
        steps = {"prefill": 0, "decode": 0}
        decode_batch = []
        out_tokens = 0
        partial = False
        host_s = {"schedule": 0.0, "model_and_sample": 0.0, "update": 0.0}
        inflight = None  # (batch, pending sample, each row's placeholder index)

        def resolve(step) -> int:
            """Patch a step's tokens over its placeholders; finish sequences at their length."""
            done, pending_sample, index = step
            n = 0
            for seq, token_id, k in zip(done.seqs, pending_sample.result().token_ids, index, strict=True):
                if k >= 0 and not seq.is_finished:
                    seq.output_token_ids[k] = token_id
                    n += 1
                    if seq.num_output_tokens >= seq.max_tokens:
                        sched.finish(seq)
            return n

        while sched.has_unfinished or inflight is not None:
            t = time.perf_counter()
            if t - start > time_limit_s:
                partial = True
                break
            batch = sched.schedule()
            t_model = time.perf_counter()
            launched = None
            if not batch.is_empty:
                slots = [s.adapter_id - 1 for s in batch.seqs]
                pending = inflight[1].token_ids if inflight is not None else None
                logits = self.runner.execute(batch.seqs, batch.num_new_tokens, batch.is_prefill, slots, pending)
                launched = (batch, sampler.launch(logits, [rows[s.seq_id] for s in batch.seqs]), [])
            elif inflight is None:
                raise RuntimeError("scheduler returned an empty batch with requests unfinished")
            t_update = time.perf_counter()
            if inflight is not None:  # the previous step's tokens, read while this one runs
                out_tokens += resolve(inflight)
            if launched is not None:
                b = launched[0]
                launched[2].extend(s.num_output_tokens if s.status is SequenceStatus.RUNNING else -1 for s in b.seqs)
                sched.update(b, [placeholder(i) for i in range(len(b.seqs))])
                if not overlap:
                    out_tokens += resolve(launched)
                    launched = None
            inflight = launched
            t_end = time.perf_counter()
            dt = t_end - t
            if batch.is_empty:
                continue
            if not batch.is_prefill:
                host_s["schedule"] += t_model - t
                host_s["model_and_sample"] += t_update - t_model
                host_s["update"] += t_end - t_update
            if batch.is_prefill:
                prefill_s += dt
                steps["prefill"] += 1
            else:
                decode_s += dt
                steps["decode"] += 1
                decode_batch.append(len(batch.seqs))
        elapsed = time.perf_counter() - start
        return dict(
            requests=len(requests), output_tokens=out_tokens, seconds=elapsed,
            output_tok_s=out_tokens / elapsed, prefill_s=prefill_s, decode_s=decode_s, steps=steps,
            mean_decode_batch=float(np.mean(decode_batch)) if decode_batch else 0.0,
            decode_step_ms=1e3 * decode_s / max(1, steps["decode"]), partial=partial, overlap=overlap,
            decode_split_ms={k: round(1e3 * v / max(1, steps["decode"]), 3) for k, v in host_s.items()},
            prompt_tokens=sum(len(r.prompt) for r in requests),
            # Every output token, hashed: two runs of the same requests can be checked for equality.
            tokens_sha1=hashlib.sha1(repr([s.output_token_ids for s in seqs]).encode()).hexdigest(),
        )  # fmt: skip

    def single_stream(self, prompt_len: int, output_len: int, slot: int, repeats: int = 3) -> dict:
        """Batch 1: ms per output token over the decode steps (prefill excluded), median of repeats."""
        per_token = []
        for rep in range(repeats):
            rng = np.random.default_rng(100 + rep)
            seq = Sequence(seq_id=rep, prompt_token_ids=rng.integers(0, self.cfg.vocab_size, prompt_len).tolist(),
                           max_tokens=output_len, adapter_id=slot + 1)
            sched = Scheduler(SchedulerConfig(num_blocks=int(self.num_blocks), block_size=BLOCK_SIZE, max_num_seqs=1,
                                              max_num_batched_tokens=self.max_batched, max_model_len=self.max_model_len,
                                              max_adapters_per_batch=self.lora.num_slots))
            sched.add(seq)
            row = SamplerInput(SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True),
                               seq.prompt_token_ids, seq.output_token_ids, None, [])
            sampler = Sampler()
            stamps = []
            while sched.has_unfinished:
                batch = sched.schedule()
                logits = self.runner.execute(batch.seqs, batch.num_new_tokens, batch.is_prefill, [slot])
                sched.update(batch, sampler(logits, [row]).token_ids)
                if seq.num_output_tokens >= output_len:
                    sched.finish(seq)
                stamps.append(time.perf_counter())
            per_token.append(1e3 * (stamps[-1] - stamps[0]) / (len(stamps) - 1))
        gpu_ms = self._graph_gpu_ms(slot >= 0)
        return dict(ms_per_token=float(np.median(per_token)), repeats_ms=per_token, graph_replay_gpu_ms=gpu_ms)

    def _graph_gpu_ms(self, lora: bool) -> float | None:
        """GPU time of one batch-1 decode graph replay (CUDA events, median of 20)."""
        graphs = self.runner.graphs
        if graphs is None or (1, lora) not in graphs._graphs:
            return None
        return replay_ms(graphs._graphs[(1, lora)])

    def profile_graph(self, lora: bool, replays: int = 5) -> dict | None:
        """Kernels of one batch-1 decode graph replay (torch.profiler): count, GPU time, and the idle
        time before each kernel (from the previous kernel's end), per kernel name."""
        graphs = self.runner.graphs
        if graphs is None or (1, lora) not in graphs._graphs:
            return None
        from torch.profiler import ProfilerActivity, profile

        graph = graphs._graphs[(1, lora)]
        graph.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                graph.replay()
                torch.cuda.synchronize()
        kernels = sorted(
            (e.time_range.start, e.time_range.end, e.name)
            for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
        )  # fmt: skip
        busy: dict[str, list[float]] = {}
        idle: dict[str, float] = {}
        prev_end = None
        for begin, finish, name in kernels:
            busy.setdefault(name, []).append(finish - begin)
            gap = 0.0 if prev_end is None else begin - prev_end
            if 0 < gap < 50:  # longer: the host sync between two replays
                idle[name] = idle.get(name, 0.0) + gap
            prev_end = finish
        rows = sorted(busy.items(), key=lambda kv: -sum(kv[1]))
        total_us = sum(sum(v) for v in busy.values()) / replays
        idle_us = sum(idle.values()) / replays
        count = sum(len(v) for v in busy.values()) / replays
        lines = [f"{'us/replay':>10} {'idle_before':>11} {'calls':>6} {'us/call':>8}  kernel", "-" * 90]
        for kernel, times in rows[:40]:
            lines.append(f"{sum(times) / replays:10.1f} {idle.get(kernel, 0.0) / replays:11.1f} "
                         f"{len(times) / replays:6.0f} {sum(times) / len(times):8.2f}  {kernel[:110]}")
        lines.append(f"total {total_us:.1f} us of kernel time + {idle_us:.1f} us idle between kernels, "
                     f"{count:.0f} kernels per replay")
        return dict(kernels_per_replay=count, kernel_us_per_replay=total_us, idle_us_per_replay=idle_us,
                    table="\n".join(lines) + "\n")

    def close(self) -> None:
        self.runner.graphs = None
        del self.runner, self.lora, self.model
        gc.collect()
        torch.cuda.empty_cache()
