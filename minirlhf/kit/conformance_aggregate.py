"""The conformance kit, part 4: what turns the critic-free methods' per-token terms into a loss
(grpo_objective.py): the aggregators' per-token weights c_it and the aggregated loss, with micro-batches that
must add up to the whole batch, and the KL as a loss term (k1, k2, k3, rho k3) with its gradient. The
calling convention, the padding rules and what a failure says: conformance.py; tolerances as in
conformance_grpo.py, derived from float64's rounding and the size of the terms.
"""
import numpy as np

from .. import grpo_objective as go
from .conformance import compare, hold, named
from .gradcheck import EPS64, OP_TOL, rounding_tol, vjp_errors
from .strategies import SEEDS


# ---------------------------------------------------------------- aggregators

def _micro_batch(r):
    """(mask (B, T) with rows of lengths 0..T, its whole batch's n_rows >= B and n_tokens >= its own, L_max)."""
    B, T = int(r.integers(1, 5)), int(r.integers(1, 6))
    mask = (np.arange(T)[None] < r.integers(0, T + 1, (B, 1))).astype(np.int64)
    mask[0, 0] = 1  # at least one valid token
    return mask, B + int(r.integers(0, 4)), int(mask.sum() + r.integers(0, 9)), T + int(r.integers(0, 3))


def expected_weights(mask, max_len, n_rows, n_tokens):
    lengths = mask.sum(1, keepdims=True)
    c = {"seq_mean_token_mean": 1 / (n_rows * np.maximum(lengths, 1)), "token_mean": 1 / n_tokens,
         "constant": 1 / (n_rows * max_len), "seq_sum": 1 / n_rows}
    return {k: np.where(mask > 0, v, 0.0) for k, v in c.items()}


@named("token_weights")
def check_token_weights(forward, max_examples=30):
    """forward(mask, max_len, n_rows, n_tokens) -> {aggregator: c (B, T)}: 1/(n_rows L_i), 1/n_tokens,
    1/(n_rows L_max), 1/n_rows on valid tokens, 0 at padding; the normaliser is the one given (a micro-batch's
    whole batch), so micro-batches with the whole batch's counts get the whole batch's weights."""
    def prop(seed):
        r = np.random.default_rng(seed)
        mask, n_rows, n_tokens, max_len = _micro_batch(r)
        inputs = {"mask": mask, "max_len": max_len, "n_rows": n_rows, "n_tokens": n_tokens}
        compare("token_weights", forward(**inputs), expected_weights(mask, max_len, n_rows, n_tokens),
                rounding_tol(2), f"c_it of a micro-batch of {len(mask)} of {n_rows} rows and {mask.sum()} of "
                f"{n_tokens} tokens, L_max {max_len} [aggregators, whole_batch_normaliser]", inputs)
        cut = int(r.integers(0, len(mask) + 1))
        parts = [forward(mask=m, max_len=max_len, n_rows=len(mask), n_tokens=int(mask.sum()))
                 for m in (mask[:cut], mask[cut:]) if len(m)]
        whole = expected_weights(mask, max_len, len(mask), int(mask.sum()))
        compare("token_weights", {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in whole}, whole,
                rounding_tol(2), "two micro-batches with the whole batch's counts get its weights "
                "[whole_batch_normaliser]")
    return hold(SEEDS, prop, max_examples)


@named("aggregate")
def check_aggregate(forward, vjp=None, max_examples=20):
    """sum_it c_it l_it for every aggregator (padding holds finite garbage), its gradient c_it dout, and
    micro-batch losses with the whole batch's counts adding up to the full batch's loss."""
    def prop(seed):
        r = np.random.default_rng(seed)
        mask, n_rows, n_tokens, max_len = _micro_batch(r)
        losses = np.where(mask > 0, r.uniform(-3, 3, mask.shape), 7.0)
        c = expected_weights(mask, max_len, n_rows, n_tokens)
        tol = rounding_tol(mask.size, 3.0)
        for kind in go.AGGREGATORS:
            inputs = {"losses": losses, "mask": mask, "kind": kind, "max_len": max_len, "n_rows": n_rows,
                      "n_tokens": n_tokens}
            compare("aggregate", forward(**inputs), (c[kind] * np.where(mask > 0, losses, 0)).sum(), tol,
                    f"the {kind} loss of a micro-batch [aggregators, whole_batch_normaliser]", inputs)
            if vjp is not None:
                compare("aggregate", vjp(np.asarray(1.5), **inputs)["losses"], 1.5 * c[kind], tol,
                        f"the {kind} loss's gradient c_it dout [aggregators]")
            cut = int(r.integers(0, len(mask) + 1))
            whole = {"kind": kind, "max_len": max_len, "n_rows": n_rows, "n_tokens": n_tokens}
            parts = sum(float(forward(losses=losses[s], mask=mask[s], **whole)) for s in (slice(0, cut),
                                                                                     slice(cut, None))
                        if len(mask[s]))
            compare("aggregate", parts, float(forward(**inputs)), tol, f"the {kind} losses of two micro-batches "
                    f"add up to the batch's [whole_batch_normaliser]")
    hold(SEEDS, prop, max_examples)
    r = np.random.default_rng(20)
    mask, n_rows, n_tokens, max_len = _micro_batch(r)
    errors = {}
    for kind in go.AGGREGATORS:
        inputs = {"losses": r.standard_normal(mask.shape) + 0.1, "mask": mask, "kind": kind, "max_len": max_len,
                  "n_rows": n_rows, "n_tokens": n_tokens}
        errors.update({f"{kind}": e for e in vjp_errors(forward, vjp, inputs, ["losses"], OP_TOL).values()})
    return errors


