"""The whole of RLHF in a minute: `python -m minirlhf.demo`.

The five stages of pipeline.py, each with a header, one log line per logged step, and what it changed:
  1. SFT on a corpus that mixes good and bad responses, so the model behaves well only sometimes.
  2. Preference data: K responses per prompt sampled from the SFT model, ranked by the simulated annotator.
  3. The Bradley-Terry reward model, from the SFT trunk: its agreement with the annotator on unseen prompts
     next to the annotator's exact ceiling; normalised to mean 0, std 1 on SFT samples.
  4. PPO with a KL penalty against the frozen SFT model; value model from the reward model. Or, with
     --algo, a critic-free method (grpo.py: GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++, GSPO), rewarded by
     the reward model or, with --reward verifier, by the world's own check of a sum (arithmetic only).
  5. What changed, on unseen prompts: side-by-side samples, behaviour rates, the annotator's win rate of
     RLHF over SFT with a 95% Wilson interval (InstructGPT's evaluation), KL to the reference, and the gold
     score next to the reward model's.
Writes a run folder (--out, runs.py): sft.npz, reward.npz, value.npz, policy.npz (atomic .npz checkpoints),
split.json, metrics.jsonl (every logged step of every stage), summary.json and the manifest.

With --lora R the RL stage trains a rank-R LoRA adapter (lora.py) on the frozen SFT model instead of a
copy of it: the SFT model is the reference, never copied, and the run keeps adapter.npz in place of
policy.npz. summary.json's "lora" part sets the adapter's trainable parameters, file size and the traced
peak memory of one PPO update beside full fine-tuning's.
"""
import argparse
import json
import os
import time
import tracemalloc
from dataclasses import replace

import numpy as np

