"""The conformance kit, part 2: the RL side. KL and rewards, GAE and whitening, the PPO losses, a rollout's
assembly and a PPO minibatch, the preference losses and DPO's log-probs, the optimiser, the schedule and
the KL controller. The calling convention, the padding rules and what a failure says: conformance.py.

Tolerances are derived from float64's rounding unit (gradcheck.rounding_tol) and the size of the
computation they cover, stated at each check: two correct implementations never differ by more, a wrong
convention always does by far more.
"""
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import expit, log_softmax

from ..reward import NO_EOS_SCORE
from ..tokenizer import EOS
from .conformance import compare, hold, named
from .gradcheck import OP_TOL, MODEL_TOL, rounding_tol, vjp_errors
from .inputs import FIXTURE_MODEL, off_kink_batch
from .oracles import naive_adamw, naive_gae
from .reference import rollout_inputs
from .registry import reference
from .strategies import SEEDS, logit_batches, masked_pairs


# ---------------------------------------------------------------- KL and rewards

@named("kl_estimators")
def check_kl_estimators(forward, max_examples=30):
    """k1 = logp - logp_ref, k2 = k1^2 / 2, k3 = (r - 1) - log r with log r = -k1 (no clamp); k2, k3 >= 0;
    all three 0 at padding and exactly 0 for logp = logp_ref."""
    def prop(args):
        logp, logp_ref, mask = args
        k, v = forward(logp=logp, logp_ref=logp_ref, mask=mask), mask > 0
        k1 = np.where(v, logp - logp_ref, 0)
        tol = rounding_tol(4, np.exp(np.abs(k1).max()))  # k3 holds e^(-k1): its rounding scales with it
        for name, expected in (("k1", k1), ("k2", k1**2 / 2), ("k3", np.expm1(-k1) + k1)):
            compare("kl_estimators", k, {name: expected}, tol, f"{name}, 0 at padding [kl_estimators]",
                    {"logp": logp, "logp_ref": logp_ref, "mask": mask}, key=name)
        assert np.all(k["k2"] >= 0) and np.all(k["k3"] >= -tol), f"k2, k3 >= 0: min k3 {k['k3'].min():.3g}"
        same = forward(logp=logp, logp_ref=logp, mask=mask)
        assert all(np.all(same[n] == 0) for n in ("k1", "k2", "k3")), "the estimators of KL(p || p) must be 0"
    return hold(masked_pairs(-20.0, 0.0), prop, max_examples)


@named("exact_kl")
def check_exact_kl(forward, max_examples=30):
    """sum_v p (log p - log q) of softmax(z / tau) at each valid position, >= 0 up to rounding, 0 for p = q
    and at padding. The bound on the rounding: V terms of size up to max_v |p (log p - log q)|."""
    def prop(args):
        z, tau, seed = args
        r = np.random.default_rng(seed)
        z_ref = z + 3 * r.standard_normal(z.shape)
        mask = r.integers(0, 2, z.shape[:2])
        lp, lq = log_softmax(z / tau, -1), log_softmax(z_ref / tau, -1)
        terms = np.exp(lp) * (lp - lq)  # (B, T, V)
        tol = rounding_tol(z.shape[-1], np.abs(terms).max())
        kl = forward(logits=z, logits_ref=z_ref, temperature=tau, mask=mask)
        compare("exact_kl", kl, mask * terms.sum(-1), 8 * tol, f"exact KL at tau {tau}",
                {"logits": z, "logits_ref": z_ref, "temperature": tau, "mask": mask})
        assert np.all(np.asarray(kl) >= -tol), f"exact KL >= 0 up to rounding ({tol:.2g}): min {np.min(kl):.3g}"
        same = forward(logits=z, logits_ref=z, temperature=tau, mask=mask)
        assert np.all(np.abs(same) <= tol), f"KL(p || p) = 0 up to rounding: max |KL| {np.abs(same).max():.3g}"
    return hold(st.tuples(logit_batches(), st.floats(0.3, 3.0), SEEDS), prop, max_examples)


