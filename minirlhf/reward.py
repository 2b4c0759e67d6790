"""The reward model: a transformer trunk with a scalar head, trained on the annotator's rankings.

Model. The SFT model's trunk (transformer.hidden_forward, not a copy) gives final hidden states h (B, T, C);
the score is read at the EOS token, the last real token of `BOS prompt response EOS`:

    r = h[b, t_eos] . w + b_head          w ~ N(0, 1 / sqrt(C + 1)), b_head = 0 (minirlhf/CONVENTIONS.md)

Backward: dh[b, t_eos] = dr_b w, dw = sum_b dr_b h[b, t_eos], db_head = sum_b dr_b, then the trunk's own
backward. A response that never emitted EOS is never scored (PPO gives it a fixed score instead).

Loss (Bradley & Terry 1952; Christiano et al. 2017; Stiennon et al. 2020). The annotator prefers y_w to
y_l with probability sigmoid(u_w - u_l); the reward model models that probability as sigmoid(r_w - r_l)
and minimises the negative log-likelihood of the labels:

    d = r_chosen - r_rejected - margin
    L = -log sigmoid(d) = softplus(-d)                   stable for any d: logaddexp(0, -d)
    dL/dr_chosen = sigmoid(d) - 1,  dL/dr_rejected = 1 - sigmoid(d)

K-way rankings (InstructGPT, Ouyang et al. 2022): every one of the C(K, 2) pairs of one prompt's ranking,
their losses averaged within the prompt, one prompt one batch element (the K responses share one forward
pass, and K correlated pairs do not each count as an independent example). With K = 2 it is the pairwise
loss. Optional terms:
  - margin (Llama 2, Touvron et al. 2023): subtracted from d, asks for a gap of at least `margin`;
  - centering (Eisenstein et al. 2023, as TRL's center_rewards_coefficient): + c (r_i + r_j)^2 per pair,
    with gradient 2 c (r_i + r_j) to both, pulling scores towards mean zero.
The loss fixes only reward differences, so a constant added to every score changes nothing.

Normalisation: after training a gain g and bias c make the scores of SFT-policy samples mean 0, std 1:
score = g r + c. A reward model travels with its normalisation as one value, `RewardModel`, and every
later stage reads normalised scores (`score`, `score_samples`, `sequence_scores`). A response that never
emitted EOS is not scored: it gets NO_EOS_SCORE, -1 in those normalised units (Ziegler et al. 2019), the
one definition every stage uses.
"""
import time
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from . import transformer as tf
from . import validate as V
from .annotator import ceiling_accuracy, prefer_probability, scored_pairs
from .optim import AdamWConfig, adamw_init, adamw_step, lr_schedule
from .tokenizer import EOS, encode_example, last_real_index, pad_batch
from .world import FAMILIES, behaviour, family_of

NO_EOS_SCORE = -1.0  # the score of a response without EOS, in normalised reward units (std 1 on SFT samples)


# ---------------------------------------------------------------- the model

@dataclass(frozen=True)
class RewardModel:
    """A trained reward model and its normalisation: score = gain * r + bias."""
    params: dict  # the trunk's parameters (transformer.param_shapes) plus head.w (C,) and head.b ()
    model_cfg: tf.GPTConfig  # the trunk's architecture
    gain: float = 1.0  # fit_normalisation: scores of SFT samples get mean 0 and std 1
    bias: float = 0.0

    def __post_init__(self):
        try:
            gain, bias = float(self.gain), float(self.bias)
        except (TypeError, ValueError):
            raise ValueError(f"RewardModel.gain and .bias must be numbers, got {self.gain!r}, {self.bias!r}") from None
        if not (np.isfinite(gain) and gain > 0 and np.isfinite(bias)):  # else every later score is NaN or flipped
            raise ValueError(f"RewardModel needs a finite gain > 0 and a finite bias, got gain {self.gain!r}, "
                             f"bias {self.bias!r}")


