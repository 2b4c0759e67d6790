"""The porting mistakes the kit can name: for a function, what minirlhf's output would be if it made the
mistake. When a port disagrees with minirlhf (a golden fixture, or a check's reference value), the kit
computes each known mistake on the same inputs and says which one the port's output matches, with the
convention it breaks. Each is a mistake seen in public RLHF code (TRL, OpenRLHF, trlx, DeepSpeed-Chat
issues and the "N implementation details of RLHF" write-ups) or a classic of ports: a convention that
another library chose differently, a missing factor, a sign, an off-by-one.

MISTAKES[name] is a list of (description, convention id, fn(**inputs) -> output in the kit's convention).
`diagnose(name, inputs, output, correct=...)` returns the descriptions whose output matches, leaving out any
mistake that gives minirlhf's own output on these inputs (it cannot be what is wrong).
"""
import numpy as np
from scipy.special import erf

from .. import dpo, kl, ppo, ppo_objective as po, reward
from .. import layers as L
from .. import transformer as tf
from ..reward import NO_EOS_SCORE, RewardModel, normalised, sequence_scores
from ..tokenizer import EOS, last_real_index, response_mask
from .gradcheck import worst
from .mistakes_grpo import MISTAKES_GRPO, MODEL_BASED as MODEL_BASED_GRPO


def _k(logp, logp_ref, mask):
    return kl.kl_estimators(logp, logp_ref, mask)


def _rewards_with(term):
    """token_rewards with the KL term of each token replaced by term(k) (k: the estimators dict)."""
    def fn(scores, logp, logp_ref, mask, kl_coef):
        r = np.where(mask > 0, -kl_coef * term(_k(logp, logp_ref, mask)), 0.0)
        r[np.arange(len(r)), mask.sum(1) - 1] += scores
        return r
    return fn


def _score_after_eos(scores, logp, logp_ref, mask, kl_coef):
    r = np.where(mask > 0, -kl_coef * (logp - logp_ref), 0.0)
    last = mask.sum(1)
    inside = last < mask.shape[1]
    r[np.arange(len(r))[inside], last[inside]] += scores[inside]
    return r


def _whiten_with(var_fn):
    def fn(x, mask):
        v = x[mask > 0]
        return np.where(mask > 0, (x - v.mean()) / var_fn(v), 0.0)
    return fn


def _gae_dict(**kw):
    return dict(zip(("advantages", "returns"), po.gae(**kw)))


def _policy_loss_mean_over_all(logp, logp_old, advantages, mask, clip_eps):
    v = mask > 0
    ratio = np.exp(np.where(v, logp - logp_old, 0))
    a = np.where(v, advantages, 0)
    return np.maximum(-a * ratio, -a * np.clip(ratio, 1 - clip_eps, 1 + clip_eps)).sum() / mask.size


def _policy_loss_min(logp, logp_old, advantages, mask, clip_eps):
    v = mask > 0
    ratio = np.exp(np.where(v, logp - logp_old, 0))
    a = np.where(v, advantages, 0)
    return np.minimum(-a * ratio, -a * np.clip(ratio, 1 - clip_eps, 1 + clip_eps))[v].sum() / v.sum()


def _policy_loss_clamped(logp, logp_old, advantages, mask, clip_eps):  # OpenRLHF's log-ratio clamp at +-20
    return po.policy_loss_forward(np.clip(logp - logp_old, -20, 20) + logp_old, logp_old, advantages, mask,
                                  clip_eps)[0]


def _seq_logprob_mean(logits, targets, mask, temperature):
    return dpo.sequence_logprob_forward(logits, targets, mask, temperature)[0] / np.maximum(mask.sum(1), 1)


