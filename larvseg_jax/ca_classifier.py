"""Category-wise attentive classifier: the per-class pixel memory bank and its attention maps.

SPEC 2.4 (cross-image) and 2.5 (single-image). The bank is functional state: `Bank` plus pure
functions, carried in the train state, one bank per virtual device (group), never synchronised.
Pairs (image b, present label l) are visited by a `lax.scan` in the official loop order (b
ascending, then l ascending), so a class seen twice in one batch scores its second image against
the first image's freshly enqueued features, exactly as the reference does.

Scores against the bank are mean cosines over the M*K stored unit vectors; since both sides are
unit vectors, mean_j <f, v_j> = <f, mean_j v_j>, so the bank keeps each class's mean vector
(`means`, recomputed for the written row on every enqueue) and a pair costs one
[h*w, D] x [D, N] product instead of reading the whole bank.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from larvseg_jax import losses
from larvseg_jax.models import interp

ZSCORE_EPS = 1e-5


class Bank(NamedTuple):
    feats: jax.Array  # [C, M, K, D] unit top-K pixel features, M FIFO slots per union class
    ptr: jax.Array  # [C] int32 next slot to overwrite
    full: jax.Array  # [C] int32 completed passes over the M slots (warm-up reads this)
    means: jax.Array  # [C, D] mean of feats over (M, K), kept in sync with feats


@dataclasses.dataclass(frozen=True)
class CASettings:
    """Static CA-classifier options (SPEC 2.4 defaults; the fixes are off by default)."""

    memory_size: int = 20  # M, slots per class
    topk: int = 20  # K, pixel features enqueued per (image, label)
    warm_up: int = 1  # wraps of the fg class's bank before its aux term counts
    background: bool = True  # background suppression (False = SPEC B1: A == 0.5)
    bg_topk: int = 5  # single-label bg candidates: mean of the top-5 pixel scores ...
    bg_thresh: float = 0.2  # ... above this threshold
    bg_mse_thresh: float = 1.0  # decorrelation filter: keep a bg class if mse > this
    single_image: bool = False  # SPEC 2.5: enqueue the current image first, then score
    max_labels: int = 16  # static bound on labels per image (pairs are padded to it)
    mask_cold_background: bool = False  # fix B2: ignore bg classes whose bank never wrapped
    nan_safe_mse: bool = False  # fix B4: epsilon in the mse z-scores (constant maps kept)


def init_bank(
    rng: jax.Array, num_classes: int, memory_size: int, topk: int, dim: int, dtype=jnp.float32
) -> Bank:
    """Random unit vectors, pointers and wrap counters at zero (SPEC 2.4 state)."""
    feats = jax.random.normal(rng, (num_classes, memory_size, topk, dim), dtype)
    feats = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
    zeros = jnp.zeros((num_classes,), jnp.int32)
    return Bank(feats, zeros, zeros, jnp.mean(feats, axis=(1, 2)))


def enqueue(bank: Bank, row: jax.Array, slot_feats: jax.Array, valid: jax.Array) -> Bank:
    """Writes [K, D] features into slot ptr[row] of class `row` (FIFO) if `valid`."""
    m = bank.feats.shape[1]
    slot = bank.ptr[row]
    old_row = bank.feats[row]
    new_row = jnp.where(valid, old_row.at[slot].set(slot_feats.astype(old_row.dtype)), old_row)
    wrapped = valid & (slot == m - 1)
    return Bank(
        feats=bank.feats.at[row].set(new_row),
        ptr=bank.ptr.at[row].set(jnp.where(valid, (slot + 1) % m, slot)),
        full=bank.full.at[row].add(wrapped.astype(jnp.int32)),
        means=bank.means.at[row].set(jnp.mean(new_row, axis=(0, 1))),
    )


def pair_list(present: jax.Array, max_labels: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pairs in loop order: labels [B, L] ascending per image, padded; valid [B, L]; count [B]."""
    labels = jax.vmap(lambda p: jnp.nonzero(p, size=max_labels, fill_value=0)[0])(present)
    count = jnp.sum(present, axis=-1)
    valid = jnp.arange(max_labels)[None] < count[:, None]
    return labels.astype(jnp.int32), valid, count


