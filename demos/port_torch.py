"""A PyTorch port of minirlhf's transformer, value head, PPO losses and Bradley-Terry loss, of the critic-free
methods (group advantages, REINFORCE++, the token, sequence and REINFORCE losses, the aggregators, the KL as a
loss term) and of LoRA as PEFT builds it (the adapted layer, merge, the adapted model, the init), checked
with the conformance kit and the golden fixtures: what a porter runs against their own code.

    python demos/port_torch.py [--fixtures DIR] [--json out.json] [--quick]

torch is optional (never an install requirement): without it this script says so and exits 0.

Where a port usually goes wrong, and the line here that gets it right:
    weights      minirlhf computes x @ W with W (in, out); nn.Linear computes x @ weight.T, so
                 weight = W.T on the way in and grad.T on the way out (NAMES, load, grads)
    LayerNorm    biased variance, eps 1e-5: nn.LayerNorm's defaults
    GELU         the tanh form: F.gelu(x, approximate="tanh") (the default is the erf form, 1e-3 away)
    attention    query i reads real keys j <= i; a padding query reads only itself (finite, never used)
    positions    cumsum(mask) - mask, so left padding changes no real logit
    LM head      tied: logits = h @ wte.weight.T
    log-probs    log_softmax(logits / tau), the sampling temperature
    PPO          mean over valid tokens of max(-A ratio, -A clamp(ratio)); padding zeroed before exp
    BT loss      -F.logsigmoid(d): F.softplus has threshold=20 and returns x itself beyond it, 2e-9 off
    GRPO         Bessel's std + eps outside the root, and A = 0 exactly for a flat group (torch.where on
                 max == min): TRL's (r - mean) / (std + 1e-4) leaves rounding noise / 1e-4 there
    aggregators  the whole batch's row and token counts, so that micro-batches add up to the batch
    KL loss      k3 = torch.expm1(-d) + d, not exp(-d) - 1 + d (which cancels near 0); no clamp
    LoRA         lora_A.weight = A.T, lora_B.weight = B.T (PEFT's layout), s = alpha / r (rsLoRA alpha /
                 sqrt r), the base frozen; kaiming_uniform_ on the (r, in) lora_A.weight (fan-in in)

Checks, all in float64: (1) the kit's properties and finite-difference gradients of each ported function;
(2) fixtures.compare against every matching golden fixture to 1e-10; (3) logits and every parameter's
autograd gradient against minirlhf's hand-written backward on the kit's model. Exit code 1 on a failure.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import minirlhf  # noqa: E402,F401  (one BLAS thread per call: minirlhf/fast.py)
import numpy as np  # noqa: E402
from minirlhf.cli import output_file  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None


# ---------------------------------------------------------------- the port

def NAMES(cfg):
    """minirlhf name -> (torch name, transposed?) for every parameter of a model with a scalar head."""
    names = {"wte": ("wte.weight", False), "wpe": ("wpe.weight", False),
             "ln_f.g": ("ln_f.weight", False), "ln_f.b": ("ln_f.bias", False)}
    for l in range(cfg.n_layer):
        for ours, theirs, t in [("ln1.g", "ln1.weight", 0), ("ln1.b", "ln1.bias", 0), ("attn.w_qkv", "qkv.weight", 1),
                                ("attn.b_qkv", "qkv.bias", 0), ("attn.w_proj", "proj.weight", 1),
                                ("attn.b_proj", "proj.bias", 0), ("ln2.g", "ln2.weight", 0), ("ln2.b", "ln2.bias", 0),
                                ("mlp.w_fc", "fc.weight", 1), ("mlp.b_fc", "fc.bias", 0),
                                ("mlp.w_proj", "mlp_proj.weight", 1), ("mlp.b_proj", "mlp_proj.bias", 0)]:
            names[f"h{l}.{ours}"] = (f"blocks.{l}.{theirs}", bool(t))
    return names


def build(cfg):
    """The GPT as torch modules, float64: a ModuleDict whose names NAMES maps minirlhf's onto."""
    nn, C = torch.nn, cfg.n_embd
    block = lambda: nn.ModuleDict({"ln1": nn.LayerNorm(C), "qkv": nn.Linear(C, 3 * C), "proj": nn.Linear(C, C),  # noqa
                                   "ln2": nn.LayerNorm(C), "fc": nn.Linear(C, 4 * C), "mlp_proj": nn.Linear(4 * C, C)})
    return nn.ModuleDict({"wte": nn.Embedding(cfg.vocab_size, C), "wpe": nn.Embedding(cfg.n_ctx, C),
                          "blocks": nn.ModuleList([block() for _ in range(cfg.n_layer)]),
                          "ln_f": nn.LayerNorm(C)}).double()


