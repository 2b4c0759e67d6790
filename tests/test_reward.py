"""The reward model: loss gradients and properties, the whole model's gradients, bad input."""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays

from minirlhf import reward as R
from minirlhf import transformer as tf
from minirlhf.annotator import Comparison
from minirlhf.kit.gradcheck import MODEL_TOL, OP_TOL, gradient_errors, key_bias_zero
from minirlhf.kit.inputs import tiny_model
from minirlhf.tokenizer import VOCAB_SIZE

TINY = tf.GPTConfig(vocab_size=VOCAB_SIZE, n_ctx=16, n_layer=2, n_head=2, n_embd=4)


def test_bt_loss_gradient():
    rng = np.random.default_rng(0)
    rc, rr = rng.standard_normal(5) + 0.1, rng.standard_normal(5) - 0.1
    for margin, center in [(0.0, 0.0), (0.5, 0.3)]:
        f = lambda: 0.7 * R.bt_loss_forward(rc, rr, margin, center)[0]
        dc, dr = R.bt_loss_backward(0.7, R.bt_loss_forward(rc, rr, margin, center)[1])
        for name, err in gradient_errors(f, {"c": rc, "r": rr}, {"c": dc, "r": dr}).items():
            assert err < OP_TOL, (name, margin, center, err)


def test_ranking_loss_gradient_with_invalid_items():
    rng = np.random.default_rng(1)
    rewards = rng.standard_normal((3, 4)) + 0.1
    valid = np.ones((3, 4), bool)
    valid[1, 2] = False  # a response without EOS is left out of its row's pairs
    valid[2, 1:] = False  # a row with a single scored response contributes nothing
    for margin, center in [(0.0, 0.0), (0.3, 0.2)]:
        f = lambda: 1.3 * R.ranking_loss_forward(rewards, valid, margin, center)[0]
        d = R.ranking_loss_backward(1.3, R.ranking_loss_forward(rewards, valid, margin, center)[1])
        assert gradient_errors(f, {"rewards": rewards}, {"rewards": d})["rewards"] < OP_TOL
        assert np.all(d[~valid] == 0)
    garbage = rewards.copy()
    garbage[~valid] = np.nan  # what sits in an unscored slot never reaches the loss
    assert R.ranking_loss_forward(garbage, valid)[0] == R.ranking_loss_forward(rewards, valid)[0]


def test_losses_keep_the_input_dtype():
    r = np.array([[0.5, -0.2], [1.0, 0.3]], np.float32)
    assert R.bt_loss_forward(r[:, 0], r[:, 1])[0].dtype == np.float32
    loss, cache = R.ranking_loss_forward(r)
    assert loss.dtype == np.float32 and R.ranking_loss_backward(1.0, cache).dtype == np.float32


finite = st.floats(-1e4, 1e4, allow_nan=False)


@given(arrays(np.float64, 4, elements=finite), arrays(np.float64, 4, elements=finite),
       st.floats(-1e3, 1e3))
def test_bt_loss_ignores_a_shared_constant(rc, rr, c):
    a, b = R.bt_loss_forward(rc, rr)[0], R.bt_loss_forward(rc + c, rr + c)[0]
    assert a == pytest.approx(b, rel=1e-9, abs=1e-9 * (1 + abs(c)))


@given(st.floats(-50, 50))
def test_bt_loss_odd_part_is_minus_d(d):
    """softplus(-d) - softplus(d) = -d: the loss's odd part is linear."""
    ld = R.bt_loss_forward(np.array([d]), np.array([0.0]))[0]
    lm = R.bt_loss_forward(np.array([-d]), np.array([0.0]))[0]
    assert ld - lm == pytest.approx(-d, abs=1e-9)


@given(arrays(np.float64, 3, elements=finite), arrays(np.float64, 3, elements=finite))
def test_bt_loss_finite_and_gradient_signs(rc, rr):
    loss, cache = R.bt_loss_forward(rc, rr)
    dc, dr = R.bt_loss_backward(1.0, cache)
    assert np.isfinite(loss) and np.all(np.isfinite(dc)) and np.all(np.isfinite(dr))
    assert np.all(dc <= 0) and np.all(dr >= 0)  # raise the chosen, lower the rejected
    np.testing.assert_array_equal(dc, -dr)


