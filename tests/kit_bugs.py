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
from minirlhf import grpo_objective as go
from minirlhf import layers as L
from minirlhf import transformer as tf
from minirlhf.kit import reference as R
from minirlhf.kit import reference_grpo as RG
from minirlhf.kit.mistakes_grpo import MISTAKES_GRPO
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



# ---------------------------------------------------------------- critic-free methods and LoRA with a bug

def cf_mistake(name, start):
    """The output of `name` with the known mistake (mistakes_grpo.py) whose description starts with `start`."""
    for description, _, fn in MISTAKES_GRPO[name]:
        if description.startswith(start):
            return fn
    raise KeyError(f"{name}: no mistake {start!r}")


def cf(name, start, grad=None):
    """A forward-only port of `name` with that mistake (or with the given vjp)."""
    return fwd(cf_mistake(name, start), grad)


def model_cf(name, start):
    """The same for a function of a model (the mistake takes the model's config first)."""
    return lambda model_cfg: ((lambda **kw: cf_mistake(name, start)(model_cfg, **kw)),)


def rloo_completion_major(rewards, groups=None):
    """RLOO of (P, G) rewards read as TRL's RLOO lays them out, reshape(G, P): group j is column j."""
    if groups is not None:
        return go.rloo_advantages(rewards, groups)
    r = np.asarray(rewards, np.float64)
    return go.rloo_advantages(r.reshape(r.shape[1], r.shape[0]).T).T.reshape(r.shape)


def token_loss_ratio_one(model_cfg):
    """The ratio taken against logp itself (TRL's per_token_logps.detach() shortcut), whatever logp_old is."""
    def forward(logp, logp_old, advantages, mask, eps_low, eps_high):
        return go.token_loss_forward(logp, logp, advantages, mask, eps_low, eps_high)[0]

    def vjp(dout, logp, logp_old, advantages, mask, eps_low, eps_high):
        cache = go.token_loss_forward(logp, logp, advantages, mask, eps_low, eps_high)[1]
        return {"logp": go.token_loss_backward(np.asarray(dout), cache)}
    return forward, vjp


def aggregate_padded_token_mean(losses, mask, kind, max_len, n_rows, n_tokens):
    """token_mean as the mean over every position, padding included; the other aggregators right."""
    if kind == "token_mean":
        return losses.sum() / losses.size
    return go.aggregate_forward(losses, mask, kind, max_len, n_rows, n_tokens)[0]


def kl_with_grad(kind, grad):
    """minirlhf's KL loss term with a hand-written backward grad(d, rho) instead of its own."""
    def port(model_cfg):
        forward = reference(f"kl_loss_{kind}", model_cfg)[0]

        def vjp(dout, logp, logp_ref, mask, kind, logp_old=None):
            valid = mask > 0
            d = np.where(valid, logp, 0) - np.where(valid, logp_ref, 0)
            rho = np.exp(np.where(valid, logp, 0) - np.where(valid, logp_old, 0)) if logp_old is not None else 1.0
            return {"logp": np.where(valid, grad(d, rho) * dout, 0)}
        return forward, vjp
    return port


def k3_without_expm1(logp, logp_ref, mask, kind, logp_old=None):
    """k3 as TRL and OpenRLHF write it, exp(-d) - 1 + d: exact to 1e-16, but it cancels near d = 0."""
    valid = mask > 0
    d = np.where(valid, logp, 0) - np.where(valid, logp_ref, 0)
    return np.where(valid, np.exp(-d) - 1 + d, 0)


def lora_transposed_on_square(model_cfg):
    """The update (A B) transposed where the layer is square (no shape error), right elsewhere."""
    def forward(x, W0, b, A, B, alpha, rslora):
        delta = A @ B
        delta = delta.T if delta.shape[0] == delta.shape[1] else delta
        return x @ W0 + b + RG.lora_scale(alpha, A.shape[1], rslora) * x @ delta
    return (forward,)


def lora_grad_into_w0(model_cfg):
    """minirlhf's layer whose vjp also returns dW0 = x^T g: the base left trainable."""
    forward, vjp = reference("lora_linear", model_cfg)

    def leaky(dout, **kw):
        g = np.asarray(dout).reshape(-1, kw["W0"].shape[1])
        return {**vjp(dout, **kw), "W0": kw["x"].reshape(-1, kw["W0"].shape[0]).T @ g}
    return forward, leaky


