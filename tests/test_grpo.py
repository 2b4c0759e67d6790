"""Critic-free RL: the advantages, losses, aggregators and KL terms of grpo_objective.py (math properties and
finite differences, per op and through the transformer), the training loop of grpo.py (the first ratio is
exactly 1, determinism, nothing written by a failed update, the reward sources), world.verify, and the
--quick runs of the three experiments."""
import json
import math
import os
import sys
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minirlhf import grpo
from minirlhf import grpo_objective as go
from minirlhf import transformer as tf
from minirlhf.kit.gradcheck import MODEL_TOL, OP_TOL, gradient_errors, key_bias_zero
from minirlhf.kit.inputs import tiny_model
from minirlhf.kit.strategies import prefix_masks
from minirlhf.ppo import response_logprobs
from minirlhf.tokenizer import EOS, VOCAB_SIZE
from minirlhf.world import all_prompts, templated_responses, verify, behaviour

EPS64 = np.finfo(np.float64).eps
rewards_pg = hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 6)),
                        elements=st.floats(-10, 10).map(lambda x: x if abs(x) > 1e-6 else 0.0))


def sum_tol(rewards, adv, scale=1.0):
    """Rounding bound on |sum of a group's advantages|: the mean of G numbers is off by up to G eps |r|, which
    G subtractions carry into the sum (G^2 eps max|r|), plus one rounding per term and per add (2 G eps max|A|);
    x4 for the division by the std. Divided by the std's scale for std-normalised advantages."""
    G = rewards.shape[1]
    return 4 * EPS64 * (G * G * np.abs(rewards).max() / scale + 2 * G * np.abs(adv).max())


# ---------------------------------------------------------------- advantages

@given(rewards_pg)
def test_advantages_of_a_group_sum_to_zero(r):
    std = r.std(axis=1, ddof=1, keepdims=True) if r.shape[1] > 1 else np.ones((len(r), 1))
    for adv, scale in ((go.dr_grpo_advantages(r), 1.0), (go.grpo_advantages(r), std.min() + 1e-4)):
        assert np.all(np.abs(adv.sum(axis=1)) <= sum_tol(r, adv, scale)), (r, adv)
    if r.shape[1] > 1:
        adv = go.rloo_advantages(r)
        assert np.all(np.abs(adv.sum(axis=1)) <= sum_tol(r, adv) * r.shape[1]), (r, adv)


@given(rewards_pg.filter(lambda r: r.shape[1] >= 2))
def test_rloo_is_g_over_g_minus_one_times_dr_grpo(r):
    G = r.shape[1]
    rloo, dr = go.rloo_advantages(r), go.dr_grpo_advantages(r)
    np.testing.assert_allclose(rloo, G / (G - 1) * dr, rtol=0, atol=8 * G * EPS64 * max(1, np.abs(r).max()))


