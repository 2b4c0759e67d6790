"""minirlhf: RLHF from scratch in NumPy, written to be read top to bottom.

Reading order (each module opens with its math):
    tokenizer     characters <-> ids, PAD / BOS / EOS, batch padding
    layers        forward/backward pairs: embedding, linear, layernorm, gelu, attention, losses
    transformer   the GPT trunk and LM head, its backward pass, KV-cache generation
    optim         AdamW, gradient clipping, learning-rate schedule
    checkpoint    .npz checkpoints without pickle
    world         the simulated assistant task and its gold score
    annotator     the simulated annotator, ranked comparisons, the exact agreement ceiling
    sft           supervised fine-tuning
    reward        the Bradley-Terry reward model
    kl            KL estimators, exact KL, beta controllers, per-token rewards
    ppo_objective GAE, whitening, the clipped PPO losses
    ppo           rollouts and the PPO update
    demo          the whole pipeline in a minute
    dpo           direct preference optimisation (and IPO): preferences without a reward model or RL loop
    best_of_n     sample n, keep the reward model's favourite; its exact KL

For porters (they need the `test` extra, hypothesis):
    testing       finite differences, relative error, hypothesis strategies, naive oracles
    conformance   checks of every public function that take any framework's callables
    fixtures      golden inputs, outputs and gradients in float64
    exact         exact KL and policy gradients by enumerating every response of a tiny model
"""
import os
import sys

__version__ = "0.1.0"

# One BLAS thread unless the user chose otherwise. This model's matrices are small (64 x 256 at demo size):
# measured on a 2-core machine, OpenBLAS's default two threads made a training step about 2x slower than
# one thread on a quiet machine (116 ms against 54 ms, float32) and many times slower when anything else
# was running. The variable is read when NumPy loads OpenBLAS, so this only takes effect when minirlhf is
# imported before NumPy (as `python -m minirlhf.demo`, the benchmarks and tests/conftest.py do).
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