def _zscore(x: jax.Array, *, ddof: int, eps: float) -> jax.Array:
    return (x - jnp.mean(x, 0)) / jnp.sqrt(jnp.var(x, 0, ddof=ddof) + eps)


def top_score_mean(score: jax.Array, k: int) -> jax.Array:
    """[..., P, N] raw scores -> [..., N] mean of each class's top-k pixel scores (bg candidates)."""
    k = min(k, score.shape[-2])
    return jnp.mean(jax.lax.top_k(jnp.swapaxes(score, -1, -2), k)[0], axis=-1)


def background_mask(
    s_vocab: jax.Array,
    s_fg: jax.Array,
    label: jax.Array,
    present: jax.Array,
    n_labels: jax.Array,
    top_mean: jax.Array,
    bank_full: jax.Array,
    cfg: CASettings,
) -> jax.Array:
    """[N] bool background classes of one pair (SPEC 2.4 step 2).

    Multi-label image: every other ground-truth class. Single-label image: classes whose mean of
    the top-5 raw pixel scores exceeds bg_thresh, minus the label, filtered by the decorrelation
    test mse(z(S_fg), z(S_bg_c)) > bg_mse_thresh with unbiased std and no epsilon (a constant
    map gives NaN and is dropped, SPEC B4).
    """
    not_label = jnp.arange(s_vocab.shape[-1]) != label
    multi = present & not_label
    candidates = (top_mean > cfg.bg_thresh) & not_label
    eps = ZSCORE_EPS if cfg.nan_safe_mse else 0.0
    z_fg = _zscore(s_fg[:, None], ddof=1, eps=eps)
    mse = jnp.mean((z_fg - _zscore(s_vocab, ddof=1, eps=eps)) ** 2, axis=0)
    single = candidates & (mse > cfg.bg_mse_thresh)
    mask = jnp.where(n_labels > 1, multi, single)
    if cfg.mask_cold_background:
        mask = mask & (bank_full > 0)
    return mask


def attention_logit(
    embed: jax.Array,
    bank_means: jax.Array,
    cls_index: jax.Array,
    label: jax.Array,
    present: jax.Array,
    n_labels: jax.Array,
    top_mean: jax.Array,
    bank_full: jax.Array,
    cfg: CASettings,
) -> tuple[jax.Array, dict]:
    """z-scored S_fg - S_bg over the pixels of one image, before upsampling and sigmoid.

    Args:
      embed: [P, D] unit pixel embeddings (P = h*w); bank_means: [C, D].
      cls_index: [N] union rows of the vocabulary; label: [] local id of the pair's class.
      present: [N] bool classes of the image; n_labels: [] their count.
      top_mean: [N] mean top-5 raw score per class; bank_full: [N] wrap counters.

    Returns:
      a [P] and debug values {"s_fg" [P], "s_bg" [P], "bg_mask" [N]}.
    """
    f = embed / jnp.linalg.norm(embed, axis=-1, keepdims=True)
    s_vocab = f @ bank_means[cls_index].T  # [P, N] mean cosine to each class's bank
    s_fg = s_vocab[:, label]
    if cfg.background:
        mask = background_mask(s_vocab, s_fg, label, present, n_labels, top_mean, bank_full, cfg)
        count = jnp.sum(mask)
        s_bg = jnp.where(
            count > 0, jnp.sum(jnp.where(mask, s_vocab, 0.0), -1) / jnp.maximum(count, 1), 1 - s_fg
        )
        d = s_fg - s_bg
        a = _zscore(d, ddof=0, eps=ZSCORE_EPS)
    else:  # SPEC B1: the official code z-scores a singleton axis, which is all zeros.
        s_bg, mask = jnp.zeros_like(s_fg), jnp.zeros_like(present)
        a = jnp.zeros_like(s_fg)
    return a, {"s_fg": s_fg, "s_bg": s_bg, "bg_mask": mask}


