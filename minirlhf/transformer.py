"""A GPT-2 style transformer with a hand-written backward pass, KV-cache generation and the sampler.

    x_0 = wte[tokens] + wpe[positions]                  positions = cumsum(mask) - mask
    for each block l:
        x = x + attn_proj(causal_self_attention(ln1(x)))  pre-LN, as GPT-2
        x = x + mlp_proj(gelu(mlp_fc(ln2(x))))            4x hidden width
    h = ln_f(x)                                           final hidden state: the trunk's output
    logits = h wte^T                                      LM head tied to the token embedding

No dropout anywhere (it breaks log-prob reproducibility and makes the KL noisy: minirlhf/CONVENTIONS.md).
Positions come from the mask, so a left-padded prompt gives each real token the position it would have
unpadded, and no real token attends to a pad: padding never changes a real token's logits.

Parameters are a flat dict; porters load them by these names (C = n_embd, V = vocab_size):

    wte                 (V, C)       token embedding, also the LM head
    wpe                 (n_ctx, C)   learned position embedding
    h{l}.ln1.g, .ln1.b  (C,)         LayerNorm before attention
    h{l}.attn.w_qkv     (C, 3C)      fused q, k, v projection (q | k | v along the last axis,
    h{l}.attn.b_qkv     (3C,)        each split into H heads of size D = C / H)
    h{l}.attn.w_proj    (C, C)       attention output projection
    h{l}.attn.b_proj    (C,)
    h{l}.ln2.g, .ln2.b  (C,)         LayerNorm before the MLP
    h{l}.mlp.w_fc       (C, 4C)      MLP up projection
    h{l}.mlp.b_fc       (4C,)
    h{l}.mlp.w_proj     (4C, C)      MLP down projection
    h{l}.mlp.b_proj     (C,)
    ln_f.g, ln_f.b      (C,)         final LayerNorm

Weights are x @ W (W is (in, out)), so a PyTorch nn.Linear weight is W.T. Init as GPT-2: N(0, 0.02),
residual projections N(0, 0.02 / sqrt(2 n_layer)), biases 0, LayerNorm gains 1.

The math is `block_forward` / `block_backward` (one block; generation decodes with the same function),
`trunk_forward` / `trunk_backward` (embeddings, blocks, final LayerNorm) and `lm_forward` / `lm_backward`
(the trunk and the tied head), read top to bottom; they call the ops of layers.py through their argument
L. The entry points every stage calls, `forward`, `backward`, `hidden_forward` (the trunk, for a scalar
reward or value head) and `hidden_backward`, check their input and run that math through fast.py, which
passes its faster forms of the same ops and splits a big batch over two threads (fast.ENABLED switches it).

A policy is a model together with how it samples (`Policy`, `Sampling`): the temperature that samples a
response is the one that scores it, wherever it is scored (rollouts, the KL, evaluation). A policy may
also carry a LoRA adapter (lora.py, the lesson after RLHF): then its parameters are the frozen base, the
optimiser trains the adapter alone, and the base without the adapter is the reference, never copied.
`policy_forward`, `policy_backward` and `trainable` are what the training stages call on a policy; they
work for either kind.
"""
from dataclasses import dataclass, field, replace

import numpy as np

