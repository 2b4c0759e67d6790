"""PPO with a KL penalty: the policy learns to earn reward while staying near the SFT model.

The sketch `loss = -reward + kl_penalty` becomes, per rollout y ~ pi(.|x) (Ziegler et al. 2019,
Stiennon et al. 2020, Ouyang et al. 2022):

    maximise  E[ score(x, y) - kl_coef * KL(pi(.|x) || pi_ref(.|x)) ]

where score is the normalised reward model and pi_ref the frozen SFT model. PPO optimises it as a
token-level RL problem: each response token is an action; its reward is -kl_coef * k1_t (k1_t = logp_t -
logp_ref_t, kl.py), and the EOS token also receives the score. A response that never emits EOS gets the
fixed reward.NO_EOS_SCORE instead of the reward model's. A value model (a separate network initialised
from the reward model) estimates the return from each state; GAE turns rewards and values into
advantages, which are whitened; then 4 epochs of shuffled minibatches of the clipped surrogate and
clipped value loss (ppo_objective.py), AdamW, gradient clipping, learning rate decaying linearly to 0 over
the updates (optim.lr_schedule).

One update:
    1. rollout: sample responses to a batch of prompts with the KV cache, at the policy's temperature
    2. score:   policy, reference and value forward passes over prompt + response; reward-model scores
    3. rewards: r_t = -kl_coef k1_t, + score on EOS; GAE (gamma 1, lambda 0.95); whiten advantages
    4. learn:   epochs x minibatches of policy and value steps; adapt kl_coef (kl.py)
Logged (TRL's names): objective/kl, objective/entropy, objective/scores, objective/non_score_reward,
objective/rlhf_reward, policy/approxkl, policy/clipfrac, val/clipfrac, val/explained_variance,
objective/kl_coef; plus objective/kl_exact (the full-vocabulary KL along the sampled paths), objective/k2,
objective/k3 and gold/score, which only a simulated world can know.

Temperature. The policy samples at its Sampling.temperature tau, and every log-prob of those samples is of
softmax(logits / tau): the policy's, the "old" policy's and the reference's (minirlhf/CONVENTIONS.md).

Exactness: the log-probs PPO treats as "old", and the reference's, are computed per minibatch of the first
epoch with the very arrays that epoch's first forward pass sees, so before any update the ratio is exactly
1 (not 1 +- 1e-7), and a policy that is its own reference has k1 exactly 0.
"""
import time
from dataclasses import dataclass, field

import numpy as np

from . import fast
from . import layers as L
from . import transformer as tf
from . import validate as V
from .kl import KLControllerConfig, exact_kl, kl_estimators, token_rewards, update_kl_coef
from .optim import AdamWConfig, adamw_init, adamw_step, all_or_nothing, lr_schedule
from .ppo_objective import (explained_variance, gae, policy_loss_backward, policy_loss_forward,
                            value_loss_backward, value_loss_forward, whiten)
from .reward import sequence_scores
from .tokenizer import EOS, decode, encode_prompts, response_mask
from .world import gold, sample_prompts


@dataclass(frozen=True)
class PPOConfig:
    updates: int = 30  # PPO iterations (rollout + learn)
    batch_size: int = 64  # rollouts per update
    minibatch_size: int = 16  # rollouts per gradient step
    epochs: int = 4  # passes over each batch of rollouts
    lr: float = 1e-4  # initial learning rate of policy and value model; decays linearly to 0
    max_grad_norm: float = 1.0  # global-norm clip, each network separately
    clip_eps: float = 0.2  # policy ratio clip
    vf_clip_eps: float = 0.2  # value clip around the rollout-time value
    vf_coef: float = 0.1  # weight of the value loss
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    kl: KLControllerConfig = field(default_factory=KLControllerConfig)  # kl_coef: fixed or adaptive

    def __post_init__(self):
        for name in ("updates", "batch_size", "minibatch_size", "epochs"):
            V.count("PPOConfig", name, getattr(self, name))
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"PPOConfig: batch_size {self.batch_size} is not a multiple of minibatch_size "
                             f"{self.minibatch_size}")
        V.number("PPOConfig", "lr", self.lr, low=0)
        V.number("PPOConfig", "max_grad_norm", self.max_grad_norm, low=0, low_open=True)
        V.number("PPOConfig", "clip_eps", self.clip_eps, low=0, low_open=True)
        V.number("PPOConfig", "vf_clip_eps", self.vf_clip_eps, low=0, low_open=True)
        V.number("PPOConfig", "vf_coef", self.vf_coef, low=0)
        V.number("PPOConfig", "gamma", self.gamma, low=0, high=1)
        V.number("PPOConfig", "lam", self.lam, low=0, high=1)
        if not isinstance(self.kl, KLControllerConfig):
            raise ValueError(f"PPOConfig.kl must be a KLControllerConfig, got {self.kl!r}")


