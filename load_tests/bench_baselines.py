"""Baselines for `load_tests/bench.py`, on the same GPU, shapes and requests as Quiver.

- transformers' continuous batching (`generate_batch`, paged attention) on the base model;
- HF transformers + PEFT mixed-adapter batches (`adapter_names=` in `generate`).
Both on a random-weight `LlamaForCausalLM` built on the GPU from the same config.
"""

from __future__ import annotations

import gc
import time

import torch


def hf_model(cfg):
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def _set_attention(model, impl: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(impl)
    else:
        model.config._attn_implementation = impl


def continuous_batching(model, prompts: list[list[int]], max_new_tokens: int,
                        impls=("paged|sdpa", "sdpa", "paged|eager")) -> dict:
    """Output tokens/s of `generate_batch` over all prompts (one warm-up call first)."""
    from transformers import GenerationConfig

    errors = {}
    for impl in impls:
        try:
            _set_attention(model, impl)
            gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
            warm = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0)
            model.generate_batch(inputs=[p[:64] for p in prompts[:8]], generation_config=warm)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            outputs = model.generate_batch(inputs=prompts, generation_config=gen)
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            lengths = [len(o.generated_tokens) for o in outputs.values()]
            return dict(attn_implementation=impl, requests=len(prompts), output_tokens=sum(lengths),
                        seconds=elapsed, output_tok_s=sum(lengths) / elapsed,
                        min_len=min(lengths), max_len=max(lengths), errors=errors)
        except Exception as exc:  # noqa: BLE001 - try the next implementation, record why
            errors[impl] = f"{type(exc).__name__}: {exc}"[:500]
    return dict(error="every attention implementation failed", errors=errors)


def peft_mixed(model, prompts: list[list[int]], num_adapters: int, max_new_tokens: int, rank: int = 16) -> dict:
    """PEFT generate with one adapter per row (`adapter_names=`), plus the base rows alone, tokens/s."""
    from peft import LoraConfig, get_peft_model

    _set_attention(model, "sdpa")
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config, adapter_name="a0")
    for i in range(1, num_adapters):
        peft_model.add_adapter(f"a{i}", config)
    peft_model.to(torch.bfloat16).eval()
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.cuda(), mask.cuda()
    names = [f"a{i % num_adapters}" for i in range(len(prompts))]
    result = {}
    for label, adapter_names in (("mixed", names), ("base", ["__base__"] * len(prompts))):
        kwargs = dict(attention_mask=mask, adapter_names=adapter_names, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            peft_model.generate(input_ids=ids[:, -16:], attention_mask=mask[:, -16:], adapter_names=adapter_names,
                                max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = peft_model.generate(input_ids=ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                      **kwargs)
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        tokens = (out.shape[1] - width) * len(prompts)
        result[label] = dict(requests=len(prompts), output_tokens=tokens, seconds=elapsed,
                             output_tok_s=tokens / elapsed, distinct_adapters=len(set(adapter_names)))
    del peft_model
    gc.collect()
    torch.cuda.empty_cache()
    return result