def load(model, cfg, params):
    """Copy minirlhf's parameters into the model by name (W.T into each nn.Linear weight)."""
    named = dict(model.named_parameters())
    names = NAMES(cfg)
    assert {theirs for theirs, _ in names.values()} == set(named), "every parameter loaded, none left over"
    with torch.no_grad():  # copy_ in place: load_state_dict does the same, 6x slower at this size
        for ours, (theirs, transposed) in names.items():
            named[theirs].copy_(torch.from_numpy(params[ours].T if transposed else params[ours]))


def hidden(model, cfg, tokens, mask):
    """Final hidden states (B, T, C): positions cumsum(mask) - mask, pre-LN blocks, no dropout."""
    B, T = tokens.shape
    H, C = cfg.n_head, cfg.n_embd
    eye = torch.eye(T, dtype=torch.bool)
    allowed = (torch.tril(torch.ones(T, T, dtype=torch.bool)) & (mask[:, None, None, :] > 0)) | eye  # (B, 1, T, T)
    x = model["wte"](tokens) + model["wpe"](mask.cumsum(1) - mask)
    for b in model["blocks"]:
        q, k, v = b["qkv"](b["ln1"](x)).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # softmax(q k^T / sqrt(D)) v
        x = x + b["proj"](y.transpose(1, 2).reshape(B, T, C))
        x = x + b["mlp_proj"](F.gelu(b["fc"](b["ln2"](x)), approximate="tanh"))
    return model["ln_f"](x)


def logits_of(model, cfg, tokens, mask):
    return hidden(model, cfg, tokens, mask) @ model["wte"].weight.T  # the tied LM head


def token_logprobs(logits, targets, temperature):
    return F.log_softmax(logits / temperature, dim=-1).gather(-1, targets[..., None])[..., 0]


def policy_loss(logp, logp_old, advantages, mask, clip_eps):
    valid = mask > 0
    ratio = torch.exp(torch.where(valid, logp - logp_old, 0.0))  # padding zeroed before exp
    adv = torch.where(valid, advantages, 0.0)
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps))
    return loss.sum() / valid.sum()


def value_loss(values, values_old, returns, mask, clip_eps, vf_coef):
    valid = mask > 0
    v, v_old, R = (torch.where(valid, x, 0.0) for x in (values, values_old, returns))
    v_clip = torch.clamp(v, v_old - clip_eps, v_old + clip_eps)
    return vf_coef * 0.5 * torch.maximum((v - R) ** 2, (v_clip - R) ** 2).sum() / valid.sum()


def bt_loss(r_chosen, r_rejected, margin=0.0, center_coef=0.0):
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean() + center_coef * ((r_chosen + r_rejected) ** 2).mean()


# ---------------------------------------------------------------- the kit's calling convention