def init_reward_params(trunk_params, model_cfg, rng):
    """A reward model from a trained trunk (copied, so the SFT model stays as it is) and a fresh head."""
    params = {k: trunk_params[k].copy() for k in tf.param_shapes(model_cfg)}
    dtype = params["wte"].dtype
    params["head.w"] = (rng.standard_normal(model_cfg.n_embd) / np.sqrt(model_cfg.n_embd + 1)).astype(dtype)
    params["head.b"] = np.zeros((), dtype)
    return params


def encode_responses(prompts, responses):
    """Texts -> right-padded (tokens, mask) of `BOS prompt response EOS`, ready to be scored."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses: one response per prompt")
    return pad_batch([encode_example(p, r) for p, r in zip(prompts, responses)], side="right")


def reward_forward(params, model_cfg, tokens, mask):
    """Raw score r (B,) of each sequence, read at its last real token, which must be EOS, and the cache.

    Works for right padding and for a left-padded prompt followed by a right-padded response (PPO).
    """
    tokens, mask = tf.check_tokens(model_cfg, tokens, mask)
    last = last_real_index(mask)
    not_eos = np.flatnonzero(tokens[np.arange(len(tokens)), last] != EOS)
    if not_eos.size:
        raise ValueError(f"sequence {int(not_eos[0])} does not end in EOS: the reward model scores only finished "
                         f"responses (a response with no EOS gets NO_EOS_SCORE instead)")
    h, trunk_cache = tf.hidden_forward(params, model_cfg, tokens, mask)
    h_eos = h[np.arange(len(tokens)), last]  # (B, C)
    r = h_eos @ params["head.w"] + params["head.b"]
    return r, (trunk_cache, h.shape, last, h_eos, params["head.w"])


def reward_backward(dr, cache):
    """Undoes r = h[b, t_eos] . w + b. Returns grads for the trunk and the head."""
    trunk_cache, h_shape, last, h_eos, w = cache
    dr = np.asarray(dr).astype(h_eos.dtype, copy=False)  # the model's float type wins over the cotangent's
    dh = np.zeros(h_shape, dtype=h_eos.dtype)
    dh[np.arange(h_shape[0]), last] = dr[:, None] * w  # only the EOS position feeds the score
    grads = tf.hidden_backward(dh, trunk_cache)
    grads["head.w"] = dr @ h_eos
    grads["head.b"] = np.asarray(dr.sum(), dtype=h_eos.dtype)
    return grads


# ---------------------------------------------------------------- normalised scores, as later stages read them

def normalised(rm, r):
    """gain * r + bias, in float64: the reward model's raw scores in the units every later stage uses."""
    return rm.gain * np.asarray(r, np.float64) + rm.bias


