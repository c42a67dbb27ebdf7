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

    def steps(self, total: int) -> Iterator[list[Batch]]:
        """`total` optimizer steps, each a list of up to `accumulation` micro-batches."""
        produced, epoch = 0, 0
        while produced < total:
            order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch))
            micro = [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
            for start in range(0, len(micro), self.accumulation):
                if produced == total:
                    return
                yield [collate([self.examples[i] for i in idx], self.pad_id)
                       for idx in micro[start : start + self.accumulation]]
                produced += 1
            epoch += 1


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-padded ids, attention mask and labels (padding is never learned)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        # Position 0 predicts nothing: only labels from position 1 on carry loss.
        "num_trained": (labels[:, 1:] != IGNORE_INDEX).sum(),
        "num_tokens": attention.sum(),
    }


def token_loss(model: torch.nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, int]:
    """(summed next-token loss over assigned tokens, number predicted right)."""
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
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
