"""Examples to padded batches, the token-summed loss, and validation over a whole set."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from training.encoding import IGNORE_INDEX, Example

Batch = dict[str, torch.Tensor]


class Batches:
    """Shuffled micro-batches grouped into optimizer steps, epoch after epoch.

    Each epoch reshuffles with `seed + epoch`, so a run is reproducible and the order does
    not depend on how many steps were asked for.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, accumulation: int, seed: int,
                 pad_id: int) -> None:
        if not examples:
            raise ValueError("no training examples")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.accumulation = accumulation
        self.seed = seed
        self.pad_id = pad_id
        micro = math.ceil(len(self.examples) / batch_size)
        self.steps_per_epoch = math.ceil(micro / accumulation)

    def steps(self, total: int, start: int = 0) -> Iterator[list[Batch]]:
        """Optimizer steps `start + 1` to `total`, each a list of up to `accumulation` micro-batches.

        A run resumed at step `start` sees the same batches an uninterrupted one would.
        """
        epoch = start // self.steps_per_epoch
        produced = epoch * self.steps_per_epoch
        while produced < total:
            order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch))
            micro = [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
            for first in range(0, len(micro), self.accumulation):
                if produced == total:
                    return
                if produced < start:
                    produced += 1
                    continue
                yield [collate([self.examples[i] for i in idx], self.pad_id)
                       for idx in micro[first : first + self.accumulation]]
                produced += 1
            epoch += 1


def pack_examples(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Lay examples end to end into sequences of at most `max_length` tokens (first fit, in order).

    Each packed sequence records its examples' lengths: `collate` restarts position ids at
    every example and gives attention a block-diagonal causal mask, so no token sees another
    example. Labels are kept as they were, except that the first token of each example is
    not predicted from the one before it (the end of a different example).
    """
    packed: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    lengths: list[int] = []
    for example in examples:
        n = len(example.input_ids)
        if lengths and len(ids) + n > max_length:
            packed.append(Example(packed_line(packed), ids, labels, tuple(lengths)))
            ids, labels, lengths = [], [], []
        ids += example.input_ids
        labels += ([IGNORE_INDEX] if lengths else example.labels[:1]) + example.labels[1:]
        lengths.append(n)
    if lengths:
        packed.append(Example(packed_line(packed), ids, labels, tuple(lengths)))
    return packed


def packed_line(packed: Sequence[Example]) -> int:
    return len(packed) + 1  # a packed sequence has no source line: its 1-based index stands in


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-padded ids, attention mask and labels (padding is never learned).

    Packed examples also get `position_ids` restarting at each packed example and a
    `segment_ids` map (padding is its own segment) from which `token_loss` builds the
    block-diagonal attention mask.
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    packed: Batch = {}
    if any(e.segments for e in examples):
        positions = torch.zeros((len(examples), width), dtype=torch.long)
        segments = torch.full((len(examples), width), -1, dtype=torch.long)
        for row, example in enumerate(examples):
            start = 0
            for index, length in enumerate(example.segments or (len(example.input_ids),)):
                positions[row, start : start + length] = torch.arange(length)
                segments[row, start : start + length] = index
                start += length
        packed = {"position_ids": positions, "segment_ids": segments}
    return {
        **packed,
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        # Position 0 predicts nothing: only labels from position 1 on carry loss.
        "num_trained": (labels[:, 1:] != IGNORE_INDEX).sum(),
        "num_tokens": attention.sum(),
    }


def token_loss(model: torch.nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, int]:
    """(summed next-token loss over assigned tokens, number predicted right)."""
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    if "segment_ids" in batch:
        inputs["position_ids"] = batch["position_ids"].to(device)
        inputs["attention_mask"] = _block_causal_mask(batch["segment_ids"].to(device), _attention(model))
        if inputs["attention_mask"] is None:
            del inputs["attention_mask"]
    logits = model(**inputs).logits
    logits = logits[:, :-1].float()
    targets = batch["labels"][:, 1:].to(device)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        mask = targets != IGNORE_INDEX
        correct = int((logits.argmax(-1) == targets)[mask].sum())
    return loss, correct


def evaluate(model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int,
             device: torch.device) -> tuple[float, float]:
    """(mean loss per assigned token, token accuracy) over `examples`, without dropout."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = collate(examples[start : start + batch_size], pad_id)
                loss, hits = token_loss(model, batch, device)
                loss_sum += float(loss)
                correct += hits
                count += int(batch["num_trained"])
    finally:
        model.train(was_training)
    return loss_sum / max(count, 1), correct / max(count, 1)


def _block_causal_mask(segments: torch.Tensor, attention: str) -> torch.Tensor | None:
    """[batch, 1, q, k] mask: a token attends to earlier tokens of its own segment only.

    SDPA takes it as booleans (whatever the compute dtype, e.g. bf16 under QLoRA), eager
    attention as an additive float mask; flash attention takes no 4-D mask and finds the
    examples from the restarting position ids itself (None).
    """
    if attention.startswith("flash"):
        return None
    width = segments.shape[1]
    causal = torch.ones((width, width), dtype=torch.bool, device=segments.device).tril()
    allowed = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]
    if attention != "eager":
        return allowed
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=segments.device)
    return mask.masked_fill(~allowed, torch.finfo(torch.float32).min)


def _attention(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "sdpa")
