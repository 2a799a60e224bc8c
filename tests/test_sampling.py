"""llm.generate.sample_next_token: which tokens top-k and top-p leave to be drawn, checked
against the distribution written out by hand, with the vocabulary in shuffled order (so
the cut must be mapped back from sorted order to token ids)."""

import math

import pytest
import torch

from llm.generate import sample_next_token

PROBS = {7: 0.5, 2: 0.3, 9: 0.15, 4: 0.05}  # token id -> probability; ids 0..9, the rest get none
DRAWS = 4000


def logits_of(probs: dict[int, float], vocab: int = 10) -> torch.Tensor:
    logits = torch.full((DRAWS, vocab), float("-inf"))
    for token, p in probs.items():
        logits[:, token] = math.log(p)
    return logits


def drawn(probs=PROBS, **sampling) -> dict[int, float]:
    """Share of DRAWS rows that drew each token."""
    generator = torch.Generator().manual_seed(0)
    tokens = sample_next_token(logits_of(probs), generator=generator, **{"top_k": None, "top_p": None, **sampling})
    assert tokens.shape == (DRAWS, 1)
    counts = torch.bincount(tokens[:, 0], minlength=10)
    return {token: count / DRAWS for token, count in enumerate(counts.tolist()) if count}


@pytest.mark.parametrize("top_p, kept", [
    (0.45, [7]),            # the most likely token alone reaches 0.45
    (0.6, [7, 2]),          # 0.5 < 0.6: the next token is needed; with it 0.8 >= 0.6
    (0.85, [7, 2, 9]),
    (1.0, [7, 2, 9, 4]),
])  # fmt: skip
def test_top_p_keeps_the_smallest_most_likely_set(top_p, kept):
    shares = drawn(temperature=1.0, top_p=top_p)
    assert sorted(shares) == sorted(kept)
    total = sum(PROBS[t] for t in kept)
    for token in kept:  # renormalised over the kept set (4000 draws: within 0.04)
        assert shares[token] == pytest.approx(PROBS[token] / total, abs=0.04)


def test_top_k_keeps_the_k_most_likely():
    assert sorted(drawn(temperature=1.0, top_k=2)) == [2, 7]
    assert sorted(drawn(temperature=1.0, top_k=3, top_p=0.6)) == [2, 7]  # both cuts apply


def test_temperature_sharpens_and_zero_is_greedy():
    assert drawn(temperature=0) == {7: 1.0}
    cold = drawn(temperature=0.5)  # p^2 renormalised: 7 gets 0.25 / 0.3650
    assert cold[7] == pytest.approx(0.25 / sum(p * p for p in PROBS.values()), abs=0.04)