from . import fast, grpo, lora, pipeline as P, runs
from .checkpoint import save_checkpoint
from .cli import apply_preset, non_negative_float, non_negative_int, positive_float, positive_int
from .kl import KLControllerConfig
from .reward import evaluate, sums_checked
from .transformer import Sampling, copy_policy
from .world import FAMILIES, HEADLINE, format_behaviour_table, gold


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minirlhf.demo", description="RLHF end to end in a minute.")
    ap.add_argument("--seed", type=non_negative_int, default=0, help="seed of the one np.random.Generator (default 0)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer steps (about a quarter of the time); a step-count flag you type still wins")
    ap.add_argument("--out", default="runs/demo", help="the run folder to write (default runs/demo)")
    ap.add_argument("--force", action="store_true", help="replace the run already in --out")
    ap.add_argument("--algo", choices=["ppo"] + list(grpo.ALGOS), default="ppo",
                    help="the RL stage's method: PPO with a value model, or a critic-free one (default ppo)")
    ap.add_argument("--reward", choices=["model", "verifier"], default="model",
                    help="what rewards the RL stage: the learned reward model, or the world's verifier of sums "
                         "(1 for a right answer, else 0; arithmetic prompts only; critic-free methods only)")
    ap.add_argument("--kl-coef", type=non_negative_float, default=None,
                    help="the KL coefficient (beta): fixed, or the adaptive controller's start (default 0.15 for "
                         "PPO; a critic-free method's own: grpo.ALGOS)")
    ap.add_argument("--kl-target", type=positive_float, default=None,
                    help="use Ziegler's adaptive controller with this target KL (nats per response)")
    ap.add_argument("--kl-horizon", type=positive_int, default=None,
                    help="the adaptive controller's horizon in rollouts (default: a quarter of the run's "
                         "rollouts, so kl_coef can change by up to about 2.2x over the run; Ziegler et al. "
                         "used 10000, which barely moves it in a run this short)")
    ap.add_argument("--temperature", type=positive_float, default=P.DEMO_SAMPLING.temperature,
                    help="sampling temperature of every policy; the same tau scores the samples (default 1)")
    ap.add_argument("--sft-steps", type=positive_int, help="SFT optimiser steps")
    ap.add_argument("--rm-steps", type=positive_int, help="reward-model optimiser steps")
    ap.add_argument("--updates", "--ppo-updates", dest="ppo_updates", type=positive_int,
                    help="RL updates (PPO: a rollout of 64 and 4 epochs each; critic-free: 8 prompts x 8 each)")
    ap.add_argument("--labels", type=positive_int, help=f"prompts ranked by the annotator (K = {P.K} each)")
    ap.add_argument("--batch-size", type=positive_int, default=P.PPO_BATCH,
                    help=f"rollouts per RL update, a multiple of 8 (default {P.PPO_BATCH}: PPO's minibatches of "
                         f"{P.PPO_MINIBATCH}; a critic-free method's groups of 8)")
    ap.add_argument("--eval-prompts", type=positive_int, default=P.EVAL_PROMPTS,
                    help=f"unseen prompts of the before/after comparison (default {P.EVAL_PROMPTS})")
    ap.add_argument("--full-reward-model", action="store_true",
                    help=f"train the reward model longer ({P.FULL_REWARD_MODEL['labels']} ranked prompts, "
                         f"{P.FULL_REWARD_MODEL['rm_steps']} steps, reward_config(full=True))")
    ap.add_argument("--lora", type=positive_int, metavar="R",
                    help=f"train the RL stage through a rank-R LoRA adapter on the frozen SFT model, at "
                         f"{P.LORA_LR_MULTIPLIER:g}x the learning rate (1 <= R <= n_embd = {P.DEMO_MODEL.n_embd})")
    ap.add_argument("--lora-alpha", type=positive_float, default=None,
                    help="LoRA's alpha: the update is scaled by alpha / R (default 8, PEFT's)")
    ap.add_argument("--lora-targets", nargs="+", choices=lora.TARGETS, default=None,
                    help="the linear layers of each block that get an adapter (default all four)")
    args = ap.parse_args(argv)
    if args.lora is None and (args.lora_alpha is not None or args.lora_targets is not None):
        ap.error("--lora-alpha and --lora-targets need --lora R")
    if args.lora is not None:
        try:
            args.lora_config = lora.LoRAConfig(args.lora, 8.0 if args.lora_alpha is None else args.lora_alpha,
                                               targets=tuple(args.lora_targets or lora.TARGETS))
            lora.adapted_layers(P.DEMO_MODEL, args.lora_config)
        except ValueError as e:
            ap.error(f"--lora: {e}")
    if args.quick and args.full_reward_model:
        ap.error("--quick and --full-reward-model do not go together")
    if args.kl_horizon is not None and args.kl_target is None:
        ap.error("--kl-horizon needs --kl-target (the adaptive controller)")
    if args.batch_size % 8 or args.batch_size % min(P.PPO_MINIBATCH, args.batch_size):
        ap.error(f"--batch-size must be a multiple of 8, and of {P.PPO_MINIBATCH} from {P.PPO_MINIBATCH} on, got "
                 f"{args.batch_size}")
    if args.kl_target is not None and args.kl_coef == 0:
        ap.error("--kl-target needs --kl-coef > 0: the adaptive controller scales kl_coef, so from 0 it stays 0")
    if args.algo != "ppo" and args.kl_target is not None:
        ap.error(f"--kl-target is PPO's adaptive controller; --algo {args.algo} uses a fixed --kl-coef")
    if args.algo == "ppo" and args.reward == "verifier":
        ap.error("--reward verifier needs a critic-free --algo (PPO's value model starts from the reward model)")
    if (args.algo != "ppo" and grpo.ALGOS[args.algo].kl_placement == "none" and args.kl_coef is not None
            and args.kl_coef > 0):
        ap.error(f"--kl-coef: --algo {args.algo} has no KL term (as its paper); its KL to the SFT model is "
                 f"measured, not penalised")
    if args.kl_coef is None:
        args.kl_coef = 0.15 if args.algo == "ppo" else grpo.ALGOS[args.algo].kl_coef
    try:
        runs.check_start(args.out, args.force)
    except ValueError as e:
        ap.error(f"--out: {e}")
    preset = {**P.STEPS["quick" if args.quick else "default"],
              **(P.FULL_REWARD_MODEL if args.full_reward_model else {})}
    apply_preset(args, preset)
    if args.kl_target is not None and args.kl_horizon is None:
        args.kl_horizon = max(1, args.ppo_updates * args.batch_size // 4)
    if args.kl_target is not None and 0.2 * args.batch_size >= args.kl_horizon:
        ap.error(f"--kl-horizon must exceed {0.2 * args.batch_size:g} (0.2 x the {args.batch_size} rollouts of an "
                 f"update)")
    return args


class Recorder:
    """Prints stage headers and writes every logged step to the run's metrics.jsonl."""

    def __init__(self, out):
        self.path = os.path.join(out, "metrics.jsonl")
        open(self.path, "w").close()
        self.t0 = time.perf_counter()

    def stage(self, title):
        print(f"\n== {title} " + "=" * max(0, 72 - len(title)), flush=True)
        return time.perf_counter()

    def record(self, recs):
        with open(self.path, "a") as f:
            for rec in recs:
                f.write(json.dumps(rec) + "\n")


# ---------------------------------------------------------------- the five stages, each printing its part

def sft_stage(run, args, train_prompts, val_prompts, rng):
    t = run["rec"].stage("1. supervised fine-tuning (SFT) on a mixed-quality corpus")
    policy, history = P.run_sft(train_prompts, val_prompts, args.sft_steps, rng,
                                Sampling(args.temperature, P.DEMO_SAMPLING.max_new_tokens))
    save(run, "sft.npz", policy.params, runs.save_policy_info(policy, "sft", run["manifest"]))
    run["rec"].record(history)
    runs.record(args.out, run["manifest"], ["metrics.jsonl"], stage="sft")
    run["seconds"]["sft"] = time.perf_counter() - t
    print(f"sft: {run['seconds']['sft']:.1f} s")
    return policy, history


def preference_stage(run, args, policy, train_prompts, val_prompts, rng):
    t = run["rec"].stage("2. preference data: SFT samples ranked by the simulated annotator")
    train_cmp, val_cmp = P.preference_data(policy, train_prompts, val_prompts, args.labels, rng)
    n_ended = sum(sum(c.ended) for c in train_cmp)
    print(f"{len(train_cmp)} train and {len(val_cmp)} validation prompts, {P.K} responses each "
          f"({n_ended / (P.K * len(train_cmp)):.0%} ended with EOS); annotator temperature {P.ANNOTATOR.temperature}")
    run["seconds"]["preferences"] = time.perf_counter() - t
    return train_cmp, val_cmp


def reward_stage(run, args, policy, train_prompts, train_cmp, val_cmp, rng):
    t = run["rec"].stage("3. reward model (Bradley-Terry on K-way rankings)")
    reward_model, history = P.run_reward_model(policy, train_prompts, train_cmp, val_cmp, args.rm_steps, rng,
                                               full=args.full_reward_model)
    save(run, "reward.npz", reward_model.params, {"stage": "reward_model", "gain": reward_model.gain,
                                                  "bias": reward_model.bias, "run_id": run["manifest"]["run_id"],
                                                  "seed": args.seed})
    run["rec"].record(history)
    runs.record(args.out, run["manifest"], ["metrics.jsonl"], stage="reward_model")
    ev = evaluate(reward_model, val_cmp, P.ANNOTATOR)
    ev["sums_checked"], ev["sum_pairs"] = sums_checked(reward_model, val_cmp)
    run["seconds"]["reward_model"] = time.perf_counter() - t
    print(f"reward model: val accuracy {ev['accuracy']:.3f} on the annotator's labels, "
          f"{ev['expected_accuracy']:.3f} expected over its randomness; annotator ceiling "
          f"{ev['ceiling']:.3f} ({ev['expected_accuracy'] / ev['ceiling']:.1%} of it); "
          f"{run['seconds']['reward_model']:.1f} s")
    for f, fe in ev["by_family"].items():
        print(f"  {f:<11} accuracy {fe['accuracy']:.3f}  expected {fe['expected_accuracy']:.3f}  "
              f"ceiling {fe['ceiling']:.3f}  ({fe['pairs']} pairs)")
    if ev["sum_pairs"]:
        print(f"  checks sums: a right answer scored above a wrong one in {ev['sums_checked']:.2f} of "
              f"{ev['sum_pairs']} held-out pairs (0.5 is guessing)")
    return reward_model, ev


def train_rl(args, policy, reference, reward_model, train_prompts, updates, rng, on_update=None, log=print):
    """`updates` updates of --algo on policy, in place, against the reference's parameters, rewarded as
    --reward says; at LORA_LR_MULTIPLIER times the learning rate through an adapter. Returns PPO's value
    model (None for a critic-free method)."""
    lr_scale = P.LORA_LR_MULTIPLIER if policy.adapter is not None else 1
    if args.algo == "ppo":
        kl = (KLControllerConfig(kl_coef=args.kl_coef, adaptive=True, target=args.kl_target, horizon=args.kl_horizon)
              if args.kl_target else KLControllerConfig(kl_coef=args.kl_coef))
        return P.run_ppo(policy, reference, reward_model, train_prompts,
                         P.ppo_config(updates, kl, lr=P.PPO_LR * lr_scale, batch_size=args.batch_size), rng,
                         on_update=on_update, log=log)[0]
    preset = grpo.ALGOS[args.algo]
    cfg = replace(preset, updates=updates, kl_coef=args.kl_coef, lr=preset.lr * lr_scale,
                  prompts_per_update=args.batch_size // preset.group_size,
                  minibatches=min(preset.minibatches, args.batch_size))
    if args.reward == "verifier":
        source, train_prompts = grpo.verifier_source(), [p for p in train_prompts if p.family == "arithmetic"]
    else:
        source = grpo.reward_model_source(reward_model)
    grpo.train_critic_free(policy, reference, source, train_prompts, cfg, rng, on_update=on_update, log=log)
    return None


def rl_stage(run, args, policy, reference, reward_model, train_prompts, rng):
    """Stage 4: PPO, or the critic-free method of --algo, trains policy in place (its adapter, with --lora)."""
    method = "PPO" if args.algo == "ppo" else args.algo
    rewarded = "the verifier, arithmetic prompts only" if args.reward == "verifier" else "the reward model"
    penalised = args.kl_coef > 0 and (args.algo == "ppo" or grpo.ALGOS[args.algo].kl_placement != "none")
    kl = ("with a KL penalty against the frozen SFT model" if penalised else
          "without a KL penalty (the KL to the SFT model is measured)")
    t = run["rec"].stage(f"4. {method} {kl}, rewarded by {rewarded}"
                         + (f", through a rank-{args.lora} LoRA adapter" if args.lora else ""))
    history = []
    value = train_rl(args, policy, reference.params, reward_model, train_prompts, args.ppo_updates, rng,
                     on_update=lambda i, s: history.append({"stage": args.algo, **s}))
    if args.lora:
        lora.save_adapter(os.path.join(run["out"], "adapter.npz"), policy.adapter)
        runs.record(run["out"], run["manifest"], ["adapter.npz"])
    else:
        save(run, "policy.npz", policy.params, runs.save_policy_info(policy, args.algo, run["manifest"]))
    if value is not None:
        save(run, "value.npz", value, {"stage": "value", "run_id": run["manifest"]["run_id"], "seed": args.seed})
    run["rec"].record(history)
    runs.record(args.out, run["manifest"], ["metrics.jsonl"], stage=args.algo)
    run["seconds"]["rl"] = time.perf_counter() - t
    print(f"{method}: {run['seconds']['rl']:.1f} s")
    return history


def lora_report(run, args, policy, sft, reward_model, train_prompts):
    """The adapter beside full fine-tuning: trainable parameters, bytes on disk, and the traced peak memory
    (tracemalloc, which sees NumPy's arrays) of one update of --algo each, run apart with their own
    Generator so the demo's stream and timings are untouched."""
    full = sum(w.size for w in sft.params.values())
    out = {"rank": args.lora, "alpha": args.lora_config.alpha, "targets": list(args.lora_config.targets),
           "lr_multiplier": P.LORA_LR_MULTIPLIER, "trainable_parameters": lora.n_trainable(policy.adapter),
           "full_trainable_parameters": full,
           "adapter_bytes": os.path.getsize(os.path.join(run["out"], "adapter.npz")),
           "full_checkpoint_bytes": os.path.getsize(os.path.join(run["out"], "sft.npz"))}
    for name, make in (("peak_mb", lambda: lora.lora_policy(sft, args.lora_config, np.random.default_rng(0))),
                       ("full_peak_mb", lambda: copy_policy(sft))):
        tracemalloc.start()
        train_rl(args, make(), sft.params, reward_model, train_prompts, 1, np.random.default_rng([args.seed, 7]),
                 log=lambda line: None)
        out[name] = tracemalloc.get_traced_memory()[1] / 2 ** 20
        tracemalloc.stop()
    print(f"LoRA rank {args.lora}: {out['trainable_parameters']:,} trainable parameters "
          f"({out['trainable_parameters'] / full:.1%} of {full:,}); adapter file {out['adapter_bytes'] / 1024:.1f} KB "
          f"against {out['full_checkpoint_bytes'] / 1024:.1f} KB for the model; peak traced memory of one "
          f"update {out['peak_mb']:.1f} MB against {out['full_peak_mb']:.1f} MB for full fine-tuning")
    return out


def evaluation_stage(run, args, policy, reference, reward_model, val_prompts, rng):
    t = run["rec"].stage("5. what RLHF changed, on unseen prompts")
    c = P.compare_policies(policy, reference, reward_model, val_prompts, rng, n=args.eval_prompts)
    before, after, w = c["before"], c["after"], c["win_rate"]
    print(side_by_side(c["prompts"], c["ref_samples"], c["samples"]))
    print("\nbehaviour before (SFT):\n" + format_behaviour_table(before))
    print("\nbehaviour after (RLHF):\n" + format_behaviour_table(after))
    print(f"\n{'headline':<28} {'SFT':>6} {'RLHF':>6}")
    for f in FAMILIES:
        print(f"{HEADLINE[f]:<28} {before[f]['preferred_rate']:6.2f} {after[f]['preferred_rate']:6.2f}")
    run["seconds"]["evaluation"] = time.perf_counter() - t
    print(f"\nannotator win rate of RLHF over SFT: {w['rate']:.3f} "
          f"(95% interval {w['low']:.3f} to {w['high']:.3f}, {w['n']} unseen prompts)")
    print(f"KL(RLHF || SFT) per response: k1 estimate {c['kl']:.3f}, exact along the samples {c['kl_exact']:.3f}")
    print(f"gold score:         SFT {before['all']['mean_gold']:+.3f}  ->  RLHF {after['all']['mean_gold']:+.3f}")
    print(f"reward-model score: SFT {c['rm_before']:+.3f}  ->  RLHF {c['rm_after']:+.3f} "
          f"(ended responses, normalised)")
    return c


def side_by_side(prompts, sft_samples, rlhf_samples):
    """One example per family: the prompt, an SFT sample, an RLHF sample and their gold scores."""
    lines = [f"{'family':<11} {'prompt':<24} {'SFT sample':<31} {'gold':>5}  {'RLHF sample':<31} {'gold':>5}"]
    for family in FAMILIES:
        i = next((i for i, p in enumerate(prompts) if p.family == family), None)
        if i is None:
            continue
        (s, se), (r, re_) = sft_samples[i], rlhf_samples[i]
        lines.append(f"{family:<11} {prompts[i].text[:24]:<24} {(s if se else s + '...')[:31]:<31} "
                     f"{gold(prompts[i], s, se):+5.1f}  {(r if re_ else r + '...')[:31]:<31} "
                     f"{gold(prompts[i], r, re_):+5.1f}")
    return "\n".join(lines)


def save(run, name, params, info):
    """A checkpoint into the run folder, recorded in its manifest."""
    save_checkpoint(os.path.join(run["out"], name), params, P.DEMO_MODEL, info=info)
    runs.record(run["out"], run["manifest"], [name])


# ---------------------------------------------------------------- the demo

def main(argv=None):
    args = parse_args(argv)
    fast.keep_freed_memory()  # an entry point: keep freed memory for reuse (fast.py)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "force", "lora_config")}
    manifest = runs.start_run(args.out, settings, args.seed, force=args.force)
    run = {"out": args.out, "manifest": manifest, "rec": Recorder(args.out), "seconds": {}}
    rng = np.random.default_rng(args.seed)
    train_prompts, val_prompts = P.split(rng)
    runs.write_json(os.path.join(args.out, "split.json"),
                    {"train": [p.text for p in train_prompts], "val": [p.text for p in val_prompts]})
    runs.record(args.out, manifest, ["split.json"])
    print(f"minirlhf demo: seed {args.seed}, {len(train_prompts)} train / {len(val_prompts)} unseen prompts, "
          f"model {vars(P.DEMO_MODEL)}, temperature {args.temperature:g}")

    policy, sft_history = sft_stage(run, args, train_prompts, val_prompts, rng)
    train_cmp, val_cmp = preference_stage(run, args, policy, train_prompts, val_prompts, rng)
    reward_model, rm_eval = reward_stage(run, args, policy, train_prompts, train_cmp, val_cmp, rng)
    if args.lora:  # the SFT model stays as it is, the reference; the adapter on it trains
        reference, policy = policy, lora.lora_policy(policy, args.lora_config, rng)
    else:  # the reference is a frozen copy; the policy trains in place
        reference = copy_policy(policy)
    rl_history = rl_stage(run, args, policy, reference, reward_model, train_prompts, rng)
    c = evaluation_stage(run, args, policy, reference, reward_model, val_prompts, rng)
    lora_part = lora_report(run, args, policy, reference, reward_model, train_prompts) if args.lora else None

    run["seconds"]["total"] = time.perf_counter() - run["rec"].t0
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in run["seconds"].items()))
    summary = {
        "seed": args.seed, "numpy": np.__version__, "quick": args.quick, "args": settings,
        "temperature": c["temperature"], "run_id": manifest["run_id"],
        "sft": {"gold_score": c["before"]["all"]["mean_gold"], "val_loss": sft_history[-1]["val_loss"],
                "behaviour": c["before"]},
        "reward_model": {"val_accuracy": rm_eval["accuracy"], "val_expected_accuracy": rm_eval["expected_accuracy"],
                         "ceiling_accuracy": rm_eval["ceiling"], "sums_checked": rm_eval["sums_checked"],
                         "sum_pairs": rm_eval["sum_pairs"], "by_family": rm_eval["by_family"],
                         "calibration": rm_eval["calibration"], "norm_gain": reward_model.gain,
                         "norm_bias": reward_model.bias},
        "rl": {"algo": args.algo, "reward": args.reward, "gold_score": c["after"]["all"]["mean_gold"],
               "reward_score": c["rm_after"], "sft_reward_score": c["rm_before"], "kl": c["kl"],
               "kl_exact": c["kl_exact"], "behaviour": c["after"],
               "final_kl_coef": rl_history[-1].get("objective/kl_coef", args.kl_coef)},
        "win_rate_vs_sft": c["win_rate"],
        "lora": lora_part,
        "seconds": run["seconds"],
    }
    runs.write_json(os.path.join(args.out, "summary.json"), summary)
    runs.record(args.out, manifest, ["summary.json"], stage="evaluation")
    runs.finish_run(args.out, manifest)
    print(f"wrote {args.out}: summary.json, metrics.jsonl, checkpoints and the manifest")
    return summary


if __name__ == "__main__":
    main()