@given(arrays(np.float64, (4, 2), elements=finite), st.floats(0, 2), st.floats(0, 1))
def test_kway_with_k2_equals_pairwise(r, margin, center):
    lk, ck = R.ranking_loss_forward(r, None, margin, center)
    lp, cp = R.bt_loss_forward(r[:, 0], r[:, 1], margin, center)
    assert lk == pytest.approx(lp, rel=1e-12, abs=1e-12)
    dk = R.ranking_loss_backward(1.0, ck)
    dc, dr = R.bt_loss_backward(1.0, cp)
    np.testing.assert_allclose(dk, np.stack([dc, dr], 1), rtol=1e-12, atol=1e-15)


def tiny_reward_params(seed=0):
    params = R.init_reward_params(tiny_model(TINY, seed), TINY, np.random.default_rng(seed + 1))
    params["head.b"] = np.asarray(0.2)
    return params


def tiny_reward_model(seed=0):
    return R.RewardModel(tiny_reward_params(seed), TINY)


def test_whole_reward_model_gradient_every_parameter():
    params = tiny_reward_params()
    comps = [Comparison("hi", ("hey", "go away", "hello"), (True, True, True), (2, 0, 1)),
             Comparison("3+4?", ("7", "8"), (True, False), (1, 0))]
    # the second comparison has one scored response: it must not contribute (and not crash)
    comps.append(Comparison("yo", ("hi", "bye"), (True, True), (0, 1)))
    cfg = R.RewardConfig(margin=0.1, center_coef=0.05)
    loss, grads = R.loss_and_grads(params, TINY, comps, cfg)
    f = lambda: R.batch_loss(params, TINY, comps, cfg)[0]
    errors = gradient_errors(f, {"params": params}, {"params": grads}, zero=key_bias_zero(TINY))
    assert set(errors) == set(params)
    for name, err in errors.items():
        assert err < MODEL_TOL, f"{name}: relative error {err:.2e}"


@given(st.lists(st.floats(-3, 3), min_size=3, max_size=20))
def test_normalisation_gives_mean_0_std_1(values):
    r = np.array(values)
    if r.std() < 1e-3:
        return
    gain, bias = 1 / r.std(), -r.mean() / r.std()
    z = gain * r + bias
    assert abs(z.mean()) < 1e-9 and abs(z.std() - 1) < 1e-9


@pytest.mark.parametrize("bias, noise", [(5.0, 0.0), (-5.0, 0.0), (1e3, 1e-5)])
def test_fit_normalisation_refuses_scores_that_differ_only_by_rounding(bias, noise):
    """Equal scores far from 0 (a zero head with a bias of +-5), and scores of 1000 that differ by 1e-5
    (below 1e-6 of their size, rounding rather than spread), cannot be normalised: a ValueError."""
    params = tiny_reward_params()
    params["head.w"] = np.full_like(params["head.w"], noise)
    params["head.b"] = np.asarray(bias)
    with pytest.raises(ValueError, match="all equal"):
        R.fit_normalisation(params, TINY, ["hi", "yo", "3+4?"], ["hey", "go", "7"])


def test_fit_normalisation_on_model_scores():
    params = tiny_reward_params()
    prompts, responses = ["hi", "yo", "3+4?", "hi"], ["hey", "go", "7", "hello there"]
    rm = R.fit_normalisation(params, TINY, prompts, responses)
    assert rm.params is params and rm.gain > 0
    z = R.score(rm, prompts, responses)
    assert abs(z.mean()) < 1e-9 and abs(z.std() - 1) < 1e-9
    raw = R.score(R.RewardModel(params, TINY), prompts, responses)
    np.testing.assert_allclose(z, rm.gain * raw + rm.bias, rtol=0, atol=1e-15)
    samples = [(r, e) for r, e in zip(responses, (True, False, True, True))]
    expected = np.where([e for _, e in samples], z, R.NO_EOS_SCORE)
    np.testing.assert_allclose(R.score_samples(rm, prompts, samples), expected, rtol=0, atol=1e-15)


