"""Tensor-parallel linear layers and vocabulary-sharded embedding/LM head (Megatron layout).

Each rank holds a shard; the weight loaders slice full checkpoint tensors, so loading is the
same code at any world size. At world size 1 every shard is the whole tensor and every
collective returns its input, so the single-device model is these classes unchanged.

- `ColumnParallelLinear`: rank r holds its rows of each output slice (`shards`); the output
  stays sharded, no communication. `QKVParallelLinear` shards by attention head; when there
  are fewer KV heads than ranks each rank keeps (a replica of) the one KV head its query
  heads read.
- `RowParallelLinear`: rank r holds its columns (the input features the column-parallel layer
  before it produced); partial outputs are summed by one all-reduce. The bias is added by
  rank 0 only, before the sum. `forward_partial` / `reduce` are split so LoRA can add its
  delta to the partial sum (see `shard_lora`).
- `VocabParallelEmbedding` / `ParallelLMHead`: rank r holds rows [r * n, (r + 1) * n) of the
  vocabulary (padded to a multiple of the world size). The embedding zeroes tokens it does
  not hold and all-reduces; the head all-gathers its logits and drops the padding.

LoRA on a sharded layer (`shard_lora(i, A, B)` gives this rank's part of the full pair):
- column-parallel: y_r = x W_r^T + (x A^T) B_r^T — A whole, B's rows of this shard.
- row-parallel: y = sum_r x_r W_r^T + (sum_r x_r A_r^T) B^T, A's columns of this shard, B
  whole. Matrix products are linear, so (sum_r x_r A_r^T) B^T = sum_r (x_r A_r^T) B^T: each
  rank expands its partial shrink and the base layer's all-reduce sums the deltas with the
  outputs — no second collective for the [tokens, rank] shrink.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine import distributed
from engine.models.layers import FusedLinear, linear

Shard = tuple[int, int]  # (offset, size) of this rank's part of a dimension


def even_shard(total: int, rank: int, size: int, what: str) -> Shard:
    """This rank's equal part of `total`; `what` names the dimension in the error."""
    if total % size:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size {size}")
    n = total // size
    return rank * n, n


def _world(rank: int | None, size: int | None) -> tuple[int, int]:
    """Explicit (rank, size), or this process's place in the tensor-parallel group."""
    size = distributed.tp_size() if size is None else size
    rank = distributed.tp_rank() if rank is None else rank
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in a world of size {size}")
    return rank, size


