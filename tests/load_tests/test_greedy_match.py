"""Greedy outputs compared token by token: exact agreement, accepted near-ties, and what stays a mismatch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from load_tests.greedy_match import Step, chat_steps, compare_greedy, completion_steps, logprob_args


def steps(*tokens: str, top: dict[int, dict[str, float]] | None = None) -> list[Step]:
    """Steps whose chosen logprob is -0.5, each with the given alternatives at its position."""
    top = top or {}
    return [Step(t, -0.5, {t: -0.5, **top.get(i, {})}) for i, t in enumerate(tokens)]


REFERENCE = steps("The", " sea", " is", " deep", top={1: {" ocean": -0.52, " water": -3.0}})


def test_the_same_tokens_are_equal() -> None:
    match = compare_greedy(REFERENCE, steps("The", " sea", " is", " deep"), tolerance=0.05)
    assert match.outcome == "equal" and match.index is None


def test_a_divergence_at_a_near_tie_within_the_tolerance_is_accepted_and_the_rest_is_free() -> None:
    match = compare_greedy(
        REFERENCE, steps("The", " ocean", " was", " cold", " and", " grey"), tolerance=0.05
    )
    assert match.outcome == "near_tie" and match.index == 1
    assert match.gap == pytest.approx(0.02)
    assert "' ocean'" in match.detail and "' sea'" in match.detail


def test_the_tolerance_bounds_the_gap() -> None:
    got = steps("The", " ocean", " was")
    assert compare_greedy(REFERENCE, got, tolerance=0.02 + 1e-9).outcome == "near_tie"
    match = compare_greedy(REFERENCE, got, tolerance=0.01)
    assert match.outcome == "mismatch" and match.index == 1 and match.gap == pytest.approx(0.02)
    assert "beyond the tolerance" in match.detail
    far = compare_greedy(REFERENCE, steps("The", " water"), tolerance=0.05)  # in the top list, 2.5 nats below
    assert far.outcome == "mismatch" and far.gap == pytest.approx(2.5)


def test_a_token_missing_from_the_reference_alternatives_is_a_mismatch() -> None:
    match = compare_greedy(REFERENCE, steps("The", " sky", " is"), tolerance=100.0)
    assert match.outcome == "mismatch" and match.index == 1 and match.gap is None
    assert "not among" in match.detail


def test_a_divergence_before_the_near_tie_is_a_mismatch() -> None:
    match = compare_greedy(REFERENCE, steps("A", " ocean", " is", " deep"), tolerance=0.05)
    assert match.outcome == "mismatch" and match.index == 0


@pytest.mark.parametrize("got", [steps("The", " sea"), steps("The", " sea", " is", " deep", "."), []])
def test_a_length_difference_without_a_divergence_is_a_mismatch(got: list[Step]) -> None:
    match = compare_greedy(REFERENCE, got, tolerance=0.05)
    assert match.outcome == "mismatch" and match.index == min(len(got), len(REFERENCE))
    assert f"{len(got)} tokens, reference {len(REFERENCE)}" in match.detail


def test_chat_and_legacy_logprobs_give_the_same_steps() -> None:
    alt = SimpleNamespace
    chat = alt(
        content=[
            alt(
                token="Hi",
                logprob=-0.1,
                top_logprobs=[alt(token="Hi", logprob=-0.1), alt(token="Yo", logprob=-2.0)],
            ),
            # the EOS that ended the answer: shown as "", named by its alternative with the same logprob
            alt(
                token="",
                logprob=-0.3,
                top_logprobs=[alt(token="</s>", logprob=-0.3), alt(token="!", logprob=-1.4)],
            ),
        ]
    )
    legacy = alt(
        tokens=["Hi", ""],
        token_logprobs=[-0.1, -0.3],
        top_logprobs=[{"Hi": -0.1, "Yo": -2.0}, {"</s>": -0.3, "!": -1.4}],
    )
    want = [Step("Hi", -0.1, {"Hi": -0.1, "Yo": -2.0}), Step("</s>", -0.3, {"</s>": -0.3, "!": -1.4})]
    assert chat_steps(chat) == want and completion_steps(legacy) == want
    assert chat_steps(None) == [] and completion_steps(None) == []
    assert logprob_args("chat") == {"logprobs": True, "top_logprobs": 20}  # as many as each endpoint allows
    assert logprob_args("completions") == {"logprobs": 5}