@given(rewards_pg)
def test_grpo_advantages_match_a_per_group_loop(r):
    for ddof, eps in ((1, 1e-4), (0, 1e-6)):
        adv = go.grpo_advantages(r, ddof=ddof, eps=eps)
        for row, a in zip(r, adv):
            if len(row) == 1 or row.min() == row.max():
                assert np.all(a == 0)
            else:
                expected = (row - row.mean()) / (row.std(ddof=ddof) + eps)
                np.testing.assert_allclose(a, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("value", [0.1, -3.7, 1e3, 0.0])
def test_a_group_of_equal_rewards_or_of_one_gets_zero_not_nan(value):
    r = np.full((2, 3), value)
    r[1] = [1.0, 2.0, 4.0]
    if value == 0.1:  # the naive r - mean is not 0 here (0.1 + 0.1 + 0.1 rounds): the exact test matters
        assert np.any(r[0] - r[0].mean() != 0)
    for adv in (go.grpo_advantages(r), go.dr_grpo_advantages(r), go.rloo_advantages(r)):
        assert np.all(adv[0] == 0) and np.all(np.isfinite(adv)) and np.all(adv[1] != 0)
    one = np.array([[5.0], [-2.0]])
    assert np.all(go.grpo_advantages(one) == 0) and np.all(go.dr_grpo_advantages(one) == 0)
    with pytest.raises(ValueError, match="RLOO needs at least 2"):
        go.rloo_advantages(one)


def test_the_std_convention_by_hand_and_group_ids():
    r = np.array([[0.0, 1.0]])
    np.testing.assert_allclose(go.grpo_advantages(r), [[-0.5, 0.5]] / (np.sqrt(0.5) + 1e-4), rtol=1e-15)  # ddof 1
    np.testing.assert_allclose(go.grpo_advantages(r, ddof=0, eps=0), [[-1.0, 1.0]], rtol=1e-15)  # G = 2: sqrt 2
    flat, ids = np.array([3.0, 1.0, 2.0, 5.0, 4.0]), np.array([7, 2, 7, 2, 7])  # any integer ids, any order
    np.testing.assert_allclose(go.dr_grpo_advantages(flat, ids), [0.0, -2.0, -1.0, 2.0, 1.0], atol=1e-15)
    np.testing.assert_allclose(go.rloo_advantages(flat, ids), [0.0, -4.0, -1.5, 4.0, 1.5], atol=1e-15)
    with pytest.raises(ValueError, match="NaN or inf at flat index 1"):
        go.grpo_advantages(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="integer groups"):
        go.dr_grpo_advantages(flat, ids[:3])


def test_reinforce_pp_advantages_match_a_loop():
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    logp, logp_ref = rng.uniform(-2, -0.1, (2, 4, 3))
    scores, groups, beta = np.array([1.0, -0.5, 2.0, 0.3]), np.array([0, 0, 1, 1]), 0.1
    for baseline in (False, True):
        s = scores - np.array([0.25, 0.25, 1.15, 1.15]) if baseline else scores
        to_go = np.zeros((4, 3))
        for b in range(4):
            n = mask[b].sum()
            for t in range(n):
                to_go[b, t] = s[b] - beta * sum(logp[b, u] - logp_ref[b, u] for u in range(t, n))
        v = to_go[mask > 0]
        expected = np.where(mask > 0, (to_go - v.mean()) / np.sqrt(v.var() + 1e-8), 0)
        got = go.reinforce_pp_advantages(scores, logp, logp_ref, mask, beta, groups, baseline)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_dapo_filters():
    r = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(go.dynamic_sampling_keep(r), [[0, 0, 0], [1, 1, 1], [0, 0, 0]])
    np.testing.assert_allclose(go.overlong_penalty([10, 26, 29, 32], 32, 6), [0, 0, -0.5, -1.0])
    with pytest.raises(ValueError, match="cache_len"):
        go.overlong_penalty([3], 8, 9)


# ---------------------------------------------------------------- losses, aggregators and KL terms per op

def off_kink(seed, eps=0.2):
    """(mask, logp, logp_old, advantages): log-ratios +-0.25 eps or +-2.5 eps (off the kinks), row 1 padded."""
    r = np.random.default_rng(seed)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    logp_old = r.uniform(-3, -0.5, mask.shape)
    logp = logp_old + eps * r.choice([-2.5, -0.25, 0.25, 2.5], mask.shape)
    adv = r.choice([-1.0, 1.0], mask.shape) * r.uniform(0.3, 1.5, mask.shape)
    return mask, logp, logp_old, adv


def test_token_loss_gradient_both_branches():
    mask, logp, logp_old, adv = off_kink(0)
    dout = np.random.default_rng(1).standard_normal(mask.shape)
    loss, cache = go.token_loss_forward(logp, logp_old, adv, mask, 0.2, 0.28)
    s = cache["stats"]
    assert 0 < s["clip_ratio/low_mean"] and 0 < s["clip_ratio/high_mean"] and s["clip_ratio/region_mean"] < 1
    f = lambda: (dout * go.token_loss_forward(logp, logp_old, adv, mask, 0.2, 0.28)[0]).sum()  # noqa: E731
    assert gradient_errors(f, {"logp": logp}, {"logp": go.token_loss_backward(dout, cache)})["logp"] < OP_TOL


@pytest.mark.parametrize("ratio", ["mean", "sum"])
def test_sequence_loss_gradient_both_branches(ratio):
    r = np.random.default_rng(2)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    logp_old = r.uniform(-3, -0.5, mask.shape)
    L = mask.sum(1)
    per_row = np.array([0.05, -0.5, 0.5, -0.05]) / (1 if ratio == "mean" else L)  # log s_i: inside / outside
    logp = logp_old + per_row[:, None] + 0.1 * r.standard_normal(mask.shape) * (mask > 0)
    logp[:, 0] -= np.where(mask > 0, logp - logp_old - per_row[:, None], 0).sum(1)  # so log s is exactly per_row
    adv, dout = np.array([1.2, -0.7, 0.9, -1.1]), r.standard_normal(4)
    _, cache = go.sequence_loss_forward(logp, logp_old, adv, mask, 0.2, 0.2, ratio)
    assert 0 < cache["clip_active"].mean() < 1  # both branches
    f = lambda: dout @ go.sequence_loss_forward(logp, logp_old, adv, mask, 0.2, 0.2, ratio)[0]  # noqa: E731
    assert gradient_errors(f, {"logp": logp}, {"logp": go.sequence_loss_backward(dout, cache)})["logp"] < OP_TOL


def test_reinforce_loss_and_aggregator_gradients():
    mask, logp, _, adv = off_kink(3)
    adv_row, dout = adv[:, 0], np.random.default_rng(4).standard_normal(3)
    _, cache = go.reinforce_loss_forward(logp, adv_row, mask)
    f = lambda: dout @ go.reinforce_loss_forward(logp, adv_row, mask)[0]  # noqa: E731
    assert gradient_errors(f, {"logp": logp}, {"logp": go.reinforce_loss_backward(dout, cache)})["logp"] < OP_TOL
    for kind in go.AGGREGATORS:
        losses = np.where(mask > 0, logp, 0)
        loss, c = go.aggregate_forward(losses, mask, kind, max_len=5)
        f = lambda: go.aggregate_forward(losses, mask, kind, max_len=5)[0]  # noqa: E731
        grads = {"losses": go.aggregate_backward(1.0, c)}
        assert gradient_errors(f, {"losses": losses}, grads)["losses"] < OP_TOL, kind


def test_token_weights_by_hand():
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    v = mask > 0
    expected = {"seq_mean_token_mean": np.array([[1 / 8] * 4, [1 / 4] * 2 + [0, 0]]),
                "token_mean": np.full((2, 4), 1 / 6), "constant": np.full((2, 4), 1 / 16),
                "seq_sum": np.full((2, 4), 0.5)}
    for kind, c in expected.items():
        np.testing.assert_allclose(go.token_weights(mask, kind, max_len=8), np.where(v, c, 0), rtol=1e-15)
    with pytest.raises(ValueError, match="max_len"):
        go.token_weights(mask, "constant", max_len=3)
    with pytest.raises(ValueError, match="unknown aggregator"):
        go.token_weights(mask, "mean")


@pytest.mark.parametrize("kind", go.KL_LOSSES)
def test_kl_loss_gradients(kind):
    mask, logp, logp_old, _ = off_kink(5)
    logp_ref = logp + np.random.default_rng(6).uniform(-1, 1, mask.shape)
    dout = np.random.default_rng(7).standard_normal(mask.shape)
    _, cache = go.kl_loss_forward(logp, logp_ref, mask, kind, logp_old)
    f = lambda: (dout * go.kl_loss_forward(logp, logp_ref, mask, kind, logp_old)[0]).sum()  # noqa: E731
    assert gradient_errors(f, {"logp": logp}, {"logp": go.kl_loss_backward(dout, cache)})["logp"] < OP_TOL


def test_kl_terms_by_hand_and_finite_at_50():
    d = np.array([[-50.0, -1.0, 0.0, 1e-9, 1.0, 50.0]])
    mask = np.ones_like(d, dtype=np.int64)
    for dtype in (np.float32, np.float64):
        logp, logp_ref = np.zeros_like(d, dtype), (-d).astype(dtype)  # logp - logp_ref = d
        k3, _ = go.kl_loss_forward(logp, logp_ref, mask, "k3")
        assert k3.dtype == dtype and np.all(np.isfinite(k3)) and np.all(k3 >= 0)
        x = d.astype(dtype).astype(np.float64)
        exact = np.where(np.abs(x) < 1e-4, x ** 2 / 2 - x ** 3 / 6, np.expm1(-x) + x)
        # expm1(-d) + d rounds once in each step: off by a few eps of |d| (the cancellation), no more
        assert np.all(np.abs(k3 - exact) <= 4 * np.finfo(dtype).eps * (np.abs(x) + exact)), (k3, exact)
        if dtype == np.float64:
            assert k3[0, 3] == pytest.approx(5e-19, rel=1e-6)  # exp(-d) - 1 + d would give 2.8e-17
        for kind in ("k1", "k2", "rho_k3"):  # rho from a log-ratio of +-50 with d = 0: finite
            out, cache = go.kl_loss_forward(logp, logp_ref, mask, kind, logp_old=logp - np.array(d, dtype))
            assert out.dtype == dtype and np.all(np.isfinite(out)), kind
            assert np.all(np.isfinite(go.kl_loss_backward(np.ones_like(out), cache))), kind
    rho_k3, cache = go.kl_loss_forward(np.zeros((1, 1)), np.full((1, 1), -0.5), np.ones((1, 1)), "rho_k3",
                                       logp_old=np.full((1, 1), np.log(0.5)))
    assert rho_k3[0, 0] == pytest.approx(2 * (np.exp(-0.5) - 1 + 0.5), rel=1e-14)
    assert go.kl_loss_backward(np.ones((1, 1)), cache)[0, 0] == pytest.approx(2 * 0.5, rel=1e-14)  # rho d


def test_everything_keeps_float32():
    mask, logp, logp_old, adv = (x.astype(np.float32) if x.dtype.kind == "f" else x for x in off_kink(8))
    per_tok, cache = go.token_loss_forward(logp, logp_old, adv, mask, 0.2, 0.28)
    assert per_tok.dtype == np.float32 and go.token_loss_backward(per_tok, cache).dtype == np.float32
    for kind in go.AGGREGATORS:
        loss, c = go.aggregate_forward(per_tok, mask, kind, max_len=4)
        assert loss.dtype == np.float32 and go.aggregate_backward(1.0, c).dtype == np.float32
    row, cache = go.sequence_loss_forward(logp, logp_old, adv[:, 0], mask, 0.2, 0.2)
    assert row.dtype == np.float32 and go.sequence_loss_backward(row, cache).dtype == np.float32
    row, cache = go.reinforce_loss_forward(logp, adv[:, 0], mask)
    assert row.dtype == np.float32 and go.reinforce_loss_backward(row, cache).dtype == np.float32
    for kind in go.KL_LOSSES:
        k, cache = go.kl_loss_forward(logp, logp_old - 0.1, mask, kind, logp_old)
        assert k.dtype == np.float32 and go.kl_loss_backward(k, cache).dtype == np.float32
    r32 = np.array([[1.0, 2.0, 4.0]], np.float32)
    assert go.grpo_advantages(r32).dtype == go.rloo_advantages(r32).dtype == np.float32


# ---------------------------------------------------------------- properties of the objective

@st.composite
def groups_on_policy(draw):
    """(rewards (P, G), mask (B, T), logp (B, T)) with B = P G."""
    P, G, T = draw(st.integers(1, 3)), draw(st.integers(2, 5)), draw(st.integers(1, 6))
    r = draw(hnp.arrays(np.float64, (P, G), elements=st.floats(-5, 5)))
    mask = draw(prefix_masks(P * G, T))
    logp = draw(hnp.arrays(np.float64, (P * G, T), elements=st.floats(-5, -0.01)))
    return r, mask, logp


@given(groups_on_policy())
def test_on_policy_grpo_loss_is_zero_and_the_token_mean_is_its_closed_form(case):
    """kl_coef = 0, logp = logp_old: every token's loss is -A_i, so GRPO's loss is -(1/B) sum_i A_i = 0 (the
    groups sum to 0), while the token mean is -(sum_i A_i L_i) / sum_j L_j, 0 only by coincidence."""
    r, mask, logp = case
    A = go.grpo_advantages(r).reshape(-1)
    per_tok, cache = go.token_loss_forward(logp, logp, go.broadcast(A, mask), mask)
    assert np.all(cache["ratio"] == 1) and cache["stats"]["clip_ratio/region_mean"] == 0
    grpo_loss, _ = go.aggregate_forward(per_tok, mask, "seq_mean_token_mean")
    T = mask.shape[1]
    scale = min(max(row.std(ddof=1), 1e-300) for row in r) + 1e-4
    assert abs(grpo_loss) <= sum_tol(r, A.reshape(r.shape), scale) + 4 * T * EPS64 * np.abs(A).max()
    tm, _ = go.aggregate_forward(per_tok, mask, "token_mean")
    L = mask.sum(1)
    closed = -(A * L).sum() / L.sum()
    assert abs(tm - closed) <= 8 * len(L) * T * EPS64 * max(1, np.abs(A).max())


def test_the_token_mean_loss_is_not_zero_on_policy():
    r, mask = np.array([[1.0, 0.0]]), np.array([[1, 1, 1, 1], [1, 0, 0, 0]])  # the right answer is the longer
    A = go.broadcast(go.grpo_advantages(r).reshape(-1), mask)
    per_tok, _ = go.token_loss_forward(np.full((2, 4), -1.0), np.full((2, 4), -1.0), A, mask)
    assert go.aggregate_forward(per_tok, mask, "seq_mean_token_mean")[0] == 0.0
    assert go.aggregate_forward(per_tok, mask, "token_mean")[0] == pytest.approx(-0.6 * A[0, 0], rel=1e-15)


@given(groups_on_policy(), st.floats(0.1, 3))
def test_on_policy_gradient_is_minus_c_times_a(case, dloss):
    """The number a port compares: on policy, unclipped, no KL, dL/dlogp_it = -c_it A_it."""
    r, mask, logp = case
    A = go.broadcast(go.dr_grpo_advantages(r).reshape(-1), mask)
    for kind in go.AGGREGATORS:
        per_tok, cache = go.token_loss_forward(logp, logp, A, mask)
        _, c = go.aggregate_forward(per_tok, mask, kind, max_len=mask.shape[1])
        dlogp = go.token_loss_backward(go.aggregate_backward(dloss, c), cache)
        np.testing.assert_allclose(dlogp, -dloss * A * go.token_weights(mask, kind, max_len=mask.shape[1]),
                                   rtol=4 * EPS64, atol=0)


@given(groups_on_policy(), st.data())
def test_clipped_loss_equals_the_unclipped_inside_the_range(case, data):
    _, mask, logp_old = case
    ratio = data.draw(hnp.arrays(np.float64, mask.shape, elements=st.floats(1 - 0.2, 1 + 0.28)))
    adv = data.draw(hnp.arrays(np.float64, mask.shape, elements=st.floats(-3, 3)))
    logp = logp_old + np.log(ratio)
    per_tok, cache = go.token_loss_forward(logp, logp_old, adv, mask, 0.2, 0.28)
    inside = (mask > 0) & (cache["ratio"] >= 0.8) & (cache["ratio"] <= 1.28)  # after rounding
    np.testing.assert_array_equal(per_tok[inside], (-adv * cache["ratio"])[inside])


@st.composite
def micro_batches(draw):
    """(mask (B, T), losses (B, T), cut points splitting the rows into 2-3 micro-batches)."""
    B, T = draw(st.integers(2, 6)), draw(st.integers(1, 5))
    mask = draw(prefix_masks(B, T))
    losses = draw(hnp.arrays(np.float64, (B, T), elements=st.floats(-3, 3)))
    cuts = sorted(draw(st.sets(st.integers(1, B - 1), min_size=1, max_size=2)))
    return mask, losses, cuts


@given(micro_batches())
def test_micro_batches_with_the_whole_batch_normaliser_give_the_full_gradient(case):
    """Gradient accumulation: the micro-batch losses, each normalised by the whole batch's counts, add up to
    the full loss, and each token's weight is the full batch's. Normalisers counted per micro-batch and
    averaged over the k micro-batches (loss / k, what accumulation does) differ: token_mean wherever a
    micro-batch holds other than its share of the tokens, the row-based ones wherever one holds other
    than its share of the rows."""
    mask, losses, cuts = case
    parts = np.split(np.arange(len(mask)), cuts)
    B, N, k = len(mask), int(mask.sum()), len(parts)
    for kind in go.AGGREGATORS:
        full, c_full = go.aggregate_forward(losses, mask, kind, max_len=5)
        micro = [go.aggregate_forward(losses[p], mask[p], kind, max_len=5, n_rows=B, n_tokens=N) for p in parts]
        assert abs(sum(m[0] for m in micro) - full) <= 8 * B * mask.shape[1] * EPS64 * max(1, np.abs(losses).max())
        np.testing.assert_allclose(np.concatenate([m[1] for m in micro]), c_full, rtol=4 * EPS64)
        if kind == "token_mean" and mask.sum() == 0:
            continue
        local = np.concatenate([go.token_weights(mask[p], kind, max_len=5) / k if mask[p].any() or
                                kind != "token_mean" else np.zeros(mask[p].shape) for p in parts])
        share = [(mask[p].sum() * k == N) if kind == "token_mean" else (len(p) * k == B) for p in parts]
        for p, fair in zip(parts, share):
            rows = mask[p] > 0
            if rows.any():
                same = np.allclose(local[p][rows], c_full[p][rows], rtol=4 * EPS64, atol=0)
                assert same == fair, (kind, p, local[p], c_full[p])


# ---------------------------------------------------------------- the whole objective through the transformer

GRAD = tf.GPTConfig(vocab_size=9, n_ctx=8, n_layer=1, n_head=2, n_embd=4)  # small: every entry checked
THROUGH_THE_MODEL = [  # (loss, aggregator, kl_placement, kl_loss): every loss, aggregator and KL term once
    ("token", "constant", "loss", "rho_k3"), ("sequence", "seq_sum", "loss", "k1"),
    ("sequence_sum", "token_mean", "loss", "k2"), ("reinforce", "seq_mean_token_mean", "loss", "k3")]


@pytest.mark.parametrize("loss, aggregator, kl_placement, kl_loss", THROUGH_THE_MODEL)
def test_loss_gradient_through_the_transformer(loss, aggregator, kl_placement, kl_loss):
    rng = np.random.default_rng(1)
    # scale 0.2, not the kit's 0.3: at 0.3 the model's own curvature leaves the h = 1e-3 stencil a truncation
    # error up to 2.4e-5 on small wpe entries (h = 2e-4 gives 4e-8 there: the gradient is right, the
    # difference quotient is not); at 0.2 the worst is 7e-8
    params = tiny_model(GRAD, 0, scale=0.2)
    policy = tf.Policy(params, GRAD, tf.Sampling(0.9, 4))
    B, P, N = 3, 3, 4
    seq = rng.integers(3, GRAD.vocab_size, (B, P + N))
    seq_mask = np.ones((B, P + N), np.int64)
    seq_mask[0, 0] = 0  # a left-padded prompt
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    seq_mask[:, P:] = mask
    logp, _ = response_logprobs(policy, seq, seq_mask, seq[:, P:], P, 0.9)
    # log-ratios 0.5, -0.05, -0.5 along rows 0, 1, 2 (eps 0.2 / 0.28), for a token or a whole sequence: row 0
    # clipped (A > 0, ratio 1.65), rows 1 and 2 not; far from the kinks
    offsets = np.array([[0.5] * 4, [-0.05] * 2 + [0, 0], [-0.5] * 3 + [0]])
    if loss == "sequence_sum":
        offsets = offsets / mask.sum(1, keepdims=True)
    cfg = grpo.CriticFreeConfig(loss=loss, aggregator=aggregator, kl_placement=kl_placement, kl_loss=kl_loss,
                                kl_coef=0.3, eps_high=0.28, advantage="dr_grpo", epochs=1,
                                minibatches=1 if loss == "reinforce" else 4)
    adv_row = np.array([0.8, -1.1, 0.6])
    mb = {"P": P, "seq": seq, "seq_mask": seq_mask, "tokens": seq[:, P:], "loss_mask": mask,
          "logp_old": logp - offsets, "logp_ref": logp + rng.uniform(-0.7, 0.7, mask.shape),
          "advantages": go.broadcast(adv_row, mask) * rng.uniform(0.5, 1.5, mask.shape), "adv_row": adv_row}
    _, grads, stats = grpo.minibatch_loss_and_grads(policy, mb, cfg, max_len=5)
    if loss != "reinforce":
        assert 0 < stats["clip_ratio/region_mean"] < 1, stats  # both branches in play
    errors = gradient_errors(lambda: grpo.minibatch_loss(policy, mb, cfg, 5)[0], {"policy": params},
                             {"policy": grads}, zero=key_bias_zero(GRAD))
    assert len(errors) == len(params)
    for name, err in errors.items():
        assert err < MODEL_TOL, f"{name}: relative error {err:.2e}"


# ---------------------------------------------------------------- the training loop

TINY = tf.GPTConfig(vocab_size=VOCAB_SIZE, n_ctx=32, n_layer=1, n_head=2, n_embd=8)
PROMPTS = [p for p in all_prompts() if len(p.text) <= 20]
ARITHMETIC = [p for p in PROMPTS if p.family == "arithmetic"]


def tiny_policy(dtype=np.float32, eos_bias=5.0, seed=0, max_new_tokens=8):
    params = {k: v.astype(dtype) for k, v in tiny_model(TINY, seed).items()}
    params["wte"][EOS] += eos_bias * params["ln_f.g"]  # eos_bias > 0 makes short responses likely
    return tf.Policy(params, TINY, tf.Sampling(1.0, max_new_tokens))


def length_source(texts, samples):
    """A toy reward with spread in every group: the length, +1 for stopping."""
    return np.array([0.1 * len(s) + e for s, e in samples])


def train(algo, updates=2, seed=0, source=length_source, prompts=PROMPTS, policy=None, **changes):
    policy = policy or tiny_policy()
    reference = {k: v.copy() for k, v in policy.params.items()}
    cfg = replace(grpo.ALGOS[algo], updates=updates, group_size=4, prompts_per_update=2, **changes)
    history = grpo.train_critic_free(policy, reference, source, prompts, cfg, np.random.default_rng(seed),
                                     log=lambda s: None)
    return policy, reference, history


@pytest.mark.parametrize("algo", sorted(grpo.ALGOS))
def test_every_preset_trains_and_its_first_ratio_is_exactly_one(algo):
    policy, reference, history = train(algo)
    assert history[0]["first_minibatch/ratio_max_dev"] == 0.0
    assert history[0]["objective/kl"] == 0.0 and history[0]["objective/kl_exact"] == 0.0  # own reference
    assert any(not np.array_equal(policy.params[k], reference[k]) for k in reference)
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "entropy", "kl",
                "clip_ratio/region_mean", "gold/score", "grad_norm"):
        assert math.isfinite(history[-1][key]), key