# ---------------------------------------------------------------- the KL as a loss term

KL_VALUES = {"k1": lambda d, rho: d, "k2": lambda d, rho: d * d / 2, "k3": lambda d, rho: np.expm1(-d) + d,
             "rho_k3": lambda d, rho: rho * (np.expm1(-d) + d)}
KL_GRADS = {"k1": lambda d, rho: np.ones_like(d), "k2": lambda d, rho: d, "k3": lambda d, rho: -np.expm1(-d),
            "rho_k3": lambda d, rho: rho * d}
# the size of the terms a correct gradient may be computed from: autograd's rho k3 + rho (1 - e^-d) for rho_k3
KL_GRAD_TERMS = {"k1": lambda d, rho: np.ones_like(d), "k2": lambda d, rho: np.abs(d),
                 "k3": lambda d, rho: 1 + np.exp(-d), "rho_k3": lambda d, rho: rho * (2 + 2 * np.exp(-d) + np.abs(d))}


def _kl_inputs(kind, d, rho_log, r):
    mask = (np.arange(d.shape[1])[None] < r.integers(1, d.shape[1] + 1, (len(d), 1))).astype(np.int64)
    logp = np.where(mask > 0, r.uniform(-3, -0.5, d.shape), 0.7)
    inputs = {"logp": logp, "logp_ref": np.where(mask > 0, logp - d, -0.4), "mask": mask, "kind": kind}
    if kind == "rho_k3":
        inputs["logp_old"] = logp - np.where(mask > 0, rho_log, 0)
    return inputs, mask


def _kl_check(kind):
    name = f"kl_loss_{kind}"

    def check(forward, vjp=None, max_examples=20):
        def prop(seed):
            r = np.random.default_rng(seed)
            d, rho_log = r.uniform(-20, 20, (3, 4)), r.uniform(-2, 2, (3, 4))
            inputs, mask = _kl_inputs(kind, d, rho_log, r)
            d, rho = inputs["logp"] - inputs["logp_ref"], np.exp(rho_log)
            tol = rounding_tol(4, 4.0)  # relative to 1 + |value|: a few roundings of exp, expm1 and products
            compare(name, forward(**inputs), np.where(mask > 0, KL_VALUES[kind](d, rho), 0), tol,
                    f"{kind} per token, 0 at padding [kl_loss]", inputs)
            if vjp is not None:
                grad = np.where(mask > 0, KL_GRADS[kind](d, rho), 0)
                size = np.where(mask > 0, KL_GRAD_TERMS[kind](d, rho), 0) / (1 + np.abs(grad))
                compare(name, vjp(np.ones(mask.shape), **inputs)["logp"], grad, rounding_tol(4, size.max()),
                        f"d{kind}/dlogp (logp_old held fixed) [kl_loss]")
        hold(SEEDS, prop, max_examples)
        r = np.random.default_rng(21)
        logp = r.uniform(-3, -0.5, (1, 4))
        far = {"logp": logp, "logp_ref": logp - np.array([[-50.0, 50.0, -12.0, 12.0]]),
               "mask": np.ones((1, 4), np.int64), "kind": kind, **({"logp_old": logp} if kind == "rho_k3" else {})}
        compare(name, forward(**far), KL_VALUES[kind](logp - far["logp_ref"], 1.0), rounding_tol(4, 4.0),
                f"{kind} at log-ratios of +-50 and +-12: no clamp, no overflow [kl_loss]", far)
        if kind in ("k3", "rho_k3"):  # near d = 0: exp(-d) - 1 + d cancels (and goes negative in float32)
            tiny = np.array([[1e-9, -1e-9, 1e-6, -3e-4, 3e-4]])
            near = {"logp": np.zeros((1, 5)), "logp_ref": -tiny, "mask": np.ones((1, 5), np.int64), "kind": kind,
                    **({"logp_old": np.zeros((1, 5))} if kind == "rho_k3" else {})}
            got = np.asarray(forward(**near), np.float64)
            exact = tiny ** 2 / 2 - tiny ** 3 / 6 + tiny ** 4 / 24
            assert np.all(got >= 0) and np.all(np.abs(got - exact) <= 4 * EPS64 * (np.abs(tiny) + exact)), (
                f"{kind} near d = 0: got {got.ravel()}, expected {exact.ravel()} to a few eps of |d|: k3 = "
                f"expm1(-d) + d, not exp(-d) - 1 + d (which cancels) [kl_loss]")
        d, rho_log = r.uniform(-2, 2, (3, 4)) + 0.1, r.uniform(-1, 1, (3, 4))
        inputs, _ = _kl_inputs(kind, d, rho_log, r)
        return vjp_errors(forward, vjp, inputs, ["logp"], OP_TOL)
    check.__doc__ = (f"{kind} per token with d = logp - logp_ref: value and gradient (k1: d, 1; k2: d^2/2, d; k3: "
                     f"expm1(-d) + d, 1 - e^-d; rho_k3: rho k3, rho d), no clamp at +-50, k3 exact near d = 0.")
    return named(name)(check)


check_kl_loss_k1, check_kl_loss_k2, check_kl_loss_k3, check_kl_loss_rho_k3 = (_kl_check(k) for k in go.KL_LOSSES)
