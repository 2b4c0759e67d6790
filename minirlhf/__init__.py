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
"""
__version__ = "0.1.0"