def merge_transposed_on_square(W0, A, B, alpha, rslora):
    """The merged update (A B) transposed where the weight is square (no shape error), right elsewhere."""
    delta = RG.lora_scale(alpha, A.shape[1], rslora) * (A @ B)
    delta = delta.T if delta.shape[0] == delta.shape[1] else delta
    return {"merged": W0 + delta, "restored": W0 + delta - delta}


def unmerge_without_scale(W0, A, B, alpha, rslora):
    merged = RG.lora_merge(W0, A, B, alpha, rslora)["merged"]
    return {"merged": merged, "restored": merged - A @ B}


def lora_merged_in_place(model_cfg):
    """The adapted forward merging W0 += s A B into the base in place and unmerging after: right to rounding,
    but every call moves the base (and so the reference) by a rounding."""
    ref_forward, ref_vjp = reference("lora_model", model_cfg)

    def forward(params, adapter, tokens, mask, alpha, rslora):
        if adapter is None:
            return tf.forward(params, model_cfg, tokens, mask)[0]
        rank = next(v for k, v in adapter.items() if k.endswith("lora_A")).shape[1]
        s = RG.lora_scale(alpha, rank, rslora)
        deltas = {k[:-len(".lora_A")]: s * (A @ adapter[k[:-len(".lora_A")] + ".lora_B"])
                  for k, A in adapter.items() if k.endswith(".lora_A")}
        for name, delta in deltas.items():
            params[name] += delta
        logits = tf.forward(params, model_cfg, tokens, mask)[0]
        for name, delta in deltas.items():
            params[name] -= delta
        return logits
    return forward, ref_vjp


