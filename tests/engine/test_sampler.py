from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import Sampler, SamplerInput, process_logits
from engine.sampling_params import SamplingParams

VOCAB = 32


def row(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    eos: list[int] | None = None,
    **params,
) -> SamplerInput:
    sp = SamplingParams(max_tokens=64, **params)
    generator = None if sp.seed is None else torch.Generator().manual_seed(sp.seed)
    return SamplerInput(
        params=sp,
        prompt_token_ids=prompt or [],
        output_token_ids=output or [],
        generator=generator,
        eos_token_ids=eos or [],
    )


def draws(logits: torch.Tensor, n: int, **params) -> torch.Tensor:
    """n unseeded samples from one row of logits, as a batch of n identical rows."""
    rows = [row(**params) for _ in range(n)]
    return torch.tensor(Sampler()(logits.expand(n, -1), rows).token_ids)


def test_greedy_is_argmax_with_ties_to_lowest_id() -> None:
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0))
    logits[5, 3] = logits[5, 17] = logits[5].max() + 1.0
    out = Sampler()(logits, [row(temperature=0.0) for _ in range(6)])
    expected = logits.argmax(dim=-1).tolist()
    assert out.token_ids == expected
    assert out.token_ids[5] == 3
    assert out.logprobs == [None] * 6


def test_seeded_request_is_reproducible_alone_and_in_any_batch_position() -> None:
    gen = torch.Generator().manual_seed(1)
    steps = [torch.randn(5, VOCAB, generator=gen) for _ in range(12)]

    def run(position: int, batch_size: int, seed: int = 1234) -> list[int]:
        target = row(seed=seed)
        others = [row(seed=100 + j) if j % 2 else row() for j in range(batch_size - 1)]
        rows = others[:position] + [target] + others[position:]
        tokens = []
        for logits in steps:
            batch = logits[:batch_size].clone()
            batch[position] = logits[0]  # the target always sees the same logits
            tokens.append(Sampler()(batch, rows).token_ids[position])
        return tokens

    alone = run(0, 1)
    assert run(2, 5) == alone
    assert run(4, 5) == alone
    assert run(0, 3) == alone
    assert run(0, 1, seed=999) != alone


def test_top_k_one_equals_greedy() -> None:
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(2))
    out = Sampler()(logits, [row(temperature=1.5, top_k=1) for _ in range(64)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_top_k_never_samples_outside_the_top_k() -> None:
    torch.manual_seed(3)
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3)) * 0.3  # nearly flat
    top5 = set(logits.topk(5).indices.tolist())
    samples = set(draws(logits.unsqueeze(0), 3000, top_k=5).tolist())
    assert samples <= top5
    assert samples == top5  # flat enough that every allowed token shows up


def test_small_top_p_keeps_only_the_top_token() -> None:
    torch.manual_seed(4)
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(4))
    samples = draws(logits, 500, top_p=0.01)
    assert set(samples.tolist()) == {int(logits.argmax())}


def test_top_p_samples_only_from_the_nucleus() -> None:
    torch.manual_seed(5)
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # nucleus at 0.9: ids 1, 3, 2 (mass 0.95)
    samples = draws(probs.log().unsqueeze(0), 4000, top_p=0.9)
    freq = torch.bincount(samples, minlength=4).float() / len(samples)
    assert freq[0] == 0
    expected = torch.tensor([0.0, 0.5, 0.15, 0.3]) / 0.95
    assert torch.allclose(freq, expected, atol=0.03)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_temperature_matches_softmax_of_scaled_logits(temperature: float) -> None:
    torch.manual_seed(6)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    samples = draws(logits, 4000, temperature=temperature)
    freq = torch.bincount(samples, minlength=5).float() / len(samples)
    expected = torch.softmax(logits[0] / temperature, dim=-1)
    assert torch.allclose(freq, expected, atol=0.03)


def test_repetition_penalty_touches_prompt_and_output_tokens_only() -> None:
    logits = torch.tensor([[2.0, -2.0, 4.0, 1.0, -1.0, 0.5]])
    out = process_logits(logits, [row(prompt=[0, 1], output=[2], repetition_penalty=2.0)])
    assert out.tolist() == [[1.0, -4.0, 2.0, 1.0, -1.0, 0.5]]


def test_frequency_and_presence_penalties_follow_output_counts() -> None:
    logits = torch.zeros(2, 6)
    rows = [
        row(prompt=[0, 1], output=[3, 3, 4], frequency_penalty=0.5),
        row(prompt=[0, 1], output=[3, 3, 4], presence_penalty=0.7),
    ]
    out = process_logits(logits, rows)
    assert out[0].tolist() == pytest.approx([0.0, 0.0, 0.0, -1.0, -0.5, 0.0])
    assert out[1].tolist() == pytest.approx([0.0, 0.0, 0.0, -0.7, -0.7, 0.0])


def test_penalties_apply_in_order_and_leave_other_rows_alone() -> None:
    logits = torch.tensor([[3.0, 3.0, 3.0], [3.0, 3.0, 3.0]])
    rows = [row(output=[1], repetition_penalty=1.5, frequency_penalty=1.0), row(output=[1])]
    out = process_logits(logits, rows)
    assert out[0].tolist() == pytest.approx([3.0, 3.0 / 1.5 - 1.0, 3.0])
    assert out[1].tolist() == [3.0, 3.0, 3.0]
    assert logits.tolist() == [[3.0, 3.0, 3.0], [3.0, 3.0, 3.0]]  # input untouched