# ---------------------------------------------------------------- the value model

def init_value_params(reward_model):
    """A value model from the reward model: the same trunk and head, the head rescaled so that values come
    out in normalised reward units (gain * r + bias), the units of the returns it will predict."""
    params = {k: v.copy() for k, v in reward_model.params.items()}
    params["head.w"] = (params["head.w"] * reward_model.gain).astype(params["head.w"].dtype)
    params["head.b"] = np.asarray(params["head.b"] * reward_model.gain + reward_model.bias,
                                  dtype=params["head.b"].dtype)
    return params


def value_forward(params, model_cfg, tokens, mask):
    """A value at every position: v[b, t] = h[b, t] . w + b_head. -> (values (B, T), cache)."""
    h, trunk_cache = tf.hidden_forward(params, model_cfg, tokens, mask)
    return h @ params["head.w"] + params["head.b"], (trunk_cache, h, params["head.w"])


def value_backward(dvalues, cache):
    """Undoes v = h . w + b at every position. Returns grads for the trunk and the head."""
    trunk_cache, h, w = cache
    dvalues = np.asarray(dvalues).astype(h.dtype, copy=False)  # the model's float type wins over the cotangent's
    grads = tf.hidden_backward(dvalues[..., None] * w, trunk_cache)
    grads["head.w"] = np.tensordot(dvalues, h, axes=2)  # sum over b, t of dv h
    grads["head.b"] = np.asarray(dvalues.sum(), dtype=h.dtype)
    return grads


# ---------------------------------------------------------------- one minibatch through both networks

def response_part(x, P, N):
    """x[:, P - 1 : P - 1 + N] of a (B, P + N, ...) array over prompt + response: the positions whose
    outputs belong to the N response tokens (the logits predicting each one, the value of the state before
    it). Position P - 1 + t reads the prompt and response tokens before token t."""
    return x[:, P - 1:P - 1 + N]


def ppo_losses(policy, value, mb, ppo_cfg):
    """The clipped policy loss and the clipped value loss of a minibatch, through both networks, and the
    caches their gradients need: (policy loss, value loss, (policy caches, value caches)).

    policy: the Policy (its temperature scores the tokens); value: the value model's parameters.
    mb holds the rollout arrays of the minibatch: seq, seq_mask (B, P+N), P, tokens, mask, logp_old,
    values_old, advantages, returns (B, N).
    """
    pg_loss, pcaches = policy_loss(policy, mb, ppo_cfg)
    vf_loss, vcaches = value_loss(value, policy.model_cfg, mb, ppo_cfg)
    return pg_loss, vf_loss, (pcaches, vcaches)


def policy_loss(policy, mb, ppo_cfg):
    """The clipped policy loss of a minibatch through the policy: (loss, caches)."""
    P, N = mb["P"], mb["tokens"].shape[1]
    logits_all, pcache = tf.policy_forward(policy, mb["seq"], mb["seq_mask"])
    logp, lcache = L.token_logprobs_forward(response_part(logits_all, P, N), mb["tokens"], policy.temperature)
    pg_loss, pg_cache = policy_loss_forward(logp, mb["logp_old"], mb["advantages"], mb["mask"], ppo_cfg.clip_eps)
    return pg_loss, (logits_all.shape, P, N, pcache, lcache, pg_cache)