def test_training_is_deterministic_and_lr_zero_changes_nothing():
    p1, ref, h1 = train("grpo")
    p2, _, h2 = train("grpo")
    for k in ref:
        np.testing.assert_array_equal(p1.params[k], p2.params[k])
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]
    p0, ref0, _ = train("dapo", lr=0.0)
    for k in ref0:
        np.testing.assert_array_equal(p0.params[k], ref0[k])


def test_a_non_finite_gradient_writes_nothing_of_its_update(monkeypatch):
    """The second update's second minibatch has a NaN gradient: the update's first step is undone."""
    real, calls, after_first = grpo.minibatch_loss_and_grads, [], {}

    def poisoned(policy, mb, cfg, max_len):
        loss, grads, stats = real(policy, mb, cfg, max_len)
        calls.append(1)
        if len(calls) == cfg.minibatches + 2:  # update 2, its second minibatch
            grads["wpe"] = grads["wpe"] * np.nan
        return loss, grads, stats
    monkeypatch.setattr(grpo, "minibatch_loss_and_grads", poisoned)
    policy = tiny_policy()
    reference = {k: v.copy() for k, v in policy.params.items()}
    cfg = replace(grpo.ALGOS["grpo"], updates=3, group_size=4, prompts_per_update=2)
    keep = lambda i, s: after_first.update({k: v.copy() for k, v in policy.params.items()}) if i == 0 else None  # noqa
    with pytest.raises(ValueError, match="update 2: gradient wpe is not finite.*nothing of this update"):
        grpo.train_critic_free(policy, reference, length_source, PROMPTS, cfg, np.random.default_rng(0),
                               log=lambda s: None, on_update=keep)
    for k in reference:
        np.testing.assert_array_equal(policy.params[k], after_first[k])


