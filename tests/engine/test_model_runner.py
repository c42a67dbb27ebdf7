"""ModelRunner: batch layout, LoRA segments, caller-order logits, context lifetime."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.context import get_context
from engine.kv_cache import allocate_kv_cache
from engine.model_runner import ModelRunner
from engine.models.loader import load_model
from scheduler.sequence import Sequence

BLOCK_SIZE = 4


class _RecordingModel(nn.Module):
    """Echoes (token id, position) as the hidden state and logits; records each context."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.contexts = []
        self.inputs = []
        self.fail = fail

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.contexts.append(get_context())
        self.inputs.append((input_ids.tolist(), positions.tolist()))
        if self.fail:
            raise RuntimeError("boom")
        return torch.stack([input_ids, positions], dim=-1).float()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def _seq(seq_id: int, prompt: list[int], blocks: list[int], outputs: list[int] | None = None) -> Sequence:
    seq = Sequence(seq_id=seq_id, prompt_token_ids=prompt, max_tokens=8, output_token_ids=list(outputs or []))
    seq.block_table = blocks
    return seq


def test_prefill_layout_and_lora_segments() -> None:
    model = _RecordingModel()
    seqs = [
        _seq(0, [10, 11, 12], [5]),
        _seq(1, [20, 21, 22, 23, 24], [2, 7]),
        _seq(2, [30, 31], [9]),
        _seq(3, [40], [1]),
    ]
    slots = [3, -1, 3, 0]
    logits = ModelRunner(model, BLOCK_SIZE, "cpu").execute(seqs, [3, 5, 2, 1], True, slots)

    # Caller order: the last token and position of each sequence as given.
    assert logits.tolist() == [[12, 2], [24, 4], [31, 1], [40, 0]]
    (ctx,) = model.contexts
    # Internal order by slot (stable): seq1 (-1), seq3 (0), seq0 (3), seq2 (3).
    ids, positions = model.inputs[0]
    assert ids == [20, 21, 22, 23, 24, 40, 10, 11, 12, 30, 31]
    assert positions == [0, 1, 2, 3, 4, 0, 0, 1, 2, 0, 1]
    assert ctx.slot_mapping.tolist() == [8, 9, 10, 11, 28, 4, 20, 21, 22, 36, 37]
    assert ctx.query_start.tolist() == [0, 5, 6, 9, 11]
    assert ctx.context_lens.tolist() == [5, 1, 3, 2] and ctx.context_lens_list == [5, 1, 3, 2]
    assert ctx.query_lens == [5, 1, 3, 2] and ctx.max_query_len == 5 and ctx.max_context_len == 5
    assert ctx.block_tables.tolist() == [[2, 7], [1, -1], [5, -1], [9, -1]]
    lora = ctx.lora
    assert lora.token_slots.tolist() == [-1] * 5 + [0] + [3] * 5
    assert lora.seg_starts.tolist() == [0, 5, 6, 11]
    assert lora.seg_slots.tolist() == [-1, 0, 3]
    assert lora.seg_bounds == [(0, 5, -1), (5, 6, 0), (6, 11, 3)]
    assert lora.any_lora is True


def test_chunked_prefill_starts_at_computed_tokens() -> None:
    model = _RecordingModel()
    seq = _seq(0, [1, 2, 3, 4, 5, 6, 7], [3, 0])
    seq.num_computed_tokens = 3
    logits = ModelRunner(model, BLOCK_SIZE, "cpu").execute([seq], [2], True, [-1])
    assert model.inputs[0] == ([4, 5], [3, 4])
    assert model.contexts[0].slot_mapping.tolist() == [15, 0]
    assert model.contexts[0].context_lens_list == [5]
    assert logits.tolist() == [[5, 4]]


def test_decode_uses_last_token_and_reports_no_lora() -> None:
    model = _RecordingModel()
    seqs = [_seq(0, [1, 2, 3], [4], outputs=[9]), _seq(1, [5, 6, 7, 8], [0, 6], outputs=[11, 12])]
    for s in seqs:
        s.num_computed_tokens = s.num_tokens - 1
    logits = ModelRunner(model, BLOCK_SIZE, "cpu").execute(seqs, [1, 1], False, [-1, -1])
    assert logits.tolist() == [[9, 3], [12, 5]]
    ctx = model.contexts[0]
    assert not ctx.is_prefill
    assert ctx.slot_mapping.tolist() == [19, 25]
    assert ctx.lora.any_lora is False and ctx.lora.seg_bounds == [(0, 2, -1)]


def test_context_is_cleared_even_on_error() -> None:
    runner = ModelRunner(_RecordingModel(fail=True), BLOCK_SIZE, "cpu")
    with pytest.raises(RuntimeError, match="boom"):
        runner.execute([_seq(0, [1, 2], [0])], [2], True, [-1])
    with pytest.raises(RuntimeError, match="no forward context"):
        get_context()