def as_torch(kw, grad):
    """NumPy inputs -> tensors (float64 ones in `grad` require grad; ints -> int64); scalars unchanged."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, np.ndarray):
            t = torch.from_numpy(np.array(v))
            out[k] = t.long() if v.dtype.kind in "iub" else t.requires_grad_(k in grad)
        else:
            out[k] = v
    return out


def pair(fn, grad):
    """(forward, vjp) of a function on tensors, for the kit: NumPy in, NumPy out, autograd for the vjp."""
    def forward(**kw):
        return fn(**as_torch(kw, ())).detach().numpy()

    def vjp(dout, **kw):
        t = as_torch(kw, grad)
        out = fn(**t)
        g = torch.autograd.grad(out, [t[k] for k in grad], torch.as_tensor(dout, dtype=out.dtype))
        return {k: x.numpy() for k, x in zip(grad, g)}
    return forward, vjp


def run_model(model, cfg, params, tokens, mask, head):
    """Load params and run: logits (head None) or a value at every position (head "value", which adds the
    leaves head.w, head.b). Returns (output tensor, {name: head leaf})."""
    load(model, cfg, params)
    tokens, mask = torch.from_numpy(np.asarray(tokens)), torch.from_numpy(np.asarray(mask))
    if head is None:
        return logits_of(model, cfg, tokens, mask), {}
    w, b = (torch.from_numpy(np.array(params[k])).requires_grad_() for k in ("head.w", "head.b"))
    return hidden(model, cfg, tokens, mask) @ w + b, {"head.w": w, "head.b": b}


def grads_of(model, cfg, leaves):
    """The gradients autograd left on the model (and head leaves), under minirlhf's names and layouts."""
    named = dict(model.named_parameters())
    grads = {ours: (named[theirs].grad.T if t else named[theirs].grad).numpy().copy()
             for ours, (theirs, t) in NAMES(cfg).items()}
    return {**grads, **{k: v.grad.numpy() for k, v in leaves.items()}}


def model_pair(cfg, head):
    """(forward, vjp) of the LM (head=None), or of the value model (head="value"), for the kit."""
    model = build(cfg)

    def forward(params, tokens, mask):
        with torch.no_grad():
            return run_model(model, cfg, params, tokens, mask, head)[0].numpy()

    def vjp(dout, params, tokens, mask):
        model.zero_grad()
        out, leaves = run_model(model, cfg, params, tokens, mask, head)
        out.backward(torch.from_numpy(np.asarray(dout)))
        return {"params": grads_of(model, cfg, leaves)}
    return forward, vjp


def ppo_minibatch_pair(cfg):
    """Both PPO losses of a minibatch through the policy and the value model, and, by one backward of their
    sum, both networks' gradients (the fixture's convention: its vjp ignores dout)."""
    models = build(cfg), build(cfg)

    def run(policy, value, seq, seq_mask, P, tokens, mask, logp_old, values_old, advantages, returns,
            temperature, clip_eps, vf_clip_eps, vf_coef):
        t = lambda x: torch.from_numpy(np.asarray(x))  # noqa: E731
        N = tokens.shape[1]
        for m in models:
            m.zero_grad()
        logits, _ = run_model(models[0], cfg, policy, seq, seq_mask, None)  # (B, P + N, V)
        v_all, leaves = run_model(models[1], cfg, value, seq, seq_mask, "value")  # (B, P + N)
        logp = token_logprobs(logits[:, P - 1:-1], t(tokens), temperature)  # position P - 1 + t: token t
        lp = policy_loss(logp, t(logp_old), t(advantages), t(mask), clip_eps)
        lv = value_loss(v_all[:, P - 1:P - 1 + N], t(values_old), t(returns), t(mask), vf_clip_eps, vf_coef)
        return lp, lv, leaves

    def forward(**kw):
        lp, lv, _ = run(**kw)
        return {"loss_policy": lp.detach().numpy(), "loss_value": lv.detach().numpy()}

    def vjp(dout, **kw):
        lp, lv, leaves = run(**kw)
        (lp + lv).backward()
        return {"policy": grads_of(models[0], cfg, {}), "value": grads_of(models[1], cfg, leaves)}
    return forward, vjp


# ---------------------------------------------------------------- the critic-free methods

