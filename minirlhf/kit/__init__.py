"""The porters' kit: what an engineer porting minirlhf to PyTorch, JAX or elsewhere checks their code with.

    gradcheck     centred finite differences and the relative error (NumPy only)
    inputs        the kit's tiny models (KIT_MODEL, FIXTURE_MODEL) and batches off the clip kinks
    oracles       naive loop versions of attention, GAE and AdamW
    strategies    hypothesis strategies (the one module that needs hypothesis, with conformance)
    registry      one record per function of the porting surface: reference, check, fixture inputs, conventions
    conformance   check_<name>(forward, vjp): properties and gradients on any implementation
    fixtures      golden inputs, outputs and gradients in float64 (shipped in golden/), and `compare`

The conventions the kit pins are stated in minirlhf/CONVENTIONS.md.
"""