from . import fast
from . import layers
from . import validate
from .tokenizer import EOS, PAD, decode, encode_prompts, response_mask


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int  # V: token ids are 0 .. V-1
    n_ctx: int  # longest sequence (prompt + response) the position table covers
    n_layer: int  # number of transformer blocks
    n_head: int  # attention heads per block; must divide n_embd
    n_embd: int  # C: width of the residual stream

    def __post_init__(self):
        for name in ("vocab_size", "n_ctx", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")


def param_shapes(model_cfg):
    """name -> shape of every parameter, in a fixed order."""
    V, C = model_cfg.vocab_size, model_cfg.n_embd
    shapes = {"wte": (V, C), "wpe": (model_cfg.n_ctx, C)}
    for l in range(model_cfg.n_layer):
        shapes.update({
            f"h{l}.ln1.g": (C,), f"h{l}.ln1.b": (C,),
            f"h{l}.attn.w_qkv": (C, 3 * C), f"h{l}.attn.b_qkv": (3 * C,),
            f"h{l}.attn.w_proj": (C, C), f"h{l}.attn.b_proj": (C,),
            f"h{l}.ln2.g": (C,), f"h{l}.ln2.b": (C,),
            f"h{l}.mlp.w_fc": (C, 4 * C), f"h{l}.mlp.b_fc": (4 * C,),
            f"h{l}.mlp.w_proj": (4 * C, C), f"h{l}.mlp.b_proj": (C,),
        })
    shapes.update({"ln_f.g": (C,), "ln_f.b": (C,)})
    return shapes


def init_params(model_cfg, rng, dtype=np.float32):
    """GPT-2 initialisation, drawn in the fixed order of param_shapes."""
    params = {}
    for name, shape in param_shapes(model_cfg).items():
        if name.endswith(".g"):
            params[name] = np.ones(shape, dtype)
        elif len(shape) == 1:
            params[name] = np.zeros(shape, dtype)
        else:
            std = 0.02 / np.sqrt(2 * model_cfg.n_layer) if name.endswith("_proj") else 0.02
            params[name] = (rng.standard_normal(shape) * std).astype(dtype)
    return params


def activation_bytes(model_cfg, rows, dtype=np.float32, T=None):
    """An estimate of the memory of one forward and backward pass over rows sequences of T tokens (n_ctx by
    default): per token, per layer, the block's cached activations (24 C numbers) and attention
    probabilities with their gradient (3 n_head T), plus the logits, their softmax and gradient (4 V) and the
    embeddings (6 C). At the demo's size it is within 10% of tracemalloc's peak of a training step."""
    T = model_cfg.n_ctx if T is None else T
    C, H, V = model_cfg.n_embd, model_cfg.n_head, model_cfg.vocab_size
    per_token = model_cfg.n_layer * (24 * C + 3 * H * T) + 4 * V + 6 * C
    return int(rows) * T * per_token * np.dtype(dtype).itemsize


def check_batch_fits(owner, model_cfg, rows, dtype=np.float32):
    """ValueError, before any work, if a forward and backward pass over rows sequences of n_ctx tokens would
    need more memory than is available (activation_bytes)."""
    validate.fits_in_memory(owner, activation_bytes(model_cfg, rows, dtype),
                     f"a forward and backward pass over {rows} sequences of {model_cfg.n_ctx} tokens")


def positions_from_mask(mask):
    """Position of each token among the real tokens of its row: cumsum(mask) - mask. (B, T) -> (B, T)."""
    return np.cumsum(mask, axis=1) - mask


def check_params(params, model_cfg):
    """ValueError naming the first parameter missing, extra or of the wrong shape for model_cfg (a walk over
    the names and shapes: no pass over the arrays)."""
    shapes = param_shapes(model_cfg)
    for name, shape in shapes.items():
        if name not in params:
            raise ValueError(f"parameter {name} is missing (the model config {model_cfg} needs it)")
        if np.shape(params[name]) != tuple(shape):
            raise ValueError(f"parameter {name} has shape {np.shape(params[name])}, the config needs {tuple(shape)}")


def check_tokens(model_cfg, tokens, mask=None):
    """(tokens, mask) as arrays, mask all ones if None; ValueError unless tokens is a (B, T) integer array of
    ids < V with T <= n_ctx and mask a 0/1 array of its shape."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 2-D integer array (B, T), got shape {tokens.shape} "
                         f"dtype {tokens.dtype}")
    if tokens.shape[1] > model_cfg.n_ctx:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds n_ctx={model_cfg.n_ctx}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= model_cfg.vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= model_cfg.vocab_size)][0]
        raise ValueError(f"token id {bad} is out of range [0, {model_cfg.vocab_size})")
    if mask is None:
        return tokens, np.ones(tokens.shape, np.int64)
    mask = np.asarray(mask)
    if mask.shape != tokens.shape:
        raise ValueError(f"mask shape {mask.shape} differs from tokens shape {tokens.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("mask must hold only 0 and 1")
    return tokens, mask


# ---------------------------------------------------------------- one block

def block_forward(x, p, attention, L=layers):
    """One pre-LN block on the residual stream x (B, T, C); p(name) reads the block's parameters.

    attention(qkv) -> (y, cache) is the causal self-attention of the fused projections: over this batch's
    own tokens when training, over the KV cache when generating. Returns the new x and the cache.
    """
    a, c_ln1 = L.layernorm_forward(x, p("ln1.g"), p("ln1.b"))
    qkv, c_qkv = L.linear_forward(a, p("attn.w_qkv"), p("attn.b_qkv"))  # (B, T, 3C)
    y, c_att = attention(qkv)  # (B, T, C)
    y, c_aproj = L.linear_forward(y, p("attn.w_proj"), p("attn.b_proj"))
    x = x + y  # residual
    m, c_ln2 = L.layernorm_forward(x, p("ln2.g"), p("ln2.b"))
    f, c_fc = L.linear_forward(m, p("mlp.w_fc"), p("mlp.b_fc"))  # (B, T, 4C)
    f, c_gelu = L.gelu_forward(f)
    f, c_mproj = L.linear_forward(f, p("mlp.w_proj"), p("mlp.b_proj"))  # (B, T, C)
    return x + f, (c_ln1, c_qkv, c_att, c_aproj, c_ln2, c_fc, c_gelu, c_mproj)  # residual


def block_backward(dx, cache, L=layers):
    """Undoes block_forward: dLoss/dx out -> dLoss/dx in and the block's gradients (names without h{l}.)."""
    c_ln1, c_qkv, c_att, c_aproj, c_ln2, c_fc, c_gelu, c_mproj = cache
    g = {}
    # x = x + f: the residual stream's gradient flows on unchanged, and also into the MLP branch
    df, g["mlp.w_proj"], g["mlp.b_proj"] = L.linear_backward(dx, c_mproj)
    df = L.gelu_backward(df, c_gelu)
    dm, g["mlp.w_fc"], g["mlp.b_fc"] = L.linear_backward(df, c_fc)
    dx_mlp, g["ln2.g"], g["ln2.b"] = L.layernorm_backward(dm, c_ln2)
    dx = dx + dx_mlp  # two paths into x: the residual and the branch
    # x = x + y: the same for the attention branch
    dy, g["attn.w_proj"], g["attn.b_proj"] = L.linear_backward(dx, c_aproj)
    dqkv = L.attention_backward(dy, c_att)
    da, g["attn.w_qkv"], g["attn.b_qkv"] = L.linear_backward(dqkv, c_qkv)
    dx_att, g["ln1.g"], g["ln1.b"] = L.layernorm_backward(da, c_ln1)
    return dx + dx_att, g


# ---------------------------------------------------------------- trunk and language model

def trunk_forward(params, model_cfg, tokens, mask, L=layers):
    """The trunk on checked tokens and a mask: h (B, T, C) and the cache `trunk_backward` needs."""
    allowed = L.attention_mask(mask)  # (B, 1, T, T)
    x_tok, c_tok = L.embedding_forward(params["wte"], tokens)
    x_pos, c_pos = L.embedding_forward(params["wpe"], positions_from_mask(mask))
    x = x_tok + x_pos  # (B, T, C)
    blocks = []
    for l in range(model_cfg.n_layer):
        x, c_block = block_forward(x, lambda name: params[f"h{l}.{name}"],  # noqa: B023  (called at once)
                                   lambda qkv: L.attention_forward(qkv, model_cfg.n_head, allowed), L)
        blocks.append(c_block)
    h, c_lnf = L.layernorm_forward(x, params["ln_f.g"], params["ln_f.b"])
    return h, (model_cfg, L, c_tok, c_pos, blocks, c_lnf)


def trunk_backward(dh, cache):
    """Undoes `trunk_forward`: dLoss/dh -> grads for every trunk parameter."""
    model_cfg, L, c_tok, c_pos, blocks, c_lnf = cache
    dh = np.asarray(dh).astype(c_lnf[0].dtype, copy=False)  # the model's float type wins over the cotangent's
    g = {}
    dx, g["ln_f.g"], g["ln_f.b"] = L.layernorm_backward(dh, c_lnf)
    for l in reversed(range(model_cfg.n_layer)):
        dx, g_block = block_backward(dx, blocks[l], L)
        g.update({f"h{l}.{name}": grad for name, grad in g_block.items()})
    g["wte"] = L.embedding_backward(dx, c_tok)  # x_0 = wte[tokens] + wpe[pos]
    g["wpe"] = L.embedding_backward(dx, c_pos)
    return {name: g[name] for name in param_shapes(model_cfg)}


def lm_forward(params, model_cfg, tokens, mask, L=layers):
    """The trunk and the tied LM head: logits (B, T, V), cache."""
    h, c_trunk = trunk_forward(params, model_cfg, tokens, mask, L)
    logits = h @ params["wte"].T  # tied LM head
    return logits, (c_trunk, h, params["wte"])


def lm_backward(dlogits, cache):
    """Undoes `lm_forward`: dLoss/dlogits -> grads for every parameter."""
    c_trunk, h, wte = cache
    C = h.shape[-1]
    dlogits = np.asarray(dlogits).astype(h.dtype, copy=False)  # float32 stays float32 under a float64 cotangent
    grads = trunk_backward(dlogits @ wte, c_trunk)  # logits = h wte^T
    # wte feeds two places, the lookup and the head: add the head's gradient to the lookup's
    grads["wte"] = grads["wte"] + dlogits.reshape(-1, wte.shape[0]).T @ h.reshape(-1, C)
    return grads


# ---------------------------------------------------------------- the entry points every stage calls

def hidden_forward(params, model_cfg, tokens, mask=None):
    """tokens (B, T), mask (B, T) 0/1 or None (all real) -> final hidden states h (B, T, C), cache."""
    check_params(params, model_cfg)
    return fast.run_forward(trunk_forward, params, model_cfg, *check_tokens(model_cfg, tokens, mask))


def hidden_backward(dh, cache):
    """dLoss/dh (B, T, C) -> grads for every trunk parameter (wte gets the lookup's part only)."""
    return fast.run_backward(trunk_backward, dh, cache)


def forward(params, model_cfg, tokens, mask=None):
    """tokens (B, T) -> logits (B, T, V) for the next token at every position, cache."""
    check_params(params, model_cfg)
    return fast.run_forward(lm_forward, params, model_cfg, *check_tokens(model_cfg, tokens, mask))


def backward(dlogits, cache):
    """dLoss/dlogits (B, T, V) -> grads with the keys and shapes of params."""
    return fast.run_backward(lm_backward, dlogits, cache)


# ---------------------------------------------------------------- generation with a KV cache

def decode_step(params, model_cfg, tokens, pos, kv, key_mask, t0, L=layers):
    """Run new tokens (B, Tn) at cache slots t0 .. t0+Tn-1 and return their logits (B, Tn, V).

    kv[l] = (K, V) arrays (B, H, n_ctx, D) filled in place; key_mask (B, n_ctx) marks real slots. The same
    blocks as `trunk_forward`; only attention differs: it reads every key and value so far from the cache.
    """
    B, Tn = tokens.shape
    H, C = model_cfg.n_head, model_cfg.n_embd
    t1 = t0 + Tn
    causal = np.arange(t1)[None, :] <= np.arange(t0, t1)[:, None]  # (Tn, t1): slot j <= query slot i
    allowed = (causal & (key_mask[:, None, None, :t1] > 0)) | (np.arange(t1) == np.arange(t0, t1)[:, None])

    def cached_attention(K, Vc):
        def attention(qkv):
            q, k, v = qkv.reshape(B, Tn, 3, H, C // H).transpose(2, 0, 3, 1, 4)
            K[:, :, t0:t1], Vc[:, :, t0:t1] = k, v
            o, _ = L.attend(q, K[:, :, :t1], Vc[:, :, :t1], allowed)
            return o.transpose(0, 2, 1, 3).reshape(B, Tn, C), None
        return attention

    x = params["wte"][tokens] + params["wpe"][pos]
    for l in range(model_cfg.n_layer):
        x, _ = block_forward(x, lambda name: params[f"h{l}.{name}"], cached_attention(*kv[l]), L)  # noqa: B023
    h, _ = L.layernorm_forward(x, params["ln_f.g"], params["ln_f.b"])
    return h @ params["wte"].T


def sample_categorical(probs, rng):
    """One draw per row of probs (B, V) by inverting the CDF with one uniform per row."""
    u = rng.random((probs.shape[0], 1))
    idx = (np.cumsum(probs, axis=-1) < u).sum(axis=-1)
    return np.minimum(idx, probs.shape[-1] - 1)  # guards u above a CDF that rounds to just below 1


def generate(params, model_cfg, prompts, prompt_mask, max_new_tokens, rng, temperature=1.0, return_logits=False,
             adapter=None):
    """Sample responses to a batch of left-padded prompts, one token at a time with a KV cache.

    prompts, prompt_mask: (B, P). Samples from softmax(logits / temperature) (no top-k / top-p); a row
    stops at its first EOS or after max_new_tokens; adapter: a LoRA adapter on params, or None. Returns dict:
        tokens   (B, N) sampled response tokens, PAD after a row's EOS (N = longest response)
        logprobs (B, N) log-prob of each sampled token under softmax(logits / temperature), 0 on padding
        mask     (B, N) 1 on response tokens, EOS included
        ended    (B,)   True where the row emitted EOS
        logits   (B, N, V) the raw logits behind each sample (only with return_logits=True)
    One uniform per row per step is drawn from rng, whether or not the row has ended.
    """
    P = np.shape(prompts)[1] if np.ndim(prompts) == 2 else 0
    if P >= model_cfg.n_ctx:  # said of the prompt before check_tokens speaks of a sequence
        raise ValueError(f"a prompt of length {P} fills n_ctx={model_cfg.n_ctx}: no room for a response")
    prompts, prompt_mask = check_tokens(model_cfg, prompts, prompt_mask)
    B, P = prompts.shape
    validate.count("generate", "max_new_tokens", max_new_tokens)
    if P + max_new_tokens > model_cfg.n_ctx:
        raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds n_ctx={model_cfg.n_ctx}")
    validate.number("generate", "temperature", temperature, low=0, low_open=True)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"generate: rng must be a numpy.random.Generator, got {type(rng).__name__}")
    ops = fast.decode_ops()
    if adapter is not None:
        from .lora import wrap  # lora.py: the base's linear layers with the adapter's low-rank update
        params, ops = wrap(params, adapter, ops)
    dtype = params["wte"].dtype
    H, D = model_cfg.n_head, model_cfg.n_embd // model_cfg.n_head
    kv = [(np.zeros((B, H, model_cfg.n_ctx, D), dtype), np.zeros((B, H, model_cfg.n_ctx, D), dtype))
          for _ in range(model_cfg.n_layer)]
    key_mask = np.zeros((B, model_cfg.n_ctx), np.int64)
    key_mask[:, :P] = prompt_mask
    pos = positions_from_mask(prompt_mask)
    logits = decode_step(params, model_cfg, prompts, pos, kv, key_mask, 0, ops)[:, -1]  # (B, V) after the prompt
    next_pos = prompt_mask.sum(axis=1)  # (B,)
    tokens, logps, all_logits = [], [], []
    alive = np.ones(B, dtype=bool)
    for t in range(max_new_tokens):
        logp = layers.log_softmax(logits / temperature)
        tok = sample_categorical(np.exp(logp), rng)
        tokens.append(np.where(alive, tok, PAD))
        logps.append(np.where(alive, logp[np.arange(B), tok], 0).astype(dtype))
        all_logits.append(logits)
        alive = alive & (tok != EOS)
        if not alive.any() or t == max_new_tokens - 1:
            break
        key_mask[:, P + t] = 1  # the new token is a real key for what follows
        logits = decode_step(params, model_cfg, tokens[-1][:, None], next_pos[:, None] + t, kv, key_mask, P + t,
                             ops)[:, 0]
    out = {"tokens": np.stack(tokens, 1), "logprobs": np.stack(logps, 1)}
    out["mask"], out["ended"] = response_mask(out["tokens"]), (out["tokens"] == EOS).any(axis=1)
    if return_logits:
        out["logits"] = np.stack(all_logits, 1)
    return out


# ---------------------------------------------------------------- a policy: a model and how it samples

@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # tau: sample from softmax(logits / tau); the samples are scored at the same tau
    max_new_tokens: int = 32  # response length cap; a response that reaches it without EOS has no EOS

    def __post_init__(self):
        object.__setattr__(self, "temperature", validate.number("Sampling", "temperature", self.temperature,
                                                                low=0, low_open=True))
        object.__setattr__(self, "max_new_tokens", validate.count("Sampling", "max_new_tokens", self.max_new_tokens))


@dataclass(frozen=True)
class Policy:
    """A language model that samples: its parameters, its config and its Sampling, and optionally a LoRA
    adapter (lora.Adapter): then params is the frozen base and the adapter's weights are what trains."""
    params: dict  # parameter name -> array (param_shapes); trained in place unless there is an adapter
    model_cfg: GPTConfig  # the architecture
    sampling: Sampling = field(default_factory=Sampling)  # how it samples, and so how its samples are scored
    adapter: object = None  # a lora.Adapter, or None for a fully fine-tuned model

    @property
    def temperature(self):
        return self.sampling.temperature


def copy_policy(policy, **changes):
    """A Policy with its own copy of the parameters (and any field replaced, e.g. sampling=...)."""
    return replace(policy, params={k: v.copy() for k, v in policy.params.items()}, **changes)


def policy_forward(policy, tokens, mask=None):
    """A policy's logits (B, T, V) and cache: `forward` of its parameters, through its adapter if it has one."""
    if policy.adapter is None:
        return forward(policy.params, policy.model_cfg, tokens, mask)
    from .lora import adapted_forward  # lora.py: only a LoRA policy needs it
    return adapted_forward(policy, tokens, mask)


def policy_backward(dlogits, cache):
    """Undoes policy_forward: the gradients of the policy's trainable arrays (`trainable`)."""
    if isinstance(cache, list):  # forward's cache: a full model
        return backward(dlogits, cache)
    from .lora import adapted_backward
    return adapted_backward(dlogits, cache)


def trainable(policy):
    """The arrays an optimiser updates: the parameters, or the adapter's weights for a LoRA policy."""
    return policy.params if policy.adapter is None else policy.adapter.weights


def sample_responses(policy, prompt_texts, rng, batch_size=256):
    """The sampler every stage uses: one response per prompt text, [(response_text, ended)], ended = it
    emitted EOS. Batches of batch_size prompts, left-padded (tokenizer.encode_prompts)."""
    validate.count("sample_responses", "batch_size", batch_size)
    out = []
    for i in range(0, len(prompt_texts), batch_size):
        tokens, mask = encode_prompts(prompt_texts[i:i + batch_size])
        gen = generate(policy.params, policy.model_cfg, tokens, mask, policy.sampling.max_new_tokens, rng,
                       policy.temperature, adapter=policy.adapter)
        out += [(decode(row), bool(e)) for row, e in zip(gen["tokens"], gen["ended"])]
    return out