def test_a_failed_update_puts_back_the_optimiser_state_too(monkeypatch):
    """grpo.learn all or nothing: arrays, moments and step count as before the update, after a NaN gradient."""
    policy = tiny_policy()
    cfg = replace(grpo.ALGOS["grpo"], group_size=4, prompts_per_update=2)
    rng = np.random.default_rng(0)
    train, _, _ = grpo.collect(policy, length_source, PROMPTS, cfg, rng)
    split = [np.array_split(rng.permutation(8), cfg.minibatches)]
    grpo.prepare(policy, tf.Policy(policy.params, TINY, policy.sampling), train, cfg, split[0])
    arrays, opt = tf.trainable(policy), grpo.AdamWConfig(lr=1e-3)
    state = grpo.adamw_init(arrays)
    grpo.learn(policy, train, split, cfg, arrays, state, opt, 1e-3)  # one good update: state is not zero
    before = ({k: v.copy() for k, v in arrays.items()}, {k: v.copy() for k, v in state["m"].items()},
              {k: v.copy() for k, v in state["v"].items()}, state["t"])
    real = grpo.minibatch_loss_and_grads
    calls = []

    def poisoned(*args):
        loss, grads, stats = real(*args)
        calls.append(1)
        return loss, {k: g * np.nan if len(calls) == 3 else g for k, g in grads.items()}, stats
    monkeypatch.setattr(grpo, "minibatch_loss_and_grads", poisoned)
    with pytest.raises(ValueError, match="not finite"):
        grpo.learn(policy, train, split, cfg, arrays, state, opt, 1e-3)
    assert len(calls) == 3 and state["t"] == before[3]
    for k in arrays:
        for now, then in ((arrays, before[0]), (state["m"], before[1]), (state["v"], before[2])):
            np.testing.assert_array_equal(now[k], then[k])