def score(rm, prompts, responses, batch_size=256):
    """Normalised score (float64) of each (prompt, response) text pair; every response must have ended."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses: one response per prompt")
    V.count("score", "batch_size", batch_size)
    out = [reward_forward(rm.params, rm.model_cfg, *encode_responses(prompts[i:i + batch_size],
                                                                     responses[i:i + batch_size]))[0]
           for i in range(0, len(prompts), batch_size)]
    return normalised(rm, np.concatenate(out) if out else np.zeros(0))


def score_samples(rm, prompts, samples):
    """Normalised score of each (text, ended) sample (B,), NO_EOS_SCORE where it did not end.

    Each distinct (prompt, text) is scored once, so identical responses get identical scores (a batch's
    padding could otherwise change the last bit and split one response's score in two).
    """
    if len(prompts) != len(samples):
        raise ValueError(f"{len(prompts)} prompts but {len(samples)} samples: one sample per prompt")
    bad = next((i for i, s in enumerate(samples) if not (isinstance(s, (tuple, list)) and len(s) == 2)), None)
    if bad is not None:
        raise ValueError(f"samples[{bad}] is {samples[bad]!r}, not a (text, ended) pair")
    keys = sorted({(p, t) for p, (t, e) in zip(prompts, samples) if e})
    of = dict(zip(keys, score(rm, [p for p, _ in keys], [t for _, t in keys])))
    return np.array([of[(p, t)] if e else NO_EOS_SCORE for p, (t, e) in zip(prompts, samples)], np.float64)


def sequence_scores(rm, tokens, mask, ended):
    """Normalised scores (B,) of token sequences (prompt + response, any padding), NO_EOS_SCORE where not ended.

    ended: (B,) bool (an integer array would index rows instead of masking them)."""
    ended = np.asarray(ended)
    if ended.dtype != bool or ended.shape != np.shape(tokens)[:1]:
        raise ValueError(f"ended must be a bool array of shape ({np.shape(tokens)[0]},), one flag per row of "
                         f"tokens, got {ended.dtype} {ended.shape}")
    scores = np.full(len(ended), NO_EOS_SCORE, np.float64)
    if np.any(ended):
        scores[ended] = normalised(rm, reward_forward(rm.params, rm.model_cfg, tokens[ended], mask[ended])[0])
    return scores


# ---------------------------------------------------------------- the losses

def bt_loss_forward(r_chosen, r_rejected, margin=0.0, center_coef=0.0):
    """Mean over pairs of -log sigmoid(r_chosen - r_rejected - margin) [+ c (r_chosen + r_rejected)^2]."""
    r_chosen, r_rejected = np.asarray(r_chosen), np.asarray(r_rejected)
    if r_chosen.shape != r_rejected.shape or r_chosen.ndim != 1 or r_chosen.size == 0:
        raise ValueError(f"chosen and rejected rewards must be 1-D of one non-zero size, got "
                         f"{r_chosen.shape} and {r_rejected.shape}")
    V.finite_array("r_chosen", r_chosen), V.finite_array("r_rejected", r_rejected)
    V.number("bt_loss", "margin", margin), V.number("bt_loss", "center_coef", center_coef, low=0)
    d = r_chosen - r_rejected - margin
    total = r_chosen + r_rejected
    loss = np.mean(np.logaddexp(0.0, -d)) + center_coef * np.mean(total * total)
    return d.dtype.type(loss), (d, total, center_coef)  # a scalar of the input dtype


def bt_loss_backward(dloss, cache):
    """Undoes the mean of softplus(-d) + c total^2. Returns (dr_chosen, dr_rejected)."""
    d, total, c = cache
    n = d.size
    dd = -expit(-d) / n * dloss  # d/dd softplus(-d) = -sigmoid(-d) = sigmoid(d) - 1
    dtotal = 2 * c * total / n * dloss
    return (dd + dtotal).astype(d.dtype), (-dd + dtotal).astype(d.dtype)


def ranking_loss_forward(rewards, valid=None, margin=0.0, center_coef=0.0):
    """K-way loss. rewards (B, K) in rank order (column 0 the best), valid (B, K) marks scored responses.

    Per row, the mean over its valid pairs i < j of softplus(-(r_i - r_j - margin)) [+ c (r_i + r_j)^2];
    then the mean over rows that have at least one pair.
    """
    rewards = np.asarray(rewards)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (B, K) with K >= 2, got shape {rewards.shape}")
    valid = np.ones(rewards.shape, bool) if valid is None else np.asarray(valid)
    if valid.shape != rewards.shape or not np.isin(valid, (0, 1)).all():
        raise ValueError(f"valid must be a 0/1 or bool array of the rewards' shape {rewards.shape}, got {valid.shape}")
    valid = valid.astype(bool)
    V.finite_array("rewards at valid slots", np.where(valid, rewards, 0))
    V.number("ranking_loss", "margin", margin), V.number("ranking_loss", "center_coef", center_coef, low=0)
    rewards = np.where(valid, rewards, 0).astype(rewards.dtype)  # unscored slots may hold anything, even NaN
    K = rewards.shape[1]
    pair = np.triu(np.ones((K, K), bool), k=1) & valid[:, :, None] & valid[:, None, :]  # (B, K, K): i < j
    n_pairs = pair.sum(axis=(1, 2))  # (B,)
    rows = n_pairs > 0
    if not rows.any():
        raise ValueError("ranking loss: no row has two valid responses")
    d = rewards[:, :, None] - rewards[:, None, :] - margin  # d[b, i, j] = r_i - r_j - margin
    total = rewards[:, :, None] + rewards[:, None, :]
    w = np.where(pair, 1.0 / np.maximum(n_pairs, 1)[:, None, None], 0.0) / rows.sum()  # pair weights
    loss = np.sum(w * (np.logaddexp(0.0, -d) + center_coef * total * total))
    return rewards.dtype.type(loss), (d, total, w, center_coef, rewards.dtype)


def ranking_loss_backward(dloss, cache):
    """Undoes the weighted sum over pairs: each pair pushes r_i by dL/dd and r_j by -dL/dd."""
    d, total, w, c, dtype = cache
    dd = -expit(-d) * w * dloss  # (B, K, K)
    dtotal = 2 * c * total * w * dloss
    # d[b, i, j] = r_i - r_j: +dd to row i (sum over j), -dd to column j (sum over i); total feeds both
    return (dd.sum(2) - dd.sum(1) + dtotal.sum(2) + dtotal.sum(1)).astype(dtype)


# ---------------------------------------------------------------- training

@dataclass(frozen=True)
class RewardConfig:
    steps: int = 300  # optimiser steps
    batch_size: int = 16  # prompts (comparisons) per step, each with its K responses
    lr: float = 1e-3  # peak learning rate, linear warm-up then decay to 0
    warmup_steps: int = 20  # warm-up steps
    weight_decay: float = 0.01  # AdamW decoupled decay on matrices
    max_grad_norm: float = 1.0  # global-norm gradient clip
    margin: float = 0.0  # required reward gap (0: plain Bradley-Terry)
    center_coef: float = 0.0  # Eisenstein et al. centering coefficient (0: off)
    eval_every: int = 50  # steps between validation evaluations (and log lines)

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every"):
            V.count("RewardConfig", name, getattr(self, name))
        V.count("RewardConfig", "warmup_steps", self.warmup_steps, minimum=0)
        if not self.warmup_steps < self.steps:
            raise ValueError(f"RewardConfig: need warmup_steps < steps, got {self.warmup_steps} and {self.steps}")
        V.number("RewardConfig", "lr", self.lr, low=0)
        V.number("RewardConfig", "weight_decay", self.weight_decay, low=0)
        V.number("RewardConfig", "max_grad_norm", self.max_grad_norm, low=0, low_open=True)
        V.number("RewardConfig", "margin", self.margin)
        V.number("RewardConfig", "center_coef", self.center_coef, low=0)


def ranked_batch(comparisons):
    """Comparisons -> the ended responses to score and where their rewards go in a (B, K) ranked array."""
    K = max(len(c.responses) for c in comparisons)
    prompts, responses, slots = [], [], []
    for b, c in enumerate(comparisons):
        if len(set(c.ranking)) != len(c.ranking):
            raise ValueError(f"ranking {c.ranking} for {c.prompt!r} repeats an item")
        for rank_pos, i in enumerate(c.ranking):
            if c.ended[i]:
                prompts.append(c.prompt)
                responses.append(c.responses[i])
                slots.append((b, rank_pos))
    return prompts, responses, np.array(slots).reshape(-1, 2), (len(comparisons), K)


def batch_loss(params, model_cfg, comparisons, rm_cfg):
    """K-way loss of a batch of comparisons, and the caches its gradient needs."""
    prompts, responses, slots, shape = ranked_batch(comparisons)
    r, cache = reward_forward(params, model_cfg, *encode_responses(prompts, responses))
    rewards = np.zeros(shape, r.dtype)
    valid = np.zeros(shape, bool)
    rewards[slots[:, 0], slots[:, 1]] = r
    valid[slots[:, 0], slots[:, 1]] = True
    loss, lcache = ranking_loss_forward(rewards, valid, rm_cfg.margin, rm_cfg.center_coef)
    return float(loss), (cache, lcache, slots)


def loss_and_grads(params, model_cfg, comparisons, rm_cfg):
    """K-way loss of a batch of comparisons and its gradient for every parameter."""
    loss, (cache, lcache, slots) = batch_loss(params, model_cfg, comparisons, rm_cfg)
    drewards = ranking_loss_backward(1.0, lcache)
    return loss, reward_backward(drewards[slots[:, 0], slots[:, 1]], cache)


def expected_agreement(r_a, r_b, p_a):
    """P(the annotator's label agrees with the model's order) per pair, with p_a = P(annotator prefers a):
    p_a where r_a > r_b, 1 - p_a where r_a < r_b, 1/2 on a tie (a coin flip). Never above max(p_a, 1 - p_a)."""
    r_a, r_b, p_a = np.asarray(r_a), np.asarray(r_b), np.asarray(p_a)
    if not r_a.shape == r_b.shape == p_a.shape:  # broadcasting would pair one score with every other
        raise ValueError(f"r_a, r_b and p_a must have one shape (one entry per pair), got {r_a.shape}, {r_b.shape}, "
                         f"{p_a.shape}")
    return np.where(r_a == r_b, 0.5, np.where(r_a > r_b, p_a, 1 - p_a))


def evaluate(rm, comparisons, annotator, n_bins=5):
    """Agreement with the annotator on every scored pair, oriented by original sample order (a sampled
    before b), overall and per prompt family:
      accuracy           the fraction of the annotator's sampled labels the reward model reproduces (a tie
                         counts 1/2);
      expected_accuracy  the same agreement in expectation over the annotator's randomness: p(a > b) where
                         the model ranks a first, 1 - p where it ranks b first, 1/2 on a tie. Unbiased for
                         what accuracy estimates, without the label-sampling noise (about +-0.01 on 1800
                         pairs), and on the same footing as the exact ceiling, mean max(p, 1 - p), which
                         it can never exceed;
    and calibration bins of predicted P(a > b) = sigmoid(r_a - r_b) against the annotator's exact p."""
    rows = []
    for c in comparisons:
        for w, l in scored_pairs(c):
            a, b = min(w, l), max(w, l)
            rows.append((c.prompt, c.responses[a], c.responses[b], w == a))
    if not rows:
        raise ValueError(f"evaluate: no scored pair (two ended responses) in {len(comparisons)} comparisons")
    V.count("evaluate", "n_bins", n_bins)
    ended = [(c.prompt, c.responses[i]) for c in comparisons for i in range(len(c.responses)) if c.ended[i]]
    r_of = dict(zip(ended, score(rm, [p for p, _ in ended], [r for _, r in ended])))  # each response scored once
    ra = np.array([r_of[(p, a)] for p, a, _, _ in rows])
    rb = np.array([r_of[(p, b)] for p, _, b, _ in rows])
    a_won = np.array([won for *_, won in rows])
    correct = np.where(ra == rb, 0.5, (ra > rb) == a_won)
    pred = expit(ra - rb)
    truth = np.array([prefer_probability(p, a, b, annotator) for p, a, b, _ in rows])
    expected = expected_agreement(ra, rb, truth)
    best = np.maximum(truth, 1 - truth)  # the ceiling, pair by pair
    families = np.array([family_of(p) for p, *_ in rows])
    by_family = {f: {"accuracy": float(correct[families == f].mean()),
                     "expected_accuracy": float(expected[families == f].mean()),
                     "ceiling": float(best[families == f].mean()), "pairs": int((families == f).sum())}
                 for f in FAMILIES if (families == f).any()}
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(pred, edges) - 1, 0, n_bins - 1)
    calibration = [{"bin": [float(edges[k]), float(edges[k + 1])], "count": int((which == k).sum()),
                    "predicted": float(pred[which == k].mean()) if (which == k).any() else None,
                    "annotator": float(truth[which == k].mean()) if (which == k).any() else None}
                   for k in range(n_bins)]
    return {"accuracy": float(correct.mean()), "expected_accuracy": float(expected.mean()),
            "ceiling": ceiling_accuracy(comparisons, annotator),
            "pairs": len(rows), "by_family": by_family, "calibration": calibration}


