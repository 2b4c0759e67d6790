"""Character tokenizer: a fixed vocabulary plus three reserved ids.

Every text character of the preference world maps to one id; three more ids are reserved and no character
uses them:

    PAD = 0   fills the unused places of a batch; masked out of every loss, never attended to
    BOS = 1   starts every sequence
    EOS = 2   ends a response; the reward model reads its score here, generation stops here

PAD is deliberately not EOS. When the two share an id (a common shortcut with GPT-2 tokenizers), masking
the padding also masks the real EOS, and a model trained that way never learns to stop
(minirlhf/CONVENTIONS.md, "Sequences").

A training example is laid out as

    BOS p_1 ... p_P r_1 ... r_R EOS

and `pad_batch` stacks examples into a (B, T) int array with a (B, T) mask (1 = real token, 0 = PAD).
Prompts for generation are *left* padded (`encode_prompts`), so every prompt ends in the same column and
sampling appends to the right; training sequences are right padded. The transformer derives positions from
the mask, so either side is correct. `last_real_index` finds where each row's real tokens end: the EOS a
reward model reads, the last response token that receives the score; `response_mask` marks a sampled
response's tokens, EOS included and everything after it out.
"""
import numpy as np

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")
# Lowercase letters, digits, space and the punctuation the preference world writes.
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,?!'+"
VOCAB_SIZE = len(SPECIALS) + len(CHARS)  # 46

_STOI = {ch: i + len(SPECIALS) for i, ch in enumerate(CHARS)}
_ITOS = np.array(list(SPECIALS) + list(CHARS), dtype=object)


def encode(text):
    """Text -> list of ids (no BOS/EOS added). Unknown characters raise ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__} {text!r}")
    ids = []
    for pos, ch in enumerate(text):
        if ch not in _STOI:
            raise ValueError(f"character {ch!r} at position {pos} of {text!r} is not in the vocabulary "
                             f"(allowed: {CHARS!r})")
        ids.append(_STOI[ch])
    return ids


def decode(ids, stop_at_eos=True):
    """ids -> text. Drops PAD and BOS; stops at the first EOS unless stop_at_eos is False."""
    out = []
    for i in np.asarray(ids).ravel().tolist():
        if not 0 <= i < VOCAB_SIZE:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {VOCAB_SIZE})")
        if i == EOS and stop_at_eos:
            break
        if i >= len(SPECIALS):
            out.append(_ITOS[i])
    return "".join(out)


def encode_example(prompt, response=None):
    """BOS prompt [response EOS]: the ids of one training example (or, without response, of one prompt)."""
    ids = [BOS] + encode(prompt)
    if response is not None:
        ids += encode(response) + [EOS]
    return ids


def pad_batch(seqs, side="right", length=None):
    """Stack lists of ids into (tokens, mask), both (B, T) int64; T = longest (or `length`).

    side="right" for training (real tokens first), "left" for prompts to generate from.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if len(seqs) == 0:
        raise ValueError("pad_batch needs at least one sequence")
    longest = max(len(s) for s in seqs)
    T = longest if length is None else length
    if longest > T:
        raise ValueError(f"a sequence of length {longest} does not fit in length={T}")
    tokens = np.full((len(seqs), T), PAD, dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=np.int64)
    for b, s in enumerate(seqs):
        if len(s) == 0:
            continue
        ids = np.asarray(s)
        if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0:  # a float would be truncated silently
            raise ValueError(f"sequence {b} must hold integer ids >= 0, got {ids.dtype} {ids.tolist()[:8]}")
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        tokens[b, sl] = ids
        mask[b, sl] = 1
    return tokens, mask


def encode_prompts(prompt_texts):
    """Prompt texts -> left-padded (tokens, mask) of `BOS prompt`, every row ending where its response begins."""
    return pad_batch([encode_example(p) for p in prompt_texts], side="left")


def last_real_index(mask):
    """Column of the last 1 of each row of a (B, T) 0/1 mask; ValueError if a row has none."""
    mask = np.asarray(mask)
    if not ((mask == 0) | (mask == 1)).all():  # a mask of 2s is a bug upstream, not a weight
        raise ValueError("mask must hold only 0 and 1 (or False and True)")
    real = mask > 0
    if real.ndim != 2 or not real.any(axis=1).all():
        empty = np.flatnonzero(~real.any(axis=1)).tolist() if real.ndim == 2 else []
        raise ValueError(f"mask must be (B, T) with at least one real token per row; rows {empty} have none")
    return real.shape[1] - 1 - np.argmax(real[:, ::-1], axis=1)


def response_mask(tokens):
    """(B, N) 0/1 mask of the response tokens of sampled rows: 1 up to and including a row's first EOS, 0 after
    it (a row without EOS is valid to its end). The mask every loss, KL and reward of a response covers."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 2-D integer array (B, N), got {tokens.dtype} {tokens.shape}")
    eos_before = np.cumsum(tokens == EOS, axis=1) - (tokens == EOS)  # EOS tokens strictly before each position
    return (eos_before == 0).astype(np.int64)