def test_advantages_of_puts_the_kl_where_the_config_says():
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    batch = {"mask": mask, "rewards": np.array([1.0, 0.0, 0.5, 0.5]), "groups": np.array([0, 0, 1, 1]),
             "logp_old": rng.uniform(-2, -0.1, (4, 3)), "logp_ref": rng.uniform(-2, -0.1, (4, 3))}
    k1 = np.where(mask > 0, batch["logp_old"] - batch["logp_ref"], 0).sum(1)
    row, per_token = grpo.advantages_of(batch, replace(grpo.ALGOS["rloo"], kl_coef=0.3))  # R = r - beta sum k1
    np.testing.assert_allclose(row, go.rloo_advantages(batch["rewards"] - 0.3 * k1, batch["groups"]), rtol=1e-14)
    np.testing.assert_array_equal(per_token, go.broadcast(row, mask))
    row, _ = grpo.advantages_of(batch, replace(grpo.ALGOS["grpo"], kl_coef=0.3))  # KL in the loss: not here
    np.testing.assert_array_equal(row, go.grpo_advantages(batch["rewards"], batch["groups"]))
    row, per_token = grpo.advantages_of(batch, replace(grpo.ALGOS["reinforce_pp"], kl_coef=0.3))
    assert row is None
    np.testing.assert_array_equal(per_token, go.reinforce_pp_advantages(batch["rewards"], batch["logp_old"],
                                                                        batch["logp_ref"], mask, 0.3))