def test_logit_bias_forces_a_token() -> None:
    torch.manual_seed(7)
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(7))
    forced = int(logits.argmin())
    assert set(draws(logits, 200, logit_bias={forced: 100.0}).tolist()) == {forced}
    greedy = Sampler()(logits, [row(temperature=0.0, logit_bias={forced: 100.0, VOCAB + 5: 1.0})])
    assert greedy.token_ids == [forced]


def test_min_tokens_suppresses_eos_and_stop_token_ids() -> None:
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0, 2.0]])
    eos, stop = 2, 3

    def greedy(output: list[int]) -> int:
        r = row(output=output, eos=[eos], temperature=0.0, min_tokens=2, stop_token_ids=[stop])
        return Sampler()(logits, [r]).token_ids[0]

    assert greedy([1]) == 4
    assert greedy([1, 1]) == eos


def test_logprobs_come_from_the_raw_logits() -> None:
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    rows = [
        row(temperature=0.7, top_logprobs=5, repetition_penalty=1.3, output=[1, 2], logit_bias={4: 30.0}),
        row(temperature=0.0, top_logprobs=0),
        row(temperature=1.0),
    ]
    out = Sampler()(logits, rows)
    expected = torch.log_softmax(logits.float(), dim=-1)

    first = out.logprobs[0]
    assert first is not None and first.token_id == out.token_ids[0] == 4  # bias forced it
    assert first.logprob == pytest.approx(expected[0, 4].item(), abs=1e-5)
    assert len(first.top) == 5
    values = [v for _, v in first.top]
    assert values == sorted(values, reverse=True)
    top_ids = expected[0].topk(5).indices.tolist()
    assert [i for i, _ in first.top] == top_ids
    for token_id, value in first.top:
        assert value == pytest.approx(expected[0, token_id].item(), abs=1e-5)

    second = out.logprobs[1]
    assert second is not None and second.top == []
    assert second.logprob == pytest.approx(expected[1].max().item(), abs=1e-5)
    assert out.logprobs[2] is None


def test_top_logprobs_larger_than_the_vocabulary_is_cut_to_it() -> None:
    logits = torch.tensor([[0.0, float("-inf"), 1.0]])
    out = Sampler()(logits, [row(temperature=0.0, top_logprobs=20)])
    entry = out.logprobs[0]
    assert entry is not None and [i for i, _ in entry.top] == [2, 0, 1]
    assert entry.top[-1][1] == -math.inf


def test_rejects_logits_that_do_not_match_the_rows() -> None:
    with pytest.raises(ValueError, match="logits must be"):
        Sampler()(torch.zeros(2, VOCAB), [row()])


def test_logits_processor_edits_its_own_row_after_bias() -> None:
    seen: list[list[float]] = []

    class OnlyEven:
        def apply(self, logits: torch.Tensor) -> None:
            seen.append(logits.tolist())
            logits[1::2] = float("-inf")

        def accept(self, token_id: int) -> None: ...

        def is_finished(self) -> bool:
            return False

    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0], [0.0, 5.0, 1.0, 0.0]])
    constrained = row(temperature=0.0, logit_bias={3: 10.0})
    constrained.logits_processor = OnlyEven()
    out = Sampler()(logits, [constrained, row(temperature=0.0, top_logprobs=1)])
    assert seen == [[0.0, 5.0, 1.0, 10.0]]  # the processor sees the biased row
    assert out.token_ids == [2, 1]  # row 1 unconstrained


class _Allowed:
    """A bitmask processor allowing a fixed token set (its mask may be narrower than the vocab)."""

    def __init__(self, allowed: set[int], width: int) -> None:
        self.allowed, self.bitmask_words = allowed, (width + 31) // 32

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        for t in self.allowed:
            word = int(bitmask[index, t // 32]) | (1 << (t % 32))
            bitmask[index, t // 32] = word - (1 << 32) if word >= 1 << 31 else word  # int32 two's complement

    def apply(self, logits: torch.Tensor) -> None:  # never called for a bitmask processor
        raise AssertionError("apply called on a bitmask processor")

    def accept(self, token_id: int) -> None: ...

    def is_finished(self) -> bool:
        return False


class _BanFirst:
    def apply(self, logits: torch.Tensor) -> None:
        logits[0] = float("-inf")

    def accept(self, token_id: int) -> None: ...

    def is_finished(self) -> bool:
        return False


def test_grammar_bitmasks_of_a_step_are_applied_together_and_other_processors_alone() -> None:
    vocab = 70  # three mask words; the second mask covers only the first 40 tokens
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(3))
    rows = [row(temperature=0.0) for _ in range(4)]
    rows[0].logits_processor = _Allowed({1, 31, 33, 69}, vocab)
    rows[1].logits_processor = _BanFirst()
    rows[3].logits_processor = _Allowed({5, 39}, 40)
    out = process_logits(logits, rows)
    finite = [set(torch.nonzero(torch.isfinite(r)).flatten().tolist()) for r in out]
    assert finite[0] == {1, 31, 33, 69} and finite[3] == {5, 39}
    assert finite[1] == set(range(1, vocab)) and finite[2] == set(range(vocab))
    assert torch.equal(out[0, [1, 31, 33, 69]], logits[0, [1, 31, 33, 69]])
    assert torch.equal(out[2], logits[2])
