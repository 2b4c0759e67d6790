"""The conformance kit run on minirlhf itself, so that the kit is exercised on every run: every check of the
registry passes on minirlhf's functions, with its gradients within the bounds; and a failure's message names
the check, minirlhf's function, the conventions it pins, the worst element and the known mistake it matches.
The kit's own mutation suite (test_kit_bugs.py) shows it catches porting bugs."""
import os

import numpy as np
import pytest

from minirlhf import kl
from minirlhf.kit import conformance_rl as K
from minirlhf.kit import reference as R
from minirlhf.kit import reference_grpo as RG
from minirlhf.kit.gradcheck import MODEL_TOL, OP_TOL
from minirlhf.kit.inputs import FIXTURE_MODEL, KIT_MODEL
from minirlhf.kit.registry import FUNCTIONS, check, reference

CHECKED = sorted(name for name, entry in FUNCTIONS.items() if entry.check)


def minirlhf_as_a_port(name):
    """The arguments check_<name> takes, for minirlhf itself."""
    if name == "generate":
        return (R.generate_adapter(KIT_MODEL),)
    if name == "lora_init":
        return (RG.lora_init,)
    if name == "rollout":
        return reference(name, FIXTURE_MODEL)[0], R.logprobs_adapter(FIXTURE_MODEL)
    if name == "ppo_minibatch":
        return reference(name, FIXTURE_MODEL)
    forward, vjp = reference(name, KIT_MODEL)
    return (forward,) if vjp is None else (forward, vjp)


def test_every_function_has_a_check_and_a_fixture():
    without_fixture = {name for name, entry in FUNCTIONS.items() if entry.inputs is None}
    assert without_fixture == {"generate", "lora_init"}  # random draws are the port's own: statistical checks
    assert set(CHECKED) == set(FUNCTIONS)


@pytest.mark.parametrize("name", CHECKED)
def test_minirlhf_passes_its_own_kit(name):
    errors = check(name)(*minirlhf_as_a_port(name))
    tol = MODEL_TOL if FUNCTIONS[name].model else OP_TOL
    assert all(e < tol for e in errors.values()), errors
    if FUNCTIONS[name].reference is not None and reference(name)[1] is not None and name != "ppo_minibatch":
        assert errors  # a function with a gradient had it checked


def test_a_failure_names_the_check_the_function_the_conventions_the_element_and_the_mistake():
    def score_after_eos(scores, logp, logp_ref, mask, kl_coef):  # TRL's placement, in a port of minirlhf
        r = np.where(mask > 0, -kl_coef * (logp - logp_ref), 0.0)
        last = mask.sum(1)
        inside = last < mask.shape[1]
        r[np.arange(len(r))[inside], last[inside]] += scores[inside]
        return r
    with pytest.raises(AssertionError) as e:
        K.check_token_rewards(score_after_eos, max_examples=20)
    message = str(e.value)
    assert message.startswith("check_token_rewards (minirlhf.kl.token_rewards; pins k1_in_reward, score_on_eos)")
    assert "the score on EOS" in message and "at index" in message and "expected" in message
    assert "matches a known mistake: the score one position after EOS (TRL's placement) [score_on_eos]" in message


def test_a_mistake_that_agrees_with_minirlhf_on_the_failing_inputs_is_never_named():
    """torch's softplus returns x itself past x = 20, 3e-11 off the true -log sigmoid(-x) at x = 21: the BT
    check fails it on inputs whose margin is 0, where "the margin left out" and "the margin added" give the
    right answer, so neither may be named (they were, before diagnose was given the correct output). A port
    that does leave the margin out is still named, by the fixture, whose margin is 0.5."""
    from minirlhf import reward
    from minirlhf.kit import fixtures
    from minirlhf.kit.mistakes import diagnose

    def softplus_threshold(r_chosen, r_rejected, margin, center_coef):
        x = -(r_chosen - r_rejected - margin)
        return np.where(x > 20, x, np.logaddexp(0, x)).mean() + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    with pytest.raises(AssertionError) as e:
        K.check_bt_loss(softplus_threshold, max_examples=30)
    assert "check_bt_loss" in str(e.value) and "known mistake" not in str(e.value)
    inputs = {"r_chosen": np.full(4, -21.0), "r_rejected": np.zeros(4), "margin": 0.0, "center_coef": 0.0}
    truth = reward.bt_loss_forward(**inputs)[0]
    assert len(diagnose("bt_loss", inputs, softplus_threshold(**inputs))) == 2  # without the truth: both named
    assert diagnose("bt_loss", inputs, softplus_threshold(**inputs), correct=truth) == []
    golden = os.path.join(fixtures.GOLDEN, "bt_loss.npz")
    with pytest.raises(AssertionError, match=r"matches a known mistake: the margin left out \[bt_loss\]"):
        fixtures.compare(golden, lambda margin, **kw: reward.bt_loss_forward(margin=0.0, **kw)[0])


def test_no_false_alarm_on_a_kl_that_rounds_below_zero():
    """A correct sum of p log(p / q) can round to -1e-17 (it did, about half of the time with random
    draws): the check allows rounding, derived from the terms' size, and shows the value when it fails."""
    def rounding_kl(logits, logits_ref, temperature, mask):
        out = kl.exact_kl(logits, logits_ref, temperature, mask)
        return np.where(out > 0, out, -1e-17 * (mask > 0))  # what a correct plain sum gives at p = q
    K.check_exact_kl(rounding_kl, max_examples=10)
    with pytest.raises(AssertionError, match=r"exact KL at tau .*: at index .* got .*, expected"):
        K.check_exact_kl(lambda **kw: kl.exact_kl(**kw) - 0.01 * kw["mask"], max_examples=5)


def test_critic_free_and_lora_failures_name_their_mistakes():
    """A GRPO port with the biased std and a LoRA layer scaled by alpha fail, and the message says which known
    mistake they match; a port that raises on groups of unequal sizes fails the check, not the kit."""
    from minirlhf import grpo_objective as go
    from minirlhf.kit import conformance_grpo as G, conformance_lora as LO
    with pytest.raises(AssertionError) as e:
        G.check_grpo_advantages(lambda rewards, groups=None, ddof=1, eps=1e-4: go.grpo_advantages(
            rewards, groups, 0, eps), max_examples=5)
    assert "matches a known mistake: the std with ddof 0 (the biased std) [grpo_std]" in str(e.value)
    with pytest.raises(AssertionError) as e:
        LO.check_lora_linear(lambda x, W0, b, A, B, alpha, rslora: x @ W0 + b + alpha * (x @ A) @ B, max_examples=10)
    assert "[lora_scale, lora_layout]" in str(e.value) and "the update scaled by alpha, not alpha / r" in str(e.value)

    def contiguous(rewards, groups=None):  # rewards.view(-1, G) of rows in order, whatever the ids
        r = np.asarray(rewards, np.float64)
        return go.dr_grpo_advantages(r if groups is None else r.reshape(len(np.unique(groups)), -1)).reshape(r.shape)
    with pytest.raises(AssertionError, match=r"\[group_ids\]"):
        G.check_dr_grpo_advantages(contiguous, max_examples=5)
