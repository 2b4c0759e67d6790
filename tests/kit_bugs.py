"""A catalogue of realistic porting bugs, each written as a port of one of minirlhf's functions with that one
bug, for the kit's mutation suite (test_kit_bugs.py): every one must be caught by the conformance check or
the golden fixture of its function. The bugs come from the public record of RLHF ports (TRL, OpenRLHF,
trlx, DeepSpeed-Chat issues and the "N implementation details of RLHF with PPO" write-ups) and from the
conventions where libraries differ (minirlhf/CONVENTIONS.md); `source` says which.

BUGS[id] = Bug(function, description, source, port) where port(model_cfg) returns what check_<function>
takes (forward, vjp), or the port's sampler / rollout assembly for generate / rollout.
"""
from dataclasses import dataclass

import numpy as np
from scipy.special import erf, expit

from minirlhf import dpo, kl, optim, ppo_objective as po, reward
from minirlhf import layers as L
from minirlhf import transformer as tf
from minirlhf.kit import reference as R
from minirlhf.kit.registry import reference
from minirlhf.tokenizer import EOS, PAD


@dataclass(frozen=True)
class Bug:
    function: str  # the registry's name of the function the port gets wrong
    description: str
    source: str  # where such a bug is on the public record
    port: object  # model_cfg -> the arguments of check_<function>


def ok(name):
    """minirlhf's own (forward, vjp) of `name`: the rest of a port, around its one bug."""
    return lambda model_cfg: reference(name, model_cfg)


def fwd(fn, grad=None):
    """A forward-only port (vjp None) or one with the given vjp."""
    return lambda model_cfg: (fn, grad) if grad is not None else (fn,)


# ---------------------------------------------------------------- the model

def ops_with(**changes):
    """layers.py with some ops replaced: a port whose transformer uses a wrong op."""
    from types import SimpleNamespace
    return SimpleNamespace(**{**{k: getattr(L, k) for k in dir(L) if not k.startswith("_")}, **changes})


def model_with(ops=None, pads_seen=False, transpose=(), untied_grad=False, grads=True):
    """A port of transformer.forward / backward with one bug: other ops, padding keys attended to, weights
    loaded transposed, or wte's gradient without its LM head's part (a head that is a copy, not tied)."""
    def port(model_cfg):
        def run(params, tokens, mask):
            p = {k: (v.T if any(k.endswith(t) for t in transpose) else v) for k, v in params.items()}
            return tf.lm_forward(p, model_cfg, tokens, np.ones_like(mask) if pads_seen else np.asarray(mask),
                                 ops or L)

        def forward(params, tokens, mask):
            return run(params, tokens, mask)[0]

        def vjp(dout, params, tokens, mask):
            dout = np.asarray(dout)
            logits, cache = run(params, tokens, mask)
            g = tf.lm_backward(dout, cache)
            if untied_grad:
                h = cache[1]
                g["wte"] = g["wte"] - dout.reshape(-1, logits.shape[-1]).T @ h.reshape(-1, h.shape[-1])
            return {"params": g}
        return (forward, vjp) if grads else (forward,)
    return port


def arange_positions(model_cfg):
    """transformer.forward with positions 0 .. T-1 (no cumsum over the mask): left padding moves every real
    token's position."""
    def forward(params, tokens, mask):
        tokens, mask = np.asarray(tokens), np.asarray(mask)
        T = tokens.shape[1]
        allowed = L.attention_mask(mask)
        x = params["wte"][tokens] + params["wpe"][np.arange(T)][None]
        for l in range(model_cfg.n_layer):
            x, _ = tf.block_forward(x, lambda n: params[f"h{l}.{n}"],  # noqa: B023
                                    lambda qkv: L.attention_forward(qkv, model_cfg.n_head, allowed))
        h, _ = L.layernorm_forward(x, params["ln_f.g"], params["ln_f.b"])
        return h @ params["wte"].T
    return (forward,)