def value_loss(value, model_cfg, mb, ppo_cfg):
    """The clipped value loss of a minibatch through the value model: (loss, caches)."""
    P, N = mb["P"], mb["tokens"].shape[1]
    values_all, vcache = value_forward(value, model_cfg, mb["seq"], mb["seq_mask"])
    vf_loss, vf_cache = value_loss_forward(response_part(values_all, P, N), mb["values_old"], mb["returns"],
                                           mb["mask"], ppo_cfg.vf_clip_eps, ppo_cfg.vf_coef)
    return vf_loss, (values_all.shape, P, N, vcache, vf_cache)


def policy_loss_and_grads(policy, mb, ppo_cfg):
    """policy_loss and its gradient for the policy's trainable arrays: (loss, grads, the loss's cache)."""
    pg_loss, (shape, P, N, pcache, lcache, pg_cache) = policy_loss(policy, mb, ppo_cfg)
    if not np.isfinite(pg_loss):
        raise ValueError(f"PPO policy loss is not finite ({pg_loss}); no update applied")
    dlogits = np.zeros(shape, pg_loss.dtype)
    response_part(dlogits, P, N)[...] = L.token_logprobs_backward(policy_loss_backward(1.0, pg_cache), lcache)
    return pg_loss, tf.policy_backward(dlogits, pcache), pg_cache


def value_loss_and_grads(value, model_cfg, mb, ppo_cfg):
    """value_loss and the value model's gradients: (loss, grads, the loss's cache)."""
    vf_loss, (shape, P, N, vcache, vf_cache) = value_loss(value, model_cfg, mb, ppo_cfg)
    if not np.isfinite(vf_loss):
        raise ValueError(f"PPO value loss is not finite ({vf_loss}); no update applied")
    dvalues = np.zeros(shape, vf_loss.dtype)
    response_part(dvalues, P, N)[...] = value_loss_backward(1.0, vf_cache)
    return vf_loss, value_backward(dvalues, vcache), vf_cache


def ppo_loss_and_grads(policy, value, mb, ppo_cfg):
    """Both losses of a minibatch and both networks' gradients: (policy_grads, value_grads, stats). The two
    networks share nothing, so fast.run_concurrently may run them on two threads."""
    (pg_loss, pgrads, pg_cache), (vf_loss, vgrads, vf_cache) = fast.run_concurrently(
        lambda: policy_loss_and_grads(policy, mb, ppo_cfg),
        lambda: value_loss_and_grads(value, policy.model_cfg, mb, ppo_cfg))
    stats = {"loss/policy": float(pg_loss), "loss/value": float(vf_loss),
             "ratio_max_dev": float(np.abs(pg_cache["ratio"] - 1)[mb["mask"] > 0].max()),
             **{k: float(v) for k, v in {**pg_cache["stats"], **vf_cache["stats"]}.items()}}
    return pgrads, vgrads, stats


# ---------------------------------------------------------------- rollouts

def response_logprobs(policy, seq, seq_mask, tokens, P, temperature):
    """log softmax(logits / tau)[token] (B, N) of each response token under a policy, and the logits
    (B, N, V) behind them."""
    logits = response_part(tf.policy_forward(policy, seq, seq_mask)[0], P, tokens.shape[1])
    return L.token_logprobs_forward(logits, tokens, temperature)[0], logits