def _ppo_minibatch_variant(kind):
    """The PPO minibatch losses with one mistake: "tau" (logits not divided by tau), "shift" (the logits of
    positions P .. P + N - 1 instead of P - 1 .. P + N - 2), "current" (the ratio against the current
    log-probs, so every ratio is 1)."""
    def fn(model_cfg, policy, value, seq, seq_mask, P, tokens, mask, logp_old, values_old, advantages, returns,
           temperature, clip_eps, vf_clip_eps, vf_coef):
        logits, N = tf.forward(policy, model_cfg, seq, seq_mask)[0], tokens.shape[1]
        part = logits[:, P:P + N] if kind == "shift" else ppo.response_part(logits, P, N)
        if part.shape[1] < N:  # the shifted slice runs past the end: the last token has no logits
            part = np.concatenate([part, np.zeros((len(part), N - part.shape[1], part.shape[2]))], 1)
        logp = L.token_logprobs_forward(part, tokens, 1.0 if kind == "tau" else temperature)[0]
        values = ppo.response_part(ppo.value_forward(value, model_cfg, seq, seq_mask)[0], P, N)
        return {"loss_policy": np.asarray(po.policy_loss_forward(logp, logp if kind == "current" else logp_old,
                                                                 advantages, mask, clip_eps)[0]),
                "loss_value": np.asarray(po.value_loss_forward(values, values_old, returns, mask, vf_clip_eps,
                                                               vf_coef)[0])}
    return fn


def _rollout_variant(kind):
    """The assembled rollout with one mistake: "ref_tau1" (the reference scored at tau = 1), "eos_out" (EOS
    left out of the response mask), "no_eos_scored" (a response without EOS scored at its last token by the
    reward model instead of NO_EOS_SCORE), "score_after" (the score one position after EOS)."""
    def fn(model_cfg, policy, reference, reward, value, prompts, prompt_mask, tokens, kl_coef, temperature, gain,
           bias):
        P, N = prompts.shape[1], tokens.shape[1]
        mask = response_mask(tokens) * ((tokens != EOS) if kind == "eos_out" else 1)
        seq, seq_mask = np.concatenate([prompts, tokens], 1), np.concatenate([prompt_mask, mask], 1)

        def logp(params, tau):
            logits = ppo.response_part(tf.forward(params, model_cfg, seq, seq_mask)[0], P, N)
            return L.token_logprobs_forward(logits, tokens, tau)[0] * mask
        logp_old, logp_ref = logp(policy, temperature), logp(reference, 1.0 if kind == "ref_tau1" else temperature)
        values = ppo.response_part(ppo.value_forward(value, model_cfg, seq, seq_mask)[0], P, N) * mask
        rm, ended = RewardModel(reward, model_cfg, gain, bias), (tokens == EOS).any(axis=1)
        if kind in ("no_eos_scored", "eos_out"):  # the reward model read at the last real token, whatever it is
            h = tf.hidden_forward(reward, model_cfg, seq, seq_mask)[0][np.arange(len(seq)), last_real_index(seq_mask)]
            scores = normalised(rm, h @ reward["head.w"] + reward["head.b"])
            if kind == "eos_out":
                scores = np.where(ended, scores, NO_EOS_SCORE)
        else:
            scores = sequence_scores(rm, seq, seq_mask, ended)
        if kind == "score_after":
            rewards = _score_after_eos(scores, logp_old, logp_ref, mask, kl_coef)
        else:  # token_rewards, also for a row the mistake left with no valid token (its score goes nowhere)
            rewards = np.where(mask > 0, -kl_coef * (logp_old - logp_ref), 0.0)
            rows = np.flatnonzero(mask.any(axis=1))
            rewards[rows, mask[rows].sum(1) - 1] += scores[rows]
        advantages, returns = po.gae(rewards, values, mask)
        return {"mask": mask, "logp_old": logp_old, "logp_ref": logp_ref, "values": values, "scores": scores,
                "rewards": rewards, "advantages": po.whiten(advantages, mask), "returns": returns}
    return fn