@named("token_rewards")
def check_token_rewards(forward, max_examples=30):
    """r_t = -kl_coef (logp_t - logp_ref_t) on the valid tokens, plus the score on the last valid one (EOS, not
    one after); 0 at padding; so sum_t r_t = score - kl_coef * sum k1. The KL part and the score's place are
    checked one at a time, so that a failure says which is wrong."""
    def prop(args):
        (logp, logp_ref, mask), seed = args
        r = np.random.default_rng(seed)
        scores, kl_coef = r.standard_normal(len(mask)), float(r.uniform(0.1, 1))
        inputs = {"scores": scores, "logp": logp, "logp_ref": logp_ref, "mask": mask, "kl_coef": kl_coef}
        out = np.asarray(forward(**inputs), np.float64)
        tol = rounding_tol(2, 20 * kl_coef + np.abs(scores).max())
        kl_part = np.where(mask > 0, -kl_coef * (logp - logp_ref), 0)
        last = mask.sum(1) - 1
        no_score = forward(**{**inputs, "scores": np.zeros_like(scores)})
        compare("token_rewards", no_score, kl_part, tol, "the KL part, -kl_coef (logp - logp_ref) on every valid "
                "token and 0 at padding [k1_in_reward]", {**inputs, "scores": np.zeros_like(scores)})
        expected = np.zeros_like(out)
        expected[np.arange(len(mask)), last] = scores
        compare("token_rewards", out, kl_part + expected, tol, "the score on EOS, the last valid token "
                "[score_on_eos]", inputs)
    return hold(st.tuples(masked_pairs(), SEEDS), prop, max_examples)


@named("update_kl_coef")
def check_update_kl_coef(forward, max_examples=30):
    """forward(kl_coef, kl, n_steps, target, horizon, adaptive), arrays of cases: fixed (adaptive 0) returns
    kl_coef; adaptive multiplies it by 1 + e n / horizon with e = clip(kl / target - 1, -0.2, 0.2): up when
    the KL is above target, down below, by at most 0.2 n / horizon."""
    def prop(args):
        coef, kl, target, n, horizon = args
        cases = {"kl_coef": np.array([coef] * 2), "kl": np.array([kl] * 2), "n_steps": np.array([n] * 2),
                 "adaptive": np.array([1, 0]), "target": target, "horizon": horizon}
        e = np.clip(kl / target - 1, -0.2, 0.2)
        expected = np.array([coef * (1 + e * n / horizon), coef])
        compare("update_kl_coef", forward(**cases), expected, rounding_tol(4, coef), "the proportional "
                "controller's new kl_coef (adaptive, then fixed) [kl_controller]", cases)
    return hold(st.tuples(st.floats(1e-3, 5), st.floats(0, 60), st.floats(0.5, 20), st.integers(1, 64),
                          st.integers(400, 20000)), prop, max_examples)


@named("response_mask")
def check_response_mask(forward, max_examples=30):
    """1 up to and including each row's first EOS, 0 after it; a row without EOS is valid to its end."""
    def prop(tokens):
        expected = np.array([[1 if EOS not in row[:t] else 0 for t in range(len(row))] for row in tokens])
        compare("response_mask", forward(tokens=tokens), expected, 0.0,
                "the response mask: EOS in, everything after it out [response_mask]", {"tokens": tokens})
    return hold(hnp.arrays(np.int64, st.tuples(st.integers(1, 4), st.integers(1, 6)), elements=st.integers(0, 6)),
                prop, max_examples)


# ---------------------------------------------------------------- GAE and whitening

