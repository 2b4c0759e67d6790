"""Be the annotator: RLHF from your own rankings, in the terminal.

    python -m minirlhf.label [--run runs/demo] [--prompts 20] [--k 4] [--resume] [--no-feedback] [--mix N]
    python -m minirlhf.label --from labels.jsonl [--mix N]     re-train from saved labels, asking nothing

The demo's stage 2 with you as the annotator (InstructGPT's data collection, Ouyang et al. 2022). It loads
the SFT policy of a finished demo run (the demo makes one first if the folder holds none), shows K of its
responses to an unseen prompt, and reads your ranking (label_io.py has the syntax; ? prints it). Then it
does with your rankings what the demo does with the simulated annotator's: the Bradley-Terry reward model
(pipeline.run_reward_model), PPO against it (pipeline.run_ppo, the demo's recipe), and the before/after
comparison on unseen prompts (pipeline.compare_policies): behaviour, gold gain and win rate.

Feedback (--no-feedback hides it). After each ranking, the gold score of each response criterion by
criterion (world.gold_breakdown), and for each pair of your ranking, w above l, the gold gap split into the
criteria that make it and the probability that the simulated annotator (pipeline.ANNOTATOR) would choose
as you did, p = sigmoid((u_w - u_l) / T) (annotator.prefer_probability). At the end, per family, over the
pairs of ended responses in your rankings (annotator.scored_pairs: the pairs a reward model learns from):
    with gold       the fraction of your pairs in gold's order, of those gold does not tie;
    with annotator  the mean of p: how often the simulated annotator would agree with you, in expectation;
    ceiling         the mean of max(p, 1 - p) (annotator.ceiling_accuracy): the most any ranker can agree
                    with the noisy annotator. No one exceeds it (p <= max(p, 1 - p), pair by pair), and a
                    ranker who follows gold reaches it exactly: the demo's annotator has no length bias, so
                    p > 1/2 exactly where gold prefers w (and p = 1/2 on a gold tie).

Reproducible questions. Question i (0, 1, 2, ...) draws its prompt and its responses from a generator of its
own, np.random.default_rng([seed, 1, i]); families come in blocks of four, block i // 4 in the order
np.random.default_rng([seed, 2, i // 4]).permutation(4). So question i is the same prompt with the same
responses however the session got there: straight through, stopped and resumed, or back with undo. Each
line of the labels file carries its question's index, and --resume goes on after the last one (a skipped
question stays skipped: it has its line). Training draws from np.random.default_rng([seed, 3]) alone, so
--from the same file, with the same seed and training flags, gives the same reward model bit for bit; the
evaluation from np.random.default_rng([seed, 4]), so every session of one seed is compared on the same
unseen prompts against the same SFT answers, whatever its labels.

The session folder (--out, default RUN/labels; a subfolder of the run, runs.py) is a run whose parent is the
demo run: labels.jsonl, then reward.npz, policy.npz and summary.json, each recorded in its manifest. The
labels file is appended to while you label, so it joins the manifest, with its hash, only when the session
finishes. --resume on a finished session reopens it: its reward model, policy and summary are deleted and
made again, from all its labels, at the end. --force starts the session over (its labels are deleted), and
re-making the demo run with --force deletes its sessions with it.

Which prompts. You rank unseen prompts (the run's val_prompts): what the SFT model says to prompts it never
trained on. The reward model learns from them, PPO trains on the run's train prompts, and the evaluation is
on unseen prompts, as in the demo (the policy has never seen them; the reward model has seen yours). The
reward model's held-out accuracy is against the simulated annotator's rankings of unseen prompts.
"""
import argparse
import os
import sys
import time
from itertools import combinations

import numpy as np