def test_bad_input():
    params = tiny_reward_params()
    with pytest.raises(ValueError, match="chosen and rejected"):
        R.bt_loss_forward(np.zeros(3), np.zeros(4))
    tokens, mask = R.encode_responses(["hi"], ["hey"])
    tokens[0, mask[0].sum() - 1] = 5  # overwrite EOS
    with pytest.raises(ValueError, match="does not end in EOS"):
        R.reward_forward(params, TINY, tokens, mask)
    bad = Comparison.__new__(Comparison)  # bypass the dataclass check to reach the loss's own check
    object.__setattr__(bad, "prompt", "hi")
    object.__setattr__(bad, "responses", ("a", "b"))
    object.__setattr__(bad, "ended", (True, True))
    object.__setattr__(bad, "ranking", (0, 0))
    with pytest.raises(ValueError, match="repeats an item"):
        R.loss_and_grads(params, TINY, [bad], R.RewardConfig())


@given(arrays(np.float64, 6, elements=st.floats(-5, 5)), arrays(np.float64, 6, elements=st.floats(-5, 5)),
       arrays(np.float64, 6, elements=st.floats(0, 1)))
def test_expected_agreement_is_bounded_by_the_ceiling_and_complementary(ra, rb, p):
    """E[agreement] = p or 1 - p by the model's order: in [min(p, 1-p), max(p, 1-p)], equal to the ceiling
    max(p, 1-p) exactly when the model orders the pair as the annotator more likely does; swapping the two
    scores gives 1 minus it (a tie gives 1/2 both ways)."""
    e = R.expected_agreement(ra, rb, p)
    assert np.all(e <= np.maximum(p, 1 - p)) and np.all(e >= np.minimum(p, 1 - p))
    np.testing.assert_allclose(e + R.expected_agreement(rb, ra, p), 1.0, rtol=0, atol=1e-15)
    same_order = (ra != rb) & (p != 0.5) & ((ra > rb) == (p > 0.5))
    np.testing.assert_array_equal(e[same_order], np.maximum(p, 1 - p)[same_order])


def test_evaluate_counts_agreement_pair_by_pair():
    rm = tiny_reward_model(seed=4)
    from minirlhf.annotator import AnnotatorConfig, ceiling_accuracy, prefer_probability, scored_pairs
    ann = AnnotatorConfig(temperature=0.5)
    comps = [Comparison("hi!", ("hello!", "ugh. hi.", "um, hi."), (True, True, True),
                        (0, 2, 1)),
             Comparison("4+1?", ("5.", "it is 6.", "6."), (True, False, True), (0, 2, 1))]
    ev = R.evaluate(rm, comps, ann)
    agree, expected = [], []
    for c in comps:
        r = R.score(rm, [c.prompt] * len(c.responses), list(c.responses))
        agree += [float(r[w] > r[l]) for w, l in scored_pairs(c)]
        for w, l in scored_pairs(c):  # P(annotator agrees with the model's order), from its exact probability
            p_w = prefer_probability(c.prompt, c.responses[w], c.responses[l], ann)
            expected.append(p_w if r[w] > r[l] else 1 - p_w)
    assert ev["pairs"] == len(agree) == 4  # 3 pairs, then 1: the no-EOS response is never scored
    assert ev["accuracy"] == pytest.approx(np.mean(agree))
    assert ev["expected_accuracy"] == pytest.approx(np.mean(expected))
    assert ev["ceiling"] == ceiling_accuracy(comps, ann)
    assert ev["expected_accuracy"] <= ev["ceiling"]
    assert sum(b["count"] for b in ev["calibration"]) == 4
    assert set(ev["by_family"]) == {"greeting", "arithmetic"}
    assert ev["by_family"]["greeting"]["pairs"] == 3