def test_reward_sources_and_their_checks():
    policy = tiny_policy()
    before = {k: v.copy() for k, v in policy.params.items()}
    with pytest.raises(ValueError, match="cannot score the 'greeting' family"):
        train("grpo", source=grpo.verifier_source(), policy=policy)
    with pytest.raises(ValueError, match="non-finite reward nan for completion 1"):
        train("grpo", source=lambda t, s: np.array([0.0, np.nan] + [0.0] * (len(s) - 2)), policy=policy)
    for k in before:  # refused before any step
        np.testing.assert_array_equal(policy.params[k], before[k])
    source = grpo.verifier_source()
    texts = [ARITHMETIC[0].text] * 3
    right = str(ARITHMETIC[0].answer)
    np.testing.assert_array_equal(source(texts, [(f"it is {right}.", True), ("it is 0.", True), (right, False)]),
                                  [1.0, 0.0, 0.0])
    _, _, history = train("grpo", source=source, prompts=ARITHMETIC)
    assert "rewards/verifier/mean" in history[0] and 0 <= history[0]["reward"] <= 1


def test_dynamic_sampling_keeps_only_groups_with_spread_and_skips_when_none():
    _, _, history = train("dapo", source=lambda t, s: np.zeros(len(s)), overlong="none")  # all groups flat
    assert all(h["skipped"] and h["dynamic/rounds"] == 3 and h["frac_reward_zero_std"] == 1 for h in history)
    learnt = ("loss", "kl", "policy/approxkl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
              "grad_norm", "first_minibatch/ratio_max_dev")
    assert all(h[k] == 0.0 for h in history for k in learnt)  # a skipped update learnt nothing and logs 0
    policy, reference, history = train("dapo", source=length_source, max_sampling_rounds=5)
    assert not history[0]["skipped"] and 1 <= history[0]["dynamic/rounds"] <= 5