def assemble_rollout(policy, reference, reward_model, value, ptok, pmask, tokens, kl_coef, ppo_cfg, minibatches=None):
    """Everything a rollout computes from its sampled tokens, the part a port most often gets wrong.

    ptok, pmask (B, P): the left-padded prompts; tokens (B, N): the sampled responses, PAD after EOS. Builds
    the response mask (EOS in, everything after it out), the old policy's and the reference's log-probs at
    the policy's temperature, the values, the scores (on EOS; NO_EOS_SCORE without EOS), the token rewards,
    GAE and the whitened advantages. minibatches: the first epoch's index arrays (None: the whole batch), on
    whose very arrays the log-probs are computed. Returns the batch dict and the logits (for statistics).
    """
    model_cfg, tau = policy.model_cfg, policy.temperature
    mask, ended = response_mask(tokens), (tokens == EOS).any(axis=1)
    seq, seq_mask = np.concatenate([ptok, tokens], 1), np.concatenate([pmask, mask], 1)
    (B, P), N = ptok.shape, tokens.shape[1]
    dtype = policy.params["wte"].dtype
    ref_policy = tf.Policy(reference, model_cfg, policy.sampling)  # the same arrays, no copy
    logp_old, logp_ref, values_old = (np.zeros((B, N), dtype) for _ in range(3))
    logits_pi, logits_ref = (np.zeros((B, N, model_cfg.vocab_size), dtype) for _ in range(2))
    for idx in minibatches if minibatches is not None else [np.arange(B)]:  # the ratio starts at exactly 1
        rows = seq[idx], seq_mask[idx], tokens[idx], P, tau

        def policy_and_value():
            logp_old[idx], logits_pi[idx] = response_logprobs(policy, *rows)
            values_old[idx] = response_part(value_forward(value, model_cfg, seq[idx], seq_mask[idx])[0], P, N)

        def reference_part():
            logp_ref[idx], logits_ref[idx] = response_logprobs(ref_policy, *rows)
        fast.run_concurrently(policy_and_value, reference_part)  # independent passes: two threads may share them
    scores = sequence_scores(reward_model, seq, seq_mask, ended)
    rewards, non_score = token_rewards(scores, logp_old, logp_ref, mask, kl_coef)
    advantages, returns = gae(rewards, values_old, mask, ppo_cfg.gamma, ppo_cfg.lam)
    batch = {"P": P, "seq": seq, "seq_mask": seq_mask, "tokens": tokens, "mask": mask, "ended": ended,
             "logp_old": logp_old, "logp_ref": logp_ref, "values_old": values_old, "scores": scores,
             "rewards": rewards, "non_score_reward": non_score, "returns": returns,
             "advantages": whiten(advantages, mask)}
    return batch, (logits_pi, logits_ref)


def rollout(policy, reference, reward_model, value, prompts, kl_coef, ppo_cfg, rng, minibatches):
    """Sample, score and compute advantages for one batch. minibatches: the first epoch's index arrays.

    reference: the frozen reference's parameters (for a LoRA policy, its own base), scored at the
    policy's temperature. Returns the batch dict (arrays over rollouts) and the rollout's statistics.
    """
    t0 = time.perf_counter()
    texts = [p.text for p in prompts]
    ptok, pmask = encode_prompts(texts)
    gen = tf.generate(policy.params, policy.model_cfg, ptok, pmask, policy.sampling.max_new_tokens, rng,
                      policy.temperature, adapter=policy.adapter)
    t1 = time.perf_counter()
    batch, (logits_pi, logits_ref) = assemble_rollout(policy, reference, reward_model, value, ptok, pmask,
                                                      gen["tokens"], kl_coef, ppo_cfg, minibatches)
    t2 = time.perf_counter()
    mask, ended, scores, tau = batch["mask"], batch["ended"], batch["scores"], policy.temperature
    kl = kl_estimators(batch["logp_old"], batch["logp_ref"], mask)
    entropy = L.entropy_forward(logits_pi, tau)[0] * mask
    responses = [decode(t) for t in batch["tokens"]]
    non_score = batch["non_score_reward"].sum(1)
    stats = {"objective/kl": float(kl["k1_sum"].mean()), "objective/k2": float(kl["k2_sum"].mean()),
             "objective/k3": float(kl["k3_sum"].mean()),
             "objective/kl_exact": float(exact_kl(logits_pi, logits_ref, tau, mask).sum(1).mean()),
             "objective/entropy": float(entropy.sum(1).mean()), "objective/scores": float(scores.mean()),
             "objective/non_score_reward": float(non_score.mean()),
             "objective/rlhf_reward": float(scores.mean() + non_score.mean()),
             "gold/score": float(np.mean([gold(t, r, e) for t, r, e in zip(texts, responses, ended)])),
             "rollout/ended": float(ended.mean()), "rollout/length": float(mask.sum(1).mean()),
             "val/explained_variance": float(explained_variance(batch["values_old"], batch["returns"], mask)),
             "time/rollout": t1 - t0, "time/score": t2 - t1}
    return batch, stats


