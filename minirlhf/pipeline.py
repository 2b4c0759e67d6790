"""The stages of RLHF as the demo runs them, shared by the demo, the experiments in demos/ and the tests.

    prompts ──► SFT ──► policy samples ──► annotator ranks ──► reward model ──► PPO + KL ──► RLHF policy
               (sft.py)               (annotator.py)         (reward.py)      (ppo.py)
                  └──────────── frozen reference for the KL penalty ─────────────┘

  1. run_sft: a fresh demo-sized GPT fine-tuned on a corpus that mixes good and bad responses (world.py),
     so it behaves well only sometimes. It becomes both the starting policy and the frozen reference.
  2. preference_data: K responses per prompt sampled from the SFT model, ranked by the simulated annotator
     (InstructGPT's recipe), on training prompts; held-out rankings on unseen prompts.
  3. run_reward_model: the Bradley-Terry reward model from the SFT trunk, then its normalisation.
  4. run_ppo: PPO with a KL penalty against the frozen SFT model; the value model from the reward model.
  5. compare_policies: both policies on the same unseen prompts: behaviour, the annotator's win rate, KL,
     gold and reward-model scores.

Everything here is a setting of the demo, not of the library: the model size, K, the annotator, how often
each family is labelled, the step counts of the default and quick runs, the recipes of each stage.
"""
import numpy as np
from scipy.stats import binomtest

from . import transformer as tf
from .annotator import AnnotatorConfig, annotate_pair, sample_comparisons
from .kl import KLControllerConfig, exact_kl, kl_estimators
from .layers import token_logprobs_forward
from .ppo import PPOConfig, init_value_params, response_part, train_ppo
from .reward import RewardConfig, fit_normalisation, init_reward_params, score, train_reward_model
from .sft import SFTConfig, train_sft
from .tokenizer import EOS, VOCAB_SIZE, encode, encode_prompts
from .world import all_prompts, behaviour_metrics, sample_prompts, sft_corpus, split_prompts

DEMO_MODEL = tf.GPTConfig(vocab_size=VOCAB_SIZE, n_ctx=64, n_layer=2, n_head=4, n_embd=64)  # the demo-sized GPT
DEMO_SAMPLING = tf.Sampling(temperature=1.0, max_new_tokens=32)  # every template fits in 31 characters + EOS
# Step counts of the default run and of --quick; each can be overridden by its flag.
STEPS = {"default": {"sft_steps": 1000, "rm_steps": 200, "ppo_updates": 30, "labels": 750},
         "quick": {"sft_steps": 300, "rm_steps": 40, "ppo_updates": 8, "labels": 200}}
# --full-reward-model: more ranked prompts and steps, and reward_config(full=True); about two minutes more.
FULL_REWARD_MODEL = {"labels": 3000, "rm_steps": 3000}
# Responses ranked per prompt (InstructGPT used 4 to 9). A ranking of K gives C(K, 2) pairs for K forward
# passes: 28 for 8 against 6 for 4. Measured (commit f4b1461): the same 6000 SFT samples ranked 8 at a time
# (750 prompts) rather than 4 (1500), trained 500 steps of 64 responses at lr 4e-3, took held-out agreement
# from 92.5% to 95.1% of the annotator's ceiling on one SFT model and from 81.9% to 84.2% on another.
K = 8
EVAL_PROMPTS = 200  # unseen prompts for the before/after comparison
VAL_FRACTION = 0.25  # the share of each family's prompts held out, unseen in every training stage
ANNOTATOR = AnnotatorConfig(temperature=0.5)  # a utility gap of 1 is preferred 88% of the time
# SFT sees arithmetic twice as often as each other family: reading the prompt's digit takes the most data.
SFT_FAMILY_WEIGHTS = {"greeting": 1.0, "arithmetic": 2.0, "unsafe": 1.0, "unknowable": 1.0}
# The annotator labels arithmetic three times as often: checking "a + 1" is what the reward model finds
# hardest (measured at commit 1040ee0, K = 4: 0.58 accuracy against a 0.78 ceiling with uniform labels, 0.66 with this).
LABEL_FAMILY_WEIGHTS = {"greeting": 1.0, "arithmetic": 3.0, "unsafe": 1.0, "unknowable": 1.0}
PPO_LR, PPO_BATCH, PPO_MINIBATCH = 2e-4, 64, 16  # the demo's PPO recipe (PPOConfig has the rest)
# demo --lora: the adapter's learning rate as a multiple of PPO_LR (demos/lora_rank.py measures the best one)
LORA_LR_MULTIPLIER = 10.0