def _groups(rewards, groups):
    """(flat rewards (B,), group index (B,) in 0..n-1, n, the shape to restore): (P, G) or (B,) with ids."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    shape = r.shape
    if groups is None:
        idx = torch.arange(shape[0]).repeat_interleave(shape[1])
    else:
        idx = torch.unique(torch.as_tensor(groups), return_inverse=True)[1].reshape(-1)
    return r.reshape(-1), idx, int(idx.max()) + 1, shape


def _group_sums(x, idx, n):
    return torch.zeros(n, dtype=x.dtype).index_add_(0, idx, x)


def _flat(r, idx, n):
    """(B,) bool: the row's group has equal rewards (max == min, exactly), a group of one included."""
    hi = torch.full((n,), -torch.inf, dtype=r.dtype).scatter_reduce(0, idx, r, "amax")
    lo = torch.full((n,), torch.inf, dtype=r.dtype).scatter_reduce(0, idx, r, "amin")
    return (hi == lo)[idx]


def grpo_advantages(rewards, groups=None, ddof=1, eps=1e-4):
    """(r - mean) / (std + eps) per group, Bessel's std (ddof 1) with eps outside the root; 0 exactly for a
    flat group and a group of one (where the division would be 0 / 0 or rounding noise / eps)."""
    r, idx, n, shape = _groups(rewards, groups)
    count = torch.bincount(idx, minlength=n).to(r.dtype)
    centred = r - (_group_sums(r, idx, n) / count)[idx]
    std = (_group_sums(centred ** 2, idx, n) / (count - ddof).clamp(min=1)).sqrt()
    return torch.where(_flat(r, idx, n), 0.0, centred / (std[idx] + eps)).reshape(shape)


def dr_grpo_advantages(rewards, groups=None):
    r, idx, n, shape = _groups(rewards, groups)
    mean = _group_sums(r, idx, n) / torch.bincount(idx, minlength=n).to(r.dtype)
    return torch.where(_flat(r, idx, n), 0.0, r - mean[idx]).reshape(shape)


def rloo_advantages(rewards, groups=None):
    """r minus the mean of the other G - 1 rewards of its group (G >= 2)."""
    r, idx, n, shape = _groups(rewards, groups)
    count = torch.bincount(idx, minlength=n).to(r.dtype)[idx]
    others = (_group_sums(r, idx, n)[idx] - r) / (count - 1)
    return torch.where(_flat(r, idx, n), 0.0, r - others).reshape(shape)


def reinforce_pp_advantages(scores, logp, logp_ref, mask, kl_coef, groups=None, baseline=False):
    """-kl_coef k1 per token, the (group-baselined) score on EOS, the reward-to-go, whitened over the batch's
    valid tokens with the biased variance and eps 1e-8 inside the root."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    s = dr_grpo_advantages(s, groups) if baseline else s
    valid = mask > 0
    rewards = -kl_coef * (torch.where(valid, logp, 0.0) - torch.where(valid, logp_ref, 0.0))  # NaN at padding
    rewards[torch.arange(len(s)), valid.sum(1) - 1] += s
    to_go = rewards.flip(1).cumsum(1).flip(1)
    v = to_go[valid]
    return torch.where(valid, (to_go - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-8), 0.0)


def token_loss(logp, logp_old, advantages, mask, eps_low, eps_high):
    """Per-token max(-A rho, -A clamp(rho, 1 - eps_low, 1 + eps_high)), 0 at padding."""
    valid = mask > 0
    ratio = torch.exp(torch.where(valid, logp - logp_old, 0.0))
    adv = torch.where(valid, advantages, 0.0)
    return torch.where(valid, torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)), 0.0)


def sequence_loss(logp, logp_old, advantages, mask, eps_low, eps_high, ratio):
    """One ratio per row: exp of the mean ("mean", GSPO) or the sum ("sum") of its valid log-ratios."""
    valid = mask > 0
    total, lengths = torch.where(valid, logp - logp_old, 0.0).sum(1), valid.sum(1)
    s = torch.exp(total / lengths.clamp(min=1) if ratio == "mean" else total)
    loss = torch.maximum(-advantages * s, -advantages * torch.clamp(s, 1 - eps_low, 1 + eps_high))
    return torch.where(lengths > 0, loss, 0.0)


def reinforce_loss(logp, advantages, mask):
    return -advantages * torch.where(mask > 0, logp, 0.0).sum(1)


def _weights(mask, max_len, n_rows, n_tokens):
    """{aggregator: c_it}: 1/(B L_i), 1/sum L, 1/(B L_max), 1/B with the whole batch's B and token count."""
    valid = mask > 0
    lengths = valid.sum(1, keepdim=True).to(torch.float64).clamp(min=1)
    c = {"seq_mean_token_mean": 1.0 / (n_rows * lengths), "token_mean": torch.full_like(lengths, 1.0 / n_tokens),
         "constant": torch.full_like(lengths, 1.0 / (n_rows * max_len)),
         "seq_sum": torch.full_like(lengths, 1.0 / n_rows)}
    return {k: torch.where(valid, v, 0.0) for k, v in c.items()}


