"""The simulated annotator: noisy pairwise and K-way judgements from the gold score, and their datasets.

Annotator: utility u(x) = gold(x) + length_bias * len(x) (length_bias in gold units per character). It
prefers A to B with probability sigmoid((u(A) - u(B)) / temperature) (Bradley-Terry), and ranks K responses
(InstructGPT) by picking best-first with probability softmax(u / temperature) among those left
(Plackett-Luce). For K = 2 the rules coincide; for any K, P(i ranked above j) is the pairwise probability
(Luce's choice axiom), so the best predictor of a pair label is right with probability max(p, 1 - p):
`ceiling_accuracy`. Identical responses in one ranking are fine (p = 1/2 between them).

Datasets follow InstructGPT (Ouyang et al. 2022): sample K responses per prompt from the SFT policy and let
the annotator rank them; every one of the C(K, 2) pairs of a ranking is a label. Pairs involving a response
that never emitted EOS are not scored by the reward model (PPO gives those a fixed score), so
`scored_pairs` skips them, and so does the ceiling.
"""
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy.special import expit

from . import validate as V
from .world import get_prompt, gold

# ----------------------------------------------------------------------------- the simulated annotator

@dataclass(frozen=True)
class AnnotatorConfig:
    temperature: float = 1.0  # Bradley-Terry noise: a utility gap of 1 wins with prob sigmoid(1/T) (.73)
    length_bias: float = 0.0  # utility added per character of response (0.05 = +0.5 per 10 characters)

    def __post_init__(self):
        V.number("AnnotatorConfig", "temperature", self.temperature, low=0, low_open=True)
        V.number("AnnotatorConfig", "length_bias", self.length_bias)


def utility(prompt, response, annotator):
    """The annotator's utility u = gold + length_bias * len(text); response is text or (text, ended)."""
    text, ended = (response, True) if isinstance(response, str) else response
    return gold(prompt, text, ended) + annotator.length_bias * len(text)


def prefer_probability(prompt, a, b, annotator):
    """Probability that the annotator prefers a to b: sigmoid((u(a) - u(b)) / temperature)."""
    return float(expit((utility(prompt, a, annotator) - utility(prompt, b, annotator)) / annotator.temperature))


def annotate_pair(prompt, a, b, annotator, rng):
    """The annotator's choice between a and b: 0 if it prefers a, 1 if b. One uniform draw."""
    return 0 if rng.random() < prefer_probability(prompt, a, b, annotator) else 1


def _softmax(u, temperature):
    z = np.asarray(u, dtype=np.float64) / temperature
    w = np.exp(z - z.max())  # max subtracted: no overflow
    return w / w.sum()


def rank(prompt, responses, annotator, rng):
    """Plackett-Luce ranking of K responses, best first, as indices: pick one of those left with probability
    softmax(u / temperature), one uniform draw per pick (the last is free). For K = 2 it uses the same draw as
    `annotate_pair` and makes the same choice."""
    u = [utility(prompt, r, annotator) for r in responses]
    left, order = list(range(len(responses))), []
    while len(left) > 1:
        cdf = np.cumsum(_softmax([u[i] for i in left], annotator.temperature))
        pick = int(np.searchsorted(cdf, rng.random(), side="right"))
        order.append(left.pop(min(pick, len(left) - 1)))  # min: the cdf may end just below 1
    return order + left


# ----------------------------------------------------------------------------- comparison datasets

@dataclass(frozen=True)
class Comparison:
    prompt: str                 # the prompt text
    responses: tuple[str, ...]  # K sampled response texts
    ended: tuple[bool, ...]     # whether each response emitted EOS
    ranking: tuple[int, ...]    # indices into responses, best first (a permutation of range(K))

    def __post_init__(self):
        if len(self.ended) != len(self.responses) or sorted(self.ranking) != list(range(len(self.responses))):
            raise ValueError(f"comparison for {self.prompt!r}: ranking or ended does not match the responses")


def sample_comparisons(prompts, sample_fn, k, annotator, rng):
    """InstructGPT data collection: per prompt, K responses from sample_fn ranked by the annotator.
    sample_fn(prompt_texts, rng) -> [(text, ended), ...] is called once, each prompt repeated K times."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"a comparison needs k >= 2 responses (an integer), got {k!r}")
    texts = [get_prompt(p).text for p in prompts]
    samples = [(str(r), bool(e)) for r, e in sample_fn([t for t in texts for _ in range(k)], rng)]
    if len(samples) != len(texts) * k:
        raise ValueError(f"sample_fn returned {len(samples)} responses for {len(texts) * k} prompts")
    groups = [samples[i * k:(i + 1) * k] for i in range(len(texts))]
    return [Comparison(t, tuple(r for r, _ in g), tuple(e for _, e in g), tuple(rank(t, g, annotator, rng)))
            for t, g in zip(texts, groups)]


def scored_pairs(c):
    """(winner, loser) indices of the C(K, 2) pairs of a ranking, skipping any pair with a no-EOS response
    (the reward model never scores those: PPO gives them a fixed score)."""
    return [(w, l) for w, l in combinations(c.ranking, 2) if c.ended[w] and c.ended[l]]


def to_pairs(comparisons):
    """(prompt, chosen, rejected) text triples: every pair of each ranking whose responses both ended."""
    return [(c.prompt, c.responses[w], c.responses[l]) for c in comparisons for w, l in scored_pairs(c)]


def ceiling_accuracy(comparisons, annotator):
    """Exact expected accuracy of the best possible predictor of the annotator's labels on the pairs of
    `to_pairs`: the mean over pairs of max(p, 1 - p), p = prefer_probability (no sampling)."""
    p = np.array([prefer_probability(c.prompt, c.responses[w], c.responses[l], annotator)
                  for c in comparisons for w, l in scored_pairs(c)])
    if len(p) == 0:
        raise ValueError("no pairs of ended responses to compute a ceiling over")
    return float(np.mean(np.maximum(p, 1 - p)))