from . import demo, fast, pipeline as P, runs
from . import transformer as tf
from .annotator import ceiling_accuracy, prefer_probability, scored_pairs
from .checkpoint import save_checkpoint
from .cli import apply_preset, non_negative_float, non_negative_int, positive_int
from .label_io import (HELP, LABELS, MAX_K, REMAKE, append_record, ask, check_session, drop_last, letter,
                       make_record, open_session, parse_answer, read_labels, to_comparisons)
from .reward import evaluate
from .world import CRITERIA, FAMILIES, HEADLINE, format_behaviour_table, get_prompt, gold, gold_breakdown
from .world import sample_prompts

DRAWS = 5  # attempts at K different responses to one prompt
QUESTION, FAMILY_ORDER, TRAINING, EVALUATION = 1, 2, 3, 4  # the session's random streams (module docstring)
# Settings: the demo's reward-model and PPO recipe (--quick: the quick demo's step counts); a typed flag wins.
DEFAULTS = {"prompts": 20, "k": 4, "seed": 0, "mix": 0, "val_labels": 100, "eval_prompts": P.EVAL_PROMPTS,
            "batch_size": P.PPO_BATCH, "kl_coef": 0.15, "rm_steps": P.STEPS["default"]["rm_steps"],
            "ppo_updates": P.STEPS["default"]["ppo_updates"]}
QUICK = {"val_labels": 50, "rm_steps": P.STEPS["quick"]["rm_steps"], "ppo_updates": P.STEPS["quick"]["ppo_updates"]}


# ---------------------------------------------------------------- the questions