def aggregate(losses, mask, kind, max_len, n_rows, n_tokens):
    return (_weights(mask, max_len, n_rows, n_tokens)[kind] * torch.where(mask > 0, losses, 0.0)).sum()


def kl_loss(logp, logp_ref, mask, kind, logp_old=None):
    """k1 = d, k2 = d^2 / 2, k3 = expm1(-d) + d (exact near 0, finite at +-50), rho k3, d = logp - logp_ref."""
    valid = mask > 0
    d = torch.where(valid, logp, 0.0) - torch.where(valid, logp_ref, 0.0)
    k3 = torch.expm1(-d) + d
    if kind == "rho_k3":  # rho = pi / pi_old with pi_old held fixed: autograd gives rho d
        value = torch.exp(torch.where(valid, logp, 0.0) - torch.where(valid, logp_old, 0.0)) * k3
    else:
        value = {"k1": d, "k2": 0.5 * d ** 2, "k3": k3}[kind]
    return torch.where(valid, value, 0.0)


def forward_only(fn):
    """The kit's forward of a function on tensors with no gradient: NumPy in, NumPy (or a dict of it) out."""
    def forward(**kw):
        with torch.no_grad():
            out = fn(**as_torch(kw, ()))
        return {k: v.numpy() for k, v in out.items()} if isinstance(out, dict) else out.numpy()
    return (forward,)


# ---------------------------------------------------------------- LoRA, as PEFT builds it

LORA_LAYERS = {"attn.w_qkv": "qkv", "attn.w_proj": "proj", "mlp.w_fc": "fc", "mlp.w_proj": "mlp_proj"}


def lora_scale(alpha, rank, rslora):
    return alpha / (rank ** 0.5 if rslora else rank)  # rsLoRA: alpha / sqrt(r)


def lora_linear(x, W0, b, A, B, alpha, rslora):
    """x W0 + b + s (x A) B in PEFT's layout: lora_A.weight = A.T (r, in), lora_B.weight = B.T (out, r)."""
    s = lora_scale(alpha, A.shape[1], rslora)
    return F.linear(x, W0.T, b) + s * F.linear(F.linear(x, A.T), B.T)


def lora_merge(W0, A, B, alpha, rslora):
    """PEFT's merge in its (out, in) layout: weight += s lora_B.weight @ lora_A.weight, and unmerge."""
    delta = lora_scale(alpha, A.shape[1], rslora) * (B.T @ A.T)
    merged = W0.T + delta
    return {"merged": merged.T, "restored": (merged - delta).T}


class LoRALinear(torch.nn.Module if torch is not None else object):
    """base(x) + s lora_B(lora_A(x)) around a frozen nn.Linear, PEFT's LoraLayer."""
    def __init__(self, base, A, B, scale):
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_A = torch.nn.Linear(*A.shape, bias=False).double()
        self.lora_B = torch.nn.Linear(*B.shape, bias=False).double()
        with torch.no_grad():
            self.lora_A.weight.copy_(torch.from_numpy(np.ascontiguousarray(A.T)))
            self.lora_B.weight.copy_(torch.from_numpy(np.ascontiguousarray(B.T)))

    def forward(self, x):
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))