def reward_at_last_column(model_cfg):
    """reward_forward reading the score at the last column, whatever the mask (right padding breaks it)."""
    def forward(params, tokens, mask):
        h = tf.hidden_forward(params, model_cfg, tokens, mask)[0]
        return h[:, -1] @ params["head.w"] + params["head.b"]
    return (forward,)


# ---------------------------------------------------------------- the sampler

def sampler(model_cfg, positions="mask", top_k=None, tau_used=None, eos_in_mask=True):
    """transformer.generate by full forward passes, with one bug: positions 0 .. T-1 for left-padded prompts,
    top-k sampling, sampling at another temperature, or EOS left out of the mask."""
    def generate(params, prompts, prompt_mask, max_new_tokens, seed, temperature):
        rng = np.random.default_rng(seed)
        seq, seq_mask = np.asarray(prompts), np.asarray(prompt_mask)
        tau = temperature if tau_used is None else tau_used
        toks, logps = [], []
        alive = np.ones(len(seq), bool)
        for _ in range(max_new_tokens):
            if positions == "arange":
                logits = arange_positions(model_cfg)[0](params, seq, seq_mask)[:, -1]
            else:
                logits = tf.forward(params, model_cfg, seq, seq_mask)[0][:, -1]
            z = logits / tau
            if top_k is not None:
                kth = np.sort(z, -1)[:, -top_k][:, None]
                z = np.where(z >= kth, z, -np.inf)
            lp = L.log_softmax(z)
            tok = tf.sample_categorical(np.exp(lp), rng)
            toks.append(np.where(alive, tok, PAD))
            logps.append(np.where(alive, L.log_softmax(logits / temperature)[np.arange(len(tok)), tok], 0))
            seq = np.concatenate([seq, toks[-1][:, None]], 1)
            seq_mask = np.concatenate([seq_mask, alive[:, None].astype(np.int64)], 1)
            alive = alive & (tok != EOS)
        tokens = np.stack(toks, 1)
        mask = np.stack([np.ones(len(tokens), np.int64)] + [np.cumsum(tokens == EOS, 1)[:, t - 1] == 0
                                                             for t in range(1, tokens.shape[1])], 1).astype(np.int64)
        if not eos_in_mask:
            mask = mask * (tokens != EOS)
        return {"tokens": tokens, "mask": mask, "logprobs": np.stack(logps, 1) * mask}
    return (generate,)


# ---------------------------------------------------------------- rollouts and PPO minibatches

def rollout_with(kind):
    """A port's rollout assembly with one bug (mistakes.py has the same assemblies, to name them)."""
    from minirlhf.kit.mistakes import _rollout_variant

    def port(model_cfg):
        assemble = (lambda **kw: _rollout_variant(kind)(model_cfg, **kw)) if kind != "repadded" else repadded(model_cfg)
        return assemble, R.logprobs_adapter(model_cfg)
    return port


def repadded(model_cfg):
    """logp_old scored on prompts padded one more column on the left than the loss will see: the same math,
    another rounding, so the first step's ratio is not exactly 1."""
    correct = reference("rollout", model_cfg)[0]

    def assemble(**kw):
        out = correct(**kw)
        prompts = np.concatenate([np.zeros((len(kw["prompts"]), 1), np.int64), kw["prompts"]], 1)[:, :]
        P = prompts.shape[1]
        seq = np.concatenate([prompts, kw["tokens"]], 1)
        seq_mask = np.concatenate([np.concatenate([np.zeros((len(prompts), 1), np.int64), kw["prompt_mask"]], 1),
                                   out["mask"]], 1)
        if seq.shape[1] > model_cfg.n_ctx:  # no room for another column: perturb by the last bit instead
            out["logp_old"] = np.nextafter(out["logp_old"], -np.inf) * out["mask"]
            return out
        lp = R.logprobs_adapter(model_cfg)(kw["policy"], seq, seq_mask, kw["tokens"], P, kw["temperature"])
        out["logp_old"] = lp * out["mask"]
        return out
    return assemble


def minibatch_with(kind):
    from minirlhf.kit.mistakes import _ppo_minibatch_variant

    def port(model_cfg):
        return (lambda **kw: _ppo_minibatch_variant(kind)(model_cfg, **kw)),
    return port


