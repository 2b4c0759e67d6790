"""One record per function of the porting surface: minirlhf's function, its reference implementation in the
kit's calling convention, its conformance check, the inputs of its golden fixture and the conventions the
fixture pins. The kit (conformance*.py), the fixtures (fixtures.py), the diagnosis of a mismatch
(mistakes.py) and the tests all read this one table.

CONVENTIONS are the ids a fixture names and a failing comparison prints, each stated in one line;
minirlhf/CONVENTIONS.md says them in full, with what other libraries do (a test checks every id is there).
"""
from dataclasses import dataclass

from .. import dpo, kl, ppo, ppo_objective as po, reward
from .. import grpo_objective as go
from .. import layers as L
from .. import transformer as tf
from ..tokenizer import response_mask
from . import reference as R
from . import reference_grpo as RG
from .inputs import FIXTURE_MODEL
from .reference import pair

CONVENTIONS = {
    "w_in_out": "linear layers compute x @ W + b with W of shape (in, out); a PyTorch nn.Linear weight is W.T",
    "layernorm_biased": "LayerNorm over the last axis with the biased variance (divide by C), eps = 1e-5 inside "
                        "the square root",
    "gelu_tanh": "GELU in its tanh form, not the erf form (PyTorch: approximate='tanh')",
    "attention_mask": "query i attends to keys j <= i that are real tokens; a padding query only to itself "
                      "(its output is unspecified and never compared)",
    "positions": "positions = cumsum(mask) - mask: left padding leaves every real token's logits unchanged",
    "tied_head": "logits = ln_f(h) @ wte.T; wte's gradient is the lookup's plus the LM head's",
    "no_dropout": "no dropout anywhere",
    "pad_not_eos": "token ids PAD = 0, BOS = 1, EOS = 2: PAD != EOS",
    "temperature": "every log-prob, entropy and exact KL of a sample is of softmax(logits / tau), the tau that "
                   "sampled it, for the policy, the old policy and the reference alike",
    "mean_over_valid": "losses are means over valid (mask 1) positions; padding may hold anything",
    "response_mask": "a sampled response's mask is 1 up to and including its first EOS, 0 after it",
    "kl_estimators": "log r = logp_ref - logp; k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r; no clamp",
    "k1_in_reward": "k1 goes in the reward: r_t = -kl_coef * (logp_t - logp_ref_t) on every response token",
    "score_on_eos": "the score is added on the EOS token (the last valid response token), not one after "
                    "(TRL puts it one position after EOS)",
    "no_eos_score": "a response without EOS is not scored by the reward model: it gets NO_EOS_SCORE = -1",
    "kl_controller": "adaptive KL coefficient: e = clip(KL / target - 1, -0.2, 0.2), kl_coef *= 1 + e n / horizon",
    "gae": "GAE: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, V = 0 after the "
           "last valid token, returns = A + V; gamma = 1, lam = 0.95",
    "whiten_biased": "whitening over valid tokens with the biased variance (divide by N), eps = 1e-8 inside "
                     "the sqrt; one valid token gives 0, not NaN (TRL: unbiased variance)",
    "ppo_clip": "policy loss mean max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)), eps = 0.2, ratio against the "
                "rollout's log-probs, no clamp of the log-ratio; at a tie the unclipped branch's gradient",
    "value_clip": "value loss vf_coef * 0.5 * mean max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2), "
                  "eps = 0.2, vf_coef = 0.1",
    "response_positions": "in prompt + response of prompt length P, the logits and value at position P - 1 + t "
                          "belong to response token t",
    "bt_loss": "Bradley-Terry: mean over pairs of -log sigmoid(r_chosen - r_rejected - margin), finite in the "
               "tails; centering adds c (r_chosen + r_rejected)^2",
    "k_way": "K-way ranking (column 0 best): mean over a prompt's valid pairs i < j, then over prompts",
    "score_at_eos_position": "the reward head reads the final hidden state of the EOS token (the last real one)",
    "value_every_position": "the value head reads the final hidden state at every position",
    "adamw_eps_outside": "AdamW as PyTorch: m_hat / (sqrt(v_hat) + eps), eps = 1e-8 outside the sqrt; "
                         "decoupled decay p -= lr wd p on parameters with ndim >= 2 only; global-norm "
                         "clipping by min(1, max_norm / (norm + 1e-6))",
    "lr_warmup": "warm-up step s of W uses peak (s + 1) / W, then linear decay to 0 (transformers: peak s / W)",
    "dpo": "DPO: u = beta ((logp_w - ref_w) - (logp_l - ref_l)) of log-probs summed over the response tokens "
           "and EOS, L = mean softplus(-u); IPO: mean (h - 1 / (2 beta))^2",
    # critic-free
    "group_ids": "rewards are (P, G), row i group i, or (B,) with integer group ids (B,) in any order, groups of "
                 "any sizes",
    "grpo_std": "GRPO: A = (r - mean) / (std + eps) per group, std with Bessel's ddof 1, eps = 1e-4 outside the "
                "root (TRL); both are arguments (verl: 1e-6, OpenRLHF: 1e-9)",
    "flat_group_zero": "a group of equal rewards (max == min), or of one, gets A = 0 exactly, never NaN or "
                       "rounding noise (verl passes a group of one's r / (1 + eps) on)",
    "group_baselines": "Dr. GRPO: A = r - the group's mean; RLOO: A = r - the mean of the other G - 1 rewards "
                       "(G >= 2)",
    "reinforce_pp": "REINFORCE++: k1 in the per-token reward, the score on EOS, the reward-to-go, whitened over "
                    "the batch's valid tokens; -baseline subtracts the group's mean score first",
    "dynamic_sampling": "DAPO's dynamic sampling keeps the rows of groups whose rewards are not all equal "
                        "(max != min, exactly); a group of one is dropped (verl keeps it)",
    "overlong_penalty": "DAPO's soft overlong penalty: 0 up to L_max - L_cache tokens, then "
                        "(L_max - L_cache - L) / L_cache, -1 at L_max and beyond",
    "token_clip": "per-token losses max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)), rho = exp(logp - "
                  "logp_old), 0 at padding; clip-higher: eps_high > eps_low; no clamp of the log-ratio",
    "sequence_ratio": "one ratio per row: GSPO's exp of the mean of the valid tokens' log-ratios (ratio "
                      "'mean'), TRL's clipped RLOO exp of their sum ('sum'); 0 for a row with no valid token",
    "reinforce_loss": "REINFORCE per row: -A_i sum_t logp_it over the valid tokens (summed, not averaged)",
    "aggregators": "per-token weights c_it: seq_mean_token_mean 1/(B L_i), token_mean 1/sum_j L_j, constant "
                   "1/(B L_max), seq_sum 1/B; 0 at padding; a row with no valid token counts in B",
    "whole_batch_normaliser": "a micro-batch's loss uses the whole batch's counts (n_rows, n_tokens), so that "
                              "micro-batch losses add up to the full batch's exactly",
    "kl_loss": "KL loss terms per token, d = logp - logp_ref: k1 = d, k2 = d^2 / 2, k3 = expm1(-d) + d, rho k3 "
               "with rho = exp(logp - logp_old), logp_old fixed; gradients 1, d, 1 - e^-d, rho d; no clamp",
    # LoRA
    "lora_scale": "LoRA's update is scaled by s = alpha / r; rsLoRA: alpha / sqrt(r)",
    "lora_layout": "y = x W0 + b + s (x A) B, W0 (in, out), A (in, r), B (r, out): PEFT's lora_A.weight is A.T, "
                   "lora_B.weight is B.T; the adapter's names say which layers are adapted",
    "lora_frozen_base": "W0, biases and LayerNorms are frozen: the gradients are dA = s x^T (g B^T) and "
                        "dB = s (x A)^T g only, none for W0",
    "lora_init": "a fresh adapter as PEFT's default: A kaiming-uniform (a = sqrt 5), U(+-1/sqrt(d_in)); B = 0",
    "lora_reference_is_base": "the reference is the base with the adapter off, the very parameters (no copy); "
                              "at B = 0 the adapted logits equal the base's bit for bit and dL/dA = 0",
    "lora_merge": "merge W0 + s A B, unmerge W - s A B: W0 again up to one rounding each way, exactly at B = 0",
}


