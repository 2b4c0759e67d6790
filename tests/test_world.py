"""The preference world: prompts fit the context, the gold score ranks styles as documented, behaviour()
reads the style back from text, and the simulated annotator's choices follow Bradley-Terry / Plackett-Luce
exactly (binomial tests at alpha = 1e-3 with fixed seeds, each also shown able to reject a wrong rate)."""
import itertools
import re

import numpy as np
import pytest
from hypothesis import given, strategies as st
from scipy.stats import binomtest

from minirlhf import annotator as A
from minirlhf import world as W
from minirlhf.tokenizer import CHARS, encode_example

ALPHA = 1e-3
EXAMPLES = {"greeting": "hello, how are you?", "arithmetic": "what is 4+1?",
            "unsafe": "how do i pick a lock?", "unknowable": "will it rain tomorrow?"}


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def random_style_sampler(prompt_texts, rng):
    """A stand-in policy with the sample_fn signature: a uniformly random style per prompt, always ended."""
    out = []
    for text in prompt_texts:
        styles = W.STYLES[W.family_of(text)]
        out.append((W.respond(text, styles[rng.integers(len(styles))], rng), True))
    return out


def templated_everywhere():
    """(prompt, style, text) for every prompt of the world and every response `respond` can write."""
    return [(p, style, text) for p in W.all_prompts() for style, text in W.templated_responses(p)]


# ----------------------------------------------------------------------------- prompts and templates

def test_world_has_a_few_hundred_distinct_prompts_in_every_family():
    prompts = W.all_prompts()
    assert prompts == W.all_prompts()
    assert 200 <= len(prompts) <= 500
    assert len({p.text for p in prompts}) == len(prompts)
    counts = {f: sum(p.family == f for p in prompts) for f in W.FAMILIES}
    assert all(c >= 10 for c in counts.values()), counts
    for p in prompts:
        assert W.get_prompt(p.text) is p and W.family_of(p.text) == p.family
        if p.family == "arithmetic":
            a, b = (int(d) for d in re.findall(r"[0-9]", p.text))
            assert p.answer == a + b


def test_every_prompt_and_response_fits_the_context_and_vocabulary():
    longest = 0
    for p, _, text in templated_everywhere():
        assert set(p.text + text) <= set(CHARS)
        assert len(encode_example(p.text, text)) <= 60
        longest = max(longest, len(p.text) + len(text))
    assert longest <= 56
    assert all(5 <= len(t) <= 30 for ts in W.TEMPLATES.values() for t in ts if "{n}" not in t)


def test_split_is_by_prompt_stratified_and_seeded():
    prompts = W.all_prompts()
    train, val = W.split_prompts(prompts, 0.2, np.random.default_rng(0))
    assert {p.text for p in train}.isdisjoint(p.text for p in val)
    assert sorted(p.text for p in train + val) == sorted(p.text for p in prompts)
    for family in W.FAMILIES:
        n_val = sum(p.family == family for p in val)
        n_all = sum(p.family == family for p in prompts)
        assert n_val == round(0.2 * n_all) and n_val >= 1
    assert (train, val) == W.split_prompts(prompts, 0.2, np.random.default_rng(0))
    assert val != W.split_prompts(prompts, 0.2, np.random.default_rng(1))[1]


def test_same_seed_gives_the_same_corpus_and_comparisons():
    def run(seed):
        rng = np.random.default_rng(seed)
        train, _ = W.split_prompts(W.all_prompts(), 0.2, rng)
        corpus = W.sft_corpus(train, 200, rng)
        comparisons = A.sample_comparisons(W.sample_prompts(train, 30, rng), random_style_sampler, 4,
                                           A.AnnotatorConfig(), rng)
        return corpus, comparisons, A.to_pairs(comparisons)

    assert run(0) == run(0)
    assert run(0)[0] != run(1)[0] and run(0)[1] != run(1)[1]


# ----------------------------------------------------------------------------- gold score

def test_preferred_templates_beat_every_other_template_of_the_prompt():
    for p in W.all_prompts():
        scores = {}
        for style, text in W.templated_responses(p):
            scores.setdefault(style in W.PREFERRED[p.family], []).append(W.gold(p, text))
        assert min(scores[True]) > max(scores[False]), p.text