# ---------------------------------------------------------------- losses and optimisers with a bug

def policy_grad_ignoring_clip(dout, logp, logp_old, advantages, mask, clip_eps):
    """The gradient of the unclipped term everywhere: the clip's gating forgotten in a hand-written backward."""
    n = mask.sum()
    return {"logp": np.where(mask > 0, -advantages * np.exp(np.where(mask > 0, logp - logp_old, 0)) / n, 0) * dout}


def whiten_unbiased(x, mask):
    v = x[mask > 0]
    return np.where(mask > 0, (x - v.mean()) / np.sqrt(v.var(ddof=1) + 1e-8), 0)


def gae_bootstrapped(rewards, values, mask, gamma, lam):
    """GAE that bootstraps from the last valid token's own value instead of V = 0 after it."""
    A, R_ = po.gae(rewards, values, mask, gamma, lam)
    v = np.where(mask > 0, values, 0)
    last = mask.sum(1) - 1
    boot = np.zeros_like(A)
    for b, t_last in enumerate(last):
        for t in range(t_last + 1):
            boot[b, t] = (gamma * lam) ** (t_last - t) * gamma * v[b, t_last]
    return {"advantages": A + boot, "returns": R_ + boot}


def bt_naive(r_chosen, r_rejected, margin, center_coef):
    """-log(sigmoid(d)) computed as written: -inf / inf once sigmoid underflows in the tails."""
    with np.errstate(divide="ignore"):
        d = r_chosen - r_rejected - margin
        return -np.log(expit(d)).mean() + center_coef * ((r_chosen + r_rejected) ** 2).mean()


def bt_softplus_threshold_pair():
    """-log sigmoid(d) as torch's F.softplus(-d) with its threshold 20: beyond it the value is -d itself and
    the gradient exactly 1 (off by 2e-9 near the threshold)."""
    def value(x):
        return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))

    def forward(r_chosen, r_rejected, margin, center_coef):
        d, t = r_chosen - r_rejected - margin, r_chosen + r_rejected
        return value(-d).mean() + center_coef * (t ** 2).mean()

    def vjp(dout, r_chosen, r_rejected, margin, center_coef):
        d, t = r_chosen - r_rejected - margin, r_chosen + r_rejected
        dd = -np.where(-d > 20, 1.0, expit(-d)) / d.size * dout  # d softplus(-d)/dd
        dt = 2 * center_coef * t / d.size * dout
        return {"r_chosen": dd + dt, "r_rejected": -dd + dt}
    return forward, vjp


def ranking_counting_empty_rows(rewards, valid, margin, center_coef):
    """The K-way loss whose mean over prompts counts prompts without a scored pair (n_pairs >= 0)."""
    loss = reward.ranking_loss_forward(rewards, valid, margin, center_coef)[0]
    pairs = (np.triu(np.ones((rewards.shape[1],) * 2), 1) * valid[:, :, None] * valid[:, None, :]).sum((1, 2))
    return loss * (pairs > 0).sum() / len(rewards)


def adamw_variant(kind):
    def run(params, grads, lr, weight_decay, max_grad_norm):
        p = {k: v.copy() for k, v in params.items()}
        m, v = ({k: np.zeros_like(x) for k, x in p.items()} for _ in range(2))
        for t in range(1, len(next(iter(grads.values()))) + 1):
            g = {k: grads[k][t - 1] for k in p}
            if kind == "clip_per_parameter":
                g = {k: x * min(1.0, max_grad_norm / (np.sqrt((x ** 2).sum()) + 1e-6)) for k, x in g.items()}
            else:
                g, _ = optim.clip_grads(g, max_grad_norm)
            for k in p:
                if kind == "coupled_l2" and p[k].ndim >= 2:
                    g[k] = g[k] + weight_decay * p[k]
                elif kind == "decay_all" or p[k].ndim >= 2:
                    p[k] = p[k] - lr * weight_decay * p[k]
                m[k] = 0.9 * m[k] + 0.1 * g[k]
                v[k] = 0.999 * v[k] + 0.001 * g[k] ** 2
                bc1, bc2 = (1.0, 1.0) if kind == "no_bias_correction" else (1 - 0.9 ** t, 1 - 0.999 ** t)
                if kind == "eps_inside":
                    p[k] = p[k] - lr * (m[k] / bc1) / np.sqrt(v[k] / bc2 + 1e-8)
                else:
                    p[k] = p[k] - lr * (m[k] / bc1) / (np.sqrt(v[k] / bc2) + 1e-8)
        return p
    return run


