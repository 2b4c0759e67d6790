"""A GPT-2 style transformer with a hand-written backward pass and KV-cache generation.

    x_0 = wte[tokens] + wpe[positions]                  positions = cumsum(mask) - mask
    for each block l:
        x = x + attn_proj(causal_self_attention(ln1(x)))  pre-LN, as GPT-2
        x = x + mlp_proj(gelu(mlp_fc(ln2(x))))            4x hidden width
    h = ln_f(x)                                           final hidden state: the trunk's output
    logits = h wte^T                                      LM head tied to the token embedding

No dropout anywhere (RLHF_REFERENCE.md: it breaks log-prob reproducibility). Positions come from the
mask, so a left-padded prompt gives each real token the position it would have unpadded, and no real
token attends to a pad: padding never changes a real token's logits.

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

The trunk (`hidden_forward` / `hidden_backward`) is public so a scalar head (reward, value) can sit on it
without copying the transformer; `forward` / `backward` add the tied LM head. The math is in
`_trunk_forward` / `_trunk_backward` and `_lm_forward` / `_lm_backward`, read top to bottom. The public
functions run them on a big batch as two halves on two threads and add the halves' gradients (fast.py
says what that buys, tests/test_fast_paths.py that it agrees with one whole batch).
"""
from dataclasses import dataclass

import numpy as np

from . import fast
from . import layers as L
from .tokenizer import EOS, PAD


@dataclass(frozen=True)
class Config:
    vocab_size: int  # V: token ids are 0 .. V-1
    n_ctx: int  # longest sequence (prompt + response) the position table covers
    n_layer: int  # number of transformer blocks
    n_head: int  # attention heads per block; must divide n_embd
    n_embd: int  # C: width of the residual stream

    def __post_init__(self):
        for name in ("vocab_size", "n_ctx", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), (int, np.integer)) or getattr(self, name) <= 0:
                raise ValueError(f"Config.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")


def param_shapes(cfg):
    """name -> shape of every parameter, in a fixed order."""
    V, C = cfg.vocab_size, cfg.n_embd
    shapes = {"wte": (V, C), "wpe": (cfg.n_ctx, C)}
    for l in range(cfg.n_layer):
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


def init_params(cfg, rng, dtype=np.float32):
    """GPT-2 initialisation, drawn in the fixed order of param_shapes."""
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(".g"):
            params[name] = np.ones(shape, dtype)
        elif len(shape) == 1:
            params[name] = np.zeros(shape, dtype)
        else:
            std = 0.02 / np.sqrt(2 * cfg.n_layer) if name.endswith("_proj") else 0.02
            params[name] = (rng.standard_normal(shape) * std).astype(dtype)
    return params


def positions_from_mask(mask):
    """Position of each token among the real tokens of its row: cumsum(mask) - mask. (B, T) -> (B, T)."""
    return np.cumsum(mask, axis=1) - mask


