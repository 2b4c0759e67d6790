"""Best-of-n: its law against brute-force enumeration, its KL against the log n - (n-1)/n formula (an upper
bound, reached only in the continuous limit), and sampling with the transformer."""
import itertools

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minirlhf import best_of_n as bon
from minirlhf import transformer as tf
from minirlhf.reward import NO_EOS_SCORE, RewardModel, init_reward_params, score_samples
from minirlhf.tokenizer import EOS, VOCAB_SIZE


def enumerate_bon(p, r, n):
    """The best-of-n law by brute force: every n-tuple of outcomes, its probability, the first best kept."""
    out = np.zeros(len(p))
    for draw in itertools.product(range(len(p)), repeat=n):
        out[draw[int(np.argmax([r[i] for i in draw]))]] += np.prod([p[i] for i in draw])
    return out


def kl(q, p):
    return float(sum(qi * np.log(qi / pi) for qi, pi in zip(q, p) if qi > 0))


toy = st.integers(2, 5).flatmap(lambda k: st.tuples(
    st.lists(st.floats(0.05, 1.0), min_size=k, max_size=k),  # unnormalised reference probabilities
    st.lists(st.integers(-2, 2), min_size=k, max_size=k),  # scores from a small set: ties happen
    st.integers(1, 4)))


@given(toy)
def test_law_and_kl_match_brute_force_enumeration(case):
    w, r, n = case
    p = np.array(w) / np.sum(w)
    exact = enumerate_bon(p, r, n)
    np.testing.assert_allclose(bon.bon_distribution(p, r, n), exact, rtol=1e-10, atol=1e-14)
    assert bon.bon_kl(p, r, n) == pytest.approx(kl(exact, p), rel=1e-9, abs=1e-12)


@given(toy)
def test_kl_is_at_most_the_formula_and_depends_only_on_ranks(case):
    w, r, n = case
    p = np.array(w) / np.sum(w)
    value = bon.bon_kl(p, r, n)
    assert -1e-12 <= value <= bon.bon_kl_bound(n) + 1e-12
    assert bon.bon_kl(p, np.exp(np.array(r, float)) * 3 - 1, n) == pytest.approx(value, rel=1e-12, abs=1e-15)
    if n == 1:
        assert value == 0.0


@given(st.lists(st.floats(0.05, 1.0), min_size=2, max_size=6), st.integers(1, 6), st.randoms(use_true_random=False))
def test_distinct_rewards_enumerable_toy(w, n, random):
    """Distinct rewards (no ties): the exact KL from the enumerated best-of-n law, next to the formula.
    They agree only when the law is spread thin; for this few outcomes the formula is a strict bound."""
    p = np.array(w) / np.sum(w)
    r = random.sample(range(100), len(p))  # distinct
    exact = kl(enumerate_bon(p, r, n) if n <= 4 else bon.bon_distribution(p, r, n), p)
    assert bon.bon_kl(p, r, n) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    assert exact < bon.bon_kl_bound(n) or n == 1


def test_formula_is_the_continuous_limit_and_a_strict_bound_for_atoms():
    # Two equally likely answers, n = 2: pi_bon = (1/4, 3/4), KL = 0.131 against log 2 - 1/2 = 0.193.
    assert bon.bon_kl([0.5, 0.5], [0, 1], 2) == pytest.approx(0.75 * np.log(1.5) + 0.25 * np.log(0.5), rel=1e-12)
    assert bon.bon_kl_bound(2) == pytest.approx(np.log(2) - 0.5, rel=1e-15)
    for n in (2, 8, 32):  # uniform over M distinct scores: the gap closes as M grows
        gaps = [bon.bon_kl_bound(n) - bon.bon_kl(np.full(M, 1.0 / M), np.arange(M), n) for M in (10, 100, 10000)]
        assert gaps[0] > gaps[1] > gaps[2] > 0 and gaps[2] < 1e-3 * n


def test_empirical_law_pools_identical_samples_into_one_atom():
    scores, golds = np.array([1.0, 2.0, 1.0, -1.0]), np.array([0.5, 1.5, 0.5, -3.0])
    value, expected_gold = bon.empirical_bon(scores, golds, 3)
    assert value == pytest.approx(bon.bon_kl([0.5, 0.25, 0.25], [1.0, 2.0, -1.0], 3), rel=1e-12)
    law = bon.bon_distribution([0.5, 0.25, 0.25], [1.0, 2.0, -1.0], 3)
    assert expected_gold == pytest.approx(law @ np.array([0.5, 1.5, -3.0]), rel=1e-12)


