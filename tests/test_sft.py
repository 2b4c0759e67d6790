"""Supervised fine-tuning: the loss covers exactly the response, it learns fast, it is deterministic."""
import numpy as np
import pytest

from minirlhf import sft
from minirlhf import transformer as tf
from minirlhf.checkpoint import load_checkpoint
from minirlhf.tokenizer import BOS, EOS, VOCAB_SIZE, decode, encode
from minirlhf.world import all_prompts, sft_corpus, split_prompts

SMALL = tf.GPTConfig(vocab_size=VOCAB_SIZE, n_ctx=64, n_layer=1, n_head=2, n_embd=32)


def test_loss_mask_covers_the_response_and_eos_only():
    inputs, targets, loss_mask, real = sft.make_batch([("hi", "yo"), ("3+4?", "7.")])
    # row 0: BOS h i y o EOS PAD PAD (row 1 is 8 long) -> inputs drop the last column, targets the first
    np.testing.assert_array_equal(inputs[0], [BOS] + encode("hiyo") + [EOS, 0])
    np.testing.assert_array_equal(targets[0], encode("hiyo") + [EOS, 0, 0])
    np.testing.assert_array_equal(loss_mask[0], [0, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(real[0], [1, 1, 1, 1, 1, 1, 0])
    assert decode(targets[1][loss_mask[1] > 0]) == "7."
    assert targets[1][loss_mask[1] > 0][-1] == EOS


def train_small(seed, steps=200, checkpoint=None):
    rng = np.random.default_rng(seed)
    train, val = split_prompts(all_prompts(), 0.2, rng)
    params = tf.init_params(SMALL, rng)
    cfg = sft.SFTConfig(steps=steps, batch_size=16, lr=1e-2, warmup_steps=10, eval_every=100)
    history = sft.train_sft(params, SMALL, sft_corpus(train, 2000, rng), sft_corpus(val, 200, rng), cfg, rng,
                            log=lambda s: None, checkpoint=checkpoint)
    return params, history


def test_sft_drives_validation_loss_well_below_log_vocab(tmp_path):
    params, history = train_small(0, checkpoint=tmp_path / "sft.npz")
    assert history[-1]["val_loss"] < 0.5 * np.log(VOCAB_SIZE)  # from ~3.83 at init
    loaded, cfg, info = load_checkpoint(tmp_path / "sft.npz")
    assert cfg == SMALL and info["stage"] == "sft"
    for k in params:
        np.testing.assert_array_equal(loaded[k], params[k])


def test_same_seed_same_training():
    p1, h1 = train_small(3, steps=20)
    p2, h2 = train_small(3, steps=20)
    assert [h["val_loss"] for h in h1] == [h["val_loss"] for h in h2]
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])


def test_sample_responses_returns_text_and_ended():
    policy = tf.Policy(tf.init_params(SMALL, np.random.default_rng(0)), SMALL, tf.Sampling(max_new_tokens=5))
    out = tf.sample_responses(policy, ["hi!", "what is 1+2?"], np.random.default_rng(1))
    assert len(out) == 2 and all(isinstance(t, str) and isinstance(e, bool) for t, e in out)
    assert all(len(t) <= 5 for t, _ in out)


def test_bad_config_and_data():
    with pytest.raises(ValueError):
        sft.SFTConfig(steps=0)
    with pytest.raises(ValueError, match="warmup"):
        sft.SFTConfig(steps=5, warmup_steps=5)
    with pytest.raises(ValueError, match="non-empty"):
        sft.train_sft({}, SMALL, [], [("a", "b")], sft.SFTConfig(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        sft.make_batch([("hi", "YO")])


@pytest.mark.slow
def test_the_demo_sft_model_behaves_well_only_part_of_the_time(demo_run_start):
    """The demo's SFT stage (default length): every family's preferred behaviour is neither rare nor the
    rule, so preferences and PPO have room to improve it. Slow (the demo's whole SFT, about 20 s): run with
    `python -m pytest -m slow`; demos/seed_sweep.py measures the same on ten seeds."""
    from minirlhf.world import FAMILIES, behaviour_metrics, sample_prompts
    policy, history, val = demo_run_start["policy"], demo_run_start["history"], demo_run_start["val"]
    rng = np.random.default_rng(1)
    assert history[-1]["val_loss"] < 0.2
    texts = [p.text for p in sample_prompts(val, 400, rng)]
    samples = tf.sample_responses(policy, texts, rng)
    metrics = behaviour_metrics(texts, [s for s, _ in samples], [e for _, e in samples])
    for family in FAMILIES:
        assert 0.15 <= metrics[family]["preferred_rate"] <= 0.85, (family, metrics[family])