def _check_full(loaded: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(loaded.shape) != expected:
        raise ValueError(f"shape mismatch for {what}: expected {expected}, checkpoint {tuple(loaded.shape)}")


def _check_lora(i: int, a: torch.Tensor, b: torch.Tensor, in_features: int, out_features: int) -> None:
    rank = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or tuple(b.shape) != (out_features, rank):
        raise ValueError(
            f"slice {i}: expected A [r, {in_features}] and B [{out_features}, r], "
            f"got {list(a.shape)} and {list(b.shape)}"
        )


class ColumnParallelLinear(FusedLinear):
    """A fused linear whose output slices are sharded; `output_sizes` are this rank's sizes.

    full_output_sizes: the checkpoint's slice sizes; shards[i]: this rank's (offset, size) in slice i.
    """

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        bias: bool,
        dtype: torch.dtype,
        shards: list[Shard] | None = None,
        rank: int | None = None,
        size: int | None = None,
    ) -> None:
        rank, size = _world(rank, size)
        if shards is None:
            shards = [even_shard(n, rank, size, "output size") for n in output_sizes]
        if len(shards) != len(output_sizes):
            raise ValueError(f"{len(shards)} shards for {len(output_sizes)} output slices")
        super().__init__(in_features, [n for _, n in shards], bias, dtype)
        self.full_in_features = in_features
        self.full_output_sizes = list(output_sizes)
        self.shards = list(shards)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        """Load output slice `shard_id` (or the whole fused tensor) of the full checkpoint tensor."""
        if shard_id is None:
            if len(self.shards) == 1:
                self._load_slice(param, loaded, 0)
                return
            _check_full(loaded, (sum(self.full_output_sizes), *param.shape[1:]), "the fused tensor")
            for i, piece in enumerate(loaded.split(self.full_output_sizes, dim=0)):
                self._load_slice(param, piece, i)
            return
        if not 0 <= shard_id < len(self.shards):
            raise ValueError(f"shard {shard_id} out of range for output sizes {self.full_output_sizes}")
        self._load_slice(param, loaded, shard_id)

    def _load_slice(self, param: nn.Parameter, loaded: torch.Tensor, i: int) -> None:
        _check_full(loaded, (self.full_output_sizes[i], *param.shape[1:]), f"shard {i}")
        offset, n = self.shards[i]
        super().weight_loader(param, loaded.narrow(0, offset, n), i)

    def shard_lora(self, i: int, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of slice i's full (A [r, in], B [out_i, r]): A whole, B's rows."""
        _check_lora(i, a, b, self.full_in_features, self.full_output_sizes[i])
        offset, n = self.shards[i]
        return a, b.narrow(0, offset, n)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections sharded by head: each rank computes whole heads.

    With num_kv_heads >= world size the KV heads are split evenly; with fewer, each rank keeps
    the single KV head its query heads belong to (replicated across the ranks sharing it).
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        dtype: torch.dtype,
        rank: int | None = None,
        size: int | None = None,
    ) -> None:
        rank, size = _world(rank, size)
        first_q, self.num_heads = even_shard(num_heads, rank, size, "num_attention_heads")
        if num_kv_heads >= size:
            first_kv, self.num_kv_heads = even_shard(num_kv_heads, rank, size, "num_key_value_heads")
        elif size % num_kv_heads:
            raise ValueError(
                f"tensor_parallel_size {size} is neither a divisor nor a multiple of num_key_value_heads "
                f"{num_kv_heads}"
            )
        else:
            first_kv, self.num_kv_heads = rank // (size // num_kv_heads), 1
        q_full, kv_full = num_heads * head_dim, num_kv_heads * head_dim
        q_shard = (first_q * head_dim, self.num_heads * head_dim)
        kv_shard = (first_kv * head_dim, self.num_kv_heads * head_dim)
        super().__init__(
            hidden_size, [q_full, kv_full, kv_full], bias, dtype, [q_shard, kv_shard, kv_shard], rank, size
        )


class RowParallelLinear(FusedLinear):
    """A linear whose input features are sharded; outputs are summed over ranks.

    `in_features` is this rank's share; `full_in_features` the checkpoint's.
    """

    reduces_output = True

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        bias: bool,
        dtype: torch.dtype,
        rank: int | None = None,
        size: int | None = None,
    ) -> None:
        rank, size = _world(rank, size)
        self.in_shard: Shard = even_shard(in_features, rank, size, "input size")
        super().__init__(self.in_shard[1], output_sizes, bias, dtype)
        self.full_in_features = in_features
        self.full_output_sizes = list(self.output_sizes)
        self.tp_rank = rank

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        """Weights: this rank's input columns of the full tensor. Bias: whole (rank 0 adds it)."""
        if param.dim() == 2:
            _check_full(loaded, (param.shape[0], self.full_in_features), "the weight")
            loaded = loaded.narrow(1, *self.in_shard)
        super().weight_loader(param, loaded, shard_id)

    def forward_partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's term of the sum (bias on rank 0 only)."""
        return linear(x, self.weight, self.bias if self.tp_rank == 0 else None)

    def reduce(self, y: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.forward_partial(x))

    def shard_lora(self, i: int, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of the full (A [r, in], B [out, r]): A's input columns, B whole."""
        _check_lora(i, a, b, self.full_in_features, self.full_output_sizes[i])
        return a.narrow(1, *self.in_shard), b


class _VocabShard(nn.Module):
    """Rows [vocab_start, vocab_start + rows) of a [vocab, hidden] table, padded with zero rows."""

    def __init__(
        self, vocab_size: int, hidden_size: int, dtype: torch.dtype, rank: int | None, size: int | None
    ) -> None:
        super().__init__()
        rank, size = _world(rank, size)
        self.vocab_size = vocab_size
        self.tp_size = size
        rows = -(-vocab_size // size)
        self.vocab_start = rank * rows
        self.num_real = max(0, min(vocab_size - self.vocab_start, rows))
        self.weight = nn.Parameter(torch.empty(rows, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        if shard_id is not None:
            raise ValueError(f"a vocabulary table is not fused; got shard {shard_id}")
        _check_full(loaded, (self.vocab_size, param.shape[1]), "the vocabulary table")
        param.data[: self.num_real].copy_(loaded.narrow(0, self.vocab_start, self.num_real))
        param.data[self.num_real :].zero_()


class VocabParallelEmbedding(_VocabShard):
    """Token embedding [vocab, hidden] sharded by vocabulary rows."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype,
        rank: int | None = None, size: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(num_embeddings, embedding_dim, dtype, rank, size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        held = (local >= 0) & (local < self.num_real)
        out = F.embedding(torch.where(held, local, 0), self.weight)
        out.masked_fill_(~held.unsqueeze(-1), 0)
        return distributed.all_reduce(out)


class ParallelLMHead(_VocabShard):
    """Output projection [vocab, hidden] sharded by vocabulary rows; its weight is the embedding's when tied."""

    def __init__(
        self, vocab_size: int, hidden_size: int, dtype: torch.dtype,
        rank: int | None = None, size: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(vocab_size, hidden_size, dtype, rank, size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight)
        if self.tp_size == 1:
            return logits
        return distributed.all_gather_last_dim(logits)[..., : self.vocab_size]
