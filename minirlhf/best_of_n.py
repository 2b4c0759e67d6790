"""Best-of-n: sample n responses from the reference policy, keep the one the reward model likes best.

No training at all: the policy is the selection rule (Nakano et al. 2021, WebGPT; Stiennon et al. 2020;
Gao et al. 2022 use it as the baseline that RL must beat). The score is the normalised reward model's; a
response without EOS gets the fixed score reward.NO_EOS_SCORE (-1), as in PPO. Ties go to the first sample.

Its distribution. Let R = r(x, y) be the score of y ~ pi_ref(.|x), F(r) = P(R <= r), F_<(r) = P(R < r).
The best of n independent draws has a score <= r with probability F(r)^n, so its score equals r with
probability F(r)^n - F_<(r)^n. Given that score, which response was kept depends only on the scores, so
it is distributed as pi_ref restricted to {R = r}. Hence

    pi_bon(y) = pi_ref(y) (F^n - F_<^n) / (F - F_<),   F, F_< taken at r(y)
              = pi_ref(y) S(y),   S = sum_{k=0}^{n-1} F^k F_<^(n-1-k)

(the same identity a^n - b^n = (a - b) sum a^k b^(n-1-k) that turns the ratio into a sum of positive
terms, computed without cancellation, also where F - F_< is tiny). The likelihood ratio S depends on y
only through its score, so the KL is a sum over the distinct scores:

    KL(pi_bon || pi_ref) = E_{pi_bon}[log S] = sum_r P_bon(R = r) log S(r)

The often quoted value log n - (n-1)/n is this KL in the limit where no score has positive probability
(a continuous reward law: F_< = F = u, S = n u^(n-1), KL = int_0^1 n u^(n-1) log(n u^(n-1)) du).
Beirami et al. 2024 ("Theoretical guarantees on the best-of-n alignment policy") show that it is an upper
bound in general. It is not exact for a discrete law even without ties: two equally likely answers and
n = 2 give 0.131 nats against 0.193. Here responses repeat (a template the SFT model writes 10% of the
time is one atom of mass 0.1), so the bound can be far from the truth, and the measured KL matters.

Measuring it. `bon_kl` and `bon_distribution` are exact for a finite law (pi_ref and scores given). For
the transformer the law of R under pi_ref(.|x) is estimated per prompt from m samples: the empirical law
puts 1/m on each sample, identical texts share one score (each distinct text is scored once), and the
formulas above applied to it give the KL and the expected gold of best-of-n drawn from the empirical law
(n draws with replacement from the m samples). Both converge to the true values as m grows for fixed n;
`kl_half` (the same estimate from half the samples) shows whether m is large enough.
"""
import numpy as np

from .reward import score_samples
from .transformer import sample_responses


# ---------------------------------------------------------------- the best-of-n law of a finite distribution

def bon_kl_bound(n):
    """log n - (n - 1) / n: the KL of best-of-n for a continuous reward law, an upper bound in general."""
    if isinstance(n, bool) or not (isinstance(n, (int, np.integer)) and n >= 1):
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return float(np.log(n) - (n - 1) / n)


def bon_ratio(p_ref, rewards, n):
    """S = pi_bon / pi_ref of each outcome of a finite law p_ref (K,) with scores rewards (K,); ties allowed.

    S = sum_{k<n} F^k F_<^(n-1-k) with F = P(R <= r), F_< = P(R < r) at the outcome's score.
    """
    p_ref, rewards = np.asarray(p_ref, np.float64), np.asarray(rewards, np.float64)
    if p_ref.ndim != 1 or p_ref.shape != rewards.shape or p_ref.size == 0:
        raise ValueError(f"p_ref and rewards must be 1-D of one non-zero size, got {p_ref.shape}, {rewards.shape}")
    if not (np.all(p_ref >= 0) and np.all(np.isfinite(rewards)) and abs(p_ref.sum() - 1) < 1e-9):
        raise ValueError("p_ref must be a probability vector (>= 0, sums to 1) and rewards finite")
    bon_kl_bound(n)  # validates n
    levels, which = np.unique(rewards, return_inverse=True)  # distinct scores, ascending
    mass = np.bincount(which, weights=p_ref, minlength=len(levels))  # P(R = level)
    F = np.minimum(np.cumsum(mass), 1.0)  # P(R <= level)
    F_lt = np.concatenate([[0.0], F[:-1]])  # P(R < level)
    k = np.arange(n)
    S = (F[:, None] ** k * F_lt[:, None] ** (n - 1 - k)).sum(axis=1)  # (levels,), 0^0 = 1 as the sum needs
    return S[which]