@pytest.mark.parametrize(
    ("num_new", "blocks", "is_prefill", "match"),
    [([3], [0], True, "cannot compute"), ([2], [], True, "holds 0 blocks"), ([2], [0], False, "decode")],
)
def test_rejects_inconsistent_batches(num_new, blocks, is_prefill, match) -> None:
    runner = ModelRunner(_RecordingModel(), BLOCK_SIZE, "cpu")
    with pytest.raises((ValueError, RuntimeError), match=match):
        runner.execute([_seq(0, [1, 2], blocks)], num_new, is_prefill, [-1])
    with pytest.raises(ValueError, match="length"):
        runner.execute([_seq(0, [1, 2], [0])], [2], True, [-1, 0])
    with pytest.raises(ValueError, match="slot"):
        runner.execute([_seq(0, [1, 2], [0])], [2], True, [-2])


def test_real_model_logits_follow_caller_order(tiny_model_factory) -> None:
    """Reordering by slot must not change any sequence's logits, only where they are computed."""
    loaded = load_model(str(tiny_model_factory("llama")), torch.float32, "cpu")
    allocate_kv_cache(loaded.model, 32, BLOCK_SIZE, torch.float32, "cpu")
    runner = ModelRunner(loaded.model, BLOCK_SIZE, "cpu")
    prompts = [[5, 6, 7, 8, 9], [1, 2], [40, 41, 42], [7, 7, 7, 7]]

    def fresh():
        return [_seq(i, p, [i * 4 + j for j in range(4)]) for i, p in enumerate(prompts)]

    alone = torch.cat([runner.execute([s], [s.num_tokens], True, [-1]) for s in fresh()])
    seqs = fresh()
    mixed = runner.execute(seqs, [s.num_tokens for s in seqs], True, [2, -1, 0, 2])
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=0)
    for s in seqs:
        s.num_computed_tokens = s.num_tokens
        s.output_token_ids.append(3)
    decode = runner.execute(seqs, [1] * 4, False, [1, 1, -1, 0])
    alone_decode = torch.cat([runner.execute([s], [1], False, [-1]) for s in seqs])
    torch.testing.assert_close(decode, alone_decode, atol=1e-5, rtol=0)
    assert not torch.allclose(decode[0], decode[1])


class _FailingGraphs:
    """Stands in for DecodeGraphs on the CPU: every batch fits, LoRA captures fail `failures` times."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.lora_version = None
        self.captures = 0
        self.replays: list[bool] = []

    def size_for(self, batch: int) -> int:
        return batch

    def fits(self, inputs) -> bool:
        return True

    def capture_lora(self, version: int) -> None:
        from engine.cuda_graphs import CaptureFailedError

        self.captures += 1
        if self.failures > 0:
            self.failures -= 1
            raise CaptureFailedError("capture invalidated")
        self.lora_version = version

    def run(self, inputs, any_lora: bool, pending_tokens=None) -> torch.Tensor:
        self.replays.append(any_lora)
        n = len(inputs.input_ids)
        return torch.stack([torch.tensor(inputs.input_ids), torch.tensor(inputs.positions)], dim=-1).float()[:n]


def test_failed_lora_capture_runs_the_step_eagerly_and_retries_later() -> None:
    from engine import model_runner as mr

    model = _RecordingModel()
    runner = ModelRunner(model, BLOCK_SIZE, "cpu")
    graphs = _FailingGraphs(failures=1)
    runner.graphs = graphs  # type: ignore[assignment]
    runner._lora_cache = [type("L", (), {"live_version": 1})()]  # one live LoRA layer, version 1
    seqs = [_seq(0, [10, 11], [5], outputs=[12]), _seq(1, [20], [2], outputs=[21])]
    expected = [[12, 2], [21, 1]]

    # The capture fails: this step runs eagerly (the model is called), with the right logits.
    assert runner.execute(seqs, [1, 1], False, [2, -1]).tolist() == expected
    assert graphs.captures == 1 and graphs.replays == [] and len(model.inputs) == 1
    assert runner.capture_failures == 1
    # The next LoRA steps wait out the back-off eagerly, without trying to capture again.
    for _ in range(mr._CAPTURE_RETRY_STEPS):
        assert runner.execute(seqs, [1, 1], False, [2, -1]).tolist() == expected
    assert graphs.captures == 1 and len(model.inputs) == 1 + mr._CAPTURE_RETRY_STEPS
    # Then it captures (successfully this time) and replays the graph.
    assert runner.execute(seqs, [1, 1], False, [2, -1]).tolist() == expected
    assert graphs.captures == 2 and graphs.replays == [True]
    # Base-only decode steps never needed the LoRA graphs.
    runner.execute(seqs, [1, 1], False, [-1, -1])
    assert graphs.replays == [True, False]
