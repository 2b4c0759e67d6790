"""Supervised fine-tuning (SFT): teach the transformer to answer prompts by imitating a corpus.

Each example is laid out as `BOS prompt response EOS` (tokenizer.py). The model predicts every next token,
but the loss counts only the response's tokens, EOS included, so the model learns to answer (and to stop),
not to write prompts:

    L = -(1 / N_resp) * sum over response positions t of log p(x_{t+1} | x_{<=t})

with N_resp the number of response tokens in the batch. Its gradient is the masked cross-entropy's,
(softmax - onehot) * mask / N_resp (layers.py), sent back through the whole transformer.

In RLHF this is step one (Ouyang et al. 2022, "InstructGPT": SFT on demonstrations). Here the corpus mixes
good and bad responses on purpose (world.py), so the SFT model behaves well only part of the time: the
room that preference learning and PPO are meant to fill. The SFT model is then both the starting policy
and the frozen reference that PPO's KL penalty measures drift from.
"""
import time
from dataclasses import dataclass

import numpy as np

from . import layers as L
from . import transformer as tf
from . import validate as V
from .checkpoint import save_checkpoint
from .optim import AdamWConfig, adamw_init, adamw_step, lr_schedule
from .tokenizer import encode_example, pad_batch


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 300  # optimiser steps
    batch_size: int = 32  # examples per step
    lr: float = 3e-3  # peak learning rate
    warmup_steps: int = 20  # linear warm-up, then linear decay to 0
    weight_decay: float = 0.01  # AdamW decoupled decay on matrices
    max_grad_norm: float = 1.0  # global-norm gradient clip
    eval_every: int = 50  # steps between validation-loss evaluations (and log lines)

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every"):
            V.count("SFTConfig", name, getattr(self, name))
        V.count("SFTConfig", "warmup_steps", self.warmup_steps, minimum=0)
        if not self.warmup_steps < self.steps:
            raise ValueError(f"SFTConfig: need warmup_steps < steps, got {self.warmup_steps} and {self.steps}")
        V.number("SFTConfig", "lr", self.lr, low=0)
        V.number("SFTConfig", "weight_decay", self.weight_decay, low=0)
        V.number("SFTConfig", "max_grad_norm", self.max_grad_norm, low=0, low_open=True)


def make_batch(pairs):
    """(prompt, response) text pairs -> inputs (B, T-1), targets (B, T-1), loss mask (B, T-1).

    The mask is 1 where the target is a response token or the EOS, 0 on BOS-prompt targets and padding.
    """
    seqs = [encode_example(p, r) for p, r in pairs]
    tokens, _ = pad_batch(seqs, side="right")
    loss_mask = np.zeros(tokens.shape, np.int64)
    for b, (p, r) in enumerate(pairs):
        start = 1 + len(p)  # index of the first response token in the sequence
        loss_mask[b, start:start + len(r) + 1] = 1  # response characters and EOS
    real = (np.arange(tokens.shape[1]) < np.array([len(s) for s in seqs])[:, None]).astype(np.int64)
    return tokens[:, :-1], tokens[:, 1:], loss_mask[:, 1:], real[:, :-1]


def loss_and_grads(params, model_cfg, pairs):
    """Mean response-token cross-entropy of a batch and its gradient for every parameter."""
    inputs, targets, loss_mask, real = make_batch(pairs)
    logits, cache = tf.forward(params, model_cfg, inputs, real)
    loss, ce = L.cross_entropy_forward(logits, targets, loss_mask)
    return float(loss), tf.backward(L.cross_entropy_backward(1.0, ce), cache)


def evaluate(params, model_cfg, pairs, batch_size=128):
    """Response-token cross-entropy over all pairs (each token weighted equally)."""
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        inputs, targets, loss_mask, real = make_batch(pairs[i:i + batch_size])
        logits, _ = tf.forward(params, model_cfg, inputs, real)
        loss, _ = L.cross_entropy_forward(logits, targets, loss_mask)
        total += float(loss) * loss_mask.sum()
        count += loss_mask.sum()
    return total / count


def train_sft(params, model_cfg, train_pairs, val_pairs, sft_cfg, rng, log=print, checkpoint=None):
    """Fine-tune params (in place) on train_pairs. Returns a history: one dict per logged step.

    Every eval_every steps (and at the last) logs `step | loss | val | ms` and records it. With
    `checkpoint` a path, the final params are saved there (atomically).
    """
    if not train_pairs or not val_pairs:
        raise ValueError("train_sft needs non-empty train_pairs and val_pairs")
    tf.check_batch_fits("train_sft", model_cfg, sft_cfg.batch_size, params["wte"].dtype)
    opt = AdamWConfig(lr=sft_cfg.lr, weight_decay=sft_cfg.weight_decay, max_grad_norm=sft_cfg.max_grad_norm)
    state = adamw_init(params)
    history, t0 = [], time.perf_counter()
    for step in range(sft_cfg.steps):
        t_step = time.perf_counter()
        idx = rng.integers(0, len(train_pairs), sft_cfg.batch_size)
        loss, grads = loss_and_grads(params, model_cfg, [train_pairs[i] for i in idx])
        lr = lr_schedule(step, sft_cfg.steps, sft_cfg.lr, sft_cfg.warmup_steps)
        grad_norm = adamw_step(params, grads, state, opt, lr=lr)
        step_ms = 1000 * (time.perf_counter() - t_step)
        if (step + 1) % sft_cfg.eval_every == 0 or step == sft_cfg.steps - 1:
            val = evaluate(params, model_cfg, val_pairs)
            rec = {"stage": "sft", "step": step + 1, "loss": loss, "val_loss": val, "lr": lr,
                   "grad_norm": grad_norm, "ms": step_ms,
                   "seconds": time.perf_counter() - t0}
            history.append(rec)
            log(f"sft step {step + 1:4d} | loss {loss:.3f} | val {val:.3f} | lr {lr:.2e} | "
                f"{rec['ms']:5.0f} ms")
    if checkpoint is not None:
        save_checkpoint(checkpoint, params, model_cfg, info={"stage": "sft", "steps": sft_cfg.steps})
    return history