def question(start, seed, i, k):
    """Question i of a session: an unseen prompt and k responses of the SFT policy, all different where
    DRAWS draws of k allow it (repeats fill the rest)."""
    family = FAMILIES[np.random.default_rng([seed, FAMILY_ORDER, i // 4]).permutation(len(FAMILIES))[i % 4]]
    rng = np.random.default_rng([seed, QUESTION, i])
    prompt = sample_prompts(start["val_prompts"], 1, rng, {family: 1.0})[0]
    drawn = []
    for _ in range(DRAWS):
        drawn += tf.sample_responses(start["sft"], [prompt.text] * k, rng)
        if len(set(drawn)) >= k:
            break
    distinct = list(dict.fromkeys(drawn))  # first occurrences, in the order drawn
    repeats = [r for n, r in enumerate(drawn) if r in drawn[:n]]
    return prompt, (distinct + repeats)[:k]


def show(number, total, prompt, responses):
    print(f"\n[{number}/{total}] {prompt.family}: {prompt.text}")
    for i, (text, ended) in enumerate(responses):
        same = next((letter(j) for j in range(i) if responses[j] == (text, ended)), None)
        print(f"  {letter(i)}  \"{text}\"" + ("...  (never ended: no EOS)" if not ended else "")
              + (f"  (same as {same})" if same else ""))


def pairs_of(kind, value):
    """(upper, lower) pairs of an answer: all C(K, 2) of a ranking, or the one best/worst pair."""
    return list(combinations(value, 2)) if kind == "ranking" else [tuple(value)]


def feedback(prompt, responses, pairs):
    """How gold ranks the responses and why; for each pair, gold's verdict and P(annotator agrees)."""
    crit = [gold_breakdown(prompt, t, e) for t, e in responses]
    golds = [gold(prompt, t, e) for t, e in responses]
    order = sorted(range(len(responses)), key=lambda i: -golds[i])  # stable: gold ties in the order shown
    print("  gold ranks them " + letter(order[0]) + "".join(f" {'=' if golds[i] == golds[j] else '>'} {letter(j)}"
                                                         for i, j in zip(order, order[1:])) + ":")
    for i in order:
        why = ", ".join(f"{c} {v:+.1f}" for c, v in crit[i].items() if v) or "every criterion 0"
        print(f"    {letter(i)} {golds[i]:+5.1f}  {why}")
    with_gold, ties, with_annotator = 0, 0, 0.0
    for w, l in pairs:
        gap, p = golds[w] - golds[l], prefer_probability(prompt, responses[w], responses[l], P.ANNOTATOR)
        diff = ", ".join(f"{c} {crit[w][c] - crit[l][c]:+.1f}" for c in CRITERIA if crit[w][c] != crit[l][c])
        verdict = "agrees" if gap > 0 else "disagrees" if gap < 0 else "ties"
        print(f"  you {letter(w)} over {letter(l)}: gold {verdict:<9} {gap:+5.1f}  {diff or 'identical criteria':<36}"
              f" the annotator agrees with P {p:.2f}")
        with_gold, ties, with_annotator = with_gold + (gap > 0), ties + (gap == 0), with_annotator + p
    print(f"  your {len(pairs)} pair{'s' * (len(pairs) > 1)}: gold agrees with {with_gold} of the {len(pairs) - ties} "
          f"it does not tie; the annotator would agree with {with_annotator:.1f} in expectation")


def agreement(comparisons, annotator=P.ANNOTATOR):
    """Per family present, then "all": pairs, with_gold, with_annotator and the annotator's ceiling, over
    the scored pairs of the comparisons (module docstring)."""
    rows = []
    for c in comparisons:
        prompt = get_prompt(c.prompt)
        for w, l in scored_pairs(c):
            gap = gold(prompt, c.responses[w]) - gold(prompt, c.responses[l])
            rows.append((prompt.family, None if gap == 0 else float(gap > 0),  # None: a gold tie
                         prefer_probability(prompt, c.responses[w], c.responses[l], annotator)))
    out = {}
    for name in FAMILIES + ("all",):
        mine = [(g, p) for f, g, p in rows if name in (f, "all")]
        if mine:
            cmp = [c for c in comparisons if name in (get_prompt(c.prompt).family, "all") and scored_pairs(c)]
            untied = [g for g, _ in mine if g is not None]
            out[name] = {"pairs": len(mine), "gold_ties": len(mine) - len(untied),
                         "with_gold": float(np.mean(untied)) if untied else None,
                         "with_annotator": float(np.mean([p for _, p in mine])),
                         "ceiling": ceiling_accuracy(cmp, annotator)}
    return out


def print_agreement(stats):
    if not stats:
        print("\nno pair of ended responses in your rankings: nothing to compare")
        return
    print(f"\nyour agreement over the {stats['all']['pairs']} pairs of ended responses in your rankings "
          f"(the pairs a reward model learns from):")
    print(f"{'family':<11} {'pairs':>5} {'gold ties':>9} {'with gold':>9} {'with annotator':>14} {'its ceiling':>11}")
    for name, s in stats.items():
        gold_cell = "-" if s["with_gold"] is None else f"{s['with_gold']:.3f}"
        print(f"{name:<11} {s['pairs']:>5} {s['gold_ties']:>9} {gold_cell:>9} {s['with_annotator']:>14.3f} "
              f"{s['ceiling']:>11.3f}")


# ---------------------------------------------------------------- the session

def label(start, args, folder, records, stdin):
    """Ask questions until args.prompts are ranked or the reader stops; every answer is appended to the
    labels file as it comes. Returns the records (the file's lines)."""
    path = os.path.join(folder, LABELS)
    if not records:
        print(f"\nrank the responses, best first: {args.prompts} prompts, {args.k} responses each "
              f"(? for help). Your answers are saved in {path} as you type them.")
    index = records[-1]["index"] + 1 if records else 0
    while (ranked := sum(r["ranking"] is not None for r in records)) < args.prompts:
        prompt, responses = question(start, args.seed, index, args.k)
        show(ranked + 1, args.prompts, prompt, responses)
        t0 = time.perf_counter()
        while True:
            line = ask("your ranking> ", stdin)
            if line is None:
                kind = "quit"
                break
            try:
                kind, value, reason = parse_answer(line, args.k)
            except ValueError as e:
                print(f"  {e}")
                continue
            if kind != "help":
                break
            print(HELP)
        if kind == "quit":
            break
        if kind == "undo":
            if not records:
                print("  nothing to undo yet")
                continue
            drop_last(path)
            undone = records.pop()
            index = undone["index"]
            print(f"  undone: your answer to {undone['prompt']!r}; here it is again")
            continue
        rec = make_record(index, prompt.text, responses, kind, value, reason, time.perf_counter() - t0)
        append_record(path, rec)
        records.append(rec)
        index += 1
        if kind != "skip" and not args.no_feedback:
            feedback(prompt, responses, pairs_of(kind, value))
    return records


# ---------------------------------------------------------------- training on the labels

def train(start, comparisons, args, folder, manifest):
    """Reward model on the reader's comparisons (plus --mix simulated rankings), PPO against it, and the
    before/after comparison; checkpoints into the session folder. Returns the summary's numbers."""
    sft, rng, seconds = start["sft"], np.random.default_rng([args.seed, TRAINING]), {}
    mix = (P.collect_preferences(sft, start["train_prompts"], args.mix, rng, family_weights=P.LABEL_FAMILY_WEIGHTS)
           if args.mix else [])
    mine = sum(bool(scored_pairs(c)) for c in comparisons)
    check_trainable(comparisons + mix, len(comparisons), os.path.join(folder, LABELS))
    t = time.perf_counter()
    header(f"reward model from your {len(comparisons)} rankings ({mine} with a pair of ended responses)"
           + (f" and {args.mix} simulated ones (K = {P.K})" if args.mix else ""))
    val_cmp = P.collect_preferences(sft, start["val_prompts"], args.val_labels, rng)
    rm, _ = P.run_reward_model(sft, start["train_prompts"], comparisons + mix, val_cmp, args.rm_steps, rng)
    save(folder, manifest, "reward.npz", rm.params, {"stage": "reward_model", "gain": rm.gain, "bias": rm.bias},
         "reward_model")
    ev = evaluate(rm, val_cmp, P.ANNOTATOR)
    print(f"reward model: accuracy {ev['accuracy']:.3f} on the simulated annotator's held-out labels, "
          f"{ev['expected_accuracy']:.3f} expected; its ceiling {ev['ceiling']:.3f}")
    for f, fe in ev["by_family"].items():
        print(f"  {f:<11} expected {fe['expected_accuracy']:.3f}  ceiling {fe['ceiling']:.3f}  ({fe['pairs']} pairs)")
    seconds["reward_model"] = time.perf_counter() - t

    t = time.perf_counter()
    header("PPO against your reward model, with a KL penalty to the SFT model")
    policy = tf.copy_policy(sft)
    P.run_ppo(policy, sft.params, rm, start["train_prompts"],
              P.ppo_config(args.ppo_updates, P.fixed_kl(args.kl_coef), batch_size=args.batch_size), rng)
    save(folder, manifest, "policy.npz", policy.params, runs.save_policy_info(policy, "ppo", manifest), "ppo")
    seconds["ppo"] = time.perf_counter() - t

    t = time.perf_counter()
    header("what your labels changed, on unseen prompts")
    c = P.compare_policies(policy, sft, rm, start["val_prompts"], np.random.default_rng([args.seed, EVALUATION]),
                           n=args.eval_prompts)
    before, after, w = c["before"], c["after"], c["win_rate"]
    print(demo.side_by_side(c["prompts"], c["ref_samples"], c["samples"]))
    print("\nbehaviour before (SFT):\n" + format_behaviour_table(before))
    print("\nbehaviour after (RLHF on your labels):\n" + format_behaviour_table(after))
    print(f"\n{'headline':<28} {'SFT':>6} {'RLHF':>6}")
    for f in (f for f in FAMILIES if f in before and f in after):  # a few prompts may miss a family
        print(f"{HEADLINE[f]:<28} {before[f]['preferred_rate']:6.2f} {after[f]['preferred_rate']:6.2f}")
    gain = after["all"]["mean_gold"] - before["all"]["mean_gold"]
    print(f"\ngold score: SFT {before['all']['mean_gold']:+.3f} -> RLHF {after['all']['mean_gold']:+.3f} "
          f"(gain {gain:+.3f}); the simulated annotator prefers RLHF's answer {w['rate']:.3f} of the time "
          f"(95% interval {w['low']:.3f} to {w['high']:.3f}, {w['n']} prompts); KL {c['kl']:.3f} per response")
    seconds["evaluation"] = time.perf_counter() - t
    return {"mix": args.mix, "reward_model": {k: ev[k] for k in ("accuracy", "expected_accuracy", "ceiling",
                                                                  "by_family")},
            "sft": {"gold_score": before["all"]["mean_gold"], "behaviour": before},
            "ppo": {"gold_score": after["all"]["mean_gold"], "behaviour": after, "kl": c["kl"]},
            "gold_gain": gain, "win_rate_vs_sft": w, "seconds": seconds}


def header(title):
    print(f"\n== {title} " + "=" * max(0, 72 - len(title)), flush=True)


def check_trainable(comparisons, yours, path):
    """ValueError unless some comparison has a pair of ended responses, the only pairs a reward model uses."""
    if not any(scored_pairs(c) for c in comparisons):
        what = f"none of your {yours} rankings has two responses that ended (with EOS)" if yours else "no ranking"
        raise ValueError(f"{what}, and the reward model learns only from pairs of ended responses: rank more "
                         f"(--resume), or add simulated rankings with --mix N. Your labels are in {path}")


def save(folder, manifest, name, params, info, stage):
    save_checkpoint(os.path.join(folder, name), params, P.DEMO_MODEL,
                    info={**info, "run_id": manifest["run_id"], "seed": manifest["seed"]})
    runs.record(folder, manifest, [name], stage=stage)


# ---------------------------------------------------------------- the command line

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog=REMAKE, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="the finished demo run to start from (default runs/demo, runs/demo-quick with "
                                  "--quick); if the folder holds no run, the demo makes one there first")
    ap.add_argument("--out", help="the session folder, inside the run (default RUN/labels, RUN/labels-from with "
                                  "--from)")
    ap.add_argument("--prompts", type=positive_int, help=f"prompts to rank (default {DEFAULTS['prompts']})")
    ap.add_argument("--k", type=positive_int, help=f"responses per prompt, 2-{MAX_K} (default {DEFAULTS['k']})")
    ap.add_argument("--seed", type=non_negative_int, help="seed of the questions and of training (default 0)")
    ap.add_argument("--resume", action="store_true", help="continue the session in --out")
    ap.add_argument("--force", action="store_true", help="replace the session in --out (its labels are deleted)")
    ap.add_argument("--from", dest="from_file", help="re-train from this labels file without asking anything")
    ap.add_argument("--no-feedback", action="store_true", help="do not show gold's view after each ranking")
    ap.add_argument("--mix", type=non_negative_int, help=f"add N simulated rankings (K = {P.K}) of training prompts")
    ap.add_argument("--quick", action="store_true", help="the quick demo's step counts (a flag you type still wins)")
    ap.add_argument("--rm-steps", type=positive_int, help="reward-model steps (the demo's)")
    ap.add_argument("--ppo-updates", type=positive_int, help="PPO updates (the demo's)")
    ap.add_argument("--val-labels", type=positive_int, help="held-out simulated rankings (reward-model accuracy)")
    ap.add_argument("--eval-prompts", type=positive_int, help="unseen prompts of the before/after comparison")
    ap.add_argument("--batch-size", type=positive_int, help=f"rollouts per PPO update ({P.PPO_BATCH})")
    ap.add_argument("--kl-coef", type=non_negative_float, help="fixed KL coefficient (the demo's, 0.15)")
    args = ap.parse_args(argv)
    if args.resume and (args.force or args.from_file):
        ap.error("--resume continues a session: it goes with neither --force nor --from")
    args.run = args.run or ("runs/demo-quick" if args.quick else "runs/demo")
    args.out = args.out or os.path.join(args.run, "labels-from" if args.from_file else "labels")
    if os.path.dirname(os.path.abspath(args.out)) != os.path.abspath(args.run):
        ap.error(f"--out must be a folder directly inside the run (--run {args.run}), such as {args.run}/labels")
    if args.resume and runs.read_manifest(args.out) is not None:  # the session's own --k and --seed
        old = runs.read_manifest(args.out)
        apply_preset(args, {"k": old["settings"].get("k"), "seed": old["seed"]})
    apply_preset(args, QUICK if args.quick else {})
    apply_preset(args, DEFAULTS)
    if not 2 <= args.k <= MAX_K:
        ap.error(f"--k must be between 2 and {MAX_K}, got {args.k}")
    if args.from_file and not os.path.isfile(args.from_file):
        ap.error(f"--from {args.from_file}: no such file")
    if args.from_file and os.path.abspath(args.from_file).startswith(os.path.abspath(args.out) + os.sep):
        ap.error(f"--from {args.from_file} is inside --out {args.out}, which the session replaces: choose another "
                 f"--out")
    try:
        check_session(args)
    except ValueError as e:
        ap.error(f"--out: {e}")
    return args


def starting_point(args):
    """The loaded demo run in args.run (runs.load_run), made there first if the folder holds no run."""
    if runs.read_manifest(args.run) is None and not (os.path.isdir(args.run) and os.listdir(args.run)):
        flags = ["--out", args.run, "--seed", str(args.seed)] + (["--quick"] if args.quick else [])
        print(f"no demo run in {args.run}: making one first with python -m minirlhf.demo {' '.join(flags)}")
        demo.main(flags)
    return runs.load_run(args.run, P.DEMO_MODEL)


def main(argv=None, stdin=None):
    """The labelling session, then training on it (module docstring). stdin: where answers come from."""
    args = parse_args(argv)
    fast.keep_freed_memory()  # an entry point (fast.py)
    if args.from_file:  # checked before any work is done
        saved = to_comparisons(read_labels(args.from_file))
        if not args.mix:
            check_trainable(saved, len(saved), args.from_file)
    start = starting_point(args)
    print(f"the SFT policy of the demo run in {args.run} (seed {start['manifest']['seed']}); "
          f"session folder {args.out}")
    manifest, records = open_session(args, start)
    t = time.perf_counter()
    if not args.from_file:
        records = label(start, args, args.out, records, sys.stdin if stdin is None else stdin)
    labelling = time.perf_counter() - t
    comparisons = to_comparisons(records)
    stats = agreement(comparisons)
    if not args.no_feedback:
        print_agreement(stats)
    results = train(start, comparisons, args, args.out, manifest)
    results["seconds"]["labelling"] = labelling
    summary = {"run": args.run, "parent_run_id": manifest["parent_run_id"], "seed": args.seed,
               "args": vars(args), "from": args.from_file, "answers": len(records),
               "rankings": sum(isinstance(r["ranking"], list) for r in records),
               "best_worst_pairs": sum(isinstance(r["ranking"], dict) for r in records),
               "skipped": sum(r["ranking"] is None for r in records), "agreement": stats, **results}
    runs.write_json(os.path.join(args.out, "summary.json"), summary)
    runs.record(args.out, manifest, [LABELS, "summary.json"], stage="evaluation")
    runs.finish_run(args.out, manifest)
    print(f"wrote {args.out}: {LABELS}, reward.npz, policy.npz, summary.json and the manifest")
    return summary


def cli():
    """main() for the command line: an input error is one line and exit code 2; Ctrl-C keeps the labels."""
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: every answer typed so far is saved; --resume continues (and trains)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
