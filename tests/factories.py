"""Tiny real-architecture models, tokenizers and PEFT adapters, built offline in temp dirs.

Random weights, real config classes: what the engine loads is exactly what transformers and
peft would load, so they serve as the correctness oracle.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

_CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Quiver serves many LoRA adapters from one base model on one GPU.",
    "Un café au lait, s'il vous plaît. Déjà vu. Ça va très bien.",
    "中文测试：你好，世界。模型推理服务器。",
    "Emoji: 🎯🏹✨ and symbols ∑ ∫ √ ≈ ≠ ≤ ≥.",
    '{"answer": "yes", "confidence": 0.9} [1, 2, 3] <tag attr="x"/>',
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained deterministically on a small corpus."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
    )


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    # Training is the slow part of building a tiny model; do it once per process.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_config(arch: str, vocab_size: int, **overrides):
    """A small config of the given architecture (2 layers, GQA, head_dim 16)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        eos_token_id=2,
        bos_token_id=None,
        pad_token_id=0,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "mistral":
        cfg = MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False)
    elif arch == "qwen3":
        cfg = Qwen3Config(**common, head_dim=16, tie_word_embeddings=True, use_sliding_window=False)
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_model_dir(
    path: Path,
    arch: str = "llama",
    seed: int = 0,
    max_shard_size: str | None = None,
    **config_overrides,
) -> Path:
    """Save a random-weight model of `arch` plus a tokenizer into `path` and return it."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cfg = tiny_config(arch, vocab_size=len(tokenizer), **config_overrides)
    cfg.eos_token_id = eos
    cfg.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _scale_up_random_init(model, seed)
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(path)
    return path


def _scale_up_random_init(model: torch.nn.Module, seed: int) -> None:
    # HF's default init (std 0.02) makes tiny models nearly uniform, so greedy ties are
    # common and comparisons meaningless; wider weights give peaked, distinct logits.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * (1.0 / param.shape[1] ** 0.5))
            elif "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


def build_adapter_dir(
    path: Path,
    model_dir: Path,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 1,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    weight_scale: float = 0.5,
    use_dora: bool = False,
) -> Path:
    """Save a PEFT LoRA adapter with random (non-zero) A and B for the model in `model_dir`;
    with `use_dora`, its magnitude vectors are PEFT's initial ones randomly rescaled by ~30%."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=False,
        use_dora=use_dora,
    )
    peft_model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.randn(param.shape, generator=gen))
            elif "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * weight_scale / param.shape[1] ** 0.5)
    path.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(path, safe_serialization=True)
    return path
