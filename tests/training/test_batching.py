from __future__ import annotations

import pytest
import torch

from training.batching import Batches, collate, evaluate, token_loss
from training.encoding import IGNORE_INDEX, Example


def _examples(n: int) -> list[Example]:
    return [Example(i + 1, list(range(3, 6 + i % 4)), [IGNORE_INDEX] * 2 + list(range(5, 6 + i % 4)))
            for i in range(n)]


def test_collate_right_pads_and_never_learns_padding() -> None:
    a = Example(1, [5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8])
    b = Example(2, [9, 10], [IGNORE_INDEX, 10])
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 10] + [IGNORE_INDEX] * 2]
    assert int(batch["num_trained"]) == 3 and int(batch["num_tokens"]) == 6


def test_batches_cover_each_epoch_once_and_reshuffle() -> None:
    examples = _examples(10)
    batches = Batches(examples, batch_size=3, accumulation=2, seed=0, pad_id=0)
    assert batches.steps_per_epoch == 2  # 4 micro-batches, 2 per step
    steps = list(batches.steps(4))
    assert len(steps) == 4 and [len(s) for s in steps] == [2, 2, 2, 2]
    rows = [tuple(row.tolist()) for step in steps for micro in step for row in micro["input_ids"]]
    assert len(rows) == 20  # two epochs of ten examples
    again = [tuple(row.tolist()) for step in Batches(examples, 3, 2, 0, 0).steps(4) for m in step
             for row in m["input_ids"]]
    assert rows == again  # reproducible
    assert rows[:10] != rows[10:]  # reshuffled between epochs
    assert list(Batches(examples, 3, 2, 0, 0).steps(3))[-1] is not None


def test_batches_refuse_an_empty_set() -> None:
    with pytest.raises(ValueError, match="no training examples"):
        Batches([], 2, 1, 0, 0)


def test_token_loss_matches_transformers_loss(tiny_model_factory) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"), dtype=torch.float32).eval()
    examples = _examples(4)
    batch = collate(examples, pad_id=0)
    with torch.no_grad():
        loss_sum, correct = token_loss(model, batch, torch.device("cpu"))
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
    assert float(loss_sum) / int(batch["num_trained"]) == pytest.approx(float(reference), rel=1e-5)
    assert 0 <= correct <= int(batch["num_trained"])
    mean, accuracy = evaluate(model, examples, batch_size=3, pad_id=0, device=torch.device("cpu"))
    per_example = []
    for example in examples:
        one = collate([example], 0)
        with torch.no_grad():
            per_example.append((float(token_loss(model, one, torch.device("cpu"))[0]), int(one["num_trained"])))
    assert mean == pytest.approx(sum(s for s, _ in per_example) / sum(n for _, n in per_example), rel=1e-5)
    assert 0.0 <= accuracy <= 1.0
    assert not model.training