def lora_model_pair(cfg):
    """(forward, vjp) of a LoRA policy's logits: the GPT with its adapted layers wrapped in LoRALinear, the base
    frozen; adapter None runs the same modules unwrapped (the adapter off: the base itself, the reference)."""
    model = build(cfg)

    def run(params, adapter, tokens, mask, alpha, rslora):
        load(model, cfg, params)
        model.requires_grad_(False)  # the base is frozen: only the adapter trains
        wrapped, originals = {}, []
        if adapter is not None:
            rank = next(v for k, v in adapter.items() if k.endswith("lora_A")).shape[1]
            for key in (k for k in adapter if k.endswith(".lora_A")):
                name = key[:-len(".lora_A")]
                layer, target = int(name.split(".", 1)[0][1:]), LORA_LAYERS[name.split(".", 1)[1]]
                block = model["blocks"][layer]
                originals.append((block, target, block[target]))
                block[target] = wrapped[name] = LoRALinear(block[target], adapter[key], adapter[name + ".lora_B"],
                                                           lora_scale(alpha, rank, rslora))
        try:
            out = logits_of(model, cfg, torch.from_numpy(np.asarray(tokens)), torch.from_numpy(np.asarray(mask)))
        finally:
            for block, target, layer in originals:  # the model is the plain base again
                block[target] = layer
        return out, wrapped

    def forward(**kw):
        with torch.no_grad():
            return run(**kw)[0].numpy()

    def vjp(dout, **kw):
        out, wrapped = run(**kw)
        out.backward(torch.from_numpy(np.asarray(dout)))
        grads = {}
        for name, layer in wrapped.items():  # back to minirlhf's layout: A = lora_A.weight.T
            grads[name + ".lora_A"], grads[name + ".lora_B"] = layer.lora_A.weight.grad.T.numpy(), \
                layer.lora_B.weight.grad.T.numpy()
        return {"adapter": grads}
    return forward, vjp


def lora_init(d_in, d_out, rank, seed):
    """PEFT's default: kaiming_uniform_(lora_A.weight, a=sqrt 5) on the (r, in) weight, whose fan-in is d_in;
    lora_B.weight = 0. Returned in minirlhf's layout, A = lora_A.weight.T."""
    lora_A = torch.empty(rank, d_in, dtype=torch.float64)
    torch.nn.init.kaiming_uniform_(lora_A, a=5 ** 0.5, generator=torch.Generator().manual_seed(seed))
    return {"A": lora_A.T.numpy(), "B": np.zeros((rank, d_out))}


def kit_ports(model_cfg):
    """{registry name: (forward, vjp)} of the functions this port provides, for a model of model_cfg: what the
    conformance kit checks and the fixtures compare (and what python -m minirlhf.kit.stress --port runs)."""
    torch.set_num_threads(1)  # tiny tensors: a second thread only contends (25x slower on a busy 2-core machine)
    return {"transformer": model_pair(model_cfg, None), "value_model": model_pair(model_cfg, "value"),
            "token_logprobs": pair(token_logprobs, ["logits"]), "policy_loss": pair(policy_loss, ["logp"]),
            "value_loss": pair(value_loss, ["values"]), "bt_loss": pair(bt_loss, ["r_chosen", "r_rejected"]),
            "ppo_minibatch": ppo_minibatch_pair(model_cfg),
            # the critic-free methods
            "grpo_advantages": forward_only(grpo_advantages), "dr_grpo_advantages": forward_only(dr_grpo_advantages),
            "rloo_advantages": forward_only(rloo_advantages),
            "reinforce_pp_advantages": forward_only(reinforce_pp_advantages),
            "reinforce_pp_baseline": forward_only(reinforce_pp_advantages),
            "token_loss": pair(token_loss, ["logp"]), "sequence_loss": pair(sequence_loss, ["logp"]),
            "sequence_loss_sum": pair(sequence_loss, ["logp"]), "reinforce_loss": pair(reinforce_loss, ["logp"]),
            "token_weights": forward_only(_weights), "aggregate": pair(aggregate, ["losses"]),
            **{f"kl_loss_{k}": pair(kl_loss, ["logp"]) for k in ("k1", "k2", "k3", "rho_k3")},
            # LoRA
            "lora_linear": pair(lora_linear, ["x", "b", "A", "B"]), "lora_merge": forward_only(lora_merge),
            "lora_model": lora_model_pair(model_cfg), "lora_init": (lora_init,)}