def check_tokens(cfg, tokens, mask=None):
    """ValueError unless tokens is a (B, T) int array of ids < V with T <= n_ctx (mask of the same shape)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 2-D integer array (B, T), got shape {tokens.shape} "
                         f"dtype {tokens.dtype}")
    if tokens.shape[1] > cfg.n_ctx:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds n_ctx={cfg.n_ctx}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= cfg.vocab_size)][0]
        raise ValueError(f"token id {bad} is out of range [0, {cfg.vocab_size})")
    if mask is not None and np.shape(mask) != tokens.shape:
        raise ValueError(f"mask shape {np.shape(mask)} differs from tokens shape {tokens.shape}")
    return tokens


# ---------------------------------------------------------------- trunk

def _trunk_forward(params, cfg, tokens, mask):
    """The trunk on checked tokens and a mask: h (B, T, C) and the cache `_trunk_backward` needs."""
    pos = positions_from_mask(mask)
    allowed = L.attention_mask(mask)  # (B, 1, T, T)
    x_tok, c_tok = L.embedding_forward(params["wte"], tokens)
    x_pos, c_pos = L.embedding_forward(params["wpe"], pos)
    x = x_tok + x_pos  # (B, T, C)
    blocks = []
    for l in range(cfg.n_layer):
        p = lambda name: params[f"h{l}.{name}"]  # noqa: E731  (one block's parameters)
        a, c_ln1 = L.layernorm_forward(x, p("ln1.g"), p("ln1.b"))
        qkv, c_qkv = L.linear_forward(a, p("attn.w_qkv"), p("attn.b_qkv"))  # (B, T, 3C)
        y, c_att = L.attention_forward(qkv, cfg.n_head, allowed)  # (B, T, C)
        y, c_aproj = L.linear_forward(y, p("attn.w_proj"), p("attn.b_proj"))
        x = x + y  # residual
        m, c_ln2 = L.layernorm_forward(x, p("ln2.g"), p("ln2.b"))
        f, c_fc = L.linear_forward(m, p("mlp.w_fc"), p("mlp.b_fc"))  # (B, T, 4C)
        f, c_gelu = L.gelu_forward(f)
        f, c_mproj = L.linear_forward(f, p("mlp.w_proj"), p("mlp.b_proj"))  # (B, T, C)
        x = x + f  # residual
        blocks.append((c_ln1, c_qkv, c_att, c_aproj, c_ln2, c_fc, c_gelu, c_mproj))
    h, c_lnf = L.layernorm_forward(x, params["ln_f.g"], params["ln_f.b"])
    return h, (cfg, c_tok, c_pos, blocks, c_lnf)


def _trunk_backward(dh, cache):
    """Undoes `_trunk_forward`: dLoss/dh -> grads for every trunk parameter."""
    cfg, c_tok, c_pos, blocks, c_lnf = cache
    g = {}
    dx, g["ln_f.g"], g["ln_f.b"] = L.layernorm_backward(dh, c_lnf)
    for l in reversed(range(cfg.n_layer)):
        c_ln1, c_qkv, c_att, c_aproj, c_ln2, c_fc, c_gelu, c_mproj = blocks[l]
        n = f"h{l}."
        # x = x + f: the residual stream's gradient flows on unchanged, and also into the MLP branch
        df, g[n + "mlp.w_proj"], g[n + "mlp.b_proj"] = L.linear_backward(dx, c_mproj)
        df = L.gelu_backward(df, c_gelu)
        dm, g[n + "mlp.w_fc"], g[n + "mlp.b_fc"] = L.linear_backward(df, c_fc)
        dx_mlp, g[n + "ln2.g"], g[n + "ln2.b"] = L.layernorm_backward(dm, c_ln2)
        dx = dx + dx_mlp  # two paths into x: the residual and the branch
        # x = x + y: the same for the attention branch
        dy, g[n + "attn.w_proj"], g[n + "attn.b_proj"] = L.linear_backward(dx, c_aproj)
        dqkv = L.attention_backward(dy, c_att)
        da, g[n + "attn.w_qkv"], g[n + "attn.b_qkv"] = L.linear_backward(dqkv, c_qkv)
        dx_att, g[n + "ln1.g"], g[n + "ln1.b"] = L.layernorm_backward(da, c_ln1)
        dx = dx + dx_att
    g["wte"] = L.embedding_backward(dx, c_tok)  # x_0 = wte[tokens] + wpe[pos]
    g["wpe"] = L.embedding_backward(dx, c_pos)
    return {name: g[name] for name in param_shapes(cfg)}


# ---------------------------------------------------------------- language model

def _lm_forward(params, cfg, tokens, mask):
    """The trunk and the tied LM head: logits (B, T, V), cache."""
    h, c_trunk = _trunk_forward(params, cfg, tokens, mask)
    logits = h @ params["wte"].T  # tied LM head
    return logits, (c_trunk, h, params["wte"])


def _lm_backward(dlogits, cache):
    """Undoes `_lm_forward`: dLoss/dlogits -> grads for every parameter."""
    c_trunk, h, wte = cache
    C = h.shape[-1]
    grads = _trunk_backward(dlogits @ wte, c_trunk)  # logits = h wte^T
    # wte feeds two places, the lookup and the head: add the head's gradient to the lookup's
    grads["wte"] = grads["wte"] + dlogits.reshape(-1, wte.shape[0]).T @ h.reshape(-1, C)
    return grads


# ---------------------------------------------------------------- the public entry points: a batch in parts

def hidden_forward(params, cfg, tokens, mask=None):
    """tokens (B, T), mask (B, T) 0/1 or None (all real) -> final hidden states h (B, T, C), cache."""
    return _forward_in_parts(_trunk_forward, params, cfg, tokens, mask)


def hidden_backward(dh, cache):
    """dLoss/dh (B, T, C) -> grads for every trunk parameter (wte gets the lookup's part only)."""
    return _backward_in_parts(_trunk_backward, dh, cache)


def forward(params, cfg, tokens, mask=None):
    """tokens (B, T) -> logits (B, T, V) for the next token at every position, cache."""
    return _forward_in_parts(_lm_forward, params, cfg, tokens, mask)


def backward(dlogits, cache):
    """dLoss/dlogits (B, T, V) -> grads with the keys and shapes of params."""
    return _backward_in_parts(_lm_backward, dlogits, cache)


def _forward_in_parts(fn, params, cfg, tokens, mask):
    """fn(params, cfg, tokens, mask) -> (out, cache) on a big batch's two halves, on two threads.

    Rows never interact, so each half is the whole computation on its rows (fast.py says what this buys).
    The cache lists (rows, the part's cache).
    """
    tokens = check_tokens(cfg, tokens, mask)
    mask = np.ones(tokens.shape, np.int64) if mask is None else np.asarray(mask)
    parts = fast.batch_parts(*tokens.shape)
    outs = fast.run_parts(lambda rows: fn(params, cfg, tokens[rows], mask[rows]), parts)
    out = outs[0][0] if len(parts) == 1 else np.concatenate([out_part for out_part, _ in outs])
    return out, [(rows, c_part) for rows, (_, c_part) in zip(parts, outs)]


def _backward_in_parts(fn, dout, cache):
    """Undoes `_forward_in_parts`: fn(dout[rows], part cache) -> grads on each part, summed."""
    grads = fast.run_parts(lambda part: fn(dout[part[0]], part[1]), cache)
    total = grads[0]
    for g in grads[1:]:  # every part uses the same parameters: add the parts' gradients, in a fixed order
        total = {name: total[name] + g[name] for name in total}
    return total


# ---------------------------------------------------------------- generation with a KV cache

def _decode(params, cfg, tokens, pos, kv, key_mask, t0):
    """Run new tokens (B, Tn) at cache slots t0 .. t0+Tn-1 and return their logits (B, Tn, V).

    kv[l] = (K, V) arrays (B, H, n_ctx, D) filled in place; key_mask (B, n_ctx) marks real slots.
    The same layer functions as `_trunk_forward`; only attention reads keys from the cache.
    """
    B, Tn = tokens.shape
    H, C = cfg.n_head, cfg.n_embd
    t1 = t0 + Tn
    causal = np.arange(t1)[None, :] <= np.arange(t0, t1)[:, None]  # (Tn, t1): slot j <= query slot i
    allowed = (causal & (key_mask[:, None, None, :t1] > 0)) | (np.arange(t1) == np.arange(t0, t1)[:, None])
    x = params["wte"][tokens] + params["wpe"][pos]
    for l in range(cfg.n_layer):
        p = lambda name: params[f"h{l}.{name}"]  # noqa: E731
        a, _ = L.layernorm_forward(x, p("ln1.g"), p("ln1.b"))
        qkv, _ = L.linear_forward(a, p("attn.w_qkv"), p("attn.b_qkv"))
        q, k, v = qkv.reshape(B, Tn, 3, H, C // H).transpose(2, 0, 3, 1, 4)
        K, Vc = kv[l]
        K[:, :, t0:t1], Vc[:, :, t0:t1] = k, v
        o, _ = L.attend(q, K[:, :, :t1], Vc[:, :, :t1], allowed)
        y, _ = L.linear_forward(o.transpose(0, 2, 1, 3).reshape(B, Tn, C), p("attn.w_proj"), p("attn.b_proj"))
        x = x + y
        m, _ = L.layernorm_forward(x, p("ln2.g"), p("ln2.b"))
        f, _ = L.linear_forward(m, p("mlp.w_fc"), p("mlp.b_fc"))
        f, _ = L.gelu_forward(f)
        f, _ = L.linear_forward(f, p("mlp.w_proj"), p("mlp.b_proj"))
        x = x + f
    h, _ = L.layernorm_forward(x, params["ln_f.g"], params["ln_f.b"])
    return h @ params["wte"].T


def sample_categorical(probs, rng):
    """One draw per row of probs (B, V) by inverting the CDF with one uniform per row."""
    u = rng.random((probs.shape[0], 1))
    idx = (np.cumsum(probs, axis=-1) < u).sum(axis=-1)
    return np.minimum(idx, probs.shape[-1] - 1)  # guards u above a CDF that rounds to just below 1


def generate(params, cfg, prompts, prompt_mask, max_new_tokens, rng, temperature=1.0, return_logits=False):
    """Sample responses to a batch of left-padded prompts, one token at a time with a KV cache.

    prompts, prompt_mask: (B, P). Samples from softmax(logits / temperature) (no top-k / top-p); a row
    stops at its first EOS or after max_new_tokens. Returns dict:
        tokens   (B, N) sampled response tokens, PAD after a row's EOS (N = longest response)
        logprobs (B, N) log-prob of each sampled token under softmax(logits / temperature), 0 on padding
        mask     (B, N) 1 on response tokens, EOS included
        ended    (B,)   True where the row emitted EOS
        logits   (B, N, V) the raw logits behind each sample (only with return_logits=True)
    One uniform per row per step is drawn from rng, whether or not the row has ended.
    """
    prompts = check_tokens(cfg, prompts, prompt_mask)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, P = prompts.shape
    if P + max_new_tokens > cfg.n_ctx:
        raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds n_ctx={cfg.n_ctx}")
    dtype = params["wte"].dtype
    H, D = cfg.n_head, cfg.n_embd // cfg.n_head
    kv = [(np.zeros((B, H, cfg.n_ctx, D), dtype), np.zeros((B, H, cfg.n_ctx, D), dtype))
          for _ in range(cfg.n_layer)]
    key_mask = np.zeros((B, cfg.n_ctx), np.int64)
    key_mask[:, :P] = prompt_mask
    pos = positions_from_mask(np.asarray(prompt_mask))
    logits = _decode(params, cfg, prompts, pos, kv, key_mask, 0)[:, -1]  # (B, V) after the prompt
    next_pos = np.asarray(prompt_mask).sum(axis=1)  # (B,)
    tokens, logps, masks, all_logits = [], [], [], []
    alive = np.ones(B, dtype=bool)
    for t in range(max_new_tokens):
        logp = L.log_softmax(logits / temperature)
        tok = sample_categorical(np.exp(logp), rng)
        tokens.append(np.where(alive, tok, PAD))
        logps.append(np.where(alive, logp[np.arange(B), tok], 0).astype(dtype))
        masks.append(alive.astype(np.int64))
        all_logits.append(logits)
        alive = alive & (tok != EOS)
        if not alive.any() or t == max_new_tokens - 1:
            break
        key_mask[:, P + t] = 1  # the new token is a real key for what follows
        logits = _decode(params, cfg, tokens[-1][:, None], next_pos[:, None] + t, kv, key_mask, P + t)[:, 0]
    out = {"tokens": np.stack(tokens, 1), "logprobs": np.stack(logps, 1), "mask": np.stack(masks, 1)}
    out["ended"] = (out["tokens"] == EOS).any(axis=1)
    if return_logits:
        out["logits"] = np.stack(all_logits, 1)
    return out