MODEL_BASED = {"ppo_minibatch", "rollout"} | MODEL_BASED_GRPO  # mistakes whose function takes the model's config
MISTAKES = {
    "layernorm": [("the unbiased variance (divide by C - 1)", "layernorm_biased",
                   lambda x, g, b: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, ddof=1, keepdims=True) + 1e-5)
                   * g + b),
                  ("eps outside the square root", "layernorm_biased",
                   lambda x, g, b: (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-5) * g + b)],
    "gelu": [("GELU's erf form (PyTorch's default) instead of the tanh form", "gelu_tanh",
              lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2))))],
    "token_logprobs": [("the logits not divided by the temperature", "temperature",
                        lambda logits, targets, temperature: L.token_logprobs_forward(logits, targets)[0])],
    "entropy": [("the logits not divided by the temperature", "temperature",
                 lambda logits, temperature: L.entropy_forward(logits)[0])],
    "exact_kl": [("the KL the other way round, KL(pi_ref || pi)", "kl_estimators",
                  lambda logits, logits_ref, temperature, mask: kl.exact_kl(logits_ref, logits, temperature, mask)),
                 ("the logits not divided by the temperature", "temperature",
                  lambda logits, logits_ref, temperature, mask: kl.exact_kl(logits, logits_ref, 1.0, mask))],
    "kl_estimators": [("log r taken as logp - logp_ref (the ratio upside down)", "kl_estimators",
                       lambda logp, logp_ref, mask: {k: v for k, v in kl.kl_estimators(logp_ref, logp, mask).items()
                                                     if k in ("k1", "k2", "k3")}),
                      ("clamped to [-10, 10] as OpenRLHF does", "kl_estimators",
                       lambda logp, logp_ref, mask: {k: np.clip(v, -10, 10) for k, v in
                                                     kl.kl_estimators(logp, logp_ref, mask).items()
                                                     if k in ("k1", "k2", "k3")})],
    "token_rewards": [("the score one position after EOS (TRL's placement)", "score_on_eos", _score_after_eos),
                      ("the KL term's sign flipped", "k1_in_reward", _rewards_with(lambda k: -k["k1"])),
                      ("k2 in the reward instead of k1", "k1_in_reward", _rewards_with(lambda k: k["k2"])),
                      ("k3 in the reward instead of k1", "k1_in_reward", _rewards_with(lambda k: k["k3"])),
                      ("the KL term without the KL coefficient", "k1_in_reward",
                       lambda scores, logp, logp_ref, mask, kl_coef: kl.token_rewards(scores, logp, logp_ref, mask,
                                                                                      1.0)[0])],
    "gae": [("lambda ignored (lambda = 1)", "gae", lambda **kw: _gae_dict(**{**kw, "lam": 1.0})),
            ("gamma and lambda swapped", "gae",
             lambda **kw: _gae_dict(**{**kw, "gamma": kw["lam"], "lam": kw["gamma"]}))],
    "whiten": [("the unbiased variance (TRL's masked_var)", "whiten_biased",
                _whiten_with(lambda v: np.sqrt(v.var(ddof=1) + 1e-8))),
               ("eps outside the square root", "whiten_biased", _whiten_with(lambda v: v.std() + 1e-8)),
               ("the mean not subtracted", "whiten_biased",
                lambda x, mask: np.where(mask > 0, x / np.sqrt(x[mask > 0].var() + 1e-8), 0.0))],
    "policy_loss": [("the mean over every position, padding included", "mean_over_valid",
                     _policy_loss_mean_over_all),
                    ("min instead of max (the clip's pessimism inverted)", "ppo_clip", _policy_loss_min),
                    ("the log-ratio clamped to +-20 (OpenRLHF)", "ppo_clip", _policy_loss_clamped)],
    "value_loss": [("no value clip", "value_clip",
                    lambda values, values_old, returns, mask, clip_eps, vf_coef:
                    vf_coef * 0.5 * ((values - returns) ** 2)[mask > 0].mean()),
                   ("without the 1/2", "value_clip",
                    lambda **kw: 2 * po.value_loss_forward(**kw)[0])],
    "bt_loss": [("the margin added instead of subtracted", "bt_loss",
                 lambda r_chosen, r_rejected, margin, center_coef: reward.bt_loss_forward(
                     r_chosen, r_rejected, -margin, center_coef)[0]),
                ("the margin left out", "bt_loss",
                 lambda r_chosen, r_rejected, margin, center_coef: reward.bt_loss_forward(
                     r_chosen, r_rejected, 0.0, center_coef)[0])],
    "ranking_loss": [("the mean over all pairs of the batch instead of within each prompt first", "k_way",
                      lambda rewards, valid, margin, center_coef: _ranking_flat(rewards, valid, margin, center_coef))],
    "dpo_loss": [("the reference's log-ratio left out", "dpo",
                  lambda logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta:
                  np.logaddexp(0, -beta * (logp_chosen - logp_rejected)).mean())],
    "sequence_logprob": [("averaged over the response's tokens instead of summed (TRL's IPO)", "dpo",
                          _seq_logprob_mean),
                         ("the logits not divided by the temperature", "temperature",
                          lambda logits, targets, mask, temperature: dpo.sequence_logprob_forward(
                              logits, targets, mask)[0])],
    "response_mask": [("EOS left out of the response mask", "response_mask",
                       lambda tokens: (np.cumsum(tokens == EOS, 1) == 0).astype(np.int64)),
                      ("only PAD masked out (tokens after EOS kept)", "response_mask",
                       lambda tokens: (tokens != 0).astype(np.int64))],
    "update_kl_coef": [("the error's sign flipped", "kl_controller",
                        lambda kl_coef, kl, n_steps, target, horizon, adaptive: np.where(
                            adaptive > 0, kl_coef * (1 - np.clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon),
                            kl_coef)),
                       ("without the clip of the error", "kl_controller",
                        lambda kl_coef, kl, n_steps, target, horizon, adaptive: np.where(
                            adaptive > 0, kl_coef * (1 + (kl / target - 1) * n_steps / horizon), kl_coef))],
    "lr_schedule": [("transformers' warm-up, peak * s / W (one step behind)", "lr_warmup",
                     lambda steps, total_steps, peak_lr, warmup_steps: np.where(
                         steps < warmup_steps, peak_lr * steps / warmup_steps,
                         peak_lr * np.maximum(0, (total_steps - steps) / (total_steps - warmup_steps))))],
    "ppo_minibatch": [("the logits not divided by the temperature when scoring", "temperature",
                       _ppo_minibatch_variant("tau")),
                      ("the response positions off by one (logits at P .. P + N - 1)", "response_positions",
                       _ppo_minibatch_variant("shift")),
                      ("the ratio taken against the current log-probs (every ratio 1)", "ppo_clip",
                       _ppo_minibatch_variant("current"))],
    "rollout": [("the reference scored at tau = 1 while the policy samples at tau", "temperature",
                 _rollout_variant("ref_tau1")),
                ("EOS left out of the response mask", "response_mask", _rollout_variant("eos_out")),
                ("a response without EOS scored by the reward model instead of NO_EOS_SCORE", "no_eos_score",
                 _rollout_variant("no_eos_scored")),
                ("the score one position after EOS (TRL's placement)", "score_on_eos",
                 _rollout_variant("score_after"))],
}


