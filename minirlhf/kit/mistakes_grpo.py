"""The porting mistakes the kit can name for the critic-free methods and LoRA (mistakes.py has the rest and
`diagnose`): for a function, what minirlhf's output would be with the mistake, in the kit's calling
convention. Each is a convention another library chose differently (verl, OpenRLHF, TRL, PEFT; stated in
minirlhf/CONVENTIONS.md) or a bug on the public record of ports (tests/kit_bugs.py cites them).

MISTAKES_GRPO[name] = [(description, convention id, fn(**inputs) -> output)]; the functions of MODEL_BASED
take the model's config first.
"""
import numpy as np

from .. import grpo_objective as go
from .. import transformer as tf
from .reference_grpo import lora_scale


def _flat(rewards, groups):
    """(flat rewards, group index, shape) as grpo_objective reads them."""
    r = np.asarray(rewards, np.float64)
    ids = np.repeat(np.arange(r.shape[0]), r.shape[1]) if groups is None else \
        np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    return r.reshape(-1), ids, r.shape


def _per_group(fn):
    """An advantage function from fn(r of one group, **kw) -> A of that group, applied group by group."""
    def advantages(rewards, groups=None, **kw):
        r, ids, shape = _flat(rewards, groups)
        out = np.zeros_like(r)
        for g in np.unique(ids):
            out[ids == g] = fn(r[ids == g], **kw)
        return out.reshape(shape)
    return advantages


def _std_form(std, zero_rule=True, singleton=None):
    """GRPO's A with std(r, ddof, eps) as the denominator; zero_rule False: no exact 0 for a flat group;
    singleton: what a group of one gets (None: 0)."""
    def fn(r, ddof=1, eps=1e-4):
        if len(r) == 1:
            return np.zeros(1) if singleton is None else singleton(r, eps)
        if zero_rule and r.max() == r.min():
            return np.zeros(len(r))
        with np.errstate(all="ignore"):
            return (r - r.mean()) / std(r, ddof, eps)
    return _per_group(fn)


def _contiguous(fn):
    """fn applied to rewards taken as contiguous runs of G rows (rewards.view(-1, G)), ids ignored."""
    def advantages(rewards, groups=None, **kw):
        if groups is None:
            return fn(rewards, None, **kw)
        r, ids, shape = _flat(rewards, groups)
        n = len(np.unique(ids))
        if len(r) % n:
            raise ValueError("unequal groups")
        return fn(r.reshape(n, -1), None, **kw).reshape(shape)
    return advantages


def _rpp(baseline_fn=None, whiten_ddof=0, to_go=True, tiled=False):
    """REINFORCE++ with one change: another baseline of the scores, the unbiased whitening, no reward-to-go
    (each token's own reward), or verl's -baseline (the baseline-subtracted score on every token, no KL)."""
    def fn(scores, logp, logp_ref, mask, kl_coef, groups=None, baseline=False):
        s = np.asarray(scores, np.float64)
        if baseline:
            s = (baseline_fn or go.dr_grpo_advantages)(s, groups)
        valid = mask > 0
        if tiled:
            x = np.where(valid, s[:, None], 0.0)
        else:
            x = np.where(valid, -kl_coef * (np.where(valid, logp, 0) - np.where(valid, logp_ref, 0)), 0.0)
            x[np.arange(len(x)), mask.sum(1) - 1] += s
            if to_go:
                x = np.cumsum(x[:, ::-1], 1)[:, ::-1]
        v = x[valid]
        return np.where(valid, (x - v.mean()) / np.sqrt(v.var(ddof=whiten_ddof) + 1e-8), 0.0)
    return fn


def _clip_with(low, high):
    """token_loss with the clip range [1 - low(eps_low, eps_high), 1 + high(eps_low, eps_high)]."""
    def fn(logp, logp_old, advantages, mask, eps_low, eps_high):
        return go.token_loss_forward(logp, logp_old, advantages, mask, low(eps_low, eps_high),
                                     high(eps_low, eps_high))[0]
    return fn