def lora_init_with(B_std=0.0, fan_in=None):
    """minirlhf's init with B ~ N(0, B_std^2), or A's bound 1/sqrt(fan_in(d_in, r))."""
    def init(d_in, d_out, rank, seed):
        w = RG.lora_init(d_in, d_out, rank, seed)
        r = np.random.default_rng(seed + 1000)
        B = B_std * r.standard_normal(w["B"].shape)
        A = w["A"] * np.sqrt(d_in) / np.sqrt(fan_in(d_in, rank)) if fan_in else w["A"]
        return {"A": A, "B": B}
    return lambda model_cfg: (init,)


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
    # critic-free: advantages and DAPO's filters
    "grpo_std_ddof0": B("grpo_advantages", "GRPO's std with ddof 0 (np.std, torch's unbiased=False)",
                        "TRL, verl and OpenRLHF take torch's Bessel std; at G = 2 ddof 0 moves A by sqrt 2",
                        cf("grpo_advantages", "the std with ddof 0")),
    "grpo_eps_inside": B("grpo_advantages", "GRPO's eps inside the root, sqrt(var + eps)",
                         "LayerNorm's form carried over to TRL's std + 1e-4", cf("grpo_advantages", "eps inside")),
    "grpo_no_exact_zero": B("grpo_advantages", "no exact-zero rule: a flat group's rounding noise / (std + eps)",
                            "TRL's (r - mean) / (std + 1e-4): 2.3e-13 of noise becomes 2.3e-9, 0 / 0 at eps 0 "
                            "(TRL PR 3502 logs frac_reward_zero_std)", cf("grpo_advantages", "no exact-zero")),
    "grpo_verl_singleton": B("grpo_advantages", "a group of one passes A = r / (1 + eps) on",
                             "verl compute_grpo_outcome_advantage: a group of one gets mean 0, std 1",
                             cf("grpo_advantages", "verl's group of one")),
    "grpo_eps_verl": B("grpo_advantages", "eps fixed at verl's 1e-6 whatever the argument",
                       "verl's epsilon=1e-6 default kept in a port where eps is an argument (TRL: 1e-4)",
                       cf("grpo_advantages", "eps 1e-6")),
    "grpo_groups_contiguous": B("grpo_advantages", "group ids ignored: rows read as contiguous runs of G",
                                "StarsfieldAI/R1-V issue 67: completions interleaved across prompts grouped by "
                                "rewards.view(-1, G)", cf("grpo_advantages", "group ids ignored")),
    "dr_grpo_no_exact_zero": B("dr_grpo_advantages", "r - r.mean() without the exact-zero rule",
                               "rounding noise on flat groups escapes zero tests (DAPO's filter, TRL's "
                               "frac_reward_zero_std)", cf("dr_grpo_advantages", "no exact-zero")),
    "dr_grpo_std_kept": B("dr_grpo_advantages", "Dr. GRPO with GRPO's std division left on",
                          "TRL scale_rewards / verl norm_adv_by_std_in_grpo left on (Liu et al. 2025 sec. 3.1)",
                          cf("dr_grpo_advantages", "GRPO's std division")),
    "rloo_divide_by_g": B("rloo_advantages", "RLOO's leave-one-out mean divided by G instead of G - 1",
                          "the baseline written (sum - r) / G", cf("rloo_advantages", "the leave-one-out mean")),
    "rloo_group_mean": B("rloo_advantages", "RLOO with the whole group's mean as baseline",
                         "RLOO taken for GRPO's baseline (TRL's RLOO: (sum - r) / (k - 1))",
                         cf("rloo_advantages", "the whole group's mean")),
    "rloo_completion_major": B("rloo_advantages", "(P, G) rewards read as TRL's RLOO lays them out, (G, P)",
                               "TRL rloo_trainer: rlhf_reward.reshape(rloo_k, -1) is completion-major; applied to "
                               "prompt-major rows it mixes prompts (R1-V issue 67)", fwd(rloo_completion_major)),
    "reinforce_pp_unbiased": B("reinforce_pp_advantages", "REINFORCE++ whitened with the unbiased variance",
                               "verl compute_reinforce_plus_plus_outcome_advantage: masked_whiten, "
                               "masked_var(unbiased=True)", cf("reinforce_pp_advantages", "whitened with")),
    "reinforce_pp_no_to_go": B("reinforce_pp_advantages", "REINFORCE++ without the reward-to-go",
                               "the return written as each token's own reward",
                               cf("reinforce_pp_advantages", "no reward-to-go")),
    "reinforce_pp_baseline_tiled": B("reinforce_pp_baseline", "REINFORCE++-baseline as verl computes it",
                                     "verl compute_reinforce_plus_plus_baseline_outcome_advantage: the score minus "
                                     "its group mean on every token, no reward-to-go",
                                     cf("reinforce_pp_baseline", "verl's REINFORCE++-baseline")),
    "reinforce_pp_baseline_std": B("reinforce_pp_baseline", "REINFORCE++-baseline dividing by the group's std too",
                                   "GRPO's advantages reused as the baseline (OpenRLHF's reinforce_baseline: "
                                   "'/ std is not needed')", cf("reinforce_pp_baseline", "the group's std")),
    "dynamic_sampling_std": B("dynamic_sampling_keep", "groups kept when np.std > 0, and groups of one",
                              "verl's DAPO filter: std > 0 or len == 1; np.std of three 0.1 is 1.4e-17",
                              cf("dynamic_sampling_keep", "groups kept when np.std")),
    "overlong_over_max": B("overlong_penalty", "the overlong penalty divided by L_max instead of L_cache",
                           "DAPO eq. 13 misread", cf("overlong_penalty", "divided by L_max")),
    "overlong_no_floor": B("overlong_penalty", "the overlong penalty without its floor at -1",
                           "verl's overlong buffer: min(-exceed_len / overlong_buffer_len * factor, 0)",
                           cf("overlong_penalty", "no floor")),
    # critic-free: policy losses
    "clip_higher_ignored": B("token_loss", "eps_low on both sides: DAPO's clip-higher lost",
                             "clip-higher ported with a single epsilon (TRL's epsilon before epsilon_high)",
                             cf("token_loss", "eps_low on both")),
    "clip_eps_swapped": B("token_loss", "eps_low and eps_high swapped", "argument order of verl's clip_ratio_low "
                          "/ clip_ratio_high, TRL's epsilon_low / epsilon_high", cf("token_loss", "eps_low and")),
    "token_ratio_one": B("token_loss", "the ratio taken against logp itself, logp_old ignored",
                         "TRL's old_per_token_logps = per_token_logps.detach() shortcut (right only when "
                         "num_iterations = 1) used off-policy; TRL issues 2703, 3452: that loss is 0 on policy",
                         token_loss_ratio_one),
    "token_log_ratio_clamped": B("token_loss", "the log-ratio clamped to +-20",
                                 "verl compute_policy_loss_vanilla: negative_approx_kl clamped to [-20, 20]",
                                 cf("token_loss", "the log-ratio clamped")),
    "gspo_sum": B("sequence_loss", "GSPO's ratio from the sum of the log-ratios, not their mean",
                  "GSPO's (pi / pi_old)^(1/|y|) read as the whole sequence's ratio", cf("sequence_loss", "the sum")),
    "gspo_padded_width": B("sequence_loss", "GSPO's mean over the padded width T",
                           "mask.sum(-1) replaced by the width of the batch", cf("sequence_loss", "the mean over")),
    "gspo_token_ratio": B("sequence_loss", "GSPO with per-token ratios averaged per row",
                          "TRL's importance_sampling_level left at 'token'", cf("sequence_loss", "per-token ratios")),
    "sequence_sum_as_mean": B("sequence_loss_sum", "the summed sequence ratio taken as GSPO's mean",
                              "ratio 'sum' and 'mean' confused", cf("sequence_loss_sum", "the mean")),
    "reinforce_mean": B("reinforce_loss", "REINFORCE's log-probs averaged over the tokens",
                        "sequence log-prob averaged, as TRL's IPO averages", cf("reinforce_loss", "the log-probs")),
    # critic-free: aggregators
    "token_mean_local": B("token_weights", "token_mean normalised by each micro-batch's own token count",
                          "TRL issue 3021 (bnpo per micro-batch: gradient accumulation changes the update); "
                          "open-instruct PR 1161", cf("token_weights", "token_mean normalised by the micro")),
    "token_mean_double_ga": B("token_weights", "token_mean divided by the whole batch's tokens and again by the "
                              "number of micro-batches", "TRL issue 5619 / PR 6024: DAPO's normaliser counts "
                              "another batch than the accumulated one; ms-swift issue 10117",
                              cf("token_weights", "token_mean normalised by the whole")),
    "grpo_as_token_mean": B("token_weights", "GRPO's seq_mean_token_mean computed as the token mean",
                            "TRL issue 2995 (PR 2881 made GRPO's loss the global token mean: a non-zero on-policy "
                            "loss); verl issue 593", cf("token_weights", "seq_mean_token_mean computed")),
    "constant_padded_width": B("token_weights", "Dr. GRPO's constant normaliser with the padded width T",
                               "verl agg_loss seq-mean-token-sum-norm: loss_mask.shape[-1]",
                               cf("token_weights", "constant normalised by the padded")),
    "constant_no_rows": B("token_weights", "Dr. GRPO's constant normaliser without the row count",
                          "verl issue 3741: seq-mean-token-sum-norm sums over rows, so the loss scales with the "
                          "micro-batch size", cf("token_weights", "constant without")),
    "constant_as_seq_mean": B("aggregate", "the constant aggregator computed as seq_mean_token_mean",
                              "Dr. GRPO run with GRPO's loss_type (TRL 'grpo' for 'dr_grpo')",
                              cf("aggregate", "constant computed as")),
    "token_mean_with_padding": B("aggregate", "token_mean as the mean over every position, padding included",
                                 "open-instruct PR 535: a loss term averaged over padding",
                                 fwd(aggregate_padded_token_mean)),
    # critic-free: the KL as a loss term
    "k3_ratio_upside_down": B("kl_loss_k3", "k3 as e^d - 1 - d: the ratio upside down",
                              "TRL issue 2914 (which ratio k3 takes); Schulman's r = p_ref / p read the other way",
                              cf("kl_loss_k3", "k3 as e^d")),
    "k3_clamped": B("kl_loss_k3", "k3 clamped to [-10, 10]", "verl kl_penalty low_var_kl; OpenRLHF "
                    "compute_approx_kl", cf("kl_loss_k3", "clamped")),
    "k3_no_expm1": B("kl_loss_k3", "k3 as exp(-d) - 1 + d, which cancels near d = 0",
                     "TRL's exp(ref - logp) - (ref - logp) - 1, OpenRLHF's log_ratio.exp() - 1 - log_ratio "
                     "(negative in float32 near 0)", fwd(k3_without_expm1)),
    "k3_grad_of_k2": B("kl_loss_k3", "k3's backward taking d, k2's (the reverse KL's) gradient, for 1 - e^-d",
                       "hand-written backward; OpenRLHF PR 1309: k3's gradient is the forward KL's",
                       kl_with_grad("k3", lambda d, rho: d)),
    "kl_detached": B("kl_loss_k2", "the KL loss term without a gradient", "open-instruct issue 530 / PR 531: "
                     "the KL loss computed under torch.no_grad()", kl_with_grad("k2", lambda d, rho: 0 * d)),
    "k1_for_k3": B("kl_loss_k3", "k1 as the loss term where k3 is asked", "open-instruct issue 534: k1 in the "
                   "loss ignores the reference in its expected gradient", cf("kl_loss_k3", "k1 in its place")),
    "rho_detached": B("kl_loss_rho_k3", "rho k3 with rho detached: gradient rho (1 - e^-d), not rho d",
                      "TRL issue 4637 / PR 4638; PR 6503's review: coef_1 is differentiable, so the gradient "
                      "changes even where rho = 1", kl_with_grad("rho_k3", lambda d, rho: -rho * np.expm1(-d))),
    "kl_padding": B("kl_loss_k1", "the KL term not zeroed at padding", "open-instruct PR 535: (beta * kl).mean() "
                    "over padding", fwd(lambda logp, logp_ref, mask, kind, logp_old=None: logp - logp_ref)),
    # LoRA
    "lora_scale_alpha": B("lora_linear", "LoRA's update scaled by alpha, not alpha / r",
                          "PEFT's scaling = lora_alpha / r ported as lora_alpha", cf("lora_linear", "the update "
                                                                                      "scaled by alpha")),
    "lora_rslora_ignored": B("lora_linear", "rsLoRA's flag ignored: alpha / r", "use_rslora dropped (PEFT: "
                             "lora_alpha / sqrt(r); Kalajdzievski 2023)", cf("lora_linear", "alpha / r under")),
    "lora_update_transposed": B("lora_linear", "the update transposed on square layers", "PEFT's delta weight "
                                "lora_B.weight @ lora_A.weight is (out, in); added to an (in, out) W0 without .T, "
                                "a square layer raises no shape error", lora_transposed_on_square),
    "lora_grad_into_w0": B("lora_linear", "a gradient for the frozen W0", "the base left trainable (PEFT freezes "
                           "it: _mark_only_adapters_as_trainable)", lora_grad_into_w0),
    "merge_no_scale": B("lora_merge", "LoRA merged without its scale, W0 + A B", "PEFT's get_delta_weight "
                        "multiplies by scaling; a hand merge without it", cf("lora_merge", "merged without")),
    "merge_transposed": B("lora_merge", "the merged update transposed", "PEFT's transpose(B @ A, fan_in_fan_out) "
                          "added to an (in, out) weight", fwd(merge_transposed_on_square)),
    "unmerge_no_scale": B("lora_merge", "unmerge without the scale (merge right)", "merge and unmerge written "
                          "apart, the scale in one of them", fwd(unmerge_without_scale)),
    "lora_model_scale_alpha": B("lora_model", "the adapted model scaled by alpha, not alpha / r", "as "
                                "lora_scale_alpha, in the model", model_cf("lora_model", "the update scaled")),
    "lora_model_attention_only": B("lora_model", "only attention's layers adapted, the MLP's adapters ignored",
                                   "PEFT's default target_modules are attention projections for many models; "
                                   "the adapter names the MLP's too", model_cf("lora_model", "only attention")),
    "lora_merged_in_place": B("lora_model", "the forward merges into the base in place and unmerges after",
                              "merge_adapter / unmerge_adapter around a forward: each call moves the base, and "
                              "so the reference, by a rounding", lora_merged_in_place),
    "lora_init_b_random": B("lora_init", "B initialised random, not 0", "PEFT init_lora_weights=False: B keeps "
                            "nn.Linear's init, the adapter is no longer a no-op (TRL issue 3194: the reference is "
                            "then not the starting policy)", lora_init_with(B_std=0.01)),
    "lora_init_fan_in_r": B("lora_init", "A's kaiming-uniform bound from fan-in r", "torch's kaiming_uniform_ on "
                            "the (in, r) A takes fan-in r; PEFT inits lora_A.weight (r, in)",
                            lora_init_with(fan_in=lambda d_in, r: r)),
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