@named("gae")
def check_gae(forward, max_examples=30):
    """advantages, returns = A + V against the closed-form sum (a naive loop); gamma = lam = 1 gives the
    reward-to-go minus the value. Sums of up to T terms of size up to 3: rounding_tol(T, 3)."""
    def prop(args):
        (rewards, values, mask), gamma, lam = args
        inputs = {"rewards": rewards, "values": values, "mask": mask, "gamma": gamma, "lam": lam}
        out, tol = forward(**inputs), rounding_tol(2 * mask.shape[1], 3.0)
        A, R = naive_gae(rewards, values, mask, gamma, lam)
        compare("gae", out, {"advantages": A, "returns": R}, tol, f"GAE at gamma {gamma}, lam {lam} [gae]", inputs)
        one = forward(**{**inputs, "gamma": 1.0, "lam": 1.0})["advantages"]
        r, v = np.where(mask > 0, rewards, 0), np.where(mask > 0, values, 0)
        compare("gae", one, np.where(mask > 0, np.cumsum(r[:, ::-1], 1)[:, ::-1] - v, 0), tol,
                "GAE(1, 1) = reward-to-go minus value [gae]")
    return hold(st.tuples(masked_pairs(-3.0, 3.0), st.sampled_from([1.0, 0.9]), st.sampled_from([0.95, 1.0, 0.0])),
                prop, max_examples)


@named("whiten")
def check_whiten(forward, max_examples=30):
    """(x - mean) / sqrt(var + 1e-8) over the valid entries, var biased (divide by N); one valid entry gives 0."""
    def prop(args):
        x, _, mask = args
        xv = x[mask > 0]
        expected = np.where(mask > 0, (x - xv.mean()) / np.sqrt(xv.var() + 1e-8), 0)  # np.var: ddof 0
        scale = 1 + np.abs(xv).max() / np.sqrt(xv.var() + 1e-8)
        compare("whiten", forward(x=x, mask=mask), expected, rounding_tol(2 * xv.size, scale),
                "whitening: the biased variance, eps 1e-8 inside the square root [whiten_biased]",
                {"x": x, "mask": mask})
    hold(masked_pairs(-5.0, 5.0), prop, max_examples)
    one = forward(x=np.array([[2.5, np.nan]]), mask=np.array([[1, 0]]))
    compare("whiten", one, np.zeros((1, 2)), 0.0, "whitening one valid token gives 0, not NaN [whiten_biased]")
    return {}


# ---------------------------------------------------------------- PPO losses

@named("policy_loss")
def check_policy_loss(forward, vjp=None, max_examples=30):
    """The mean over valid tokens of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)); at ratio = 1 it is
    -mean(A) with gradient -A / N; no clamp of the log-ratio; gradient 0 where the clip is active."""
    def prop(seed):
        mask, logp, offset, A = off_kink_batch(seed)
        v, eps, n = mask > 0, 0.2, mask.sum()
        ratio = np.exp(offset)
        expected = np.maximum(-A * ratio, -A * np.clip(ratio, 1 - eps, 1 + eps))[v].sum() / n
        args = {"logp_old": logp - offset, "advantages": A, "mask": mask, "clip_eps": eps}
        tol = rounding_tol(n, 2 * np.exp(np.abs(offset).max()))
        compare("policy_loss", forward(logp=logp, **args), expected, tol, "the clipped policy loss [ppo_clip]",
                {"logp": logp, **args})
        args["logp_old"] = logp
        compare("policy_loss", forward(logp=logp, **args), -A[v].sum() / n, tol, "the policy loss at ratio 1")
        if vjp is not None:
            compare("policy_loss", vjp(1.0, logp=logp, **args)["logp"], np.where(v, -A / n, 0), tol,
                    "the gradient at ratio 1, -A / N on valid tokens")
    hold(SEEDS, prop, max_examples)
    mask = np.array([[1, 1]])
    far = {"logp": np.array([[21.0, 0.0]]), "logp_old": np.zeros((1, 2)), "advantages": np.array([[-1.0, 1.0]]),
           "mask": mask, "clip_eps": 0.2}  # a log-ratio of 21 on the unclipped branch: nothing clamps it
    compare("policy_loss", forward(**far), (np.exp(21.0) - 1.2) / 2, rounding_tol(2, np.exp(21.0)),
            "the loss at a log-ratio of 21: no clamp of the log-ratio [ppo_clip]", far)
    mask, logp, offset, A = off_kink_batch(11)
    inputs = {"logp": logp, "logp_old": logp - offset, "advantages": A, "mask": mask, "clip_eps": 0.2}
    return vjp_errors(forward, vjp, inputs, ["logp"], OP_TOL)