# ---------------------------------------------------------------- exact.py's protocol (python -m minirlhf.exact --port)

def _exact_model():
    from minirlhf.exact import EXACT_MODEL
    return EXACT_MODEL


def _sequence(tokens, mask):
    """BOS y_1 .. y_H and its mask, as tensors."""
    bos = np.ones((len(tokens), 1), np.int64)  # BOS = 1
    return (torch.from_numpy(np.hstack([bos, tokens])), torch.from_numpy(np.hstack([np.ones_like(bos), mask])))


def _response_logprobs(model, cfg, tokens, mask, temperature):
    seq, seq_mask = _sequence(tokens, mask)
    logits = logits_of(model, cfg, seq, seq_mask)[:, :-1]  # position t predicts token t + 1
    return token_logprobs(logits, torch.from_numpy(tokens), temperature) * torch.from_numpy(mask)


def logprobs(params, tokens, mask, temperature):
    cfg = _exact_model()
    model = build(cfg)
    load(model, cfg, params)
    with torch.no_grad():
        return _response_logprobs(model, cfg, np.asarray(tokens), np.asarray(mask), temperature).numpy()


def sample(params, n, seed, temperature):
    """n responses to BOS by full forward passes at the temperature, at most H tokens, PAD after EOS."""
    from minirlhf.exact import H
    cfg, gen = _exact_model(), torch.Generator().manual_seed(seed)
    model = build(cfg)
    load(model, cfg, params)
    seq, alive = torch.ones((n, 1), dtype=torch.long), torch.ones(n, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(H):
            logits = logits_of(model, cfg, seq, torch.ones_like(seq))[:, -1]
            tok = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=gen)[:, 0]
            tok = torch.where(alive, tok, torch.zeros_like(tok))
            seq = torch.cat([seq, tok[:, None]], 1)
            alive = alive & (tok != 2)  # EOS = 2
    tokens = seq[:, 1:].numpy()
    eos_before = np.cumsum(tokens == 2, 1) - (tokens == 2)
    return tokens, (eos_before == 0).astype(np.int64)


def kl_estimators(logp, logp_ref, mask):
    log_r = torch.where(torch.from_numpy(mask) > 0, torch.from_numpy(logp_ref - logp), 0.0)
    return {"k1": (-log_r).numpy(), "k2": (0.5 * log_r ** 2).numpy(), "k3": (torch.expm1(log_r) - log_r).numpy()}


def policy_gradient(params, reference, tokens, mask, scores, kl_coef, temperature):
    """REINFORCE with k1 in the reward: (1/N) sum (R - kl_coef sum_t k1) grad log pi(y), by autograd."""
    cfg = _exact_model()
    model, ref = build(cfg), build(cfg)
    load(model, cfg, params)
    load(ref, cfg, reference)
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    logp = _response_logprobs(model, cfg, tokens, mask, temperature)
    with torch.no_grad():
        k1 = (logp - _response_logprobs(ref, cfg, tokens, mask, temperature)).sum(1)
    weight = (torch.from_numpy(np.asarray(scores, np.float64)) - kl_coef * k1) / len(tokens)
    (weight * logp.sum(1)).sum().backward()
    return grads_of(model, cfg, {})


# ---------------------------------------------------------------- checking it

def fixtures_folder(path):
    """--fixtures' type: a folder of golden fixtures, which has their index.json."""
    if not os.path.isfile(os.path.join(path, "index.json")):
        raise argparse.ArgumentTypeError(f"{path!r} is not a folder of fixtures (no index.json in it; "
                                         f"python -m minirlhf.kit.fixtures --out DIR writes one)")
    return path