MISTAKES.update(MISTAKES_GRPO)  # the critic-free methods' and LoRA's (mistakes_grpo.py)


def _ranking_flat(rewards, valid, margin, center_coef):
    K = rewards.shape[1]
    pairs = [(x[i], x[j]) for x, ok in zip(rewards, valid) for i in range(K) for j in range(i + 1, K)
             if ok[i] and ok[j]]
    return np.mean([np.logaddexp(0, -(a - b - margin)) + center_coef * (a + b) ** 2 for a, b in pairs])


def _matches(a, b, tol):
    if isinstance(b, dict):
        return isinstance(a, dict) and all(k in a and _matches(a[k], b[k], tol) for k in b)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and worst(a, b)[3] <= tol


def diagnose(name, inputs, output, model_cfg=None, tol=1e-8, correct=None):
    """The descriptions (with their convention ids) of the known mistakes of `name` whose output on inputs
    matches the port's output, on the outputs the conventions define (registry.Entry.defined). model_cfg:
    the model the inputs are for (the functions of MODEL_BASED). correct: minirlhf's output on the same
    inputs, if known. A mistake that gives the correct output here (within tol) cannot be told from a right
    port on these inputs and is never named, and a port within tol of the correct output matches none: its
    error is smaller than any known mistake's."""
    from .registry import FUNCTIONS
    entry, found = FUNCTIONS.get(name), []
    defined = entry.defined(inputs) if entry is not None and entry.defined is not None else None

    def masked(x):
        if defined is not None and not isinstance(x, dict) and np.shape(x) == np.shape(output):
            return np.where(np.broadcast_to(defined, np.shape(x)), np.asarray(x, np.float64), 0)
        return x
    if correct is not None and _matches(masked(output), masked(correct), tol):
        return found
    for description, convention, fn in MISTAKES.get(name, []):
        try:
            with np.errstate(all="ignore"):
                expected = fn(model_cfg, **inputs) if name in MODEL_BASED else fn(**inputs)
        except (ValueError, FloatingPointError, ZeroDivisionError, KeyError, IndexError, TypeError):
            continue
        if correct is not None and _matches(masked(expected), masked(correct), tol):
            continue
        if _matches(masked(output), masked(expected), tol):
            found.append(f"{description} [{convention}]")
    return found
