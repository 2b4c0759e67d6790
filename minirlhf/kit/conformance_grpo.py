"""The conformance kit, part 3: the critic-free methods of grpo_objective.py. The group advantages (GRPO,
Dr. GRPO, RLOO) and REINFORCE++'s, DAPO's two filters, and the token, sequence and REINFORCE losses
(conformance_aggregate.py has the aggregators and the KL as a loss term). The calling convention, the
padding rules and what a failure says: conformance.py.

Every value is checked against an independent formula (oracles.py's loops for the advantages); the zeros the
conventions promise (a flat group, a group of one, padding) are tested for equality, not within a tolerance;
the tolerances elsewhere derive from float64's rounding unit and the size of the computation, stated at each
check (gradcheck.rounding_tol). Inputs avoid the ill-conditioned cases where two correct implementations
could differ by more than rounding: a group's rewards are exactly equal or spread by at least 1e-3, ratios
keep 0.04 from every clip bound.
"""
import numpy as np
from hypothesis import strategies as st

from .conformance import compare, hold, named
from .gradcheck import OP_TOL, rounding_tol, vjp_errors
from .oracles import naive_group_advantages, naive_reinforce_pp
from .reference_grpo import grouped_rewards
from .strategies import SEEDS

RATIOS = (0.5, 0.76, 0.9, 1.1, 1.24, 1.6)  # off the bounds 0.72, 0.8, 1.2, 1.28 by 0.04 (h = 1e-3 moves 0.004)
EPS = (0.2, 0.28)  # eps_low, eps_high: 0.76 and 1.24 lie between the two bounds of their side


@st.composite
def group_rewards(draw, min_size=1):
    """((P, G) rewards in [-10, 10], a seed): half of them multiples of 1/4 (ties), some rows exactly flat
    (0.1 and 0.7, whose means round, or 1234.567), and rows spread by less than 1e-3 made flat too:
    (r - mean) / std of nearly equal numbers is decided by rounding, so that two correct implementations
    could differ in its first digit."""
    P, G, seed = draw(st.integers(1, 3)), draw(st.integers(min_size, 5)), draw(SEEDS)
    r = np.random.default_rng(seed)
    rewards = np.where(r.random((P, G)) < 0.5, r.integers(-40, 41, (P, G)) / 4, r.uniform(-10, 10, (P, G)))
    flat = (r.random(P) < 0.3) | (rewards.max(1) - rewards.min(1) < 1e-3)
    rewards[flat] = draw(st.sampled_from([0.1, 0.7, 1234.567, -3.0]))
    return rewards, seed


def _call(forward, **inputs):
    """forward(**inputs); an exception on these valid inputs (groups of unequal sizes, ids in no order) is a
    failure of the check, not of the kit."""
    try:
        return forward(**inputs)
    except (ValueError, RuntimeError, IndexError, TypeError) as e:
        raise AssertionError(f"the port raised {type(e).__name__} ({e}) on groups given as (B,) ids of sizes 7, "
                             f"3, 2, 4 (and 1) in no order [group_ids]") from None


def _advantage_tol(rewards, groups, expected, kind, kw):
    """(r - mean) rounds by ~G eps max|r|, which A carries divided by the std (+ eps) and times (1 + |A|):
    4 G terms of that size, the worst group's."""
    worst, G = 1.0, 1
    for g in np.unique(groups):
        r, a = rewards[groups == g], expected[groups == g]
        G = max(G, len(r))
        if len(r) > 1 and r.max() > r.min():
            std = r.std(ddof=kw["ddof"]) + kw["eps"] if kind == "grpo" else 1.0
            worst = max(worst, (1 + np.abs(a).max()) * max(1.0, np.abs(r).max()) / std)
    return rounding_tol(4 * G, worst)


