"""Exact enumeration: a distribution over every response, the exact KL against the per-token exact KL,
the exact gradient against finite differences of the exact objective, and the Monte-Carlo estimators
(k1 / k2 / k3, REINFORCE, PPO's first step) against the exact values, with fixed seeds."""
import numpy as np
import pytest
from scipy import stats

from minirlhf import exact as E
from minirlhf import kl, ppo_objective as po
from minirlhf import transformer as tf
from minirlhf.kit.gradcheck import numerical_gradient, rel_error

SIZES = (100, 1000, 10000, 100000)


@pytest.fixture(scope="module")
def rep():
    return E.report(seed=0, sizes=SIZES)


@pytest.fixture(scope="module")
def world():
    return E.enumerate_all(*E.models(0))


def test_enumeration_is_every_response_once(world):
    tokens, mask, ended = world["tokens"], world["mask"], world["ended"]
    assert len(tokens) == 1 + 3 + 9 + 27  # EOS after 0, 1, 2 tokens from {PAD, BOS, text}, or 3 without EOS
    assert len({tuple(t[m > 0]) for t, m in zip(tokens, mask)}) == len(tokens)
    for t, m, e in zip(tokens, mask, ended):
        n = m.sum()
        assert np.all(m[:n] == 1) and not np.any(t[:n - 1] == E.EOS) and e == (t[n - 1] == E.EOS)
        assert e or n == E.H
    assert np.all(world["p"] > 0) and abs(world["p"].sum() - 1) < 1e-12


@pytest.mark.parametrize("tau", [1.0, 0.8])
def test_sequence_kl_is_the_expected_sum_of_per_token_exact_kl(tau):
    """The chain rule of KL, the claim kl.exact_kl's docstring makes for "the exact KL along the path"."""
    policy, reference = E.models(0)
    w = E.enumerate_all(policy, reference, temperature=tau)
    seq = np.hstack([np.full((len(w["tokens"]), 1), E.BOS), w["tokens"]])
    seq_mask = np.hstack([np.ones((len(seq), 1), np.int64), w["mask"]])
    logits = [tf.forward(m, E.EXACT_MODEL, seq, seq_mask)[0][:, :-1] for m in (policy, reference)]
    along_path = kl.exact_kl(*logits, temperature=tau, mask=w["mask"]).sum(axis=1)  # (S,)
    assert w["kl"] > 0.05
    assert abs(w["p"] @ along_path - w["kl"]) < 1e-12
    assert E.enumerate_all(policy, policy, temperature=tau)["kl"] == 0.0


def test_generate_samples_the_enumerated_distribution_at_a_temperature():
    policy, _ = E.models(0)
    w = E.enumerate_all(policy, policy, temperature=0.8)
    counts = np.bincount(E.sample(policy, E.EXACT_MODEL, 20000, np.random.default_rng(5), 0.8), minlength=len(w["p"]))
    assert stats.chisquare(counts, w["p"] * counts.sum()).pvalue > 1e-3
    wrong = E.enumerate_all(policy, policy, temperature=1.0)["p"]  # scoring without the sampling temperature
    assert stats.chisquare(counts, wrong * counts.sum()).pvalue < 1e-6


def test_k1_and_k3_are_unbiased_k2_is_not(rep):
    k = rep["kl"]
    assert abs(k["k1"]["bias"]) < 1e-12 and abs(k["k3"]["bias"]) < 1e-12
    assert k["k2"]["bias"] > 0.01
    assert k["k3"]["variance"] < k["k1"]["variance"] / 10  # close policies: k3 is far less noisy
    for name in ("k1", "k3"):  # Monte-Carlo means from transformer.generate, fixed seed
        assert all(abs(z) < 4 for z in k[name]["z"].values()), (name, k[name]["z"])
    assert abs(k["k2"]["z"][SIZES[-1]]) > 10  # the same test sees k2's bias
    assert rep["sampler_chi2_pvalue"] > 1e-3


def test_exact_gradient_matches_finite_differences_of_the_exact_objective():
    policy, reference = E.models(0)
    grads = E.exact_gradient(E.enumerate_all(policy, reference))
    J = lambda: E.enumerate_all(policy, reference)["objective"]  # noqa: E731
    rng = np.random.default_rng(0)
    for name, x in policy.items():
        idx = rng.choice(x.size, min(x.size, 6), replace=False)
        analytic, numeric = grads[name].ravel()[idx], numerical_gradient(J, x, idx)
        if name.endswith("attn.b_qkv"):  # the key bias: exactly 0 (softmax ignores a shift)
            keep = (idx < E.EXACT_MODEL.n_embd) | (idx >= 2 * E.EXACT_MODEL.n_embd)
            assert np.abs(analytic[~keep]).max(initial=0) < 1e-12
            analytic, numeric = analytic[keep], numeric[keep]
        assert rel_error(analytic, numeric) < 1e-6, name


def test_policy_gradient_estimators_exact_means(rep):
    g = rep["gradient"]
    for name in ("reinforce_k1", "ppo_true_values_lam0.95", "ppo_zero_values_lam1"):
        assert g[name]["relative_bias"] < 1e-12, name
    for name in ("reinforce_k3", "ppo_zero_values_lam0.95"):  # k3 in the reward; no baseline with lambda < 1
        assert g[name]["relative_bias"] > 0.01, name
    assert g["ppo_true_values_lam0.95"]["trace_variance"] < g["reinforce_k1"]["trace_variance"]


