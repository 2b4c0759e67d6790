"""Explaining a ranking: "comparing ranked responses, analysing why one answer is better".

    python demos/explain_ranking.py [--run runs/demo] [--k 8] [--json explain_ranking.json]
                                    [--plot explain_ranking.png] [--quick]

Method. For one unseen prompt of each family: K responses sampled from the SFT model (InstructGPT's data
collection; drawn again, up to a few times, until at least 3 of them differ, so there is something to
compare), the demo annotator's ranking of them (Plackett-Luce, annotator.py), the demo reward model's
normalised scores, and the gold criteria of each response (world.gold_breakdown). No training: this is
the data a reward model learns from, taken apart.

Reading the output. Per prompt, the responses in the annotator's order, best first, each with its gold
total, reward-model score and the criteria that are not 0. Then each neighbouring pair of the ranking:
the probability that the annotator prefers the upper one (sigmoid of the utility gap over the
temperature; a noisy annotator sometimes ranks the worse answer higher), the gold gap, upper minus lower,
split into the criteria that separate the two (why one answer is better), and whether the reward model
orders them the same way. The last line counts how often the reward model agrees with the annotator on all
the ranked pairs shown.
"""
import time
from itertools import combinations

import _common as C
import numpy as np

from minirlhf import pipeline as P
from minirlhf.annotator import prefer_probability, rank
from minirlhf.cli import positive_int
from minirlhf.reward import score_samples
from minirlhf.transformer import sample_responses
from minirlhf.world import FAMILIES, behaviour, gold_breakdown

ANNOTATOR, K = P.ANNOTATOR, P.K

DRAWS = 5  # attempts at K responses with at least 3 different texts


def explain(prompt, responses, ranking, scores):
    """The record of one ranked prompt: each response's criteria, and why each neighbour pair is ordered."""
    items = [{"response": s, "ended": e, "behaviour": behaviour(prompt, s, e), "criteria": gold_breakdown(prompt, s, e),
              "reward_model": None if rm is None else float(rm)} for (s, e), rm in zip(responses, scores)]
    for it in items:
        it["gold"] = float(sum(it["criteria"].values()))
    pairs = []
    for hi, lo in zip(ranking, ranking[1:]):
        a, b = items[hi], items[lo]
        diff = {c: a["criteria"][c] - b["criteria"][c] for c in a["criteria"] if a["criteria"][c] != b["criteria"][c]}
        if a["reward_model"] is None or b["reward_model"] is None:
            rm_agrees = None
        else:  # "tie" for equal scores (identical responses get identical ones)
            rm_agrees = "tie" if a["reward_model"] == b["reward_model"] else a["reward_model"] > b["reward_model"]
        pairs.append({"upper": hi, "lower": lo, "p_annotator": prefer_probability(prompt, responses[hi],
                                                                               responses[lo], ANNOTATOR),
                      "criteria_diff": diff, "reward_model_agrees": rm_agrees})
    return {"prompt": prompt.text, "family": prompt.family, "ranking": list(ranking), "responses": items,
            "neighbour_pairs": pairs}


def main(argv=None):
    ap = C.parser(__doc__, "python demos/explain_ranking.py")
    ap.add_argument("--k", type=positive_int, help=f"responses per prompt (default {K}, the demo's)")
    args = C.parse(ap, argv, {}, {"k": K})
    if args.k < 2:
        ap.error("--k must be >= 2")
    t0 = time.perf_counter()
    start = C.starting_point(args)
    sft, rm = start["sft"], start["reward_model"]
    rng = np.random.default_rng([args.seed, 5])
    records, agree, total = [], 0, 0
    for family in FAMILIES:
        candidates = [p for p in start["val_prompts"] if p.family == family]
        prompt = candidates[rng.integers(len(candidates))]
        for _ in range(DRAWS):
            responses = sample_responses(sft, [prompt.text] * args.k, rng)
            if len({s for s, _ in responses}) >= min(3, args.k):
                break
        ranking = rank(prompt, responses, ANNOTATOR, rng)
        scores = [None if not e else float(v) for (_, e), v in
                  zip(responses, score_samples(rm, [prompt.text] * args.k, responses))]
        rec = explain(prompt, responses, ranking, scores)
        records.append(rec)

        print(f"\n{family}: {prompt.text!r}   (annotator's order, best first)")
        print(C.table([("rank", 4, "d"), ("response", 32, ""), ("gold", 5, "+.1f"), ("RM", 6, ""),
                       ("behaviour", 13, ""), ("criteria not 0", 15, "")],
                      [(r + 1, repr(rec["responses"][i]["response"] + ("" if rec["responses"][i]["ended"] else "...")),
                        rec["responses"][i]["gold"],
                        "no EOS" if scores[i] is None else f"{scores[i]:+.2f}", rec["responses"][i]["behaviour"],
                        "  " + ", ".join(f"{c} {v:+.1f}" for c, v in rec["responses"][i]["criteria"].items() if v))
                       for r, i in enumerate(ranking)]))
        for r, pair in enumerate(rec["neighbour_pairs"]):
            why = ", ".join(f"{c} {d:+.1f}" for c, d in pair["criteria_diff"].items()) or "identical criteria"
            rm_word = {True: "agrees", False: "disagrees", "tie": "scores them equally",
                       None: "cannot score a no-EOS response"}[pair["reward_model_agrees"]]
            print(f"  {r + 1} over {r + 2}: annotator P = {pair['p_annotator']:.2f}; gold gap (upper - lower) "
                  f"{sum(pair['criteria_diff'].values()):+.1f} = {why}; reward model {rm_word}")
        for hi, lo in combinations(ranking, 2):  # every pair of the ranking, as the reward model is trained
            if scores[hi] is not None and scores[lo] is not None and scores[hi] != scores[lo]:
                agree += scores[hi] > scores[lo]
                total += 1
    print(f"\nreward model orders {agree} of {total} ranked pairs (both ended, different scores) as the annotator did")

    C.save_figure(args.plot, lambda plt: draw(plt, records))
    return C.finish(args, "explain_ranking", {"prompts": records, "rm_agreement": {"agree": agree, "pairs": total}},
                    t0)


def draw(plt, records):
    fig, axes = plt.subplots(1, len(records), figsize=(4 * len(records), 4), squeeze=False)
    for ax, rec in zip(axes[0], records):
        order = rec["ranking"]
        criteria = list(rec["responses"][0]["criteria"])
        pos, neg = np.zeros(len(order)), np.zeros(len(order))
        for k, c in enumerate(criteria):  # stacked bars: positive criteria up, negative down
            v = np.array([rec["responses"][i]["criteria"][c] for i in order])
            base = np.where(v >= 0, pos, neg)
            ax.bar(range(len(order)), v, bottom=base, color=f"C{k}", label=c)
            pos, neg = pos + np.maximum(v, 0), neg + np.minimum(v, 0)
        rm = [rec["responses"][i]["reward_model"] for i in order]
        ax.plot([j for j, v in enumerate(rm) if v is not None], [v for v in rm if v is not None], "kD",
                label="reward model")
        ax.set_xticks(range(len(order)), [f"#{r + 1}" for r in range(len(order))])
        ax.set(title=f"{rec['family']}: {rec['prompt'][:24]}", xlabel="annotator's rank")
    axes[0][0].set_ylabel("gold criteria (stacked) / reward-model score")
    axes[0][-1].legend(fontsize=7, loc="best")
    return fig


if __name__ == "__main__":
    C.main_guard(main)