def sums_checked(rm, comparisons):
    """(rate, n): over the n scored pairs of arithmetic comparisons in which one answer states the right sum
    and the other a wrong one (world.behaviour), the fraction the model scores right-first (None if n = 0).
    The hardest thing this world asks of a reward model: read the prompt's digit and the answer's, compare."""
    right, wrong = {"correct", "rude_correct"}, {"wrong", "overconfident_wrong"}
    pairs = []
    for c in comparisons:
        if family_of(c.prompt) != "arithmetic":
            continue
        for w, l in scored_pairs(c):
            a, b = c.responses[w], c.responses[l]
            kinds = behaviour(c.prompt, a), behaviour(c.prompt, b)
            if kinds[0] in right and kinds[1] in wrong:
                pairs.append((c.prompt, a, b))
            elif kinds[1] in right and kinds[0] in wrong:
                pairs.append((c.prompt, b, a))
    if not pairs:
        return None, 0
    r_right = score(rm, [p for p, _, _ in pairs], [a for _, a, _ in pairs])
    r_wrong = score(rm, [p for p, _, _ in pairs], [b for _, _, b in pairs])
    return float(np.mean(r_right > r_wrong)), len(pairs)


def train_reward_model(params, model_cfg, train, val, rm_cfg, annotator, rng, log=print):
    """Train params (in place) on train comparisons; evaluate on val. Returns a history of dicts."""
    train = [c for c in train if len(scored_pairs(c)) > 0]
    if not train or not val:
        raise ValueError("train_reward_model needs comparisons with at least one scored pair in train and val")
    tf.check_batch_fits("train_reward_model", model_cfg, rm_cfg.batch_size * max(len(c.responses) for c in train),
                        params["wte"].dtype)
    opt = AdamWConfig(lr=rm_cfg.lr, weight_decay=rm_cfg.weight_decay, max_grad_norm=rm_cfg.max_grad_norm)
    state, history, t0 = adamw_init(params), [], time.perf_counter()
    for step in range(rm_cfg.steps):
        t_step = time.perf_counter()
        batch = [train[i] for i in rng.integers(0, len(train), rm_cfg.batch_size)]
        loss, grads = loss_and_grads(params, model_cfg, batch, rm_cfg)
        lr = lr_schedule(step, rm_cfg.steps, rm_cfg.lr, rm_cfg.warmup_steps)
        grad_norm = adamw_step(params, grads, state, opt, lr=lr)
        step_ms = 1000 * (time.perf_counter() - t_step)
        if (step + 1) % rm_cfg.eval_every == 0 or step == rm_cfg.steps - 1:
            ev = evaluate(RewardModel(params, model_cfg), val, annotator)
            rec = {"stage": "reward_model", "step": step + 1, "loss": loss, "val_accuracy": ev["accuracy"],
                   "val_expected_accuracy": ev["expected_accuracy"], "ceiling_accuracy": ev["ceiling"], "lr": lr,
                   "grad_norm": grad_norm, "ms": step_ms, "seconds": time.perf_counter() - t0}
            history.append(rec)
            log(f"rm  step {step + 1:4d} | loss {loss:.3f} | val acc {ev['accuracy']:.3f}, expected "
                f"{ev['expected_accuracy']:.3f} | ceiling {ev['ceiling']:.3f} | {rec['ms']:5.0f} ms")
    return history


def fit_normalisation(params, model_cfg, prompts, responses):
    """The RewardModel whose scores of these (SFT-policy, ended) samples have mean 0 and std 1."""
    r = score(RewardModel(params, model_cfg), prompts, responses)
    std = float(r.std()) if len(r) else 0.0
    if len(r) < 2 or not std > 1e-6 * (1 + float(np.abs(r).max())):  # rounding is not spread
        raise ValueError(f"cannot normalise over {len(r)} scores that are all equal (std {std:.3g}): the "
                         f"reward model scores every sample the same; train it on rankings of different samples")
    return RewardModel(params, model_cfg, gain=1.0 / std, bias=float(-r.mean() / std))