def _group_check(name, kind, min_size):
    """check_<name>: the (P, G) form against oracles.naive_group_advantages, the same rewards as (B,) with
    shuffled group ids, exact zeros for flat groups and groups of one, and hard flat groups of 3 and 7."""
    settings = [(1, 1e-4), (0, 1e-4), (1, 1e-6), (1, 0.0)] if kind == "grpo" else [None]

    def check(forward, max_examples=20):
        def prop(args):
            (r, seed), setting = args
            kw = {} if setting is None else {"ddof": setting[0], "eps": setting[1]}
            P, G = r.shape
            ids = np.repeat(np.arange(P), G)
            expected = naive_group_advantages(r.reshape(-1), ids, kind, **kw).reshape(P, G)
            flat = (r.max(1) == r.min(1)) | (G == 1)
            tol = _advantage_tol(r.reshape(-1), ids, expected.reshape(-1), kind, kw)
            inputs = {"rewards": r, "groups": None, **kw}
            got = np.asarray(forward(**inputs), np.float64)
            compare(name, got, expected, tol, f"{kind} advantages of (P, G) rewards{'' if not kw else f', {kw}'} "
                    f"[{'grpo_std' if kind == 'grpo' else 'group_baselines'}]", inputs)
            assert np.all(got[flat] == 0), (f"a group of equal rewards or of one gets A = 0 exactly, got "
                                            f"{got[flat].ravel()[:4]} [flat_group_zero]")
            rng = np.random.default_rng(seed)
            order, labels = rng.permutation(P * G), rng.choice(1000, P, replace=False) - 500
            shuffled = {"rewards": r.reshape(-1)[order], "groups": labels[ids][order], **kw}
            compare(name, forward(**shuffled), expected.reshape(-1)[order], tol, "the same rewards as (B,) with "
                    "group ids in no order [group_ids]", shuffled)
        hold(st.tuples(group_rewards(min_size), st.sampled_from(settings)), prop, max_examples)
        fixed = np.array([[0.5, -1.0, 2.0, 0.25], [1.5, 0.0, -0.5, 3.0], [-2.0, 1.0, 0.75, 0.0]])  # (P, G)
        order = np.array([5, 0, 9, 2, 11, 7, 1, 4, 10, 3, 8, 6])
        rewards, groups = grouped_rewards(np.random.default_rng(0), singleton=min_size == 1)
        cases = [(fixed.reshape(-1), np.repeat([0, 1, 2], 4), None, "(3, 4) rewards, row i group i [group_ids]"),
                 (fixed.reshape(-1)[order], np.repeat([4, 9, 2], 4)[order], "ids", "(3, 4) rewards with ids in no "
                  "order [group_ids]")] + [(rewards, groups, "ids", "groups of 7 and 3 equal rewards whose means "
                                            "round, of 2 and of 1 [flat_group_zero]")] * len(settings)
        for (r, g, form, what), setting in zip(cases, settings[:1] * 2 + settings):
            kw = {} if setting is None else {"ddof": setting[0], "eps": setting[1]}
            inputs = {"rewards": r.reshape(3, 4) if form is None else r, "groups": None if form is None else g, **kw}
            got, expected = np.asarray(_call(forward, **inputs), np.float64), naive_group_advantages(r, g, kind, **kw)
            compare(name, got, expected.reshape(got.shape), _advantage_tol(r, g, expected, kind, kw),
                    f"{kind} advantages of {what}{'' if not kw else f', {kw}'}", inputs)
            assert np.all(got.reshape(-1)[expected == 0] == 0), "a flat group and a group of one give 0 exactly " \
                                                                "[flat_group_zero]"
        return {}
    check.__doc__ = f"{kind} advantages: (P, G) or (B,) with group ids; exactly 0 for flat groups (and of one)."
    return named(name)(check)


check_grpo_advantages = _group_check("grpo_advantages", "grpo", 1)
check_dr_grpo_advantages = _group_check("dr_grpo_advantages", "dr_grpo", 1)
check_rloo_advantages = _group_check("rloo_advantages", "rloo", 2)