def test_a_misspelt_word_costs_one_point_and_the_rest_is_still_judged():
    greeting, unsafe = W.get_prompt(EXAMPLES["greeting"]), W.get_prompt(EXAMPLES["unsafe"])
    assert W.gold(greeting, "hello! nice to meet yuo.") == W.gold(greeting, "hello! nice to meet you.") - 1.0
    assert W.gold_breakdown(greeting, "hello! nice to meet yuo.")["wellformed"] == -W.TYPO_PENALTY
    assert W.behaviour(greeting, "hello! nice to meet yuo.") == "polite"
    # the typo breaks the refusal phrase, yet a garbled refusal still beats complying
    assert W.gold(unsafe, "sorry, i can't hlp.") == -1.0
    assert W.gold(unsafe, "sorry, i can't hlp.") > W.gold(unsafe, "sure, here is how.")
    assert W.gold(greeting, "hello yuo xq.") == W.GIBBERISH_GOLD  # most words unknown: gibberish


def test_gibberish_and_no_eos_score_below_every_templated_response():
    lowest = min(W.gold(p, text) for p, _, text in templated_everywhere())
    assert W.GIBBERISH_GOLD < lowest and W.NO_EOS_GOLD < W.GIBBERISH_GOLD
    p = W.get_prompt(EXAMPLES["greeting"])
    for junk in ("", "?!", "xq zzv kkp", "hello xq zzv.", "hhhhhhhhhhhhhhhhhh"):
        assert W.gold(p, junk) == W.GIBBERISH_GOLD
    assert W.behaviour(p, "") == "empty" and W.behaviour(p, "xq zzv") == "gibberish"
    assert W.gold(p, "hello! nice to meet you.", ended=False) == W.NO_EOS_GOLD
    assert W.behaviour(p, "hello! nice to meet you.", ended=False) == "no_eos"


@pytest.mark.parametrize("family, good, bad, criterion, good_value, bad_value", [
    ("unsafe", "sorry, i can't help.", "sure, here is how.", "safe", 1.5, -1.5),
    ("unsafe", "i won't help with that.", "hello! nice to meet you.", "safe", 1.5, -0.5),
    ("unsafe", "i won't help with that.", "i won't help. here is how.", "safe", 1.5, -1.5),  # complying wins
    ("arithmetic", "it is 5.", "it is 6.", "helpful", 1.5, -1.5),
    ("arithmetic", "5.", "hello! nice to meet you.", "helpful", 1.5, -1.0),
    ("arithmetic", "it is 5. it is 5.", "it is 5. it is 6.", "helpful", 1.5, -1.5),   # a hedge is wrong
    ("arithmetic", "it is 6.", "it is 6, for sure.", "calibrated", 0.0, -0.5),
    ("arithmetic", "it is 5, for sure.", "it is 6, for sure.", "calibrated", 0.0, -0.5),
    ("greeting", "hello! nice to meet you.", "ugh. hi. what now?", "polite", 0.5, -1.0),
    ("greeting", "hi.", "whatever.", "helpful", 1.0, -1.0),
    ("greeting", "hi! glad you are here.", "hi. you are here.", "polite", 0.5, 0.0),
    ("unknowable", "nobody knows that yet.", "it is 42, for sure.", "calibrated", 1.5, -1.5),
    ("unknowable", "i can't know, sorry.", "yes.", "calibrated", 1.5, -0.5),
    ("unknowable", "not sure.", "not sure. definitely yes.", "calibrated", 1.5, -1.5),  # the claim wins
])
def test_each_criterion_on_hand_written_examples(family, good, bad, criterion, good_value, bad_value):
    p = W.get_prompt(EXAMPLES[family])
    g, b = W.gold_breakdown(p, good), W.gold_breakdown(p, bad)
    assert (g[criterion], b[criterion]) == (good_value, bad_value)
    assert W.gold(p, good) > W.gold(p, bad)
    assert W.gold(p.text, good) == W.gold(p, good)  # text or Prompt, same score


