"""minirlhf: RLHF from scratch in NumPy, written to be read top to bottom.

Reading order (each module opens with its math; the README has the same table):
    tokenizer       characters <-> ids, PAD / BOS / EOS, batch padding, prompt encoding
    layers          forward/backward pairs: embedding, linear, layernorm, gelu, attention, losses
    transformer     the GPT trunk and LM head, its backward pass, KV-cache generation, the sampler
    optim           AdamW, gradient clipping, learning-rate schedule
    checkpoint      .npz checkpoints without pickle
    world           the simulated assistant task and its gold score
    annotator       the simulated annotator, ranked comparisons, the exact agreement ceiling
    sft             supervised fine-tuning
    reward          the Bradley-Terry reward model
    kl              KL estimators, exact KL, the KL coefficient's controller, per-token rewards
    ppo_objective   GAE, whitening, the clipped PPO losses
    ppo             rollouts and the PPO update
    dpo             direct preference optimisation (and IPO): preferences without a reward model or RL loop
    best_of_n       sample n, keep the reward model's favourite; its exact KL
    exact           exact KL and policy gradients by enumerating every response of a tiny model
    grpo_objective  critic-free advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++), clipped and sequence
                    losses, the aggregators, the KL as a loss term
    grpo            group sampling, the verifier's reward and the critic-free training loop
    exact_rl        where the KL goes and what each aggregator does, by exact expectation
    lora            low-rank adapters: RLHF without a second copy of the model
    pipeline        the five stages of the demo, reusable by the experiments
    demo            the whole pipeline in a minute, on the command line
    label           be the annotator: RLHF from your own rankings, in the terminal (label_io: its files)
Beside the lesson:
    fast            the speed tricks (the same math, faster), chosen by one switch
    bench           the speed benchmark
    validate        the checks every config and entry point makes of its numbers
    cli, runs       the command lines' argument types, run folders with a manifest
    kit/            for porters: finite differences, the conformance kit, the golden fixtures
CONVENTIONS.md (in this folder) states every convention minirlhf follows and where other libraries differ.

Importing minirlhf sets BLAS to one thread per call unless the environment chose a count (fast.py,
pin_blas_threads: faster for this model's small matrices, and the same numbers however NumPy was loaded).
It does not retune the memory allocator; the entry points do that (fast.keep_freed_memory).
"""
from . import fast  # noqa: F401  (pins BLAS to one thread per call, once)

__version__ = "0.1.0"