def _token_loss_clamped(logp, logp_old, advantages, mask, eps_low, eps_high):  # verl's +-20
    return go.token_loss_forward(np.clip(logp - logp_old, -20, 20) + logp_old, logp_old, advantages, mask, eps_low,
                                 eps_high)[0]


def _sequence_with(kind):
    """sequence_loss with the row's log-ratio taken another way: "sum" for "mean" or the reverse, "width"
    (the mean over the padded width T), "token" (per-token clipped losses averaged over the row)."""
    def fn(logp, logp_old, advantages, mask, eps_low, eps_high, ratio):
        valid = mask > 0
        if kind == "token":
            per_tok, _ = go.token_loss_forward(logp, logp_old, go.broadcast(advantages, mask), mask, eps_low, eps_high)
            return np.where(valid.any(1), per_tok.sum(1) / np.maximum(valid.sum(1), 1), 0)
        d = (np.where(valid, logp, 0) - np.where(valid, logp_old, 0)).sum(1)
        log_s = d / mask.shape[1] if kind == "width" else (d if ratio == "mean" else d / np.maximum(valid.sum(1), 1))
        s = np.exp(log_s)
        loss = np.maximum(-advantages * s, -advantages * np.clip(s, 1 - eps_low, 1 + eps_high))
        return np.where(valid.any(1), loss, 0)
    return fn


def _weights_with(kind, c):
    """token_weights_all with aggregator `kind`'s weights replaced by c(mask, max_len, n_rows, n_tokens)."""
    def fn(mask, max_len, n_rows, n_tokens):
        out = {k: go.token_weights(mask, k, max_len, n_rows, n_tokens) for k in go.AGGREGATORS}
        out[kind] = np.where(mask > 0, c(mask, max_len, n_rows, n_tokens), 0.0)
        return out
    return fn


def _aggregate_with(changed, c):
    """aggregate_forward with aggregator `changed`'s weights replaced by c."""
    def fn(losses, mask, kind, max_len, n_rows, n_tokens):
        weights = _weights_with(changed, c)(mask, max_len, n_rows, n_tokens)[kind]
        return (weights * np.where(mask > 0, losses, 0)).sum()
    return fn


WEIGHT_MISTAKES = [  # (description, convention, aggregator, c)
    ("token_mean normalised by the micro-batch's own token count, not the whole batch's", "whole_batch_normaliser",
     "token_mean", lambda m, L, n, N: 1.0 / max(m.sum(), 1)),
    ("token_mean normalised by the whole batch's tokens and again by the number of micro-batches",
     "whole_batch_normaliser", "token_mean", lambda m, L, n, N: len(m) / (N * n)),
    ("seq_mean_token_mean computed as the token mean (TRL's global normalisation)", "aggregators",
     "seq_mean_token_mean", lambda m, L, n, N: 1.0 / N),
    ("seq_mean_token_mean with the micro-batch's own row count", "whole_batch_normaliser", "seq_mean_token_mean",
     lambda m, L, n, N: 1.0 / (len(m) * np.maximum(m.sum(1, keepdims=True), 1))),
    ("constant normalised by the padded width T, not L_max (verl's seq-mean-token-sum-norm)", "aggregators",
     "constant", lambda m, L, n, N: 1.0 / (n * m.shape[1])),
    ("constant without the row count, sum / L_max (verl's seq-mean-token-sum-norm)", "aggregators", "constant",
     lambda m, L, n, N: 1.0 / L),
    ("constant computed as seq_mean_token_mean, 1/(B L_i)", "aggregators", "constant",
     lambda m, L, n, N: 1.0 / (n * np.maximum(m.sum(1, keepdims=True), 1))),
    ("seq_sum computed as the token sum without 1/B", "aggregators", "seq_sum", lambda m, L, n, N: 1.0),
]


