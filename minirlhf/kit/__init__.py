"""The porters' kit: what an engineer porting minirlhf to PyTorch, JAX or elsewhere checks their code with.

    gradcheck     centred finite differences and the relative error (NumPy only)
    inputs        the kit's tiny models (KIT_MODEL, FIXTURE_MODEL) and batches off the clip kinks
    oracles       naive loop versions of attention, GAE, AdamW, the group advantages and REINFORCE++
    strategies    hypothesis strategies (the one module that needs hypothesis, with conformance)
    registry      one record per function of the porting surface: reference, check, fixture inputs, conventions
    reference     minirlhf in the kit's calling convention, and the fixtures' inputs (reference_grpo: the
                  critic-free methods' and LoRA's)
    conformance   check_<name>(forward, vjp): properties and gradients on any implementation (the layers and
                  models; conformance_rl: PPO, KL, preferences, the optimiser; conformance_grpo: the critic-free
                  advantages and losses; conformance_aggregate: the aggregators and the KL as a loss;
                  conformance_lora: LoRA)
    mistakes      the known porting mistakes a failing comparison names (mistakes_grpo: the critic-free
                  methods' and LoRA's)
    fixtures      golden inputs, outputs and gradients in float64 (shipped in golden/), and `compare`
    stress        the whole kit run with fresh draws, on minirlhf or a port: the rate of false alarms

The conventions the kit pins are stated in minirlhf/CONVENTIONS.md.
"""
