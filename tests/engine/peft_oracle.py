"""transformers + peft as the correctness oracle: greedy tokens and raw logprobs per adapter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Reference:
    token_ids: list[int]
    logprobs: list[float]


def peft_greedy(
    model_dir: Path, adapters: dict[str, Path], jobs: list[tuple[list[int], str | None]], max_new_tokens: int
) -> list[Reference]:
    """Greedy-decode each (prompt, adapter-or-None) with peft's per-adapter `generate`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # Force full-length outputs: the engine runs with ignore_eos, so must the oracle.
    base.generation_config.eos_token_id = None
    model = base
    names = list(adapters)
    if names:
        model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    refs = []
    for prompt, adapter in jobs:
        input_ids = torch.tensor([prompt])
        with torch.no_grad():
            if adapter is None and names:
                with model.disable_adapter():
                    out = model.generate(input_ids=input_ids, generation_config=gen_config)
            else:
                if adapter is not None:
                    model.set_adapter(adapter)
                out = model.generate(input_ids=input_ids, generation_config=gen_config)
        tokens = out.sequences[0, len(prompt) :].tolist()
        logprobs = [
            torch.log_softmax(step_logits[0].float(), dim=-1)[tok].item()
            for step_logits, tok in zip(out.logits, tokens, strict=True)
        ]
        refs.append(Reference(tokens, logprobs))
    return refs