@named("value_loss")
def check_value_loss(forward, vjp=None, max_examples=30):
    """vf_coef * 0.5 * mean max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2) over valid tokens."""
    def prop(seed):
        mask, v, offset, R = off_kink_batch(seed)
        valid, eps, coef = mask > 0, 0.2, 0.1
        v_old = v - offset
        clipped = (np.clip(v, v_old - eps, v_old + eps) - R) ** 2
        expected = coef * 0.5 * np.maximum((v - R) ** 2, clipped)[valid].mean()
        args = {"returns": R, "mask": mask, "clip_eps": eps, "vf_coef": coef}
        tol = rounding_tol(valid.sum(), 20.0)
        compare("value_loss", forward(values=v, values_old=v_old, **args), expected, tol,
                "the clipped value loss [value_clip]", {"values": v, "values_old": v_old, **args})
        inside = coef * 0.5 * ((v - R) ** 2)[valid].mean()
        compare("value_loss", forward(values=v, values_old=v - offset / 10, **args), inside, tol,
                "the value loss inside the clip range")
    hold(SEEDS, prop, max_examples)
    mask, v, offset, R = off_kink_batch(12)
    inputs = {"values": v, "values_old": v - offset, "returns": R, "mask": mask, "clip_eps": 0.2, "vf_coef": 0.1}
    return vjp_errors(forward, vjp, inputs, ["values"], OP_TOL)


@named("rollout")
def check_rollout(assemble, logprobs=None, model_cfg=FIXTURE_MODEL):
    """A port's rollout assembly, plugged in: assemble(policy, reference, reward, value, prompts, prompt_mask,
    tokens, kl_coef, temperature, gain, bias) -> {mask, logp_old, logp_ref, values, scores, rewards,
    advantages (whitened), returns}, every array 0 at padding (registry's rollout fixture: reference.py says
    the layout). Checked against minirlhf's assembly of the same sampled tokens (left-padded prompts, a
    response ending in EOS, one without EOS, one that is EOS alone), output by output, so that a failure
    names the convention: the response mask, the temperature of both log-probs, the positions, the fixed
    score of a response without EOS, the score on EOS, GAE and whitening.
    logprobs(policy, seq, seq_mask, tokens, P, temperature) -> (B, N), optional: the log-probs the port's
    loss computes on the first minibatch; they must equal logp_old exactly, so that the ratio of the first
    step is exactly 1."""
    inputs = rollout_inputs(np.random.default_rng(0), None)
    got, expected = assemble(**inputs), reference("rollout", model_cfg)[0](**inputs)
    tol = 1e-10
    for key, what in (("mask", "the response mask: EOS in, after it out [response_mask]"),
                      ("logp_old", "the old policy's log-probs at the policy's temperature, at positions P - 1 + t "
                                   "[temperature, response_positions]"),
                      ("logp_ref", "the reference's log-probs at the policy's temperature [temperature]"),
                      ("values", "the old values at positions P - 1 + t [response_positions]"),
                      ("scores", f"the scores: the reward model's at EOS, normalised; {NO_EOS_SCORE} for a response "
                                 f"without EOS [no_eos_score]"),
                      ("rewards", "the token rewards: -kl_coef k1 on every token, the score on EOS [score_on_eos]"),
                      ("returns", "GAE's returns [gae]"), ("advantages", "the whitened advantages [whiten_biased]")):
        compare("rollout", got, expected, tol, what, inputs, model_cfg, key=key)
    if logprobs is not None:
        P = inputs["prompts"].shape[1]
        seq = np.concatenate([inputs["prompts"], inputs["tokens"]], 1)
        seq_mask = np.concatenate([inputs["prompt_mask"], np.asarray(got["mask"])], 1)
        again = np.asarray(logprobs(inputs["policy"], seq, seq_mask, inputs["tokens"], P, inputs["temperature"]))
        ratio = np.exp(np.where(np.asarray(got["mask"]) > 0, again - np.asarray(got["logp_old"]), 0))
        assert np.all(ratio == 1.0), (f"the first step's ratio is not exactly 1 (max |ratio - 1| "
                                      f"{np.abs(ratio - 1).max():.3g}): compute logp_old with the loss's own "
                                      f"function on the first epoch's very arrays")
    return {}