def test_policy_gradient_monte_carlo_means_converge(rep):
    for name, e in rep["gradient"].items():
        err, predicted = e["relative_error"], e["predicted_error"]
        if e["relative_bias"] < 1e-12:
            assert err[SIZES[-1]] < err[SIZES[0]] / 10, (name, err)
            assert all(0.1 < err[n] / predicted[n] < 4 for n in SIZES), (name, err, predicted)
            assert all(abs(z) < 4 for z in e["z_along_gradient"].values()), (name, e["z_along_gradient"])
        else:  # the biased ones stall at their bias, and the same statistics catch them
            assert err[SIZES[-1]] > 0.5 * e["relative_bias"] and err[SIZES[-1]] > 3 * predicted[SIZES[-1]], name


def test_ppo_estimate_on_a_sampled_batch_equals_the_count_weighted_one(world):
    """Running ppo.py's array math on the sampled batch itself (repeated rows, the token mean over the batch)
    gives what per_response + counts give: the counts shortcut in report() is the real estimator."""
    policy, _ = E.models(0)
    idx = E.sample(policy, E.EXACT_MODEL, 300, np.random.default_rng(7))
    values = E.true_values(world)
    batch = {k: world[k][idx] for k in ("tokens", "mask", "scores", "logp", "logp_ref")}
    rewards, _ = kl.token_rewards(batch["scores"], batch["logp"], batch["logp_ref"], batch["mask"], E.KL_COEF)
    adv, _ = po.gae(rewards, values[idx], batch["mask"], 1.0, 0.95)
    _, cache = po.policy_loss_forward(batch["logp"], batch["logp"], adv, batch["mask"])
    _, caches = E.token_logprobs(policy, E.EXACT_MODEL, batch["tokens"], batch["mask"])
    direct = -E.flat(E.backprop(po.policy_loss_backward(1.0, cache), caches)) * batch["mask"].sum() / len(idx)
    F = E.per_response(world, lambda w: E.ppo_weights(world, w, values, 0.95))
    counted = np.bincount(idx, minlength=len(F)) @ F / len(idx)
    assert rel_error(direct, counted) < 1e-9


def test_a_port_plugs_into_exact_and_its_biased_estimators_are_caught():
    """check_port on minirlhf itself passes everything; ports with one bug each fail the check that sees it:
    a sampler that ignores the temperature, log-probs without it, k3 with its ratio upside down, and a
    policy gradient with k3 in the reward (biased: exact.py's docstring)."""
    from types import SimpleNamespace
    good = E.minirlhf_port()
    results = E.check_port(good, n=4000)
    assert all(r["ok"] for r in results.values()), results
    assert results["k2 mean, tau 0.7"]["bias"] > 0.01  # k2's bias is measured, and expected

    def k3_in_reward(params, reference, tokens, mask, scores, kl_coef, temperature):
        logp, caches = E.token_logprobs(params, E.EXACT_MODEL, tokens, mask, temperature)
        logp_ref, _ = E.token_logprobs(reference, E.EXACT_MODEL, tokens, mask, temperature)
        k3 = kl.kl_estimators(logp, logp_ref, mask)["k3_sum"]
        return E.backprop(((scores - kl_coef * k3) / len(tokens))[:, None] * mask, caches)
    bugs = {"sampler law, tau 0.7": {"sample": lambda params, n, seed, temperature: good.sample(params, n, seed, 1.0)},
            "log-probs, tau 0.7": {"logprobs": lambda params, tokens, mask, temperature: good.logprobs(
                params, tokens, mask, 1.0)},
            "k3 mean, tau 1.0": {"kl_estimators": lambda logp, logp_ref, mask: {
                **good.kl_estimators(logp, logp_ref, mask), "k3": good.kl_estimators(logp_ref, logp, mask)["k3"]}},
            "policy gradient mean, tau 1.0": {"policy_gradient": k3_in_reward}}
    for failing, functions in bugs.items():
        out = E.check_port(SimpleNamespace(**functions), n=4000)
        assert not out[failing]["ok"], (failing, out[failing])


def test_the_sampler_law_check_pools_rare_responses_so_a_correct_sampler_passes():
    """Under the null (counts drawn from the law itself) p-values are uniform, so at level 1e-3 about 0.3
    of 300 draws fail. A law with 30 responses expected far fewer than 5 times breaks the unpooled test (one
    draw of a response expected 0.01 times gives chi-square ~100); the pooled one keeps its level."""
    rng = np.random.default_rng(0)
    law = np.concatenate([rng.uniform(1, 2, 10), rng.uniform(1e-6, 1e-4, 30)])
    law /= law.sum()
    n = 20000
    draws = rng.multinomial(n, law, size=300)
    pooled = np.array([E.chi_square_p(c, law * n) for c in draws])
    unpooled = np.array([stats.chisquare(c, law * n).pvalue for c in draws])
    assert (pooled < 1e-3).sum() <= 3  # P(Binomial(300, 1e-3) > 3) = 2.6e-4
    assert (unpooled < 1e-3).sum() > 10  # 29 here: the approximation the pooling repairs
    assert E.check_port(E.minirlhf_port(), seed=5)["sampler law, tau 1.0"]["ok"]  # it failed here unpooled