def test_overlong_masking_leaves_truncated_completions_out():
    def never_stops():  # h = ln_f.b at every position (gain 0), and EOS's logit -50 there: no completion ends
        policy = tiny_policy(max_new_tokens=4)
        policy.params["ln_f.g"][:] = 0
        b = policy.params["ln_f.b"]
        policy.params["wte"][EOS] = -50 * b / (b @ b)
        return policy
    p, reference, history = train("grpo", policy=never_stops(), overlong="mask")
    assert history[0]["completions/clipped_ratio"] == 1.0
    for k in reference:
        np.testing.assert_array_equal(p.params[k], reference[k])
    p, reference, _ = train("grpo", policy=never_stops(), overlong="none")  # the same rows, in the loss
    assert not np.array_equal(p.params["ln_f.b"], reference["ln_f.b"])


@pytest.mark.parametrize("change, field", [({"group_size": 0}, "group_size"), ({"aggregator": "mean"}, "aggregator"),
                                           ({"kl_coef": -1.0}, "kl_coef"), ({"advantage": "rloo", "group_size": 1},
                                                                            "group_size"),
                                           ({"loss": "reinforce"}, "loss"), ({"eps_high": 0.0}, "eps_high"),
                                           ({"advantage": "reinforce_pp"}, "advantage")])
def test_config_names_the_bad_field(change, field):
    with pytest.raises(ValueError, match=field):
        replace(grpo.ALGOS["grpo"], **change)


# ---------------------------------------------------------------- the world's verifier

def test_verify_checks_sums_and_refuses_other_families():
    p = next(q for q in all_prompts() if q.family == "arithmetic")
    right, wrong = str(p.answer), str(p.answer + 2)
    cases = {f"it is {right}.": 1.0, f"ugh, it is {right}.": 1.0, f"{right} and {wrong}.": 0.0,
             "the answer is.": 0.0, "": 0.0, "zqx vvb.": 0.0, f"it is {right}, trust me.": 1.0}
    for text, expected in cases.items():
        assert verify(p, text) == expected, text
    assert verify(p, f"it is {right}.", ended=False) == 0.0  # no EOS
    for prompt in (q for q in all_prompts() if q.family == "arithmetic"):  # the same verdict as behaviour()
        for style, text in templated_responses(prompt):
            assert verify(prompt, text) == float(behaviour(prompt, text) in ("correct", "rude_correct")), text
    for family in ("greeting", "unsafe", "unknowable"):
        q = next(x for x in all_prompts() if x.family == family)
        with pytest.raises(ValueError, match=f"cannot check the '{family}' family"):
            verify(q, "hello!")


# ---------------------------------------------------------------- the experiments, --quick

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demos"))


def run_quick(module, tiny_run, tmp_path):
    """main(--quick) from the session's tiny run; the JSON's numbers all finite; a figure where matplotlib is."""
    from test_experiments import HAVE_MATPLOTLIB, numbers, plot_flags
    path, fig = tmp_path / "out.json", tmp_path / "fig.png"
    module.main(["--quick", "--run", str(tiny_run[0]), "--json", str(path), *plot_flags(fig)])
    out = json.loads(path.read_text())
    assert out["args"]["quick"] is True and not [x for x in numbers(out) if not math.isfinite(x)]
    assert fig.exists() == HAVE_MATPLOTLIB
    return out


def test_length_bias_grpo_quick(tiny_run, tmp_path):
    import length_bias_grpo
    out = run_quick(length_bias_grpo, tiny_run, tmp_path)
    assert list(out["arms"]) == ["grpo", "dr_grpo"]
    for arm in out["arms"].values():
        assert len(arm["seeds"]) == len(length_bias_grpo.QUICK["seeds"])
        for key in ("length", "wrong_length", "right_rate"):
            assert isinstance(arm["mean"][key], float), key


def test_verifier_quick(tiny_run, tmp_path):
    import verifier
    out = run_quick(verifier, tiny_run, tmp_path)
    assert list(out["arms"]) == list(verifier.ARMS)
    for arm in out["arms"].values():
        assert 0 <= arm["families"]["arithmetic"]["preferred_rate"] <= 1
        assert set(arm["families"]) == {"arithmetic", "greeting", "unsafe", "unknowable"}