# The full-length reward model of the demo's size (`python -m minirlhf.demo --full-reward-model`: 3000
# prompts ranked 8 at a time, 3000 steps; about two and a half minutes with its SFT) runs with
# `python -m pytest -m slow`. The default run deselects it (setup.cfg) to keep the suite near two minutes;
# `python demos/reward_benchmark.py --full` measures the same recipe on more seeds.
@pytest.mark.slow
def test_the_full_length_demo_sized_reward_model_reaches_90_percent_of_the_ceiling(demo_run_start):
    """The full recipe's bar: the demo's SFT model and stages 2 and 3 for seed 0 as `python -m minirlhf.demo
    --full-reward-model` runs them (pipeline.FULL_REWARD_MODEL, pipeline.reward_config(full=True)). On held-out
    prompts the reward model agrees with the annotator at least 90% as often as the best possible
    predictor, the exact ceiling, with agreement taken in expectation over the annotator's randomness
    (reward.evaluate) like the ceiling.
    And it checks sums: of two answers to one held-out sum, one right and one wrong, it scores the right one
    higher in at least 90% of pairs.

    Measured at commit 5f3dd96 on seed 0: 95.0% of the ceiling, sums 0.99; with demos/reward_benchmark.py
    --full over seeds 0-4 the first bar held on all five (90.3-95.0%), the second on four (seed 2: 0.69);
    demos/README.md has the current figures."""
    from minirlhf import pipeline as P
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = demo_run_start["rng_state"]
    policy, train, val = demo_run_start["policy"], demo_run_start["train"], demo_run_start["val"]
    full = P.FULL_REWARD_MODEL
    train_cmp, val_cmp = P.preference_data(policy, train, val, full["labels"], rng)
    reward_model, _ = P.run_reward_model(policy, train, train_cmp, val_cmp, full["rm_steps"], rng,
                                         log=lambda s: None, full=True)
    ev = R.evaluate(reward_model, val_cmp, P.ANNOTATOR)
    assert ev["expected_accuracy"] >= 0.9 * ev["ceiling"], ev
    rate, n = R.sums_checked(reward_model, val_cmp)
    assert n >= 50 and rate >= 0.9, (rate, n)


def test_sums_checked_counts_right_against_wrong_pairs_only():
    rm = tiny_reward_model(seed=5)
    comps = [Comparison("4+1?", ("5.", "it is 6.", "is 5!", "6."), (True,) * 4, (0, 2, 1, 3)),
             Comparison("hi!", ("hello!", "ugh."), (True, True), (0, 1))]
    rate, n = R.sums_checked(rm, comps)
    r = R.score(rm, ["4+1?"] * 4, list(comps[0].responses))
    right_first = [r[i] > r[j] for i in (0, 2) for j in (1, 3)]  # "5." and "is 5!" are right
    assert n == 4 and rate == pytest.approx(np.mean(right_first))
    assert R.sums_checked(rm, comps[1:]) == (None, 0)