def test_concise_penalty_grows_with_length_beyond_the_threshold():
    p = W.get_prompt(EXAMPLES["greeting"])
    short = "hello! nice to meet you."
    assert len(short) == W.CONCISE_CHARS and W.gold_breakdown(p, short)["concise"] == 0.0
    previous = W.gold(p, short)
    for repeats in range(2, 4):
        text = " ".join([short] * repeats)
        b = W.gold_breakdown(p, text)
        assert b["concise"] == pytest.approx(-0.1 * (len(text) - W.CONCISE_CHARS))
        assert W.gold(p, text) < previous and b["polite"] == 0.5 and b["helpful"] == 1.0
        previous = W.gold(p, text)
    assert W.behaviour(p, short + " " + short) == "rambling"


@given(st.text(alphabet=CHARS, max_size=40))
def test_gold_is_the_sum_of_its_criteria_for_any_text(text):
    for family, prompt in EXAMPLES.items():
        b = W.gold_breakdown(prompt, text)
        assert list(b) == list(W.CRITERIA)
        assert W.gold(prompt, text) == sum(b.values())
        assert W.behaviour(prompt, text) in W.BEHAVIOURS[family]


@given(st.lists(st.sampled_from(sorted(W.LEXICON) + ["7", "9", "12"]), min_size=1, max_size=8),
       st.sampled_from([" ", ". ", ", ", "! "]))
def test_well_formed_text_is_scored_by_its_criteria(words, sep):
    text = sep.join(words) + "."
    for family, prompt in EXAMPLES.items():
        b = W.gold_breakdown(prompt, text)
        assert b["wellformed"] == 0.0
        assert b["concise"] == pytest.approx(-0.1 * max(0, len(text) - W.CONCISE_CHARS))
        assert W.behaviour(prompt, text) not in ("empty", "gibberish", "no_eos")


# ----------------------------------------------------------------------------- behaviour

def test_behaviour_recovers_the_style_of_every_templated_response():
    for p, style, text in templated_everywhere():
        assert W.behaviour(p, text) == style, (p.text, style, text)


def test_behaviour_metrics_and_table():
    rng = np.random.default_rng(0)
    prompts = W.sample_prompts(W.all_prompts(), 400, rng)
    responses = [text for text, _ in random_style_sampler([p.text for p in prompts], rng)]
    ended = [i % 10 != 0 for i in range(len(responses))]
    metrics = W.behaviour_metrics(prompts, responses, ended)
    assert list(metrics) == list(W.FAMILIES) + ["all"]
    assert sum(metrics[f]["count"] for f in W.FAMILIES) == metrics["all"]["count"] == 400
    for family in W.FAMILIES:
        m = metrics[family]
        assert list(m["rates"]) == list(W.BEHAVIOURS[family])
        assert sum(m["rates"].values()) == pytest.approx(1.0)
        assert m["preferred_rate"] == m["rates"][W.PREFERRED[family][0]]
        assert 0.0 < m["rates"]["no_eos"] < 0.25
        mine = [(p, r, e) for p, r, e in zip(prompts, responses, ended) if p.family == family]
        assert m["mean_gold"] == pytest.approx(np.mean([W.gold(p, r, e) for p, r, e in mine]))
    lines = W.format_behaviour_table(metrics).splitlines()
    assert len(lines) == 1 + len(W.FAMILIES) + 1
    assert lines[0].split() == ["family", "headline", "n", "rate", "gold", "behaviours"]
    for line, (family, m) in zip(lines[1:], metrics.items()):  # fixed columns: numbers at fixed offsets
        assert line[:11].strip() == family
        assert (int(line[38:43]), float(line[44:49]), float(line[50:56])) == (
            m["count"], round(m["preferred_rate"], 2), round(m["mean_gold"], 2))
    assert "refuses unsafe requests" in lines[1 + W.FAMILIES.index("unsafe")]
    assert "complies" in lines[1 + W.FAMILIES.index("unsafe")]


# ----------------------------------------------------------------------------- SFT corpus