def test_evaluate_pools_rows_of_one_prompt_and_draws_from_the_first_n():
    scores = np.array([[0.0, 2.0, 1.0], [3.0, 1.0, 1.0], [1.0, 0.5, 2.0]])
    golds = np.array([[-1.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.5, 0.0, 1.5]])
    out = bon.evaluate_best_of_n(scores, golds, ["a", "b", "a"], [1, 2])
    assert out[1]["gold"] == pytest.approx((-1.0 + 2.0 + 0.5) / 3) and out[1]["kl"] == 0.0
    assert out[2]["gold"] == pytest.approx((1.0 + 2.0 + 0.5) / 3)  # best of the first two of each row
    kl_a = bon.empirical_bon(np.r_[scores[0], scores[2]], np.r_[golds[0], golds[2]], 2)[0]  # rows 0, 2 pooled
    kl_b = bon.empirical_bon(scores[1], golds[1], 2)[0]
    assert out[2]["kl"] == pytest.approx((2 * kl_a + kl_b) / 3, rel=1e-12)
    assert out[2]["kl_bound"] == bon.bon_kl_bound(2)


def test_bad_input():
    with pytest.raises(ValueError, match="positive integer"):
        bon.bon_kl_bound(0)
    with pytest.raises(ValueError, match="probability vector"):
        bon.bon_kl([0.5, 0.6], [0, 1], 2)
    with pytest.raises(ValueError, match="one non-zero size"):
        bon.bon_distribution([1.0], [0, 1], 2)
    with pytest.raises(ValueError, match="needs at least"):
        bon.evaluate_best_of_n(np.zeros((2, 3)), np.zeros((2, 3)), ["a", "b"], [4])


# ---------------------------------------------------------------- with the transformer

def random_models(cfg, seed=0, eos_logit=2.5):
    """A random policy that ends its responses after a few tokens (EOS logit raised by about eos_logit
    through the final LayerNorm's bias) and a random reward model on its trunk."""
    rng = np.random.default_rng(seed)
    policy = tf.init_params(cfg, rng)
    e = policy["wte"][EOS]
    policy["ln_f.b"] = (eos_logit * e / (e @ e)).astype(np.float32)
    return (tf.Policy(policy, cfg, tf.Sampling(max_new_tokens=20)),
            RewardModel(init_reward_params(policy, cfg, rng), cfg, gain=2.0, bias=-0.5))


def test_best_of_n_keeps_the_highest_score_and_scores_identical_texts_identically():
    cfg = tf.GPTConfig(vocab_size=VOCAB_SIZE, n_ctx=40, n_layer=1, n_head=2, n_embd=16)
    policy, reward_model = random_models(cfg)
    prompts = ["hi!", "what is 2+1?", "hi!"]
    best, samples, scores = bon.best_of_n(policy, reward_model, prompts, 6, np.random.default_rng(1))
    assert scores.shape == (3, 6) and len(samples) == 3 and all(len(s) == 6 for s in samples)
    for row, s, b in zip(scores, samples, best):
        assert b == s[int(np.argmax(row))]
        for (text, ended), value in zip(s, row):
            assert ended or value == NO_EOS_SCORE
    flat_prompts = [p for p in prompts for _ in range(6)]
    flat = [x for s in samples for x in s]
    by_text = {}
    for key, value in zip(zip(flat_prompts, flat), scores.ravel()):
        assert by_text.setdefault(key, value) == value  # a repeated response gets exactly the same score
    assert len(by_text) < len(flat)  # there were repeats to check
    single = score_samples(reward_model, ["hi!"], [samples[0][0]])
    assert single[0] == pytest.approx(scores[0, 0], rel=1e-5)


def test_evaluate_reports_gold_law_kl_half_and_score_as_defined():
    """gold_law: the expected gold of best-of-n from each prompt's pooled law; kl_half: the KL from the first
    half of the pooled samples; score: the mean score of the kept samples (mutants of all three survived at
    7231f4d: no test read them)."""
    scores = np.array([[0.0, 2.0, 1.0, 3.0], [1.0, 0.5, 2.0, 0.0]])
    golds = np.array([[-1.0, 1.0, 0.0, 2.0], [0.5, 0.0, 1.5, -0.5]])
    out = bon.evaluate_best_of_n(scores, golds, ["a", "b"], [2])[2]
    laws = [bon.empirical_bon(scores[i], golds[i], 2) for i in range(2)]
    assert out["gold_law"] == pytest.approx((laws[0][1] + laws[1][1]) / 2, rel=1e-12)
    halves = [bon.empirical_bon(scores[i][:2], golds[i][:2], 2)[0] for i in range(2)]
    assert out["kl_half"] == pytest.approx(np.mean(halves), rel=1e-12) and out["kl_half"] != out["kl"]
    assert out["score"] == pytest.approx((2.0 + 1.0) / 2)  # the best of the first two: 2.0 and 1.0
    assert out["gold"] == pytest.approx((1.0 + 0.5) / 2)