def test_evaluate_by_family_ties_and_calibration_by_hand(monkeypatch):
    """Scores chosen by hand (reward.score replaced by a table): a tie counts 1/2 in accuracy and in
    expected accuracy; each family's numbers are its own pairs' means; each calibration bin holds the pairs
    whose sigmoid(r_a - r_b) falls in it, with their mean prediction and mean exact annotator probability.
    Written for mutants that survived at 7231f4d: the per-family mean, the tie rule, the bins' edges."""
    from minirlhf.annotator import AnnotatorConfig, prefer_probability
    ann = AnnotatorConfig(temperature=0.5)
    table = {("hi!", "hello!"): 2.0, ("hi!", "ugh. hi."): 0.0, ("4+1?", "5."): 1.0, ("4+1?", "6."): 1.0}
    monkeypatch.setattr(R, "score", lambda rm, prompts, responses: np.array(
        [table[(p, r)] for p, r in zip(prompts, responses)]))
    comps = [Comparison("hi!", ("hello!", "ugh. hi."), (True, True), (1, 0)),  # the annotator ranked b first
             Comparison("4+1?", ("5.", "6."), (True, True), (0, 1))]  # a tie in the model's scores
    ev = R.evaluate(None, comps, ann, n_bins=4)
    p_hi, p_sum = prefer_probability("hi!", "hello!", "ugh. hi.", ann), prefer_probability("4+1?", "5.", "6.", ann)
    greet, arith = ev["by_family"]["greeting"], ev["by_family"]["arithmetic"]
    assert greet == {"accuracy": 0.0, "expected_accuracy": pytest.approx(p_hi), "ceiling": pytest.approx(
        max(p_hi, 1 - p_hi)), "pairs": 1}  # the model put a first, the label b: wrong; expected p(a > b)
    assert arith == {"accuracy": 0.5, "expected_accuracy": 0.5, "ceiling": pytest.approx(max(p_sum, 1 - p_sum)),
                     "pairs": 1}
    assert ev["accuracy"] == 0.25 and ev["expected_accuracy"] == pytest.approx((p_hi + 0.5) / 2)
    pred_hi = 1 / (1 + np.exp(-2.0))  # sigmoid(2) = 0.88: the last of 4 bins; the tie's 0.5: the third
    bins = ev["calibration"]
    assert [b["count"] for b in bins] == [0, 0, 1, 1]
    assert [b["bin"] for b in bins] == [[0.0, 0.25], [0.25, 0.5], [0.5, 0.75], [0.75, 1.0]]
    assert bins[2]["predicted"] == 0.5 and bins[2]["annotator"] == pytest.approx(p_sum)
    assert bins[3]["predicted"] == pytest.approx(pred_hi) and bins[3]["annotator"] == pytest.approx(p_hi)
    assert bins[0]["predicted"] is None and bins[0]["annotator"] is None


def test_a_row_without_a_scored_pair_is_left_out_of_the_ranking_loss_mean():
    """The mean is over rows with at least one valid pair: a row with one scored response adds nothing,
    not a zero that halves the loss (the mutant n_pairs >= 0 did); a batch with no such row is refused."""
    rewards = np.array([[1.0, 0.0], [5.0, 5.0]])
    loss, _ = R.ranking_loss_forward(rewards, np.array([[1, 1], [1, 0]]))
    assert loss == pytest.approx(np.log1p(np.exp(-1.0)), rel=1e-15)
    with pytest.raises(ValueError, match="no row has two valid responses"):
        R.ranking_loss_forward(rewards, np.array([[1, 0], [0, 1]]))


def test_score_pairs_each_prompt_with_its_own_response_across_batches():
    """score() in batches of 2: the third and later responses are scored with their own prompts, as one
    batch of everything scores them (a mutant paired the second batch's responses with the wrong prompts)."""
    rm = tiny_reward_model(seed=6)
    prompts, responses = ["hi!", "4+1?", "hey!", "2+3?", "hi!"], ["hello!", "5.", "hey.", "it is 5.", "ugh."]
    whole = R.score(rm, prompts, responses, batch_size=256)
    np.testing.assert_allclose(R.score(rm, prompts, responses, batch_size=2), whole, rtol=1e-6)
    np.testing.assert_allclose(whole[2:], R.score(rm, prompts[2:], responses[2:]), rtol=1e-6)
    assert len(set(np.round(whole, 6))) == 5  # five different scores: a swap would show


def test_training_evaluates_every_eval_every_steps_and_after_the_last():
    """The history has one record per evaluation: after steps eval_every, 2 eval_every, ... and after the
    last step, each with the learning rate that step used (optim.lr_schedule of the 0-based step)."""
    from minirlhf.annotator import AnnotatorConfig
    from minirlhf.optim import lr_schedule
    cmp = Comparison("hey!", ("hello.", "hi.", "ugh."), (True, True, True), (0, 1, 2))
    cfg = R.RewardConfig(steps=5, batch_size=2, warmup_steps=1, eval_every=2)
    history = R.train_reward_model(tiny_reward_params(), TINY, [cmp], [cmp], cfg, AnnotatorConfig(),
                                   np.random.default_rng(0), log=lambda s: None)
    assert [h["step"] for h in history] == [2, 4, 5]
    assert [h["lr"] for h in history] == [lr_schedule(s - 1, 5, cfg.lr, 1) for s in (2, 4, 5)]