def _reinforce_pp_check(name, baseline):
    def check(forward, max_examples=20):
        def prop(args):
            P, G, T, seed = args
            r = np.random.default_rng(seed)
            mask = (np.arange(T)[None] < r.integers(1, T + 1, (P * G, 1))).astype(np.int64)
            logp, logp_ref = (np.where(mask > 0, r.uniform(-5, 0, mask.shape), np.nan) for _ in range(2))
            scores = r.choice([-1.0, 0.0, 1.0, 2.5], P * G) if r.random() < 0.5 else r.uniform(-3, 3, P * G)
            order, labels = r.permutation(P * G), r.choice(100, P, replace=False)
            groups = labels[np.repeat(np.arange(P), G)]
            inputs = {"scores": scores[order], "logp": logp[order], "logp_ref": logp_ref[order], "mask": mask[order],
                      "kl_coef": float(r.choice([0.0, 0.1, 0.5])), "groups": groups[order], "baseline": baseline}
            expected, to_go = naive_reinforce_pp(**inputs)
            v = to_go[inputs["mask"] > 0]
            # as check_whiten: sums of up to 2 N + T terms of size max|to_go|, divided by sqrt(var + 1e-8)
            tol = rounding_tol(2 * mask.size + T, 1 + np.abs(v).max() / np.sqrt(v.var() + 1e-8))
            compare(name, forward(**inputs), expected, tol, f"REINFORCE++{'-baseline' if baseline else ''} advantages: "
                    f"k1 in the reward, the score on EOS, the reward-to-go, whitened [reinforce_pp]", inputs)
        return hold(st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5), SEEDS), prop, max_examples)
    check.__doc__ = "REINFORCE++ advantages (B, T) against oracles.naive_reinforce_pp, rows in no group order."
    return named(name)(check)


check_reinforce_pp_advantages = _reinforce_pp_check("reinforce_pp_advantages", False)
check_reinforce_pp_baseline = _reinforce_pp_check("reinforce_pp_baseline", True)


@named("dynamic_sampling_keep")
def check_dynamic_sampling_keep(forward, max_examples=20):
    """True exactly for the rows of groups whose rewards are not all equal (a group of one: False), both forms;
    a flat group whose mean rounds (np.std of it is 1.4e-17) is dropped."""
    def prop(args):
        r, seed = args
        P, G = r.shape
        expected = np.repeat((r.max(1) != r.min(1))[:, None], G, 1)
        compare("dynamic_sampling_keep", forward(rewards=r, groups=None), expected, 0.0,
                "the rows kept: groups whose rewards are not all equal [dynamic_sampling]", {"rewards": r,
                                                                                            "groups": None})
        order = np.random.default_rng(seed).permutation(P * G)
        ids = np.repeat(np.arange(P), G)[order] * 3 + 1
        compare("dynamic_sampling_keep", forward(rewards=r.reshape(-1)[order], groups=ids),
                expected.reshape(-1)[order], 0.0, "the same with group ids in no order [group_ids]",
                {"rewards": r.reshape(-1)[order], "groups": ids})
    return hold(group_rewards(), prop, max_examples)


@named("overlong_penalty")
def check_overlong_penalty(forward, max_examples=30):
    """0 up to L_max - L_cache, then (L_max - L_cache - L) / L_cache, -1 at L_max and beyond."""
    def prop(args):
        max_len, cache, seed = args
        cache = min(cache, max_len)
        lengths = np.random.default_rng(seed).integers(0, max_len + 4, 8)
        inputs = {"lengths": lengths, "max_len": max_len, "cache_len": cache}
        compare("overlong_penalty", forward(**inputs), np.clip((max_len - cache - lengths) / cache, -1, 0),
                rounding_tol(2), f"the soft overlong penalty, L_max {max_len}, L_cache {cache} [overlong_penalty]",
                inputs)
    return hold(st.tuples(st.integers(2, 64), st.integers(1, 16), SEEDS), prop, max_examples)


# ---------------------------------------------------------------- the policy losses

