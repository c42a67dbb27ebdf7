"""NEFTune: uniform noise on the input embeddings while training (Jain et al., 2023).

The noise is added by a forward hook on the embedding layer, as TRL and transformers do,
and only while that layer is in training mode: evaluation and inference see the embeddings
unchanged. Its scale is alpha / sqrt(L * d) for a batch of length L and hidden size d.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def add_neftune_hook(model: Any, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Hook noise onto `model`'s input embeddings; the returned handle's `remove()` takes it off."""
    embeddings = model.get_input_embeddings()
    return embeddings.register_forward_hook(_noise_hook(alpha))


def _noise_hook(alpha: float) -> Any:
    def hook(module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        magnitude = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.empty_like(output).uniform_(-magnitude, magnitude)

    return hook