def minibatch(batch, idx):
    """The rows idx of every (B, ...) array of a batch."""
    return {k: (v if k == "P" else v[idx]) for k, v in batch.items()}


def train_ppo(policy, reference, reward_model, value, train_prompts, ppo_cfg, rng, log=print, on_update=None):
    """Run PPO, updating the policy's trainable arrays (tf.trainable) and value in place. Returns the list of
    per-update stats dicts.

    reference (parameters) and reward_model (a reward.RewardModel) stay frozen. on_update(i, stats), if
    given, is called after each update (the demo writes metrics with it).
    """
    # the policy and the value model each take a minibatch forward and backward; the rollout, the batch forward
    tf.check_batch_fits("train_ppo", policy.model_cfg, max(2 * ppo_cfg.minibatch_size, ppo_cfg.batch_size // 2),
                        policy.params["wte"].dtype)
    opt = AdamWConfig(lr=ppo_cfg.lr, weight_decay=0.0, max_grad_norm=ppo_cfg.max_grad_norm)
    pstate, vstate = adamw_init(tf.trainable(policy)), adamw_init(value)
    kl_coef, history = ppo_cfg.kl.kl_coef, []
    n_mb = ppo_cfg.batch_size // ppo_cfg.minibatch_size
    for update in range(ppo_cfg.updates):
        prompts = sample_prompts(train_prompts, ppo_cfg.batch_size, rng)
        orders = [rng.permutation(ppo_cfg.batch_size) for _ in range(ppo_cfg.epochs)]
        split = [np.array_split(order, n_mb) for order in orders]  # epochs x minibatches of indices
        batch, stats = rollout(policy, reference, reward_model, value, prompts, kl_coef, ppo_cfg, rng, split[0])
        t0 = time.perf_counter()
        lr = lr_schedule(update, ppo_cfg.updates, ppo_cfg.lr)  # linear decay to 0 (cleanrl's annealing)
        mb_stats = []
        # One update is all of its epochs of minibatches: a gradient that is not finite in any of them undoes
        # the whole update (policy, value and both optimiser states as they were after the last update).
        with all_or_nothing(tf.trainable(policy), value, pstate, vstate):
            for epoch in range(ppo_cfg.epochs):
                for j, idx in enumerate(split[epoch]):
                    pgrads, vgrads, s = ppo_loss_and_grads(policy, value, minibatch(batch, idx), ppo_cfg)
                    for g in (pgrads, vgrads):
                        for name, x in g.items():
                            if not np.all(np.isfinite(x)):
                                raise ValueError(f"PPO update {update + 1}, epoch {epoch + 1}, minibatch {j + 1}: "
                                                 f"the gradient of {name} is not finite; the update was undone")
                    adamw_step(tf.trainable(policy), pgrads, pstate, opt, lr=lr)
                    adamw_step(value, vgrads, vstate, opt, lr=lr)
                    mb_stats.append(s)
        stats.update({"update": update + 1, "objective/kl_coef": kl_coef, "lr": lr,
                      "time/update": time.perf_counter() - t0,
                      **{k: float(np.mean([s[k] for s in mb_stats])) for k in
                         ("policy/approxkl", "policy/clipfrac", "val/clipfrac", "loss/policy", "loss/value")},
                      "first_minibatch/ratio_max_dev": mb_stats[0]["ratio_max_dev"],
                      "first_minibatch/clipfrac": mb_stats[0]["policy/clipfrac"]})
        kl_coef = update_kl_coef(kl_coef, stats["objective/kl"], ppo_cfg.batch_size, ppo_cfg.kl)
        history.append(stats)
        log(f"ppo update {update + 1:3d} | score {stats['objective/scores']:+.3f} | "
            f"gold {stats['gold/score']:+.3f} | kl {stats['objective/kl']:.3f} "
            f"(exact {stats['objective/kl_exact']:.3f}) | kl_coef {stats['objective/kl_coef']:.3f} | "
            f"clipfrac {stats['policy/clipfrac']:.3f} | "
            f"{1000 * (stats['time/rollout'] + stats['time/score'] + stats['time/update']):5.0f} ms")
        if on_update is not None:
            on_update(update, stats)
    return history