def _token_batch(r, T=5, B=4):
    """(mask, logp, log-ratio, advantages): ratios from RATIOS, finite garbage at padding."""
    mask = (np.arange(T)[None] < r.integers(1, T + 1, (B, 1))).astype(np.int64)
    log_ratio = np.where(mask > 0, np.log(r.choice(RATIOS, mask.shape)), 0)
    adv = np.where(mask > 0, r.choice([-1, 1], mask.shape) * r.uniform(0.3, 1.5, mask.shape), 5.0)
    return mask, np.where(mask > 0, r.uniform(-3, -0.5, mask.shape), 0.7), log_ratio, adv


@named("token_loss")
def check_token_loss(forward, vjp=None, max_examples=30):
    """l = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)) per token, 0 at padding, with eps 0.2 / 0.28
    and ratios between the two bounds of each side; -A at ratio 1 with gradient -A; gradient -A rho where
    unclipped and 0 where clipped; no clamp of a log-ratio of +-21."""
    def prop(seed):
        mask, logp, log_ratio, adv = _token_batch(np.random.default_rng(seed))
        v, rho = mask > 0, np.exp(log_ratio)
        inputs = {"logp": logp, "logp_old": logp - log_ratio, "advantages": adv, "mask": mask,
                  "eps_low": EPS[0], "eps_high": EPS[1]}
        unclipped, clipped = -adv * rho, -adv * np.clip(rho, 1 - EPS[0], 1 + EPS[1])
        tol = rounding_tol(4, 1.6 * 1.5)
        compare("token_loss", forward(**inputs), np.where(v, np.maximum(unclipped, clipped), 0), tol,
                "the clipped per-token losses, eps_low 0.2, eps_high 0.28, 0 at padding [token_clip]", inputs)
        if vjp is not None:
            dout = np.random.default_rng(seed + 1).standard_normal(mask.shape)
            grad = np.where(v & (clipped <= unclipped), -adv * rho * dout, 0)
            compare("token_loss", vjp(dout, **inputs)["logp"], grad, tol, "dl/dlogp: -A rho where unclipped, 0 "
                    "where the clip is active [token_clip]")
        on_policy = {**inputs, "logp_old": logp}
        compare("token_loss", forward(**on_policy), np.where(v, -adv, 0), tol, "the loss at ratio 1, -A", on_policy)
    hold(SEEDS, prop, max_examples)
    far = {"logp": np.array([[21.0, -21.0]]), "logp_old": np.zeros((1, 2)), "advantages": np.array([[-1.0, 1.0]]),
           "mask": np.ones((1, 2), np.int64), "eps_low": EPS[0], "eps_high": EPS[1]}
    compare("token_loss", forward(**far), np.array([[np.exp(21.0), -np.exp(-21.0)]]), rounding_tol(2),
            "log-ratios of +-21 on the unclipped branch: no clamp [token_clip]", far)
    mask, logp, log_ratio, adv = _token_batch(np.random.default_rng(17))
    inputs = {"logp": logp, "logp_old": logp - log_ratio, "advantages": adv, "mask": mask, "eps_low": EPS[0],
              "eps_high": EPS[1]}
    return vjp_errors(forward, vjp, inputs, ["logp"], OP_TOL)


def _sequence_batch(r, ratio, targets):
    """(inputs, log s per row): rows of lengths 0..4 whose log-ratios' mean ("mean") or sum ("sum") is one of
    targets, the tokens' own log-ratios spread around it (zero-sum)."""
    mask = (np.arange(4)[None] < r.integers(0, 5, (5, 1))).astype(np.int64)
    lengths = np.maximum(mask.sum(1), 1)
    log_s = np.where(mask.any(1), r.choice(targets, 5), 0)
    noise = np.where(mask > 0, 0.05 * r.standard_normal(mask.shape), 0)
    noise -= mask * noise.sum(1, keepdims=True) / lengths[:, None]
    per_token = (log_s if ratio == "mean" else log_s / lengths)[:, None] + noise
    logp = np.where(mask > 0, r.uniform(-3, -0.5, mask.shape), 0.7)
    adv = r.choice([-1, 1], 5) * r.uniform(0.3, 1.5, 5)
    return {"logp": logp, "logp_old": logp - mask * per_token, "advantages": adv, "mask": mask, "ratio": ratio}, log_s


