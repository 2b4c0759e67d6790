"""Critic-free RL: G completions per prompt, a reward each, advantages relative to the group, a clipped update.

PPO (ppo.py) learns a value model to tell a good action from a lucky one. The methods here replace it by the
other completions of the same prompt: sample a group of G, score each, and push up those that beat their
group. One update:

    1. sample: P prompts (world.sample_prompts), each repeated G times, sampled with the KV cache at the
       policy's temperature (transformer.generate); every log-prob is of softmax(logits / tau)
    2. score:  a reward source gives one float64 reward per completion; optional DAPO filters: the soft
       overlong penalty, dynamic sampling (groups with equal rewards dropped, more groups sampled, up to
       max_sampling_rounds rounds, until P groups are kept)
    3. old and reference log-probs per minibatch of the first epoch, on the very arrays that epoch sees (the
       first ratio is exactly 1, as in PPO); the KL into the reward if it goes there; advantages
    4. learn:  epochs x minibatches of the loss of grpo_objective.py, AdamW, global-norm clip, the learning
       rate decaying linearly to 0 over the updates (optim.lr_schedule)

The presets, ALGOS, follow each paper (the table in grpo_objective.py has the formulas); the scale (G = 8,
8 prompts: 64 completions an update, PPO's demo batch; 4 gradient steps an update; lr) is the demo's:
    grpo          std-normalised advantages, token clip 0.2, seq_mean_token_mean, k3 in the loss, kl_coef 0.04
                  (DeepSeekMath sec. 4.2 uses 0.04)
    dr_grpo       r - mean, token clip 0.2, the constant normaliser B L_max, no KL (Liu et al. 2025)
    dapo          std-normalised, clip-higher 0.2 / 0.28, token_mean, no KL, dynamic sampling, the soft
                  overlong penalty with L_cache = 6 of the 32 tokens (the paper: 4096 of 20480)
    rloo          leave-one-out, REINFORCE on the whole sequence (one gradient step per batch: it has no
                  ratio to correct a stale one), sequence k1 in the reward, kl_coef 0.05 (Ahmadian et al.)
    reinforce_pp  k1 in the per-token reward, reward-to-go z-scored over the batch, token clip 0.2,
                  token_mean, kl_coef 0.05 (Hu 2025); "reinforce_pp_baseline" subtracts the group mean first
    gspo          std-normalised, the sequence ratio clipped to [1 - 3e-4, 1 + 4e-4], no KL (Zheng et al.)
The KL coefficients of rloo and reinforce_pp are minirlhf's, for its normalised rewards (the papers tune
theirs to their own reward scales). A KL in the loss is aggregated with the config's aggregator, as TRL adds
beta k3 to each token's loss before aggregating.

Reward sources: a callable (prompt_texts, samples) -> rewards (B,) float64, samples [(text, ended)]. Two are
built here: `reward_model_source(rm)`, the normalised reward-model score (reward.score_samples:
NO_EOS_SCORE for a response without EOS), and `verifier_source()`, world.verify: 1.0 for a right sum, 0.0
otherwise. The verifier can score arithmetic prompts only; train_critic_free refuses training prompts of a
family its source cannot score (a source's `families`) before any work. A NaN reward raises ValueError.

A non-finite loss or gradient anywhere in an update raises ValueError with nothing of that update written:
each minibatch's gradient is checked, and on failure the trainable arrays and the optimiser state are put
back, in place, as the update found them (a later minibatch's gradient depends on the earlier steps, so
"apply nothing until all are finite" would need the snapshot anyway).

Logged under TRL's GRPO names where it has one: reward, reward_std (mean of the groups' Bessel std),
frac_reward_zero_std, rewards/{source}/mean, completions/mean_length, completions/clipped_ratio (share with
no EOS), completions/mean_terminated_length, entropy (mean per token), kl (per-token mean of k3 between
policy and reference during the loss, as TRL), clip_ratio/low_mean, /high_mean, /region_mean, loss,
grad_norm; PPO's objective/kl (the summed k1 per completion), objective/kl_exact, objective/k3,
policy/approxkl; and gold/score, which only a simulated world knows.
"""
import time
from dataclasses import dataclass, field