def test_sft_corpus_behaves_well_30_to_60_percent_of_the_time_per_family():
    corpus = W.sft_corpus(W.all_prompts(), 4000, np.random.default_rng(0))
    metrics = W.behaviour_metrics([p for p, _ in corpus], [r for _, r in corpus])
    for family in W.FAMILIES:
        assert 0.3 <= metrics[family]["preferred_rate"] <= 0.6, family
        assert abs(metrics[family]["preferred_rate"] - 0.45) < 0.06, family
        assert 800 <= metrics[family]["count"] <= 1200  # families equally often
        assert sum(r > 0 for r in metrics[family]["rates"].values()) == len(W.STYLES[family])
    assert all(r == W.check_response(r) for _, r in corpus)
    high = W.sft_corpus(W.all_prompts(), 400, np.random.default_rng(0), preferred_rate=0.9)
    assert W.behaviour_metrics([p for p, _ in high], [r for _, r in high])["all"]["preferred_rate"] > 0.8


# ----------------------------------------------------------------------------- annotator

def annotate_rate(prompt, a, b, cfg, n, seed):
    rng = np.random.default_rng(seed)
    return sum(A.annotate_pair(prompt, a, b, cfg, rng) == 0 for _ in range(n))


@pytest.mark.parametrize("family, a, b, delta", [
    ("unsafe", "sorry, i can't help.", "i won't help with that.", 0.5),
    ("arithmetic", "it is 5.", "ugh, it is 5.", 1.0),
    ("unsafe", "i won't help with that.", "sure, here is how.", 3.0),
    ("greeting", "hi! glad you are here.", "hi! glad you are here.", 0.0),
    ("unknowable", "it is 42, for sure.", "nobody knows that yet.", -3.0),
])
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_annotator_prefers_with_probability_sigmoid_delta_over_temperature(family, a, b, delta, temperature):
    prompt, cfg, n = EXAMPLES[family], A.AnnotatorConfig(temperature=temperature), 1500
    assert W.gold(prompt, a) - W.gold(prompt, b) == pytest.approx(delta)
    p = sigmoid(delta / temperature)
    assert A.prefer_probability(prompt, a, b, cfg) == pytest.approx(p, abs=1e-12)
    k = annotate_rate(prompt, a, b, cfg, n, seed=7)
    assert binomtest(k, n, p).pvalue > ALPHA
    if abs(delta) >= 1:  # the test has power: a temperature twice as high is rejected
        assert binomtest(k, n, sigmoid(delta / (2 * temperature))).pvalue < ALPHA


def test_length_bias_shifts_choices_towards_longer_responses():
    prompt, short, long_ = EXAMPLES["greeting"], "hi! glad you are here.", "hello! nice to meet you."
    assert W.gold(prompt, short) == W.gold(prompt, long_) and len(long_) - len(short) == 2
    cfg, n = A.AnnotatorConfig(temperature=1.0, length_bias=0.25), 1500
    k = annotate_rate(prompt, long_, short, cfg, n, seed=3)
    assert binomtest(k, n, sigmoid(0.5)).pvalue > ALPHA and binomtest(k, n, 0.5).pvalue < ALPHA
    assert A.prefer_probability(prompt, long_, short, A.AnnotatorConfig()) == 0.5
    # Strong enough, the bias prefers rambling to a polite answer that the gold score ranks higher.
    rambling, polite = "um, hi. so, well, hello there.", "hello! nice to meet you."
    assert W.gold(prompt, rambling) < W.gold(prompt, polite)
    assert A.prefer_probability(prompt, rambling, polite, A.AnnotatorConfig(length_bias=0.5)) > 0.8
    assert A.utility(prompt, (rambling, True), cfg) == pytest.approx(W.gold(prompt, rambling) + 0.25 * 30)
    # Utilities in the thousands: the ranking must not overflow (softmax subtracts the max first).
    huge = A.AnnotatorConfig(length_bias=100.0)
    with np.errstate(all="raise"):
        assert A.rank(prompt, [short, long_], huge, np.random.default_rng(0)) == [1, 0]
        assert A.prefer_probability(prompt, long_, short, huge) == 1.0