def main(argv=None):
    from minirlhf.kit.fixtures import GOLDEN
    ap = argparse.ArgumentParser(prog="python demos/port_torch.py", description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", type=fixtures_folder, default=GOLDEN,
                    help="the golden fixtures (default: the set minirlhf ships)")
    ap.add_argument("--json", type=output_file, help="write the agreement figures here")
    ap.add_argument("--quick", action="store_true", help="3 hypothesis examples per property instead of the "
                                                          "checks' defaults (seconds)")
    args = ap.parse_args(argv)
    if torch is None:
        print("torch is not installed: nothing to check (pip install torch to run the port). Exiting cleanly.")
        return 0
    from minirlhf import transformer as tf
    from minirlhf.kit import fixtures as FX
    from minirlhf.kit.inputs import KIT_MODEL as TINY, tiny_model
    from minirlhf.kit.registry import check as kit_check
    torch.set_num_threads(1)
    ported = kit_ports(TINY)
    checks = {name: kit_check(name) for name in ported if name != "ppo_minibatch"}
    result, failed = {"kit": {}, "fixtures": {}, "direct": {}}, []
    for name, check in checks.items():
        try:
            errors = check(*ported[name], **({"max_examples": 3} if args.quick else {}))
            result["kit"][name] = max(errors.values(), default=0.0)
            worst = f"worst gradient relative error {max(errors.values()):.1e}" if errors else "no gradient"
            print(f"kit      {name:23s} | properties ok | {worst}")
        except AssertionError as e:
            failed.append(f"kit {name}: {e}")
            print(f"kit      {name:23s} | FAILED: {str(e).splitlines()[0]}")
    with open(os.path.join(args.fixtures, "index.json")) as f:
        index = json.load(f)
    on_fixture_cfg = kit_ports(tf.GPTConfig(**index["config"]))
    for name in (n for n in on_fixture_cfg if n in index["fixtures"]):  # lora_init's draws have no fixture
        try:
            errors = FX.compare(os.path.join(args.fixtures, f"{name}.npz"), *on_fixture_cfg[name])
            result["fixtures"][name] = max(errors.values())
            print(f"fixture  {name:23s} | {len(errors):2d} arrays     | worst max |a - b| / (1 + |b|) "
                  f"{max(errors.values()):.1e}")
        except AssertionError as e:
            failed.append(f"fixture {name}: {e}")
            print(f"fixture  {name:23s} | FAILED: {str(e).splitlines()[0]}")
    # logits and every gradient against minirlhf's hand-written backward, on the kit's 2-layer model
    params, rng = tiny_model(TINY, 7), np.random.default_rng(7)
    tokens, mask = rng.integers(0, TINY.vocab_size, (3, TINY.n_ctx)), np.ones((3, TINY.n_ctx), np.int64)
    mask[1, :2] = 0  # left padding
    logits, cache = tf.forward(params, TINY, tokens, mask)
    dlogits = rng.standard_normal(logits.shape) * mask[..., None]
    ours, theirs = tf.backward(dlogits, cache), ported["transformer"][1](dlogits, params, tokens, mask)["params"]
    real = mask > 0
    abs_logits = float(np.abs(logits - ported["transformer"][0](params, tokens, mask))[real].max())
    rel_grads = max(float(np.abs(ours[k] - theirs[k]).max() / np.abs(ours[k]).max()) for k in ours)
    result["direct"] = {"logits_max_abs_diff": abs_logits, "logits_max_abs": float(np.abs(logits).max()),
                        "grads_max_diff_over_max_grad": rel_grads}
    print(f"direct   logits max |diff| {abs_logits:.1e} (max |logit| {np.abs(logits).max():.2f}); gradients max "
          f"|diff| / max |grad| per parameter {rel_grads:.1e}")
    if abs_logits > 1e-10 or rel_grads > 1e-10:
        failed.append("direct agreement worse than 1e-10")
    from minirlhf.exact import check_port
    result["exact"] = check_port(sys.modules[__name__])  # this file is also a port for exact.py's protocol
    for name, r in result["exact"].items():
        print(f"exact    {name:36s} | {'ok' if r['ok'] else 'FAILED'} | "
              + ", ".join(f"{k} {v:.3g}" for k, v in r.items() if k != "ok"))
        if not r["ok"]:
            failed.append(f"exact {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print("all checks passed" if not failed else f"{len(failed)} checks FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