def split(rng):
    """(train, unseen) prompts: VAL_FRACTION of each family held out."""
    return split_prompts(all_prompts(), VAL_FRACTION, rng)


# ---------------------------------------------------------------- 1. SFT

def run_sft(train_prompts, val_prompts, steps, rng, sampling=DEMO_SAMPLING, checkpoint=None, log=print):
    """A fresh demo-sized GPT fine-tuned on the mixed corpus. Returns (the SFT Policy, history)."""
    params = tf.init_params(DEMO_MODEL, rng)
    train_pairs = sft_corpus(train_prompts, 6000, rng, family_weights=SFT_FAMILY_WEIGHTS)
    # 16 examples a step: measured (commit be7d64d), 1200 steps of 16 beat 600 of 32 at the same cost (validation loss,
    # and the right digit's probability after "it is " 0.50 against 0.23).
    cfg = SFTConfig(steps=steps, batch_size=16, lr=1e-2, warmup_steps=min(30, steps - 1),
                    eval_every=max(1, steps // 6))
    hist = train_sft(params, DEMO_MODEL, train_pairs, sft_corpus(val_prompts, 300, rng), cfg, rng, log=log,
                     checkpoint=checkpoint)
    return tf.Policy(params, DEMO_MODEL, sampling), hist


# ---------------------------------------------------------------- 2. preference data

def collect_preferences(policy, prompts, n, rng, annotator=ANNOTATOR, k=K, family_weights=None):
    """n prompts, k samples of policy each, ranked by the annotator (InstructGPT's recipe)."""
    sampler = lambda texts, r: tf.sample_responses(policy, texts, r)  # noqa: E731
    return sample_comparisons(sample_prompts(prompts, n, rng, family_weights), sampler, k, annotator, rng)


def preference_data(policy, train_prompts, val_prompts, labels, rng, annotator=ANNOTATOR):
    """`labels` training rankings (arithmetic weighted, LABEL_FAMILY_WEIGHTS) and a fifth as many held-out
    ones (at least 50), on the unseen prompts with families equally often."""
    train_cmp = collect_preferences(policy, train_prompts, labels, rng, annotator,
                                    family_weights=LABEL_FAMILY_WEIGHTS)
    return train_cmp, collect_preferences(policy, val_prompts, max(50, labels // 5), rng, annotator)


# ---------------------------------------------------------------- 3. the reward model

def reward_config(steps, full=False):
    """The demo's reward-model recipe for `steps` optimiser steps; full=True gives the full-length recipe.

    Demo: 32 responses a step at lr 1e-3. Full (FULL_REWARD_MODEL's label and step counts): 64 responses a
    step at lr 4e-3 with weight decay 0.1. demos/README.md, "The reward model across seeds", has what each
    reaches on seeds 0-4.
    """
    if full:
        return RewardConfig(steps=steps, batch_size=64 // K, lr=4e-3, weight_decay=0.1,
                            warmup_steps=min(20, steps - 1), eval_every=max(1, steps // 5))
    return RewardConfig(steps=steps, batch_size=32 // K, lr=1e-3, warmup_steps=min(10, steps - 1),
                        eval_every=max(1, steps // 2))


def run_reward_model(policy, train_prompts, train_cmp, val_cmp, steps, rng, annotator=ANNOTATOR, log=print,
                     full=False):
    """The reward model from the SFT trunk (recipe: reward_config), then its normalisation on 256 fresh SFT
    samples. Returns (RewardModel, history)."""
    params = init_reward_params(policy.params, policy.model_cfg, rng)
    hist = train_reward_model(params, policy.model_cfg, train_cmp, val_cmp, reward_config(steps, full),
                              annotator, rng, log=log)
    prompts = sample_prompts(train_prompts, 256, rng)
    samples = tf.sample_responses(policy, [p.text for p in prompts], rng)
    ended = [(p.text, s) for p, (s, e) in zip(prompts, samples) if e]
    return fit_normalisation(params, policy.model_cfg, [p for p, _ in ended], [s for _, s in ended]), hist


# ---------------------------------------------------------------- 4. PPO

def ppo_config(updates, kl, lr=PPO_LR, batch_size=PPO_BATCH):
    """The demo's PPO recipe with `updates` updates and the KL controller kl (a KLControllerConfig)."""
    return PPOConfig(updates=updates, batch_size=batch_size, minibatch_size=min(PPO_MINIBATCH, batch_size),
                     lr=lr, kl=kl)


def run_ppo(policy, reference, reward_model, train_prompts, ppo_cfg, rng, on_update=None, log=print):
    """PPO in place on policy.params against the frozen reference's parameters, with a value model from the
    reward model. Returns (value parameters, history)."""
    value = init_value_params(reward_model)
    hist = train_ppo(policy, reference, reward_model, value, train_prompts, ppo_cfg, rng, log=log,
                     on_update=on_update)
    return value, hist


def fixed_kl(kl_coef):
    """A KLControllerConfig with a fixed coefficient."""
    return KLControllerConfig(kl_coef=kl_coef)


# ---------------------------------------------------------------- 5. what changed

def policy_kl(policy, reference, texts, samples):
    """Mean over samples of the summed k1 and of the exact KL(policy || reference) along the sampled paths,
    both at the policy's temperature. reference: parameters; samples: [(text, ended)] of the policy."""
    ptok, pmask = encode_prompts(texts)
    P = ptok.shape[1]
    resp = [encode(t) + ([EOS] if e else []) for t, e in samples]  # the response's ids, EOS where it ended
    N = max(len(r) for r in resp)
    tokens, mask = np.zeros((len(resp), N), np.int64), np.zeros((len(resp), N), np.int64)
    for i, r in enumerate(resp):
        tokens[i, :len(r)], mask[i, :len(r)] = r, 1
    seq, seq_mask = np.concatenate([ptok, tokens], 1), np.concatenate([pmask, mask], 1)
    tau = policy.temperature
    logits = response_part(tf.policy_forward(policy, seq, seq_mask)[0], P, N)
    logits_ref = response_part(tf.forward(reference, policy.model_cfg, seq, seq_mask)[0], P, N)
    k1 = kl_estimators(token_logprobs_forward(logits, tokens, tau)[0],
                       token_logprobs_forward(logits_ref, tokens, tau)[0], mask)["k1_sum"]
    return float(k1.mean()), float(exact_kl(logits, logits_ref, tau, mask).sum(1).mean())


def mean_score(reward_model, texts, samples):
    """Mean normalised reward-model score of the samples that ended (NaN if none did)."""
    ended = [(p, s) for p, (s, e) in zip(texts, samples) if e]
    return float(np.mean(score(reward_model, [p for p, _ in ended], [s for _, s in ended]))) if ended else np.nan


def compare_policies(policy, reference, reward_model, val_prompts, rng, annotator=ANNOTATOR, n=EVAL_PROMPTS):
    """Both policies on the same n unseen prompts, each sampling as its Sampling says: samples, behaviour,
    the annotator's win rate of policy over reference with a 95% Wilson interval, KL(policy || reference)
    at the policy's temperature, and reward-model scores."""
    prompts = sample_prompts(val_prompts, n, rng)
    texts = [p.text for p in prompts]
    ref_samples = tf.sample_responses(reference, texts, rng)
    new_samples = tf.sample_responses(policy, texts, rng)
    wins = sum(annotate_pair(p, a, b, annotator, rng) == 0 for p, a, b in zip(texts, new_samples, ref_samples))
    ci = binomtest(wins, n).proportion_ci(0.95, method="wilson")
    kl_k1, kl_exact = policy_kl(policy, reference.params, texts, new_samples)
    return {"prompts": prompts, "ref_samples": ref_samples, "samples": new_samples,
            "before": behaviour_metrics(texts, [s for s, _ in ref_samples], [e for _, e in ref_samples]),
            "after": behaviour_metrics(texts, [s for s, _ in new_samples], [e for _, e in new_samples]),
            "win_rate": {"rate": wins / n, "low": float(ci.low), "high": float(ci.high), "n": n},
            "kl": kl_k1, "kl_exact": kl_exact, "temperature": policy.temperature,
            "rm_before": mean_score(reward_model, texts, ref_samples),
            "rm_after": mean_score(reward_model, texts, new_samples)}