import numpy as np

from . import fast
from . import grpo_objective as go
from . import layers as L
from . import transformer as tf
from . import validate as V
from .kl import exact_kl, kl_estimators
from .optim import AdamWConfig, adamw_init, adamw_step, all_or_nothing, lr_schedule
from .ppo import minibatch, response_logprobs, response_part
from .reward import score_samples
from .tokenizer import PAD, decode, encode_prompts
from .world import FAMILIES, get_prompt, gold, sample_prompts, verify

ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
LOSSES = ("token", "sequence", "sequence_sum", "reinforce")


@dataclass(frozen=True)
class CriticFreeConfig:
    algo: str = "grpo"  # the name on each log line
    group_size: int = 8  # G: completions per prompt
    prompts_per_update: int = 8  # P: B = P G completions per update
    updates: int = 30  # sample + learn iterations
    epochs: int = 1  # passes over each batch
    minibatches: int = 4  # gradient steps per epoch, over shuffled equal splits of the B rows
    lr: float = 2e-4  # peak learning rate, decays linearly to 0 over the updates
    max_grad_norm: float = 1.0  # global-norm clip
    advantage: str = "grpo"  # one of ADVANTAGES (grpo_objective.py)
    std_ddof: int = 1  # grpo advantages: the std's ddof (1: Bessel, as TRL, verl, OpenRLHF)
    std_eps: float = 1e-4  # grpo advantages: added to the std (TRL 1e-4)
    loss: str = "token"  # one of LOSSES: token clip, GSPO's sequence ratio, TRL's summed one, REINFORCE
    aggregator: str = "seq_mean_token_mean"  # one of grpo_objective.AGGREGATORS (token losses, and a KL loss)
    eps_low: float = 0.2  # the ratio is clipped to [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.2
    kl_placement: str = "loss"  # none, loss (kl_loss per token), reward (k1: per sequence, or to-go for R++)
    kl_loss: str = "k3"  # one of grpo_objective.KL_LOSSES, when kl_placement is "loss"
    kl_coef: float = 0.04  # beta
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, sample more
    max_sampling_rounds: int = 3  # dynamic sampling: at most this many sampling rounds per update
    overlong: str = "none"  # none, mask (truncated completions out of the loss), penalty (DAPO's soft one)
    overlong_cache: int = 6  # L_cache of the soft penalty, tokens

    def __post_init__(self):
        for name in ("group_size", "prompts_per_update", "updates", "epochs", "minibatches", "max_sampling_rounds",
                     "overlong_cache"):
            V.count("CriticFreeConfig", name, getattr(self, name))
        choices = {"advantage": ADVANTAGES, "loss": LOSSES, "aggregator": go.AGGREGATORS,
                   "kl_placement": ("none", "loss", "reward"), "kl_loss": go.KL_LOSSES,
                   "overlong": ("none", "mask", "penalty")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"CriticFreeConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("lr", "std_eps", "kl_coef"):
            V.number("CriticFreeConfig", name, getattr(self, name), low=0)
        for name in ("max_grad_norm", "eps_low", "eps_high"):
            V.number("CriticFreeConfig", name, getattr(self, name), low=0, low_open=True)
        if self.std_ddof not in (0, 1):
            raise ValueError(f"CriticFreeConfig.std_ddof must be 0 or 1, got {self.std_ddof!r}")
        if self.advantage == "rloo" and self.group_size < 2:
            raise ValueError("CriticFreeConfig.group_size must be >= 2 for rloo advantages (leave one out)")
        if self.advantage.startswith("reinforce_pp") and (self.loss != "token" or self.kl_placement == "loss"):
            raise ValueError("CriticFreeConfig.advantage reinforce_pp has per-token advantages: it needs loss "
                             "'token' and its KL in the reward (kl_placement 'reward' or 'none')")
        if self.loss == "reinforce" and self.epochs * self.minibatches != 1:
            raise ValueError("CriticFreeConfig.loss 'reinforce' is on-policy only: epochs and minibatches must be 1")
        if self.minibatches > self.group_size * self.prompts_per_update:
            raise ValueError(f"CriticFreeConfig.minibatches {self.minibatches} exceeds the batch of "
                             f"{self.group_size * self.prompts_per_update} completions")


ALGOS = {
    "grpo": CriticFreeConfig(),
    "dr_grpo": CriticFreeConfig(algo="dr_grpo", advantage="dr_grpo", aggregator="constant", kl_placement="none",
                                kl_coef=0.0),
    "dapo": CriticFreeConfig(algo="dapo", aggregator="token_mean", eps_high=0.28, kl_placement="none",
                             kl_coef=0.0, dynamic_sampling=True, overlong="penalty"),
    "rloo": CriticFreeConfig(algo="rloo", advantage="rloo", loss="reinforce", aggregator="seq_sum", minibatches=1,
                             kl_placement="reward", kl_coef=0.05),
    "reinforce_pp": CriticFreeConfig(algo="reinforce_pp", advantage="reinforce_pp", aggregator="token_mean",
                                     kl_placement="reward", kl_coef=0.05),
    "gspo": CriticFreeConfig(algo="gspo", loss="sequence", eps_low=3e-4, eps_high=4e-4, kl_placement="none",
                             kl_coef=0.0),
}


# ---------------------------------------------------------------- reward sources

@dataclass(frozen=True)
class RewardSource:
    """A reward for each completion: score(prompt_texts, samples) -> (B,), checked when called."""
    name: str  # logged as rewards/{name}/mean
    score: object  # the callable (prompt_texts, samples) -> (B,) rewards
    families: tuple = field(default=FAMILIES)  # the prompt families it can score

    def __call__(self, prompt_texts, samples):
        return check_rewards(self.score(prompt_texts, samples), len(samples), self.name)


def check_rewards(rewards, n, name="reward source"):
    """rewards as float64 (n,); ValueError naming the first NaN or inf."""
    r = np.asarray(rewards, np.float64)
    if r.shape != (n,):
        raise ValueError(f"{name} returned shape {r.shape}, expected ({n},): one reward per completion")
    bad = np.flatnonzero(~np.isfinite(r))
    if bad.size:
        raise ValueError(f"{name} returned a non-finite reward {r[bad[0]]} for completion {int(bad[0])}")
    return r


def reward_model_source(rm):
    """The normalised reward-model score of every completion; NO_EOS_SCORE for one without EOS."""
    return RewardSource("reward_model", lambda texts, samples: score_samples(rm, texts, samples))


def verifier_source():
    """world.verify on every completion: 1.0 for a right sum, else 0.0. Arithmetic prompts only (the family
    the world can check); another family's prompt raises ValueError naming it."""
    def score(texts, samples):
        return np.array([verify(p, text, ended) for p, (text, ended) in zip(texts, samples)], np.float64)
    return RewardSource("verifier", score, ("arithmetic",))


# ---------------------------------------------------------------- sampling groups

def sample_groups(policy, prompts, group_size, rng):
    """Each prompt repeated G times (rows i G .. i G + G - 1 are group i) and sampled once per row."""
    texts = [p.text for p in prompts for _ in range(group_size)]
    ptok, pmask = encode_prompts(texts)
    gen = tf.generate(policy.params, policy.model_cfg, ptok, pmask, policy.sampling.max_new_tokens, rng,
                      policy.temperature, adapter=policy.adapter)
    return {"texts": texts, "groups": np.repeat(np.arange(len(prompts)), group_size), "ptok": ptok,
            "pmask": pmask, "tokens": gen["tokens"], "mask": gen["mask"], "ended": gen["ended"],
            "samples": [(decode(t), bool(e)) for t, e in zip(gen["tokens"], gen["ended"])]}


def _concat(parts):
    """Rows of several sampled batches as one: prompts left-padded, responses right-padded to common widths."""
    P, N = max(b["ptok"].shape[1] for b in parts), max(b["tokens"].shape[1] for b in parts)
    out, offset = {k: [] for k in parts[0]}, 0
    for b in parts:
        lead, tail = P - b["ptok"].shape[1], N - b["tokens"].shape[1]
        for k in ("ptok", "pmask"):
            out[k].append(np.pad(b[k], ((0, 0), (lead, 0)), constant_values=PAD))
        for k in ("tokens", "mask"):
            out[k].append(np.pad(b[k], ((0, 0), (0, tail)), constant_values=PAD))
        out["groups"].append(b["groups"] + offset)
        offset += int(b["groups"].max()) + 1
        for k in ("texts", "samples", "ended", "rewards"):
            out[k].append(b[k])
    return {k: (sum(v, []) if k in ("texts", "samples") else np.concatenate(v)) for k, v in out.items()}


def _keep_rows(b, rows):
    return {k: ([v[i] for i in rows] if isinstance(v, list) else v[rows]) for k, v in b.items()}


def collect(policy, reward_source, train_prompts, cfg, rng):
    """Sample and score one update's groups (with DAPO's filters). Returns (training rows, every sampled row)."""
    max_len, rounds, kept, seen = policy.sampling.max_new_tokens, 0, [], []
    while True:
        rounds += 1
        b = sample_groups(policy, sample_prompts(train_prompts, cfg.prompts_per_update, rng), cfg.group_size, rng)
        b["rewards"] = check_rewards(reward_source(b["texts"], b["samples"]), len(b["texts"]))
        if cfg.overlong == "penalty":
            b["rewards"] = b["rewards"] + go.overlong_penalty(b["mask"].sum(1), max_len, cfg.overlong_cache)
        seen.append(b)
        if not cfg.dynamic_sampling:
            return b, b, rounds
        rows = np.flatnonzero(go.dynamic_sampling_keep(b["rewards"], b["groups"]))
        if rows.size:
            kept.append(_keep_rows(b, rows))
        n_kept = sum(len(np.unique(k["groups"])) for k in kept)
        if n_kept >= cfg.prompts_per_update or rounds == cfg.max_sampling_rounds:
            every = _concat(seen)
            if not kept:
                return None, every, rounds
            train = _concat(kept)
            train["groups"] = np.unique(train["groups"], return_inverse=True)[1].reshape(-1)  # 0, 1, ... in order
            return _keep_rows(train, np.flatnonzero(train["groups"] < cfg.prompts_per_update)), every, rounds


# ---------------------------------------------------------------- the loss of one minibatch

def advantages_of(batch, cfg):
    """(per-row advantages (B,) or None, per-token advantages (B, T)) of a scored batch with old / ref log-probs."""
    mask, rewards = batch["mask"], batch["rewards"]
    dtype = batch["logp_old"].dtype
    if cfg.advantage.startswith("reinforce_pp"):
        coef = cfg.kl_coef if cfg.kl_placement == "reward" else 0.0
        adv = go.reinforce_pp_advantages(rewards, batch["logp_old"], batch["logp_ref"], mask, coef,
                                         batch["groups"], baseline=cfg.advantage.endswith("baseline"))
        return None, adv.astype(dtype)
    if cfg.kl_placement == "reward":  # R_i = r_i - beta sum_t k1_t, no gradient through it (RLOO)
        rewards = rewards - cfg.kl_coef * kl_estimators(batch["logp_old"], batch["logp_ref"], mask)["k1_sum"]
    fn = {"grpo": lambda r, g: go.grpo_advantages(r, g, cfg.std_ddof, cfg.std_eps),
          "dr_grpo": go.dr_grpo_advantages, "rloo": go.rloo_advantages}[cfg.advantage]
    row = fn(np.asarray(rewards, np.float64), batch["groups"]).astype(dtype)
    return row, go.broadcast(row, mask)


def minibatch_loss(policy, mb, cfg, max_len):
    """The critic-free loss of a minibatch through the policy, and what its gradient needs.

    mb: seq, seq_mask (B, P+N), P, tokens, loss_mask, logp_old, logp_ref, advantages (B, N), adv_row (B,) or
    None. max_len: L_max (the constant aggregator)."""
    P, N = mb["P"], mb["tokens"].shape[1]
    logits_all, pcache = tf.policy_forward(policy, mb["seq"], mb["seq_mask"])
    logp, lcache = L.token_logprobs_forward(response_part(logits_all, P, N), mb["tokens"], policy.temperature)
    mask, B = mb["loss_mask"], len(mb["tokens"])
    if cfg.loss == "token":
        terms, pg = go.token_loss_forward(logp, mb["logp_old"], mb["advantages"], mask, cfg.eps_low, cfg.eps_high)
    elif cfg.loss == "reinforce":
        per_row, pg = go.reinforce_loss_forward(logp, mb["adv_row"], mask)
    else:
        per_row, pg = go.sequence_loss_forward(logp, mb["logp_old"], mb["adv_row"], mask, cfg.eps_low,
                                               cfg.eps_high, "mean" if cfg.loss == "sequence" else "sum")
    kl = None
    if cfg.kl_placement == "loss" and cfg.kl_coef > 0:
        kl_terms, kl = go.kl_loss_forward(logp, mb["logp_ref"], mask, cfg.kl_loss, mb["logp_old"])
    if cfg.loss == "token":  # beta k is added to each token's loss before aggregating (TRL)
        loss, agg = go.aggregate_forward(terms + (cfg.kl_coef * kl_terms if kl else 0), mask, cfg.aggregator, max_len)
    else:  # sequence losses: the mean over rows, plus the aggregated KL term
        loss = per_row.sum() / per_row.dtype.type(B)
        if kl:
            kl_loss, agg = go.aggregate_forward(kl_terms, mask, cfg.aggregator, max_len)
            loss = loss + cfg.kl_coef * kl_loss
    return loss, {"logits_shape": logits_all.shape, "pcache": pcache, "lcache": lcache, "pg": pg, "kl": kl,
                  "agg": agg if (cfg.loss == "token" or kl) else None, "logp": logp, "B": B}


def minibatch_loss_and_grads(policy, mb, cfg, max_len):
    """minibatch_loss and the gradients of the policy's trainable arrays: (loss, grads, stats)."""
    loss, c = minibatch_loss(policy, mb, cfg, max_len)
    if not np.isfinite(loss):
        raise ValueError(f"critic-free loss is not finite ({loss})")
    dtype = c["logp"].dtype.type
    if cfg.loss == "token":
        dterms = go.aggregate_backward(1.0, c["agg"])  # c_it: each token's weight in the loss
        dlogp = go.token_loss_backward(dterms, c["pg"])
    else:
        drow = np.full(c["B"], 1 / c["B"], dtype)  # L = (1/B) sum_i l_i
        back = go.reinforce_loss_backward if cfg.loss == "reinforce" else go.sequence_loss_backward
        dlogp = back(drow, c["pg"])
        dterms = go.aggregate_backward(1.0, c["agg"]) if c["kl"] else None
    if c["kl"]:  # d(beta k)/dlogp, weighted as its aggregated terms
        dlogp = dlogp + cfg.kl_coef * go.kl_loss_backward(dterms, c["kl"])
    P, N = mb["P"], mb["tokens"].shape[1]
    dlogits = np.zeros(c["logits_shape"], dtype)
    response_part(dlogits, P, N)[...] = L.token_logprobs_backward(dlogp.astype(dtype), c["lcache"])
    grads = tf.policy_backward(dlogits, c["pcache"])
    valid = mb["loss_mask"] > 0
    k3 = go.kl_loss_forward(c["logp"], mb["logp_ref"], mb["loss_mask"], "k3")[0]
    stats = {"loss": float(loss), "kl": float(k3[valid].mean()) if valid.any() else 0.0,
             "ratio_max_dev": float(np.abs(c["pg"]["ratio"] - 1).max()) if cfg.loss != "reinforce" else 0.0,
             **{k: float(v) for k, v in c["pg"].get("stats", {}).items()}}
    return loss, grads, stats


# ---------------------------------------------------------------- training

def rollout_stats(every, train, logits_pi, logits_ref, tau, name):
    """The update's sampling statistics: rewards over every sampled completion, lengths, KL and entropy of the
    training rows."""
    r, groups = every["rewards"], every["groups"]
    counts = np.bincount(groups)
    g_std = np.sqrt(np.bincount(groups, (r - (np.bincount(groups, r) / counts)[groups]) ** 2)
                    / np.maximum(counts - 1, 1))
    lengths, ended = every["mask"].sum(1), every["ended"]
    flat = ~go.dynamic_sampling_keep(r, groups)[np.unique(groups, return_index=True)[1]]  # (groups,)
    stats = {"reward": float(r.mean()), f"rewards/{name}/mean": float(r.mean()), "reward_std": float(g_std.mean()),
             "frac_reward_zero_std": float(flat.mean()),
             "completions/mean_length": float(lengths.mean()), "completions/clipped_ratio": float(1 - ended.mean()),
             "completions/mean_terminated_length": float(lengths[ended].mean()) if ended.any() else 0.0,
             "gold/score": float(np.mean([gold(t, s, e) for t, (s, e) in zip(every["texts"], every["samples"])]))}
    if train is not None:
        kl = kl_estimators(train["logp_old"], train["logp_ref"], train["mask"])
        valid = train["mask"] > 0
        stats.update({"objective/kl": float(kl["k1_sum"].mean()), "objective/k3": float(kl["k3_sum"].mean()),
                      "objective/kl_exact": float(exact_kl(logits_pi, logits_ref, tau, train["mask"]).sum(1).mean()),
                      "entropy": float(L.entropy_forward(logits_pi, tau)[0][valid].mean())})
    return stats


def prepare(policy, ref_policy, train, cfg, first_epoch):
    """Add the old and reference log-probs (per minibatch of the first epoch, on the very arrays it sees: its
    first ratio is exactly 1), the advantages and the loss mask to the training rows; return the logits."""
    (B, N), tau = train["tokens"].shape, policy.temperature
    seq, seq_mask = (np.concatenate([train[a], train[b]], 1) for a, b in (("ptok", "tokens"), ("pmask", "mask")))
    train.update(seq=seq, seq_mask=seq_mask, P=train["ptok"].shape[1])
    dtype = policy.params["wte"].dtype
    train["logp_old"], train["logp_ref"] = np.zeros((B, N), dtype), np.zeros((B, N), dtype)
    logits = [np.zeros((B, N, policy.model_cfg.vocab_size), dtype) for _ in range(2)]
    for idx in first_epoch:
        rows = seq[idx], seq_mask[idx], train["tokens"][idx], train["P"], tau
        (train["logp_old"][idx], logits[0][idx]), (train["logp_ref"][idx], logits[1][idx]) = fast.run_concurrently(
            lambda: response_logprobs(policy, *rows), lambda: response_logprobs(ref_policy, *rows))
    train["adv_row"], train["advantages"] = advantages_of(train, cfg)
    keep = train["ended"] if cfg.overlong == "mask" else np.ones(B, bool)  # truncated rows out of the loss
    train["loss_mask"] = train["mask"] * keep[:, None]
    return logits


def learn(policy, train, split, cfg, arrays, state, opt, lr):
    """Every minibatch step of one update, all or nothing: on a non-finite loss or gradient the trainable
    arrays and the optimiser state are put back as they were, then ValueError. Returns (stats, norms)."""
    keys = ("P", "seq", "seq_mask", "tokens", "loss_mask", "logp_old", "logp_ref", "advantages")
    batch, mb_stats, norms = {k: train[k] for k in keys}, [], []
    with all_or_nothing(arrays, state):
        for idx in (idx for epoch in split for idx in epoch):
            mb = {**minibatch(batch, idx), "adv_row": None if train["adv_row"] is None else train["adv_row"][idx]}
            if not mb["loss_mask"].any():  # every row masked out (overlong="mask"): nothing to learn
                continue
            _, grads, s = minibatch_loss_and_grads(policy, mb, cfg, policy.sampling.max_new_tokens)
            norms.append(adamw_step(arrays, grads, state, opt, lr=lr))  # raises before writing if not finite
            mb_stats.append(s)
    return mb_stats, norms


def train_critic_free(policy, reference, reward_source, train_prompts, cfg, rng, log=print, on_update=None):
    """Run a critic-free method (cfg: a CriticFreeConfig, e.g. ALGOS["grpo"]), updating the policy's trainable
    arrays (transformer.trainable) in place against the frozen reference's parameters. reward_source:
    (prompt_texts, samples) -> rewards (B,). Returns the per-update stats dicts; on_update(i, stats) after each."""
    families = getattr(reward_source, "families", FAMILIES)
    wrong = sorted({get_prompt(p).family for p in train_prompts} - set(families))
    if wrong:
        raise ValueError(f"the reward source {getattr(reward_source, 'name', reward_source)!r} cannot score the "
                         f"{wrong[0]!r} family; give it prompts of {families} only")
    rows = cfg.group_size * cfg.prompts_per_update
    tf.check_batch_fits("train_critic_free", policy.model_cfg, max(rows // cfg.minibatches, rows // 2),
                        policy.params["wte"].dtype)
    opt = AdamWConfig(lr=cfg.lr, weight_decay=0.0, max_grad_norm=cfg.max_grad_norm)
    arrays = tf.trainable(policy)
    state, history = adamw_init(arrays), []
    ref_policy = tf.Policy(reference, policy.model_cfg, policy.sampling)  # the same arrays, no copy
    name = getattr(reward_source, "name", "reward")
    for update in range(cfg.updates):
        t0 = time.perf_counter()
        train, every, rounds = collect(policy, reward_source, train_prompts, cfg, rng)
        stats = {"update": update + 1, "lr": lr_schedule(update, cfg.updates, cfg.lr), "dynamic/rounds": rounds,
                 "skipped": train is None}
        mb_stats, norms, logits = [], [], (None, None)
        if train is not None:
            split = [np.array_split(rng.permutation(len(train["tokens"])), cfg.minibatches) for _ in range(cfg.epochs)]
            logits = prepare(policy, ref_policy, train, cfg, split[0])
        stats.update(rollout_stats(every, train, *logits, policy.temperature, name))
        t1 = time.perf_counter()
        if train is not None:
            try:
                mb_stats, norms = learn(policy, train, split, cfg, arrays, state, opt, stats["lr"])
            except ValueError as e:
                raise ValueError(f"update {update + 1}: {e}; nothing of this update was applied") from None
        keys = ("loss", "kl", "policy/approxkl", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean")
        stats.update({k: float(np.mean([s.get(k, 0.0) for s in mb_stats])) if mb_stats else 0.0 for k in keys})
        stats.update({"grad_norm": float(np.mean(norms)) if norms else 0.0, "time/rollout": t1 - t0,
                      "first_minibatch/ratio_max_dev": mb_stats[0]["ratio_max_dev"] if mb_stats else 0.0,
                      "time/update": time.perf_counter() - t1})
        history.append(stats)
        log(f"{cfg.algo} update {update + 1:3d} | reward {stats['reward']:+.3f} | gold {stats['gold/score']:+.3f} | "
            f"kl {stats.get('objective/kl', 0.0):.3f} | clip {stats['clip_ratio/region_mean']:.3f} | "
            f"len {stats['completions/mean_length']:4.1f} | "
            f"{1000 * (stats['time/rollout'] + stats['time/update']):5.0f} ms" + (" | skipped" * (train is None)))
        if on_update is not None:
            on_update(update, stats)
    return history
