"""exact_rl.py: the exact expected gradient of each KL placement against the true gradient of the sequence
reverse KL, and of each critic-free method against the true gradient of expected reward, by enumeration."""
import itertools

import numpy as np
import pytest

from minirlhf import exact as E
from minirlhf import exact_rl as X
from minirlhf import grpo_objective as go
from minirlhf.kit.gradcheck import MODEL_TOL, numerical_gradient, rel_error


@pytest.fixture(scope="module")
def placements():
    g, _ = X.kl_placements(0)
    return g, X.kl_table(g)


def test_the_true_kl_gradient_is_the_gradient_of_the_enumerated_kl(placements):
    g, _ = placements
    policy, reference = E.models(0)
    true = dict(zip(policy, np.split(g["true_reverse_kl"], np.cumsum([v.size for v in policy.values()])[:-1])))
    rng = np.random.default_rng(0)
    for name in ("wte", "h0.mlp.w_fc", "ln_f.g"):
        idx = rng.choice(policy[name].size, 6, replace=False)
        numeric = numerical_gradient(lambda: E.enumerate_all(policy, reference)["kl"], policy[name], idx)
        assert rel_error(true[name].ravel()[idx], numeric) < MODEL_TOL, name  # a whole model


def test_where_the_kl_goes(placements):
    """k1 in the loss: expected gradient 0. k2 and rho k3: each context's reverse-KL gradient, which is not the
    sequence KL's. k3: the per-context forward KL's gradient. k1 in the reward, to-go or per sequence: exact."""
    _, t = placements
    assert t["k1_loss"]["norm_ratio"] < 1e-12
    for name in ("k2_loss", "rho_k3_loss"):
        assert t[name]["to_reverse_per_context"] < 1e-12 and t[name]["to_true_reverse_kl"] > 0.1, (name, t[name])
    assert t["k3_loss"]["to_forward_per_context"] < 1e-12
    assert t["k3_loss"]["to_true_reverse_kl"] > 0.1 and t["k3_loss"]["to_sequence_forward_kl"] > 0.1
    for name in ("k1_reward_to_go", "k1_reward_sequence"):
        assert t[name]["to_true_reverse_kl"] < 1e-12, (name, t[name])


def test_the_per_context_references_are_not_the_sequence_ones(placements):
    """The references differ from each other by more than rounding, so the claims above can fail."""
    g, _ = placements
    names = ("true_reverse_kl", "reverse_per_context", "forward_per_context", "sequence_forward_kl")
    for a, b in itertools.combinations(names, 2):
        assert X.rel(g[a], g[b]) > 0.05, (a, b)


def brute_force_gradient(world, reward, method, G):
    """E[sum_i c_i A_i grad log pi(y_i)] summing over all S^G ordered groups of responses."""
    adv_kind, agg = X.GROUP_METHODS[method]
    S, H = world["mask"].shape
    W = np.zeros(S)
    for group in itertools.product(range(S), repeat=G):
        g = np.array(group)
        prob = np.prod(world["p"][g])
        A = X.ADVANTAGE[adv_kind](reward[g][None, :])[0]
        c = go.token_weights(world["mask"][g], agg, max_len=H)[:, 0]
        np.add.at(W, g, prob * c * A)
    return E.flat(E.backprop(W[:, None] * world["mask"], world["caches"]))


@pytest.mark.parametrize("method", ["grpo", "dapo", "rloo"])
def test_the_multiset_expectation_equals_enumerating_every_group(method):
    policy, reference = E.models(0)
    world = E.enumerate_all(policy, reference, reward=X.answer_reward, kl_coef=0.0)
    R = world["scores"]
    a, b = X.method_gradient(world, R, method, 2), brute_force_gradient(world, R, method, 2)
    assert X.rel(a, b) < 16 * np.finfo(float).eps * len(R) ** 2  # two orders of summing S^2 terms


@pytest.mark.parametrize("G", [2, 4])
def test_aggregator_biases(G):
    """Dr. GRPO's and RLOO's expected updates point along the true gradient of E[R] (RLOO's is it); GRPO's
    1/L_i turns it: wrong answers lengthen where the true gradient shortens them; the token mean is between."""
    rows = X.aggregator_table(G)["rows"]
    for name in ("dr_grpo", "rloo"):
        assert rows[name]["rescaled_bias"] < 1e-12, (name, rows[name])
    assert rows["rloo"]["scale"] == pytest.approx(1, rel=1e-12)
    assert rows["dr_grpo"]["scale"] == pytest.approx((1 - 1 / G) / E.H, rel=1e-12)
    assert rows["grpo"]["rescaled_bias"] > 0.1 and rows["grpo"]["cosine"] < 0.95
    assert rows["true"]["dE[L|wrong]"] < 0 < rows["grpo"]["dE[L|wrong]"]  # the length bias, as a sign
    assert rows["grpo"]["cosine"] < rows["dapo"]["cosine"] < 1 - 1e-6


def test_the_std_normalisation_weights_tasks_by_difficulty():
    """With binary rewards, G = 2 is a sign (every task scaled by sqrt 2); at G = 4 rare and common tasks get
    more weight than balanced ones, and the summed update leaves the summed gradient's direction."""
    two, four = X.difficulty_table(2), X.difficulty_table(4)
    assert all(r["std_scale"] == pytest.approx(np.sqrt(2) / (1 + 1e-4 * np.sqrt(2)), rel=1e-9)
               for r in two["tasks"].values())
    scale = {name: r["std_scale"] for name, r in four["tasks"].items()}
    p = {name: r["p"] for name, r in four["tasks"].items()}
    rare, balanced = min(p, key=p.get), min(p, key=lambda n: abs(p[n] - 0.5))
    assert scale[rare] > scale[balanced]
    assert four["cosine_of_summed_update"]["dr_grpo"] == pytest.approx(1, abs=1e-12)
    assert four["cosine_of_summed_update"]["grpo_constant_norm"] < 1 - 1e-6


def test_main_prints_the_tables(capsys):
    X.main(["--groups", "2"])
    out = capsys.readouterr().out
    assert "k1_reward_to_go" in out and "dE[L|wrong]" in out and "difficulty" in out