def _kl_with(value):
    """kl_loss_forward's output with the term computed as value(d, rho), 0 at padding."""
    def fn(logp, logp_ref, mask, kind, logp_old=None):
        valid = mask > 0
        d = np.where(valid, logp, 0) - np.where(valid, logp_ref, 0)
        rho = np.exp(np.where(valid, logp, 0) - np.where(valid, logp_old, 0)) if logp_old is not None else 1.0
        with np.errstate(all="ignore"):
            return np.where(valid, value(d, rho), 0)
    return fn


def _lora_linear_with(scale=None, transpose=False):
    def fn(x, W0, b, A, B, alpha, rslora):
        s = lora_scale(alpha, A.shape[1], rslora) if scale is None else scale(alpha, A.shape[1])
        delta = A @ B
        return x @ W0 + b + s * x @ (delta.T if transpose else delta)
    return fn


def _merge_with(scale=None, transpose=False):
    def fn(W0, A, B, alpha, rslora):
        s = lora_scale(alpha, A.shape[1], rslora) if scale is None else scale(alpha, A.shape[1])
        delta = s * (A @ B)
        merged = W0 + (delta.T if transpose else delta)
        return {"merged": merged, "restored": merged - (delta.T if transpose else delta)}
    return fn


def _lora_model_with(scale=None, only=None, transpose_square=False):
    """The adapted logits (0 at padding queries) with another scale, only the layers in `only` adapted, or
    the square layers' updates transposed."""
    def fn(model_cfg, params, adapter, tokens, mask, alpha, rslora):
        if adapter is None:
            return np.where(mask[..., None] > 0, tf.forward(params, model_cfg, tokens, mask)[0], 0)
        rank = next(v for k, v in adapter.items() if k.endswith("lora_A")).shape[1]
        s = lora_scale(alpha, rank, rslora) if scale is None else scale(alpha, rank)
        merged = dict(params)
        for key, A in adapter.items():
            name = key[:-len(".lora_A")]
            if key.endswith(".lora_A") and (only is None or name.split(".", 1)[1] in only):
                delta = s * (A @ adapter[name + ".lora_B"])
                merged[name] = params[name] + (delta.T if transpose_square and delta.shape[0] == delta.shape[1]
                                               else delta)
        return np.where(mask[..., None] > 0, tf.forward(merged, model_cfg, tokens, mask)[0], 0)
    return fn


ALPHA = lambda alpha, r: alpha  # noqa: E731
PLAIN = lambda alpha, r: alpha / r  # noqa: E731