@named("ppo_minibatch")
def check_ppo_minibatch(forward, vjp=None, model_cfg=FIXTURE_MODEL):
    """Both PPO losses of a minibatch through the port's policy and value model (the golden fixture's
    inputs: tau 0.9, left padding, a response ending early), against minirlhf's; a mismatch is named by the
    known mistakes it matches (temperature left out, positions off by one, the ratio against the current
    log-probs). Given vjp, both networks' gradients of the sum of the losses too."""
    from .fixtures import GOLDEN, load
    import os
    inputs = load(os.path.join(GOLDEN, "ppo_minibatch.npz"))[0]
    ref_fwd, ref_vjp = reference("ppo_minibatch", model_cfg)
    got = forward(**inputs)
    compare("ppo_minibatch", got, ref_fwd(**inputs), 1e-10, "the PPO minibatch's losses", inputs, model_cfg)
    if vjp is not None:
        theirs, ours = vjp(None, **inputs), ref_vjp(None, **inputs)
        for net in ("policy", "value"):
            compare("ppo_minibatch", theirs[net], ours[net], MODEL_TOL, f"the {net} network's gradients")
    return {}


# ---------------------------------------------------------------- preference losses

@named("bt_loss")
def check_bt_loss(forward, vjp=None, max_examples=30):
    """mean softplus(-(r_chosen - r_rejected - margin)) + c mean (r_chosen + r_rejected)^2, finite and right
    in the far tails (|d| up to 50); dL/dr_chosen = (sigmoid(d) - 1) / n + 2 c total / n; a shared shift of
    the scores changes nothing when c = 0."""
    def prop(args):
        c, r, shift, margin, center = args
        d, total = c - r - margin, c + r
        inputs = {"r_chosen": c, "r_rejected": r, "margin": margin, "center_coef": center}
        expected = np.logaddexp(0, -d).mean() + center * (total ** 2).mean()
        tol = rounding_tol(2 * d.size, np.abs(d).max() + center * (total ** 2).max())
        compare("bt_loss", forward(**inputs), expected, tol, "the Bradley-Terry loss with a margin subtracted and "
                "centering [bt_loss]", inputs)
        plain = {"r_chosen": c + shift, "r_rejected": r + shift, "margin": margin, "center_coef": 0.0}
        compare("bt_loss", forward(**plain), np.logaddexp(0, -d).mean(), rounding_tol(8, abs(shift) + 50),
                "a shift shared by both scores changes nothing")
        if vjp is not None:
            g = vjp(1.0, **inputs)
            compare("bt_loss", g["r_chosen"], (expit(d) - 1 + 2 * center * total) / d.size, tol, "dL/dr_chosen")
            compare("bt_loss", g["r_rejected"], (1 - expit(d) + 2 * center * total) / d.size, tol, "dL/dr_rejected")
    scores = hnp.arrays(np.float64, 4, elements=st.floats(-25, 25))
    hold(st.tuples(scores, scores, st.floats(-100, 100), st.floats(0, 2), st.sampled_from([0.0, 0.05])), prop,
         max_examples)
    r = np.random.default_rng(13)
    inputs = {"r_chosen": r.standard_normal(5) + 0.1, "r_rejected": r.standard_normal(5) - 0.1, "margin": 0.5,
              "center_coef": 0.05}
    return vjp_errors(forward, vjp, inputs, ["r_chosen", "r_rejected"], OP_TOL)