def tokens_only(fn):
    return lambda tokens: fn(np.asarray(tokens))


B = Bug
BUGS = {
    # layers
    "gelu_erf": B("gelu", "GELU in its erf form", "PyTorch's F.gelu default; HF GPT-2 ports use gelu_new (tanh)",
                  fwd(lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2))))),
    "layernorm_unbiased": B("layernorm", "LayerNorm with the unbiased variance", "torch.var's default unbiased=True",
                            fwd(lambda x, g, b: (x - x.mean(-1, keepdims=True))
                                / np.sqrt(x.var(-1, ddof=1, keepdims=True) + 1e-5) * g + b)),
    "layernorm_eps_outside": B("layernorm", "LayerNorm with eps added to the std", "TF/Keras-style and hand ports",
                               fwd(lambda x, g, b: (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-5)
                                   * g + b)),
    "attention_scale_d": B("attention", "attention scores scaled by 1/D instead of 1/sqrt(D)", "hand-written ports",
                           fwd(lambda qkv, key_mask, n_head: L.attention_forward(
                               qkv * np.repeat([1 / np.sqrt(qkv.shape[-1] // 3 // n_head), 1, 1],
                                               qkv.shape[-1] // 3), n_head, L.attention_mask(key_mask))[0])),
    "attention_sees_next": B("attention", "a causal mask one position too wide (query i sees key i + 1)",
                             "tril(k=1) slips; nanoGPT-style bias buffers sliced wrong",
                             fwd(lambda qkv, key_mask, n_head: _attend_wide(qkv, key_mask, n_head))),
    "cross_entropy_all_positions": B("cross_entropy", "cross-entropy averaged over every position, padding included",
                                     "SFT completion-only-loss bugs (TRL issues)",
                                     fwd(lambda logits, targets, mask: -(np.take_along_axis(
                                         L.log_softmax(logits), targets[..., None], -1)[..., 0] * mask).sum()
                                         / mask.size)),
    "logprobs_no_tau": B("token_logprobs", "token log-probs without the temperature",
                         "TRL issue: temperature used in sampling but not in the log-prob recomputation",
                         fwd(lambda logits, targets, temperature: L.token_logprobs_forward(logits, targets)[0])),
    "entropy_no_tau": B("entropy", "entropy without the temperature", "as the log-probs",
                        fwd(lambda logits, temperature: L.entropy_forward(logits)[0])),
    # the model
    "positions_arange": B("transformer", "positions 0 .. T-1, not cumsum(mask) - mask, under left padding",
                          "HF generate with left padding and no position_ids", arange_positions),
    "pads_attended": B("transformer", "padding keys attended to (the key mask ignored)",
                       "attention_mask dropped in a forward call", model_with(pads_seen=True)),
    "gelu_erf_model": B("transformer", "the model's GELU in its erf form", "PyTorch's default",
                        model_with(ops=ops_with(gelu_forward=lambda x: (0.5 * x * (1 + erf(x / np.sqrt(2))), x)),
                                   grads=False)),
    "proj_not_transposed": B("transformer", "the square attention output projection loaded without its transpose",
                             "nn.Linear stores W.T: square weights load without a shape error",
                             model_with(transpose=("attn.w_proj",), grads=False)),
    "head_untied": B("transformer", "wte's gradient without the LM head's part", "an untied copy of the embedding "
                     "as the head", model_with(untied_grad=True)),
    "reward_last_column": B("reward_model", "the score read at the last column, not at EOS",
                            "reward read at position -1 with right padding (several RM repos)",
                            reward_at_last_column),
    # the sampler
    "sampler_positions_arange": B("generate", "the sampler numbers positions 0 .. T-1 for left-padded prompts",
                                  "left-padded batched generation without position ids",
                                  lambda c: sampler(c, positions="arange")),
    "sampler_top_k": B("generate", "top-k sampling (k = 2): the sampled law is not the scored one",
                       "RLHF with top-k / top-p rollouts (negative KL reports)", lambda c: sampler(c, top_k=2)),
    "sampler_no_tau": B("generate", "sampling at tau = 1 while scoring at tau", "temperature not passed to generate",
                        lambda c: sampler(c, tau_used=1.0)),
    "sampler_mask_eos_out": B("generate", "EOS left out of the sampler's response mask",
                              "PAD = EOS tokenizers mask the real EOS", lambda c: sampler(c, eos_in_mask=False)),
    # KL and rewards
    "kl_sign_flipped": B("token_rewards", "the KL term's sign flipped in the reward",
                         "log-ratio written logp_ref - logp (TRL / trlx issues)",
                         fwd(lambda scores, logp, logp_ref, mask, kl_coef: kl.token_rewards(
                             scores, logp_ref, logp, mask, kl_coef)[0])),
    "k3_in_reward": B("token_rewards", "k3 in the reward instead of k1", "k3 adopted from GRPO into PPO's reward",
                      fwd(lambda scores, logp, logp_ref, mask, kl_coef: _rewards_k3(scores, logp, logp_ref, mask,
                                                                                   kl_coef))),
    "score_after_eos": B("token_rewards", "the score one position after EOS", "TRL's placement, ported as is",
                         fwd(lambda **kw: __import__("minirlhf.kit.mistakes", fromlist=["_score_after_eos"])
                             ._score_after_eos(**kw))),
    "score_every_token": B("token_rewards", "the score added on every response token", "dense-reward confusion",
                           fwd(lambda scores, logp, logp_ref, mask, kl_coef: np.where(
                               mask > 0, -kl_coef * (logp - logp_ref) + scores[:, None], 0))),
    "log_r_upside_down": B("kl_estimators", "log r taken as logp - logp_ref in the estimators",
                           "Schulman's r = p / q read the other way", fwd(lambda logp, logp_ref, mask: {
                               k: v for k, v in kl.kl_estimators(logp_ref, logp, mask).items() if k in ("k1", "k2",
                                                                                                          "k3")})),
    "estimators_clamped": B("kl_estimators", "the estimators clamped to [-10, 10]", "OpenRLHF's compute_approx_kl",
                            fwd(lambda logp, logp_ref, mask: {k: np.clip(v, -10, 10) for k, v in kl.kl_estimators(
                                logp, logp_ref, mask).items() if k in ("k1", "k2", "k3")})),
    "exact_kl_reversed": B("exact_kl", "the exact KL the other way round", "KL(q || p) for KL(p || q)",
                           fwd(lambda logits, logits_ref, temperature, mask: kl.exact_kl(logits_ref, logits,
                                                                                         temperature, mask))),
    "exact_kl_no_tau": B("exact_kl", "the exact KL without the temperature", "as the log-probs",
                         fwd(lambda logits, logits_ref, temperature, mask: kl.exact_kl(logits, logits_ref, 1.0, mask))),
    "controller_sign": B("update_kl_coef", "the controller's error with its sign flipped",
                         "adaptive KL controllers that diverge (trlx / TRL issues)",
                         fwd(lambda kl_coef, kl, n_steps, target, horizon, adaptive: np.where(
                             adaptive > 0, kl_coef * (1 - np.clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon),
                             kl_coef))),
    "controller_no_clip": B("update_kl_coef", "the controller's error without its clip to [-0.2, 0.2]",
                            "Ziegler's clip dropped", fwd(lambda kl_coef, kl, n_steps, target, horizon, adaptive:
                                                          np.where(adaptive > 0, kl_coef * (1 + (kl / target - 1)
                                                                                           * n_steps / horizon),
                                                                   kl_coef))),
    "mask_eos_out": B("response_mask", "EOS left out of the response mask", "PAD = EOS masking (TRL docs warn)",
                      fwd(tokens_only(lambda t: (np.cumsum(t == EOS, 1) == 0).astype(np.int64)))),
    "mask_pad_only": B("response_mask", "only PAD masked: text after EOS kept", "attention_mask = tokens != pad",
                       fwd(tokens_only(lambda t: (t != PAD).astype(np.int64)))),
    # PPO
    "gae_bootstrap": B("gae", "GAE bootstrapping from the last token's value instead of V = 0 after it",
                       "value bootstrapping on terminated episodes", fwd(gae_bootstrapped)),
    "gae_no_lambda": B("gae", "GAE with lambda ignored", "lam not threaded through",
                       fwd(lambda **kw: dict(zip(("advantages", "returns"), po.gae(**{**kw, "lam": 1.0}))))),
    "whiten_unbiased": B("whiten", "whitening with the unbiased variance", "TRL's masked_var", fwd(whiten_unbiased)),
    "whiten_eps_outside": B("whiten", "whitening with eps added to the std", "hand ports",
                            fwd(lambda x, mask: np.where(mask > 0, (x - x[mask > 0].mean())
                                                         / (x[mask > 0].std() + 1e-8), 0))),
    "policy_min": B("policy_loss", "min instead of max in the clipped objective", "sign slips in PPO ports",
                    lambda c: (__import__("minirlhf.kit.mistakes", fromlist=["_policy_loss_min"])._policy_loss_min,)),
    "policy_mean_with_padding": B("policy_loss", "the policy loss averaged over padding too",
                                  "masked_mean forgotten (TRL issues)",
                                  lambda c: (__import__("minirlhf.kit.mistakes", fromlist=["x"])
                                             ._policy_loss_mean_over_all,)),
    "policy_grad_no_clip": B("policy_loss", "the clip's gating forgotten in the backward", "hand-written backward",
                             lambda c: (reference("policy_loss", c)[0], policy_grad_ignoring_clip)),
    "ratio_inverted": B("policy_loss", "the ratio inverted, exp(logp_old - logp)", "argument order swapped",
                        fwd(lambda logp, logp_old, advantages, mask, clip_eps: po.policy_loss_forward(
                            logp_old, logp, advantages, mask, clip_eps)[0])),
    "value_no_clip": B("value_loss", "no value clip", "value clipping dropped",
                       fwd(lambda values, values_old, returns, mask, clip_eps, vf_coef:
                           vf_coef * 0.5 * ((values - returns) ** 2)[mask > 0].mean())),
    "value_no_half": B("value_loss", "the value loss without its 1/2", "0.5 dropped",
                       fwd(lambda **kw: 2 * po.value_loss_forward(**kw)[0])),
    "minibatch_no_tau": B("ppo_minibatch", "the temperature left out of scoring in the PPO step",
                          "TRL issue: logits not divided by temperature in the training forward",
                          minibatch_with("tau")),
    "minibatch_positions": B("ppo_minibatch", "response positions off by one in the PPO step",
                             "logits[:, P:] instead of logits[:, P-1:-1]", minibatch_with("shift")),
    "minibatch_ratio_current": B("ppo_minibatch", "the ratio taken against the current log-probs",
                                 "old log-probs recomputed after an update", minibatch_with("current")),
    "rollout_ref_tau1": B("rollout", "the reference scored at tau = 1 while the policy samples at tau",
                          "TRL issue: ref logits not divided by temperature", rollout_with("ref_tau1")),
    "rollout_no_eos_scored": B("rollout", "a response without EOS scored by the reward model",
                               "missing_eos_penalty absent", rollout_with("no_eos_scored")),
    "rollout_eos_out": B("rollout", "EOS left out of the rollout's response mask", "PAD = EOS masking",
                         rollout_with("eos_out")),
    "rollout_repadded": B("rollout", "logp_old scored under other padding than the loss's (the first ratio is "
                          "not exactly 1)", "N implementation details: ratio != 1 on the first minibatch",
                          rollout_with("repadded")),
    # preferences
    "bt_margin_added": B("bt_loss", "the Bradley-Terry margin added instead of subtracted", "Llama 2 margin ports",
                         fwd(lambda r_chosen, r_rejected, margin, center_coef: reward.bt_loss_forward(
                             r_chosen, r_rejected, -margin, center_coef)[0])),
    "bt_naive_log_sigmoid": B("bt_loss", "log(sigmoid(d)) computed as written (inf in the tails)",
                              "reward-model trainers before logsigmoid", fwd(bt_naive)),
    "bt_softplus_threshold": B("bt_loss", "-log sigmoid as torch's softplus with its threshold 20",
                               "F.softplus's threshold", lambda c: bt_softplus_threshold_pair()),
    "ranking_empty_rows": B("ranking_loss", "prompts without a scored pair counted in the mean",
                            "the mutation n_pairs > 0 -> >= 0", fwd(ranking_counting_empty_rows)),
    "sequence_mean": B("sequence_logprob", "DPO's sequence log-prob averaged over tokens", "TRL's IPO averages",
                       fwd(lambda logits, targets, mask, temperature: dpo.sequence_logprob_forward(
                           logits, targets, mask, temperature)[0] / np.maximum(mask.sum(1), 1))),
    "sequence_no_mask": B("sequence_logprob", "the sequence log-prob summed over prompt tokens too",
                          "labels not masked to -100 on the prompt",
                          fwd(lambda logits, targets, mask, temperature: dpo.sequence_logprob_forward(
                              logits, targets, np.ones_like(mask), temperature)[0])),
    "dpo_refs_swapped": B("dpo_loss", "the reference log-probs of chosen and rejected swapped", "argument order",
                          fwd(lambda logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta: dpo.dpo_loss_forward(
                              logp_chosen, logp_rejected, ref_rejected, ref_chosen, beta)[0])),
    "ipo_target": B("ipo_loss", "IPO's target 1 / beta instead of 1 / (2 beta)", "the IPO paper's two notations",
                    fwd(lambda logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta: dpo.ipo_loss_forward(
                        logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta / 2)[0])),
    # optimiser and schedule
    "adam_eps_inside": B("adamw", "Adam's eps inside the square root", "TensorFlow's Adam (N implementation details)",
                         fwd(adamw_variant("eps_inside"))),
    "adamw_decay_all": B("adamw", "weight decay on biases and gains too", "AdamW over model.parameters()",
                         fwd(adamw_variant("decay_all"))),
    "adam_coupled_l2": B("adamw", "L2 penalty in the gradient instead of decoupled decay", "torch.optim.Adam's "
                         "weight_decay", fwd(adamw_variant("coupled_l2"))),
    "adam_no_bias_correction": B("adamw", "Adam without bias correction", "hand ports",
                                 fwd(adamw_variant("no_bias_correction"))),
    "clip_per_parameter": B("adamw", "gradient clipping per parameter, not by the global norm", "clip_grad_value "
                            "or per-tensor clipping", fwd(adamw_variant("clip_per_parameter"))),
    "warmup_hf": B("lr_schedule", "the warm-up one step behind (peak s / W)", "transformers' "
                   "get_linear_schedule_with_warmup",
                   fwd(lambda steps, total_steps, peak_lr, warmup_steps: np.where(
                       steps < warmup_steps, peak_lr * steps / warmup_steps,
                       peak_lr * np.maximum(0, (total_steps - steps) / (total_steps - warmup_steps))))),
}


def _rewards_k3(scores, logp, logp_ref, mask, kl_coef):
    k3 = kl.kl_estimators(logp, logp_ref, mask)["k3"]
    r = np.where(mask > 0, -kl_coef * k3, 0.0)
    r[np.arange(len(r)), mask.sum(1) - 1] += scores
    return r


def _attend_wide(qkv, key_mask, n_head):
    T = key_mask.shape[1]
    allowed = (np.tril(np.ones((T, T), bool), k=1) & (key_mask[:, None, None, :] > 0)) | np.eye(T, dtype=bool)
    return L.attention_forward(qkv, n_head, allowed)[0]