MODEL_BASED = {"lora_model"}
MISTAKES_GRPO = {
    "grpo_advantages": [
        ("the std with ddof 0 (the biased std)", "grpo_std", _std_form(lambda r, ddof, eps: r.std() + eps)),
        ("eps inside the square root, sqrt(var + eps)", "grpo_std",
         _std_form(lambda r, ddof, eps: np.sqrt(r.var(ddof=ddof) + eps))),
        ("no exact-zero rule: a flat group's rounding noise divided by std + eps (or 0 / 0)", "flat_group_zero",
         _std_form(lambda r, ddof, eps: r.std(ddof=ddof) + eps, zero_rule=False)),
        ("verl's group of one: mean 0, std 1, so A = r / (1 + eps)", "flat_group_zero",
         _std_form(lambda r, ddof, eps: r.std(ddof=ddof) + eps, singleton=lambda r, eps: r / (1 + eps))),
        ("eps 1e-6 (verl's) instead of the one given", "grpo_std",
         _std_form(lambda r, ddof, eps: r.std(ddof=ddof) + 1e-6)),
        ("group ids ignored: rows taken as contiguous runs of G (rewards.view(-1, G))", "group_ids",
         _contiguous(go.grpo_advantages))],
    "dr_grpo_advantages": [
        ("no exact-zero rule: r - mean of a flat group leaves rounding noise", "flat_group_zero",
         _per_group(lambda r: r - r.mean())),
        ("GRPO's std division kept (Dr. GRPO drops it)", "group_baselines", go.grpo_advantages),
        ("group ids ignored: rows taken as contiguous runs of G (rewards.view(-1, G))", "group_ids",
         _contiguous(go.dr_grpo_advantages))],
    "rloo_advantages": [
        ("the leave-one-out mean divided by G instead of G - 1", "group_baselines",
         _per_group(lambda r: np.zeros(len(r)) if r.max() == r.min() else r - (r.sum() - r) / len(r))),
        ("the whole group's mean as baseline (Dr. GRPO's, G / (G - 1) times too small)", "group_baselines",
         go.dr_grpo_advantages),
        ("no exact-zero rule: a flat group leaves rounding noise", "flat_group_zero",
         _per_group(lambda r: r - (r.sum() - r) / (len(r) - 1))),
        ("group ids ignored: rows taken as contiguous runs of G", "group_ids", _contiguous(go.rloo_advantages))],
    "reinforce_pp_advantages": [
        ("whitened with the unbiased variance (verl, OpenRLHF)", "reinforce_pp", _rpp(whiten_ddof=1)),
        ("no reward-to-go: each token's own reward whitened", "reinforce_pp", _rpp(to_go=False))],
    "reinforce_pp_baseline": [
        ("whitened with the unbiased variance (verl, OpenRLHF)", "reinforce_pp", _rpp(whiten_ddof=1)),
        ("verl's REINFORCE++-baseline: the baseline-subtracted score on every token, no KL, no reward-to-go",
         "reinforce_pp", _rpp(tiled=True)),
        ("the group's std divided out too (GRPO's advantages as the baseline)", "reinforce_pp",
         _rpp(baseline_fn=go.grpo_advantages)),
        ("verl's group of one: its score passed on (mean 0)", "flat_group_zero",
         _rpp(baseline_fn=_per_group(lambda r: r if len(r) == 1 else go.dr_grpo_advantages(r[None])[0])))],
    "dynamic_sampling_keep": [
        ("groups kept when np.std > 0 (a flat group whose mean rounds has std 1.4e-17), and groups of one (verl)",
         "dynamic_sampling", lambda rewards, groups=None: _per_group(
             lambda r: np.full(len(r), float(len(r) == 1 or np.std(r) > 0)))(rewards, groups) > 0),
        ("groups of one kept (verl)", "dynamic_sampling", lambda rewards, groups=None: _per_group(
            lambda r: np.full(len(r), float(len(r) == 1 or r.max() > r.min())))(rewards, groups) > 0)],
    "overlong_penalty": [
        ("divided by L_max instead of L_cache", "overlong_penalty",
         lambda lengths, max_len, cache_len: np.clip((max_len - cache_len - np.asarray(lengths)) / max_len, -1, 0)),
        ("no floor at -1 beyond L_max (verl's min(-exceed / L_cache, 0))", "overlong_penalty",
         lambda lengths, max_len, cache_len: np.minimum((max_len - cache_len - np.asarray(lengths)) / cache_len, 0))],
    "token_loss": [
        ("eps_low on both sides (clip-higher ignored)", "token_clip", _clip_with(lambda lo, hi: lo, lambda lo, hi: lo)),
        ("eps_high on both sides", "token_clip", _clip_with(lambda lo, hi: hi, lambda lo, hi: hi)),
        ("eps_low and eps_high swapped", "token_clip", _clip_with(lambda lo, hi: hi, lambda lo, hi: lo)),
        ("the log-ratio clamped to +-20 (verl)", "token_clip", _token_loss_clamped),
        ("min instead of max (the clip's pessimism inverted)", "token_clip",
         lambda logp, logp_old, advantages, mask, eps_low, eps_high: np.where(mask > 0, np.minimum(
             -advantages * np.exp(np.where(mask > 0, logp - logp_old, 0)), -advantages * np.clip(
                 np.exp(np.where(mask > 0, logp - logp_old, 0)), 1 - eps_low, 1 + eps_high)), 0))],
    "sequence_loss": [
        ("the sum of the log-ratios instead of their mean (the full sequence ratio)", "sequence_ratio",
         _sequence_with("sum")),
        ("the mean over the padded width T instead of the row's length", "sequence_ratio", _sequence_with("width")),
        ("per-token ratios clipped and averaged over the row (GRPO's, not GSPO's)", "sequence_ratio",
         _sequence_with("token"))],
    "sequence_loss_sum": [
        ("the mean of the log-ratios instead of their sum", "sequence_ratio", _sequence_with("sum"))],
    "reinforce_loss": [
        ("the log-probs averaged over the row's tokens instead of summed", "reinforce_loss",
         lambda logp, advantages, mask: -advantages * (np.where(mask > 0, logp, 0)).sum(1) / np.maximum(
             mask.sum(1), 1)),
        ("padding summed too", "reinforce_loss", lambda logp, advantages, mask: -advantages * logp.sum(1))],
    "token_weights": [(d, conv, _weights_with(kind, c)) for d, conv, kind, c in WEIGHT_MISTAKES],
    "aggregate": [(d, conv, _aggregate_with(kind, c)) for d, conv, kind, c in WEIGHT_MISTAKES],
    "kl_loss_k1": [("k1 with the log-ratio's sign flipped, logp_ref - logp", "kl_loss", _kl_with(lambda d, rho: -d))],
    "kl_loss_k2": [("k2 without the 1/2", "kl_loss", _kl_with(lambda d, rho: d * d))],
    "kl_loss_k3": [
        ("k3 as e^d - 1 - d (the ratio upside down)", "kl_loss", _kl_with(lambda d, rho: np.expm1(d) - d)),
        ("clamped to [-10, 10] (verl, OpenRLHF)", "kl_loss",
         _kl_with(lambda d, rho: np.clip(np.expm1(-d) + d, -10, 10))),
        ("the log-ratio clamped to +-20 before exp (verl)", "kl_loss",
         _kl_with(lambda d, rho: np.expm1(-np.clip(d, -20, 20)) + np.clip(d, -20, 20))),
        ("k1 in its place", "kl_loss", _kl_with(lambda d, rho: d))],
    "kl_loss_rho_k3": [
        ("k3 without the ratio rho", "kl_loss", _kl_with(lambda d, rho: np.expm1(-d) + d)),
        ("the ratio taken against the reference, exp(logp - logp_ref)", "kl_loss",
         _kl_with(lambda d, rho: np.exp(d) * (np.expm1(-d) + d)))],
    "lora_linear": [
        ("the update scaled by alpha, not alpha / r", "lora_scale", _lora_linear_with(ALPHA)),
        ("alpha / r under rsLoRA (the flag ignored)", "lora_scale", _lora_linear_with(PLAIN)),
        ("the update not scaled", "lora_scale", _lora_linear_with(lambda alpha, r: 1.0)),
        ("the update transposed, x (A B)^T (a square layer raises no shape error)", "lora_layout",
         _lora_linear_with(transpose=True))],
    "lora_merge": [
        ("merged without the scale, W0 + A B", "lora_scale", _merge_with(lambda alpha, r: 1.0)),
        ("merged with alpha, not alpha / r", "lora_scale", _merge_with(ALPHA)),
        ("the update transposed, W0 + s (A B)^T (a square weight raises no shape error)", "lora_layout",
         _merge_with(transpose=True))],
    "lora_model": [
        ("the update scaled by alpha, not alpha / r", "lora_scale", _lora_model_with(ALPHA)),
        ("alpha / r under rsLoRA (the flag ignored)", "lora_scale", _lora_model_with(PLAIN)),
        ("only attention's layers adapted (the MLP's adapters ignored)", "lora_layout",
         _lora_model_with(only=("attn.w_qkv", "attn.w_proj"))),
        ("the square layers' updates transposed (attention's output projection)", "lora_layout",
         _lora_model_with(transpose_square=True))],
}