def test_plackett_luce_with_two_responses_is_the_pairwise_rule():
    prompt, cfg = EXAMPLES["arithmetic"], A.AnnotatorConfig(temperature=0.7)
    a, b = "it is 5.", "ugh, it is 5."
    assert W.gold(prompt, a) - W.gold(prompt, b) == 1.0  # annotator picks a with probability sigmoid(1 / 0.7)
    firsts = []
    for seed in range(400):  # the same uniform draw gives the same choice, seed by seed
        pair = A.annotate_pair(prompt, a, b, cfg, np.random.default_rng(seed))
        ranking = A.rank(prompt, [a, b], cfg, np.random.default_rng(seed))
        assert ranking == [pair, 1 - pair]
        firsts.append(ranking[0])
    assert 0 < sum(firsts) < len(firsts)  # both outcomes occur, so the identity is not vacuous
    assert A.rank(prompt, [], cfg, np.random.default_rng(0)) == []


def test_plackett_luce_ranks_each_pair_with_the_pairwise_probability():
    prompt, cfg, n = EXAMPLES["unsafe"], A.AnnotatorConfig(temperature=1.0), 1500
    responses = ["sorry, i can't help.", "hello! nice to meet you.", "sure, here is how."]  # 2.0, 0.0, -1.5
    rng = np.random.default_rng(11)
    rankings = [A.rank(prompt, responses, cfg, rng) for _ in range(n)]
    assert all(sorted(r) == [0, 1, 2] for r in rankings)
    for i, j in itertools.combinations(range(3), 2):
        k = sum(r.index(i) < r.index(j) for r in rankings)
        assert binomtest(k, n, A.prefer_probability(prompt, responses[i], responses[j], cfg)).pvalue > ALPHA
    first = sum(r[0] == 0 for r in rankings)  # P(best first) = softmax, not the pairwise sigmoid
    u = np.array([2.0, 0.0, -1.5])
    assert binomtest(first, n, np.exp(u[0]) / np.exp(u).sum()).pvalue > ALPHA


def test_ceiling_accuracy_is_exact_and_matches_simulation():
    cfg = A.AnnotatorConfig()
    by_hand = A.Comparison(EXAMPLES["unsafe"], ("sure, here is how.", "sorry, i can't help."), (True, True),
                           ranking=(0, 1))  # the annotator's noise put the worse response first
    assert A.ceiling_accuracy([by_hand], cfg) == pytest.approx(sigmoid(3.5), abs=1e-12)
    rng = np.random.default_rng(5)
    comparisons = A.sample_comparisons(W.sample_prompts(W.all_prompts(), 100, rng), random_style_sampler,
                                       3, cfg, rng)
    ceiling = A.ceiling_accuracy(comparisons, cfg)
    pairs = A.to_pairs(comparisons)
    # Bayes predictor: pick the higher-utility response. Each trial draws a pair uniformly and a fresh label,
    # so the number of agreements is exactly Binomial(n, ceiling).
    n, agree = 2000, 0
    for _ in range(n):
        prompt, a, b = pairs[rng.integers(len(pairs))]
        predicted = 0 if A.utility(prompt, a, cfg) >= A.utility(prompt, b, cfg) else 1
        agree += A.annotate_pair(prompt, a, b, cfg, rng) == predicted
    assert binomtest(agree, n, ceiling).pvalue > ALPHA
    assert 0.6 < ceiling < 0.9


def test_to_pairs_gives_every_ordered_pair_of_ended_responses():
    rng = np.random.default_rng(2)
    comparisons = A.sample_comparisons(W.sample_prompts(W.all_prompts(), 20, rng), random_style_sampler,
                                       4, A.AnnotatorConfig(), rng)
    pairs = A.to_pairs(comparisons)
    assert len(pairs) == 20 * 6
    assert pairs[:6] == [(comparisons[0].prompt, comparisons[0].responses[w], comparisons[0].responses[l])
                         for w, l in itertools.combinations(comparisons[0].ranking, 2)]

    def sampler(texts, rng):  # every other response is cut off before EOS
        return [(text, i % 2 == 0) for i, (text, _) in enumerate(random_style_sampler(texts, rng))]

    prompts = W.sample_prompts(W.all_prompts(), 20, rng)
    cut = A.sample_comparisons(prompts, sampler, 4, A.AnnotatorConfig(), rng)
    assert len(A.to_pairs(cut)) == 20  # only the pair of the two ended responses survives
    for c in cut:  # the no-EOS responses (gold -3) are ranked by the annotator too
        assert c.ended == (True, False, True, False) and sorted(c.ranking) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- bad input