@dataclass(frozen=True)
class Entry:
    function: str  # minirlhf's function, as minirlhf.<module>.<name>
    reference: object  # model_cfg -> (forward, vjp or None): minirlhf in the kit's calling convention
    inputs: object  # (rng, offsets) -> the inputs of the golden fixture, or None for a check only
    conventions: tuple  # the CONVENTIONS ids the fixture and the check pin
    check: str = None  # the conformance check's name (conformance*.py), None for a fixture only
    defined: object = None  # inputs -> bool mask of the outputs the conventions define (padding queries: no)
    model: bool = False  # True: the function runs a model, so its inputs are of a model config's shapes
    tol: float = 1e-10  # a port agrees with the fixture within tol (1 + |expected|); BLAS may move the last bits
    #                     across machines, so models and matrix ops get 1e-10, elementwise losses less


def _plain(fn):
    return lambda model_cfg: (fn, None)


def _with_cfg(fn):
    """(model_cfg -> (forward, vjp)) of a function taking the model's config first and returning (out, grads)."""
    return lambda model_cfg: (lambda **kw: fn(model_cfg, **kw)[0], lambda dout, **kw: fn(model_cfg, **kw)[1])


E = Entry
FUNCTIONS = {
    # layers
    "linear": E("layers.linear_forward", lambda c: pair(L.linear_forward, L.linear_backward, ["x", "W", "b"]),
                R.activations("linear"), ("w_in_out",), "check_linear"),
    "layernorm": E("layers.layernorm_forward", lambda c: pair(L.layernorm_forward, L.layernorm_backward,
                                                             ["x", "g", "b"]),
                   R.activations("layernorm"), ("layernorm_biased",), "check_layernorm"),
    "gelu": E("layers.gelu_forward", lambda c: pair(L.gelu_forward, L.gelu_backward, ["x"]), R.activations("gelu"),
              ("gelu_tanh",), "check_gelu"),
    "attention": E("layers.attention_forward",
                   lambda c: pair(lambda qkv, key_mask, n_head: L.attention_forward(qkv, n_head,
                                                                                    L.attention_mask(key_mask)),
                                  L.attention_backward, ["qkv"]),
                   R.attention_inputs, ("attention_mask",), "check_attention",
                   defined=lambda kw: kw["key_mask"][..., None] > 0),
    "cross_entropy": E("layers.cross_entropy_forward",
                       lambda c: pair(L.cross_entropy_forward, L.cross_entropy_backward, ["logits"]),
                       R.logits_inputs("cross_entropy"), ("mean_over_valid",), "check_cross_entropy"),
    "token_logprobs": E("layers.token_logprobs_forward",
                        lambda c: pair(L.token_logprobs_forward, L.token_logprobs_backward, ["logits"]),
                        R.logits_inputs("token_logprobs"), ("temperature",), "check_token_logprobs"),
    "entropy": E("layers.entropy_forward", lambda c: pair(L.entropy_forward, L.entropy_backward, ["logits"]),
                 R.logits_inputs("entropy"), ("temperature",), "check_entropy"),
    # models
    "transformer": E("transformer.forward", R.model_pair(tf.forward, tf.backward), R.transformer_inputs,
                     ("w_in_out", "layernorm_biased", "gelu_tanh", "attention_mask", "positions", "tied_head",
                      "no_dropout"), "check_transformer", defined=lambda kw: kw["mask"][..., None] > 0, model=True),
    "reward_model": E("reward.reward_forward", R.model_pair(reward.reward_forward, reward.reward_backward),
                      R.scored_inputs(2), ("score_at_eos_position", "positions", "pad_not_eos"),
                      "check_reward_model", model=True),
    "value_model": E("ppo.value_forward", R.model_pair(ppo.value_forward, ppo.value_backward), R.scored_inputs(9),
                     ("value_every_position", "positions"), "check_value_model",
                     defined=lambda kw: kw["mask"] > 0, model=True),
    "generate": E("transformer.generate", None, None, ("temperature", "positions", "response_mask"),
                  "check_generate", model=True),
    # sampled responses, KL and rewards
    "response_mask": E("tokenizer.response_mask", _plain(response_mask),
                       R.response_mask_inputs, ("response_mask",), "check_response_mask"),
    "kl_estimators": E("kl.kl_estimators", _plain(lambda **kw: {k: v for k, v in kl.kl_estimators(**kw).items()
                                                              if k in ("k1", "k2", "k3")}),
                       R.token_reward_inputs(False), ("kl_estimators", "mean_over_valid"), "check_kl_estimators"),
    "exact_kl": E("kl.exact_kl", _plain(kl.exact_kl), R.exact_kl_inputs, ("temperature",), "check_exact_kl"),
    "token_rewards": E("kl.token_rewards", _plain(lambda **kw: kl.token_rewards(**kw)[0]),
                       R.token_reward_inputs(True), ("k1_in_reward", "score_on_eos"), "check_token_rewards"),
    "update_kl_coef": E("kl.update_kl_coef", _plain(R.kl_coef_steps), R.kl_coef_inputs, ("kl_controller",),
                        "check_update_kl_coef"),
    # PPO
    "gae": E("ppo_objective.gae", _plain(lambda **kw: dict(zip(("advantages", "returns"), po.gae(**kw)))),
             R.gae_inputs, ("gae",), "check_gae"),
    "whiten": E("ppo_objective.whiten", _plain(po.whiten), R.whiten_inputs, ("whiten_biased",), "check_whiten"),
    "policy_loss": E("ppo_objective.policy_loss_forward",
                     lambda c: pair(po.policy_loss_forward, po.policy_loss_backward, ["logp"]),
                     R.policy_loss_inputs, ("ppo_clip", "mean_over_valid"), "check_policy_loss"),
    "value_loss": E("ppo_objective.value_loss_forward",
                    lambda c: pair(po.value_loss_forward, po.value_loss_backward, ["values"]),
                    R.value_loss_inputs, ("value_clip", "mean_over_valid"), "check_value_loss"),
    "rollout": E("ppo.assemble_rollout", lambda c: (lambda **kw: R.rollout_assembly(c, **kw), None),
                 R.rollout_inputs, ("response_mask", "temperature", "response_positions", "no_eos_score",
                                    "score_on_eos", "k1_in_reward", "gae", "whiten_biased"), "check_rollout",
                 model=True),
    "ppo_minibatch": E("ppo.ppo_loss_and_grads", _with_cfg(R.ppo_minibatch), R.ppo_minibatch_inputs,
                       ("response_positions", "temperature", "ppo_clip", "value_clip", "value_every_position",
                        "positions"), "check_ppo_minibatch", model=True),
    # preferences
    "bt_loss": E("reward.bt_loss_forward", lambda c: pair(reward.bt_loss_forward, reward.bt_loss_backward,
                                                          ["r_chosen", "r_rejected"]),
                 R.bt_inputs, ("bt_loss",), "check_bt_loss", tol=1e-12),  # sees softplus's threshold
    "ranking_loss": E("reward.ranking_loss_forward",
                      lambda c: pair(reward.ranking_loss_forward, reward.ranking_loss_backward, ["rewards"]),
                      R.ranking_inputs, ("k_way", "bt_loss"), "check_ranking_loss"),
    "sequence_logprob": E("dpo.sequence_logprob_forward", lambda c: R.sequence_pair(), R.sequence_logprob_inputs,
                          ("dpo", "temperature"), "check_sequence_logprob"),
    "dpo_loss": E("dpo.dpo_loss_forward", lambda c: pair(dpo.dpo_loss_forward, dpo.dpo_loss_backward,
                                                         list(R.PAIR_NAMES)),
                  R.preference_inputs(0.1), ("dpo",), "check_dpo_loss"),
    "ipo_loss": E("dpo.ipo_loss_forward", lambda c: pair(dpo.ipo_loss_forward, dpo.ipo_loss_backward,
                                                         list(R.PAIR_NAMES)),
                  R.preference_inputs(0.5), ("dpo",), "check_ipo_loss"),
    # optimiser
    "adamw": E("optim.adamw_step", _plain(R.adamw_steps), R.adamw_inputs, ("adamw_eps_outside",), "check_adamw"),
    "lr_schedule": E("optim.lr_schedule", _plain(R.lr_steps), R.lr_inputs, ("lr_warmup",), "check_lr_schedule"),
    # critic-free: advantages and DAPO's filters
    "grpo_advantages": E("grpo_objective.grpo_advantages", _plain(go.grpo_advantages), RG.advantage_inputs("grpo"),
                         ("grpo_std", "flat_group_zero", "group_ids"), "check_grpo_advantages", tol=1e-12),
    "dr_grpo_advantages": E("grpo_objective.dr_grpo_advantages", _plain(go.dr_grpo_advantages),
                            RG.advantage_inputs("dr_grpo"), ("group_baselines", "flat_group_zero", "group_ids"),
                            "check_dr_grpo_advantages", tol=1e-12),
    "rloo_advantages": E("grpo_objective.rloo_advantages", _plain(go.rloo_advantages), RG.advantage_inputs("rloo"),
                         ("group_baselines", "flat_group_zero", "group_ids"), "check_rloo_advantages", tol=1e-12),
    "reinforce_pp_advantages": E("grpo_objective.reinforce_pp_advantages", _plain(go.reinforce_pp_advantages),
                                 RG.reinforce_pp_inputs(False), ("reinforce_pp", "k1_in_reward", "score_on_eos",
                                                                 "whiten_biased"),
                                 "check_reinforce_pp_advantages", tol=1e-12),
    "reinforce_pp_baseline": E("grpo_objective.reinforce_pp_advantages", _plain(go.reinforce_pp_advantages),
                               RG.reinforce_pp_inputs(True), ("reinforce_pp", "flat_group_zero", "group_ids",
                                                              "whiten_biased"), "check_reinforce_pp_baseline",
                               tol=1e-12),
    "dynamic_sampling_keep": E("grpo_objective.dynamic_sampling_keep", _plain(go.dynamic_sampling_keep),
                               RG.advantage_inputs("keep"), ("dynamic_sampling", "group_ids"),
                               "check_dynamic_sampling_keep", tol=0.0),
    "overlong_penalty": E("grpo_objective.overlong_penalty", _plain(go.overlong_penalty), RG.overlong_inputs,
                          ("overlong_penalty",), "check_overlong_penalty", tol=1e-12),
    # critic-free: the policy losses, the aggregators and the KL as a loss term
    "token_loss": E("grpo_objective.token_loss_forward",
                    lambda c: pair(go.token_loss_forward, go.token_loss_backward, ["logp"]), RG.token_loss_inputs,
                    ("token_clip",), "check_token_loss", tol=1e-12),
    "sequence_loss": E("grpo_objective.sequence_loss_forward",
                       lambda c: pair(go.sequence_loss_forward, go.sequence_loss_backward, ["logp"]),
                       RG.sequence_loss_inputs("mean"), ("sequence_ratio", "token_clip"), "check_sequence_loss",
                       tol=1e-12),
    "sequence_loss_sum": E("grpo_objective.sequence_loss_forward",
                           lambda c: pair(go.sequence_loss_forward, go.sequence_loss_backward, ["logp"]),
                           RG.sequence_loss_inputs("sum"), ("sequence_ratio", "token_clip"),
                           "check_sequence_loss_sum", tol=1e-12),
    "reinforce_loss": E("grpo_objective.reinforce_loss_forward",
                        lambda c: pair(go.reinforce_loss_forward, go.reinforce_loss_backward, ["logp"]),
                        RG.reinforce_loss_inputs, ("reinforce_loss",), "check_reinforce_loss", tol=1e-12),
    "token_weights": E("grpo_objective.token_weights", _plain(RG.token_weights_all), RG.token_weights_inputs,
                       ("aggregators", "whole_batch_normaliser"), "check_token_weights", tol=1e-12),
    "aggregate": E("grpo_objective.aggregate_forward",
                   lambda c: pair(go.aggregate_forward, go.aggregate_backward, ["losses"]), RG.aggregate_inputs,
                   ("aggregators", "whole_batch_normaliser"), "check_aggregate", tol=1e-12),
    **{f"kl_loss_{kind}": E("grpo_objective.kl_loss_forward",
                            lambda c: pair(go.kl_loss_forward, go.kl_loss_backward, ["logp"]), RG.kl_loss_inputs(kind),
                            ("kl_loss", "kl_estimators"), f"check_kl_loss_{kind}",
                            tol=1e-9 if kind == "rho_k3" else 1e-12) for kind in go.KL_LOSSES},
    # (autograd's rho k3 gradient, rho k3 + rho (1 - e^-d), cancels terms of size rho e^-d: 2e-12 at d = -12)
    # LoRA
    "lora_linear": E("lora.lora_linear_forward", lambda c: RG.lora_linear_pair(), RG.lora_linear_inputs,
                     ("lora_scale", "lora_layout", "lora_frozen_base"), "check_lora_linear"),
    "lora_merge": E("lora.merge", _plain(RG.lora_merge), RG.lora_merge_inputs, ("lora_scale", "lora_layout",
                                                                                 "lora_merge"), "check_lora_merge"),
    "lora_model": E("lora.adapted_forward", RG.lora_model_pair, RG.lora_model_inputs,
                    ("lora_scale", "lora_layout", "lora_frozen_base", "lora_init", "lora_reference_is_base"),
                    "check_lora_model", defined=lambda kw: kw["mask"][..., None] > 0, model=True),
    "lora_init": E("lora.init_adapter", None, None, ("lora_init",), "check_lora_init"),
}


def reference(name, model_cfg=FIXTURE_MODEL):
    """(forward, vjp or None) of minirlhf's function `name` in the kit's calling convention (model_cfg: the
    model's config, for the functions that run one)."""
    entry = FUNCTIONS[name]
    if entry.reference is None:
        raise ValueError(f"{name} has no reference in the kit's calling convention (its check takes the port's "
                         f"own functions: conformance.check_{name})")
    return entry.reference(model_cfg)


def check(name):
    """The conformance check of `name` (imports hypothesis: the property checks need it, the fixtures do not)."""
    from . import conformance, conformance_aggregate, conformance_grpo, conformance_lora, conformance_rl
    entry = FUNCTIONS[name]
    for module in (conformance, conformance_rl, conformance_grpo, conformance_aggregate, conformance_lora):
        if hasattr(module, entry.check):
            return getattr(module, entry.check)
    raise ValueError(f"no conformance check {entry.check} for {name}")


def names_with_a_fixture():
    return [name for name, entry in FUNCTIONS.items() if entry.inputs is not None]