@named("ranking_loss")
def check_ranking_loss(forward, vjp=None, max_examples=30):
    """K-way: per prompt the mean over its valid pairs i < j (column 0 best) of softplus(-(r_i - r_j - margin))
    + c (r_i + r_j)^2, then the mean over prompts with a pair."""
    def prop(args):
        seed, margin, center = args
        r = np.random.default_rng(seed)
        rewards, valid = r.standard_normal((3, 4)) * 3, r.random((3, 4)) < 0.8
        valid[0] = True
        rows = [[np.logaddexp(0, -(x[i] - x[j] - margin)) + center * (x[i] + x[j]) ** 2 for i in range(4)
                 for j in range(i + 1, 4) if ok[i] and ok[j]] for x, ok in zip(rewards, valid)]
        expected = np.mean([np.mean(row) for row in rows if row])
        inputs = {"rewards": rewards, "valid": valid, "margin": margin, "center_coef": center}
        compare("ranking_loss", forward(**inputs), expected, rounding_tol(12, 40.0), "the K-way ranking loss "
                "[k_way]", inputs)
    hold(st.tuples(SEEDS, st.floats(0, 1), st.sampled_from([0.0, 0.02])), prop, max_examples)
    r = np.random.default_rng(14)
    valid = np.ones((3, 4), bool)
    valid[1, 2], valid[2, 1:] = False, False  # an unscored response; a row with no pair
    inputs = {"rewards": r.standard_normal((3, 4)) + 0.1, "valid": valid, "margin": 0.3, "center_coef": 0.02}
    return vjp_errors(forward, vjp, inputs, ["rewards"], OP_TOL)


@named("sequence_logprob")
def check_sequence_logprob(forward, vjp=None, max_examples=20):
    """log pi(y) = sum_t mask_t log softmax(z_t / tau)[y_t]: summed, not averaged, over the mask."""
    def prop(args):
        z, tau, seed = args
        r = np.random.default_rng(seed)
        y, mask = r.integers(0, z.shape[-1], z.shape[:2]), r.integers(0, 2, z.shape[:2])
        mask[~mask.any(1), -1] = 1  # a response has at least its EOS (an empty row is refused)
        lp = np.take_along_axis(log_softmax(z / tau, -1), y[..., None], -1)[..., 0]
        inputs = {"logits": z, "targets": y, "mask": mask, "temperature": tau}
        compare("sequence_logprob", forward(**inputs), (lp * mask).sum(1),
                rounding_tol(z.shape[1] * z.shape[2], np.abs(z).max() / tau), "the sequence log-prob, a sum over "
                "the response mask at the temperature [dpo]", inputs)
    hold(st.tuples(logit_batches(), st.floats(0.3, 3.0), SEEDS), prop, max_examples)
    r = np.random.default_rng(16)
    inputs = {"logits": r.standard_normal((2, 4, 5)) + 0.1, "targets": r.integers(0, 5, (2, 4)),
              "mask": np.array([[0, 1, 1, 1], [0, 0, 1, 0]]), "temperature": 0.8}
    return vjp_errors(forward, vjp, inputs, ["logits"], OP_TOL)


PAIRS = ("logp_chosen", "logp_rejected", "ref_chosen", "ref_rejected")