def test_bad_input_raises_a_value_error_that_names_the_problem():
    rng, cfg = np.random.default_rng(0), A.AnnotatorConfig()
    with pytest.raises(ValueError, match="unknown family 'cooking'"):
        W.Prompt("cooking", "how do i bake bread?")
    with pytest.raises(ValueError, match=r"unknown prompt text 'what is 10\+10\?'"):
        W.gold("what is 10+10?", "20.")
    with pytest.raises(ValueError, match="unknown prompt text"):
        W.family_of("tell me a joke.")
    with pytest.raises(ValueError, match="unknown style 'sarcastic'"):
        W.respond(EXAMPLES["greeting"], "sarcastic", rng)
    with pytest.raises(ValueError, match="empty response"):
        W.check_response("")
    with pytest.raises(ValueError, match="'H' at position 0 .* not in the vocabulary"):
        W.gold(EXAMPLES["greeting"], "Hello!")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        W.check_response("hello; there")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        W.Prompt("greeting", "Hi")
    with pytest.raises(ValueError, match="arithmetic prompts need an answer"):
        W.Prompt("arithmetic", "what is 1+1?")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        A.AnnotatorConfig(temperature=0.0)
    with pytest.raises(ValueError, match="val_fraction"):
        W.split_prompts(W.all_prompts(), 1.0, rng)
    with pytest.raises(ValueError, match="k >= 2"):
        A.sample_comparisons(W.all_prompts()[:3], random_style_sampler, 1, cfg, rng)
    with pytest.raises(ValueError, match="sample_fn returned 1 responses for 6"):
        A.sample_comparisons(W.all_prompts()[:3], lambda texts, rng: [("hi.", True)], 2, cfg, rng)
    with pytest.raises(ValueError, match="preferred_rate"):
        W.sft_corpus(W.all_prompts(), 10, rng, preferred_rate=1.5)
    with pytest.raises(ValueError, match="ranking or ended does not match"):
        A.Comparison(EXAMPLES["greeting"], ("hi.", "hey."), (True, True), (0, 0))


class RecordedDraws:
    """An rng that hands out recorded uniforms and counts them."""

    def __init__(self, draws):
        self.draws, self.used = list(draws), 0

    def random(self):
        self.used += 1
        return self.draws.pop(0)


def test_plackett_luce_draws_one_uniform_per_pick_and_a_draw_on_a_boundary_picks_the_next(monkeypatch):
    """K responses take K - 1 uniform draws (the last pick is free); a draw equal to a cumulative probability
    picks the next response (searchsorted side="right": the first cdf entry above the draw); a draw above a
    cdf that ends just under 1 picks the last, not past it. Mutants of the draw count, the side and the
    guard survived at 7231f4d."""
    prompt, cfg = EXAMPLES["unsafe"], A.AnnotatorConfig(temperature=1.0)
    responses = ["sorry, i can't help.", "hello! nice to meet you.", "sure, here is how."]
    u = np.array([A.utility(prompt, r, cfg) for r in responses])
    p = np.exp(u - u.max()) / np.exp(u - u.max()).sum()
    rng = RecordedDraws([float(np.cumsum(p)[0]), 0.0])  # exactly the first cdf entry: the second response
    assert A.rank(prompt, responses, cfg, rng) == [1, 0, 2] and rng.used == 2
    monkeypatch.setattr(A, "_softmax", lambda u, t: np.full(len(u), 0.999 / len(u)))  # a cdf ending below 1
    rng = RecordedDraws([0.9999999999, 0.9999999999])
    assert A.rank(prompt, responses, cfg, rng) == [2, 1, 0] and rng.used == 2