def bon_distribution(p_ref, rewards, n):
    """pi_bon (K,): the law of the best of n draws from p_ref, ties in score broken by sample order."""
    return np.asarray(p_ref, np.float64) * bon_ratio(p_ref, rewards, n)


def bon_kl(p_ref, rewards, n):
    """KL(pi_bon || p_ref) = sum pi_bon log S, exact for a finite law (outcomes with pi_bon = 0 add 0)."""
    S = bon_ratio(p_ref, rewards, n)
    p_bon = np.asarray(p_ref, np.float64) * S
    return float(np.sum(np.where(p_bon > 0, p_bon * np.log(np.where(p_bon > 0, S, 1.0)), 0.0)))


# ---------------------------------------------------------------- best-of-n with the transformer

def best_of_n(policy, reward_model, prompt_texts, n, rng):
    """For each prompt, n samples from policy and the one with the highest score (the first of ties).

    Returns (best [(text, ended)] (B,), samples [[(text, ended)] * n] (B lists), scores (B, n)).
    """
    bon_kl_bound(n)  # validates n
    texts = [t for t in prompt_texts for _ in range(n)]  # each prompt n times, in a row
    flat = sample_responses(policy, texts, rng)
    scores = score_samples(reward_model, texts, flat).reshape(len(prompt_texts), n)
    samples = [flat[i * n:(i + 1) * n] for i in range(len(prompt_texts))]
    best = [s[j] for s, j in zip(samples, np.argmax(scores, axis=1))]  # argmax: first maximum
    return best, samples, scores


def empirical_bon(scores, values, n):
    """Best-of-n from the empirical law of m samples of one prompt: (KL to that law, expected value).

    scores (m,) their scores, values (m,) anything to average (the gold score); each sample has mass 1/m.
    """
    scores, values = np.asarray(scores, np.float64), np.asarray(values, np.float64)
    if scores.shape != values.shape or scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"scores and values must be 1-D of one non-zero size, got {scores.shape}, {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("empirical_bon: values holds a NaN or inf")
    p = np.full(scores.size, 1.0 / scores.size)
    return bon_kl(p, scores, n), float(np.sum(bon_distribution(p, scores, n) * values))


def evaluate_best_of_n(scores, golds, groups, ns):
    """Best-of-n on evaluation prompts, for each n of ns. One row per evaluation prompt:

    scores, golds (P, m): the scores and gold of m reference samples of each prompt; groups (P,): a key per
    row, rows of one key being draws of the same prompt (their samples are pooled into that prompt's
    empirical law). Returns {n: dict}, each averaged over the P rows:
        gold         mean gold of the actual best of the first n samples of each row (a real draw)
        gold_law     expected gold of best-of-n from the pooled empirical law of the row's prompt
        kl           KL(best-of-n || reference) measured on that law
        kl_half      the same from the first half of the pooled samples (m large enough: kl_half ~ kl)
        kl_bound     log n - (n - 1) / n
        score        mean reward-model score of the kept samples
    """
    scores, golds, groups = np.asarray(scores, np.float64), np.asarray(golds, np.float64), list(groups)
    if scores.shape != golds.shape or scores.ndim != 2 or len(groups) != scores.shape[0]:
        raise ValueError(f"scores {scores.shape} and golds {golds.shape} must be (P, m) with P groups")
    for name, x in (("scores", scores), ("golds", golds)):
        if not np.all(np.isfinite(x)):
            raise ValueError(f"evaluate_best_of_n: {name} holds a NaN or inf")
    ns = list(ns)
    if not ns:
        raise ValueError("ns must list at least one n")
    for n in ns:
        bon_kl_bound(n)  # validates each n
    if max(ns) > scores.shape[1]:
        raise ValueError(f"n = {max(ns)} needs at least that many samples per row, got {scores.shape[1]}")
    pooled = {g: (np.concatenate([scores[i] for i in range(len(groups)) if groups[i] == g]),
                  np.concatenate([golds[i] for i in range(len(groups)) if groups[i] == g])) for g in set(groups)}
    out = {}
    for n in ns:
        first = np.argmax(scores[:, :n], axis=1)
        per_group = {}
        for g, (s, v) in pooled.items():
            half = len(s) // 2
            kl, gold_law = empirical_bon(s, v, n)
            per_group[g] = (kl, gold_law, empirical_bon(s[:half], v[:half], n)[0] if half else np.nan)
        rows = np.array([per_group[g] for g in groups])  # (P, 3)
        out[n] = {"gold": float(golds[np.arange(len(groups)), first].mean()),
                  "gold_law": float(rows[:, 1].mean()), "kl": float(rows[:, 0].mean()),
                  "kl_half": float(rows[:, 2].mean()), "kl_bound": bon_kl_bound(n),
                  "score": float(scores[np.arange(len(groups)), first].mean())}
    return out