def _preference_check(name, loss, grad):
    def check(forward, vjp=None, max_examples=30):
        def prop(args):
            seed, beta = args
            r = np.random.default_rng(seed)
            x = dict(zip(PAIRS, -5 * r.random((4, 3))))
            h = (x["logp_chosen"] - x["ref_chosen"]) - (x["logp_rejected"] - x["ref_rejected"])
            inputs = {**x, "beta": beta}
            tol = rounding_tol(8, 10 * max(beta, 1 / beta))
            compare(name, forward(**inputs), loss(h, beta), tol, f"the {name} at beta {beta:.3g} [dpo]", inputs)
            if vjp is not None:
                compare(name, vjp(1.0, **inputs)["logp_chosen"], grad(h, beta) / 3, tol, f"d{name}/dlogp_chosen")
        hold(st.tuples(SEEDS, st.floats(0.05, 1.0)), prop, max_examples)
        r = np.random.default_rng(15)
        inputs = {**dict(zip(PAIRS, -3 * r.random((4, 3)) - 0.1)), "beta": 0.5}
        return vjp_errors(forward, vjp, inputs, list(PAIRS), OP_TOL)
    return named(name)(check)


check_dpo_loss = _preference_check("dpo_loss", lambda h, b: np.logaddexp(0, -b * h).mean(),
                                   lambda h, b: -b * expit(-b * h))
check_dpo_loss.__doc__ = ("u = beta ((logp_w - ref_w) - (logp_l - ref_l)), L = mean softplus(-u), "
                          "dL/dlogp_w = -beta sigmoid(-u) / B.")
check_ipo_loss = _preference_check("ipo_loss", lambda h, b: ((h - 1 / (2 * b)) ** 2).mean(),
                                   lambda h, b: 2 * (h - 1 / (2 * b)))
check_ipo_loss.__doc__ = "L = mean (h - 1 / (2 beta))^2 (Azar et al.), dL/dlogp_w = 2 (h - 1 / (2 beta)) / B."


# ---------------------------------------------------------------- optimiser and schedule

@named("adamw")
def check_adamw(forward, max_examples=10):
    """forward(params, grads, lr, weight_decay, max_grad_norm) -> params after len(grads[k]) AdamW steps from
    a zero state. Gradients near eps (1e-9) tell eps placement apart: here the first step is
    lr g / (|g| + eps), about 0.09 lr; with eps inside the root it would be about 1e-5 lr."""
    def prop(seed):
        r = np.random.default_rng(seed)
        params = {"w": r.standard_normal((3, 4)), "b": r.standard_normal(4)}
        scales = np.array([1e-9, 1e-3, 3.0])[:, None, None]  # tiny steps, plain steps, a clipped step
        grads = {"w": scales * r.standard_normal((3, 3, 4)), "b": scales[:, 0] * r.standard_normal((3, 4))}
        args = {"lr": 0.01, "weight_decay": 0.1, "max_grad_norm": 1.0}
        out, expected = forward(params=params, grads=grads, **args), naive_adamw(params, grads, **args)
        inputs = {"params": params, "grads": grads, **args}
        for k in params:
            compare("adamw", out, expected, 1e-12, f"AdamW's {k} after 3 steps (eps outside the square root, decay "
                    f"on ndim >= 2, torch's clip) [adamw_eps_outside]", inputs, key=k)
    return hold(SEEDS, prop, max_examples)


@named("lr_schedule")
def check_lr_schedule(forward, max_examples=20):
    """forward(steps, total_steps, peak_lr, warmup_steps) -> the learning rate at each 0-based step: warm-up
    peak (s + 1) / W, then linear decay to 0 at total_steps, peak (total - s) / (total - W)."""
    def prop(args):
        total, warmup = args
        warmup = min(warmup, total - 1)
        s = np.arange(total)
        expected = np.where(s < warmup, 0.01 * (s + 1) / max(warmup, 1), 0.01 * (total - s) / (total - warmup))
        inputs = {"steps": s, "total_steps": total, "peak_lr": 0.01, "warmup_steps": warmup}
        compare("lr_schedule", forward(**inputs), expected, rounding_tol(4, 0.01), "the learning rate: warm-up "
                "peak (s + 1) / W, then linear decay [lr_warmup]", inputs)
    return hold(st.tuples(st.integers(2, 40), st.integers(0, 10)), prop, max_examples)