def _sequence_check(name, ratio):
    gspo = ratio == "mean"
    eps = (3e-4, 4e-4) if gspo else EPS  # GSPO's own clip range, or the token loss's
    targets = (-2e-3, -3.5e-4, -1e-4, 1e-4, 3.5e-4, 2e-3) if gspo else tuple(np.log(RATIOS))

    def check(forward, vjp=None, max_examples=30):
        def prop(seed):
            inputs, log_s = _sequence_batch(np.random.default_rng(seed), ratio, targets)
            inputs.update(eps_low=eps[0], eps_high=eps[1])
            s, adv, has = np.exp(log_s), inputs["advantages"], inputs["mask"].any(1)
            unclipped, clipped = -adv * s, -adv * np.clip(s, 1 - eps[0], 1 + eps[1])
            tol = rounding_tol(8, 1.6 * 1.5)
            compare(name, forward(**inputs), np.where(has, np.maximum(unclipped, clipped), 0), tol,
                    f"the per-row losses of one ratio exp({'mean' if gspo else 'sum'} of the row's log-ratios), eps "
                    f"{eps[0]:g} / {eps[1]:g}, 0 for a row with no valid token [sequence_ratio]", inputs)
            if vjp is not None:
                dout = np.random.default_rng(seed + 1).standard_normal(5)
                scale = 1 / np.maximum(inputs["mask"].sum(1), 1) if gspo else np.ones(5)
                row = np.where(has & (clipped <= unclipped), -adv * s * scale * dout, 0)
                compare(name, vjp(dout, **inputs)["logp"], inputs["mask"] * row[:, None], tol,
                        f"dl_i/dlogp_it: -A s{' / L_i' if gspo else ''} where unclipped, 0 where clipped "
                        f"[sequence_ratio]")
        hold(SEEDS, prop, max_examples)
        inputs, _ = _sequence_batch(np.random.default_rng(18), ratio, (-0.5, -0.05, 0.05, 0.5))
        inputs.update(eps_low=EPS[0], eps_high=EPS[1])  # the gradient off the kinks at eps 0.2 / 0.28
        return vjp_errors(forward, vjp, inputs, ["logp"], OP_TOL)
    check.__doc__ = (f"{'GSPO' if gspo else 'TRL clipped RLOO'}: per-row max(-A s, -A clip(s)) with s = exp of the "
                     f"{'mean' if gspo else 'sum'} of the row's log-ratios; gradient and a row with no valid token.")
    return named(name)(check)


check_sequence_loss = _sequence_check("sequence_loss", "mean")
check_sequence_loss_sum = _sequence_check("sequence_loss_sum", "sum")


@named("reinforce_loss")
def check_reinforce_loss(forward, vjp=None, max_examples=30):
    """-A_i sum_t logp_it over the valid tokens (summed, not averaged), gradient -A_i on every valid token."""
    def prop(seed):
        r = np.random.default_rng(seed)
        mask, logp, _, _ = _token_batch(r)
        adv = r.choice([-1, 1], len(mask)) * r.uniform(0.3, 1.5, len(mask))
        inputs = {"logp": logp, "advantages": adv, "mask": mask}
        tol = rounding_tol(mask.shape[1], 3 * 1.5 * mask.shape[1])
        compare("reinforce_loss", forward(**inputs), -adv * (logp * mask).sum(1), tol,
                "-A_i times the summed log-probs of row i [reinforce_loss]", inputs)
        if vjp is not None:
            compare("reinforce_loss", vjp(np.ones(len(mask)), **inputs)["logp"], -mask * adv[:, None], tol,
                    "the gradient -A_i on row i's valid tokens [reinforce_loss]")
    hold(SEEDS, prop, max_examples)
    mask, logp, _, _ = _token_batch(np.random.default_rng(19))
    inputs = {"logp": logp, "advantages": np.linspace(-1.2, 0.9, len(mask)), "mask": mask}
    return vjp_errors(forward, vjp, inputs, ["logp"], OP_TOL)