def scan_pairs(
    bank: Bank,
    embed: jax.Array,
    score: jax.Array,
    present: jax.Array,
    cls_index: jax.Array,
    cfg: CASettings,
    class_mask: jax.Array | None = None,
) -> tuple[Bank, dict]:
    """Visits every (image, label) pair in loop order: score against the bank, then enqueue.

    Args:
      embed: [B, P, D] unit pixel embeddings; score: [B, P, N] raw cosine scores (stop-grad).
      present: [B, N] image-level labels; cls_index: [N] union rows.
      class_mask: [N] bool, False for padding columns of a sampled vocabulary.

    Returns:
      the updated bank and per-pair arrays [B, L, ...]: "a" [B, L, P] attention logits,
      "label" [B, L], "valid" [B, L], "warm" [B, L] (+ "s_fg", "s_bg", "bg_mask" for tests).
    """
    labels, valid, n_labels = pair_list(present, cfg.max_labels)
    top_mean = top_score_mean(score, cfg.bg_topk)  # [B, N]
    if class_mask is not None:  # padding columns never become background candidates
        top_mean = jnp.where(class_mask, top_mean, -jnp.inf)
    b_idx = jnp.repeat(jnp.arange(labels.shape[0]), cfg.max_labels)

    def visit(bank, xs):
        b, label, ok = xs
        row = cls_index[label]
        fg_feats = embed[b][jax.lax.top_k(score[b][:, label], cfg.topk)[1]]  # [K, D]
        if cfg.single_image:
            bank = enqueue(bank, row, fg_feats, ok)
        warm = bank.full[row] >= cfg.warm_up
        a, debug = attention_logit(
            embed[b],
            bank.means,
            cls_index,
            label,
            present[b],
            n_labels[b],
            top_mean[b],
            bank.full[cls_index],
            cfg,
        )
        if not cfg.single_image:
            bank = enqueue(bank, row, fg_feats, ok)
        return bank, dict(debug, a=a, warm=warm & ok)

    def skip(bank, xs):  # padding pair: no score, no write (lax.cond runs only one branch)
        shapes = jax.eval_shape(visit, bank, xs)[1]
        return bank, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def step(bank, xs):
        return jax.lax.cond(xs[2], visit, skip, bank, xs)

    bank, out = jax.lax.scan(step, bank, (b_idx, labels.reshape(-1), valid.reshape(-1)))
    out = jax.tree.map(lambda x: x.reshape(labels.shape + x.shape[1:]), out)
    return bank, dict(out, label=labels, valid=valid)


def attentive_ce(
    logits: jax.Array,
    a: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    warm: jax.Array,
    present: jax.Array,
    feature_hw: tuple[int, int],
    num_pairs: jax.Array | None = None,
    class_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Aux CE of mean_p(A_p * logits_p) per pair, same kept-class rule as SPEC 2.3 (step 4).

    Args:
      logits: [B, H, W, N] loss-grid logits (gradients flow only through these).
      a: [B, L, h*w] attention logits; labels/valid/warm: [B, L]; present: [B, N].

      num_pairs: [] all (image, label) pairs, including any beyond max_labels (default: valid).

    Returns:
      the aux loss, mean over pairs with un-warmed pairs counted as zeros (SPEC B11), and the
      per-pair CE [B, L].
    """
    b, l = labels.shape
    h, w = feature_hw
    big_h, big_w, n = logits.shape[1:]
    maps = a.reshape(b * l, h, w, 1)
    att = jax.nn.sigmoid(interp.resize_bilinear(maps, (big_h, big_w)))  # upsample, then sigmoid
    att = jax.lax.stop_gradient(att.reshape(b, l, big_h * big_w))
    pooled = jnp.einsum("blp,bpn->bln", att, logits.reshape(b, big_h * big_w, n)) / (big_h * big_w)
    ce_all = losses.kept_class_ce(pooled, present[:, None, :], class_mask)  # [B, L, N]
    ce = jnp.take_along_axis(ce_all, labels[..., None], axis=-1)[..., 0]
    ce = jnp.where(valid & warm, ce, 0.0)
    num_pairs = jnp.sum(valid) if num_pairs is None else num_pairs
    return jnp.sum(ce) / jnp.maximum(num_pairs, 1), ce
