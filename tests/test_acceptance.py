"""The offline prediction of speculative acceptance (distill.acceptance) against direct simulations of
the verification steps; its agreement with vLLM's measurement is tested in test_serve and test_pipeline."""

import numpy as np
import pytest
import torch

from distill.acceptance import Continuations, expected_accepted, greedy_steps, predict


def simulate_greedy(matches: list[bool], k: int) -> tuple[int, int]:
    """Token by token: the prefill gives token 0; a step drafts k tokens, the teacher keeps them up to
    the first wrong one and emits its own token there (or after the k-th), while k fit before the end."""
    accepted = steps = 0
    produced = 1
    while produced + k <= len(matches):
        steps += 1
        for i in range(k):
            if not matches[produced + i]:
                break
            accepted += 1
        else:
            i = k
        produced += i + 1  # the accepted drafts and the teacher's token
    return accepted, steps


def test_greedy_steps_walk_the_engine_steps():
    assert greedy_steps(np.array([0, 1, 1, 0, 1, 1, 1], bool), 2) == (4, 2)
    assert greedy_steps(np.zeros(6, bool), 2) == (0, 4)
    assert greedy_steps(np.ones(11, bool), 4) == (8, 2)
    rng = np.random.default_rng(0)
    for _ in range(200):
        matches = rng.random(rng.integers(2, 40)) < rng.random()
        k = int(rng.integers(1, 6))
        assert greedy_steps(matches, k) == simulate_greedy(matches.tolist(), k)


def test_expected_accepted_is_the_mean_of_sampled_chains():
    a = np.full(10, 0.5)
    np.testing.assert_allclose(expected_accepted(a, 3), np.full(8, 0.875))
    assert len(expected_accepted(np.ones(2), 3)) == 0
    rng = np.random.default_rng(1)
    a = rng.random(12)
    draws = rng.random((200_000, 12)) < a  # each position accepted with its own probability
    for t, value in enumerate(expected_accepted(a, 4)):
        run = np.cumprod(draws[:, t : t + 4], axis=1).sum(1)  # accepted until the first rejection
        assert abs(run.mean() - value) < 0.01


def test_predict_at_temperature_0_counts_matches_in_vllm_units():
    prompt = [[5, 6, 7]] * 2
    completion = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    c = Continuations(torch.cat([torch.tensor(prompt), completion], 1), prompt_len=3)
    drafted = completion.clone()
    drafted[0, 3] = 0  # one wrong proposal in the first row
    drafted[1] = 2  # the second row never matches
    row = predict(drafted, c, k=2, temperature=0.0)
    first, second = (
        simulate_greedy((drafted[0] == completion[0]).tolist(), 2),
        simulate_greedy([False] * 9, 2),
    )
    accepted, steps = first[0] + second[0], first[1] + second[1]
    assert row["acceptance_rate"] == pytest.approx(accepted / (2 * steps))
    assert row["mean_acceptance_length"] == pytest.approx(1 + accepted / steps)
    assert row["alpha"] == pytest.approx(7 / 16)  # positions 1..8 of both rows: 7 matches in row one
    perfect = predict(completion, c, k=2, temperature=0.0)
    assert perfect["acceptance_rate"] == 1 and perfect["mean_acceptance_length"] == 3


def test_predict_above_temperature_0_uses_the_teachers_probability_of_the_draft_token():
    B, M, top = 3, 12, 4
    ids = torch.arange(top).expand(B, M, top).clone()
    probs = torch.tensor([0.6, 0.2, 0.1, 0.1]).expand(B, M, top).clone()
    c = Continuations(torch.zeros(B, 2 + M, dtype=torch.long), 2, ids, probs)
    always_first = predict(torch.zeros(B, M, dtype=torch.long), c, k=3, temperature=1.0)
    p = 0.6
    assert always_first["acceptance_rate"] == pytest.approx((p + p**2 + p**3) / 3)
    assert always_first["alpha"] == pytest.approx(p)
    outside = predict(torch.full((B, M), 99), c, k=3, temperature=1.0)  # not in the teacher's top
    assert outside["acceptance_rate"] == 0 and outside["mean_acceptance_length"] == 1