def test_gao_fits_recover_their_forms_and_peaks():
    import frontier
    d = np.array([0.3, 0.7, 1.2, 2.0, 3.0, 4.5])
    rl = [{"kl": float(x * x), "gold": float(-1 + x * (1 - 0.5 * np.log(x)))} for x in d]
    fit = frontier.gao_fit(rl, -1.0, "rl")  # log d* = alpha / beta - 1 = 1
    assert fit["alpha"] == pytest.approx(1, rel=1e-6) and fit["beta"] == pytest.approx(0.5, rel=1e-6)
    assert fit["peak_kl"] == pytest.approx(np.e ** 2, rel=1e-5) and fit["r2"] == pytest.approx(1, abs=1e-9)
    bon = [{"kl": float(x * x), "gold": float(x * (1 - 0.25 * x))} for x in d]
    fit = frontier.gao_fit(bon, 0.0, "bon")  # d* = alpha / (2 beta) = 2
    assert fit["peak_d"] == pytest.approx(2, rel=1e-6) and fit["peak_gold_gain"] == pytest.approx(1, rel=1e-6)
    assert frontier.gao_fit(bon[:2], 0.0, "bon") is None  # two points: no fit
    rising = [{"kl": float(x * x), "gold": float(x)} for x in d]  # beta 0: no peak
    assert frontier.gao_fit(rising, 0.0, "rl")["peak_d"] is None


def test_the_presets_are_the_papers_settings():
    """Each preset differs from GRPO's (DeepSeekMath: clip 0.2, k3 in the loss at beta 0.04, Bessel's std
    + 1e-4) in exactly what its paper changes (CONVENTIONS.md, critic-free methods); a port's presets are
    compared against these."""
    import dataclasses
    base = dataclasses.asdict(grpo.CriticFreeConfig())
    assert base == {"algo": "grpo", "group_size": 8, "prompts_per_update": 8, "updates": 30, "epochs": 1,
                    "minibatches": 4, "lr": 2e-4, "max_grad_norm": 1.0, "advantage": "grpo", "std_ddof": 1,
                    "std_eps": 1e-4, "loss": "token", "aggregator": "seq_mean_token_mean", "eps_low": 0.2,
                    "eps_high": 0.2, "kl_placement": "loss", "kl_loss": "k3", "kl_coef": 0.04,
                    "dynamic_sampling": False, "max_sampling_rounds": 3, "overlong": "none", "overlong_cache": 6}
    changed = {name: {k: v for k, v in dataclasses.asdict(cfg).items() if base[k] != v}
               for name, cfg in grpo.ALGOS.items()}
    none = {"kl_placement": "none", "kl_coef": 0.0}
    assert changed == {
        "grpo": {},
        "dr_grpo": {"algo": "dr_grpo", "advantage": "dr_grpo", "aggregator": "constant", **none},
        "dapo": {"algo": "dapo", "aggregator": "token_mean", "eps_high": 0.28, **none, "dynamic_sampling": True,
                 "overlong": "penalty"},
        "rloo": {"algo": "rloo", "minibatches": 1, "advantage": "rloo", "loss": "reinforce", "aggregator": "seq_sum",
                 "kl_placement": "reward", "kl_coef": 0.05},
        "reinforce_pp": {"algo": "reinforce_pp", "advantage": "reinforce_pp", "aggregator": "token_mean",
                         "kl_placement": "reward", "kl_coef": 0.05},
        "gspo": {"algo": "gspo", "loss": "sequence", "eps_low": 3e-4, "eps_high": 4e-4, **none}}


def test_rloo_takes_the_smallest_group_that_leaves_one_out():
    """A group of 2 is RLOO's smallest (each completion's baseline is the other's reward); 1 is refused."""
    assert replace(grpo.ALGOS["rloo"], group_size=2).group_size == 2
    with pytest.raises(ValueError, match="group_size must be >= 2 for rloo"):
        replace(grpo.ALGOS["rloo"], group_size=1)


def test_collect_counts_its_rounds_and_keeps_every_sampled_row():
    """Without dynamic sampling one round of prompts_per_update x group_size rows; with it and every group
    flat, max_sampling_rounds rounds, all of their rows in the second value, nothing to train on."""
    policy, flat = tiny_policy(), (lambda texts, samples: np.zeros(len(samples)))
    cfg = replace(grpo.ALGOS["dapo"], group_size=4, prompts_per_update=2, overlong="none")
    train, every, rounds = grpo.collect(policy, flat, PROMPTS, cfg, np.random.default_rng(0))
    assert train is None and rounds == cfg.max_sampling_rounds == 3 and len(every["texts"]) == 3 * 8
    train, every, rounds = grpo.collect(policy, flat, PROMPTS, replace(cfg, dynamic_sampling=False),
                                        np.random.default_rng(0))
    assert rounds == 1 and train is every and len(every["texts"]) == 8


def test_rollout_stats_are_their_definitions():
    """reward_std is the mean over groups of each group's Bessel std (TRL's reward_std), frac_reward_zero_std
    the share of flat groups; lengths over every sampled row, terminated lengths over the ended ones."""
    r = np.array([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 3.0, 1.0])
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    mask = np.zeros((10, 4), np.int64)
    lengths = np.array([1, 2, 3, 4, 1, 1, 2, 2, 4, 3])
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ended = lengths < 4
    every = {"rewards": r, "groups": groups, "mask": mask, "ended": ended, "texts": ["hey!"] * 10,
             "samples": [("hi.", bool(e)) for e in ended]}
    stats = grpo.rollout_stats(every, None, None, None, 1.0, "verifier")
    stds = [np.std(r[groups == g], ddof=1) for g in range(3)]
    assert stats["reward_std"] == pytest.approx(np.mean(stds), rel=1e-12)
    assert stats["frac_reward_zero_std"] == pytest.approx(1 / 3) and stats["reward"] == pytest.approx(r.mean())
    assert stats["completions/mean_length"] == lengths.mean()
    assert stats["completions/clipped_ratio"] == pytest.approx(0.2)
    assert stats["completions/mean_terminated_length"] == lengths[ended].mean()
