"""Category-wise attentive classifier: attention maps from the per-class pixel memory bank
(ca_bank) and the attentive image-level loss.

SPEC 2.4 (cross-image) and 2.5 (single-image).

The official code visits the pairs (image b, present label l) one by one (b ascending, then l
ascending): score the image against the bank, then enqueue its top-K pixels. This module computes
the same numbers for all pairs at once:
  * what a pair enqueues (top-K pixels by raw score) does not depend on the bank, so every write
    is known up front, and the j-th write of a class in the batch lands in slot (ptr + j) % M;
  * scores are mean cosines over the M*K unit vectors of a class, i.e. dot products with the
    class mean, so the bank a pair sees is the step's initial class means plus the mean changes
    of the writes before it in loop order (a [T, T] "seen" mask over the T = B * max_labels
    pairs); a class seen twice in one batch scores its second image against the first image's
    features, as in the reference.
Scores therefore read only the class means `means` [C, D] and, for the slots a step overwrites,
the per-slot means `slot_means` [C, M, D]; the features `feats` [C, M, K, D] are never read
and are dropped by default (`keep_features=False`): 0.31 GB of the 0.32 GB per group at the A150
union, 25 GB per group at 21K. `keep_features=True` keeps them (SPEC's bank state, for parity
tests) with one in-place scatter per step; everything else is bit-identical either way.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from larvseg_jax import interp, losses
from larvseg_jax.ca_bank import Bank, Writes

ZSCORE_EPS = 1e-5


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
    mask_cold_background: bool = False  # fix B2: ignore bg classes whose bank never wrapped
    nan_safe_mse: bool = False  # fix B4: epsilon in the mse z-scores (constant maps kept)
    keep_features: bool = False  # keep feats [C, M, K, D] (never read by the step) in the state


def pair_list(present: jax.Array, max_labels: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pairs in loop order: labels [B, L] ascending per image, padded; valid [B, L]; count [B]."""
    labels = jax.vmap(lambda p: jnp.nonzero(p, size=max_labels, fill_value=0)[0])(present)
    count = jnp.sum(present, axis=-1)
    valid = jnp.arange(max_labels)[None] < count[:, None]
    return labels.astype(jnp.int32), valid, count


def _zscore(x: jax.Array, *, ddof: int, eps: float, axis: int = 0) -> jax.Array:
    mean = jnp.mean(x, axis, keepdims=True)
    return (x - mean) / jnp.sqrt(jnp.var(x, axis, ddof=ddof, keepdims=True) + eps)


def top_score_mean(score: jax.Array, k: int) -> jax.Array:
    """[..., P, N] raw scores -> [..., N] mean of each class's top-k scores (bg candidates)."""
    k = min(k, score.shape[-2])
    return jnp.mean(jax.lax.top_k(jnp.swapaxes(score, -1, -2), k)[0], axis=-1)


def single_label_background(
    s_vocab: jax.Array,
    s_fg: jax.Array,
    label: jax.Array,
    top_mean: jax.Array,
    bank_full: jax.Array,
    cfg: CASettings,
) -> jax.Array:
    """[N] bool background classes of a single-label image's pair (SPEC 2.4 step 2).

    Classes whose mean of the top-5 raw pixel scores exceeds bg_thresh, minus the label, filtered
    by the decorrelation test mse(z(S_fg), z(S_c)) > bg_mse_thresh with unbiased std and no
    epsilon (a constant map gives NaN and is dropped, SPEC B4).

    Args:
      s_vocab: [P, N] bank scores of every class; s_fg: [P] the label's; label: [] local id.
      top_mean: [N] mean top-5 raw score per class; bank_full: [N] wrap counters (fix B2).
    """
    candidates = (top_mean > cfg.bg_thresh) & (jnp.arange(s_vocab.shape[-1]) != label)
    eps = ZSCORE_EPS if cfg.nan_safe_mse else 0.0
    z_fg = _zscore(s_fg[:, None], ddof=1, eps=eps)
    mse = jnp.mean((z_fg - _zscore(s_vocab, ddof=1, eps=eps)) ** 2, axis=0)
    mask = candidates & (mse > cfg.bg_mse_thresh)
    if cfg.mask_cold_background:
        mask = mask & (bank_full > 0)
    return mask


def _masked_mean(values: jax.Array, mask: jax.Array, fallback: jax.Array) -> jax.Array:
    """Mean of values[..., P, X] over X where mask[..., X]; `fallback` [..., P] if none."""
    count = jnp.sum(mask, -1)[..., None]
    total = jnp.einsum("...px,...x->...p", values, mask.astype(values.dtype))
    return jnp.where(count > 0, total / jnp.maximum(count, 1), fallback)


def _topk_feats(embed: jax.Array, score: jax.Array, labels: jax.Array, topk: int) -> jax.Array:
    """[B, L, K, D] what each pair enqueues: the K pixels scoring highest on its label.

    Top-K by the raw cosine of the label over the whole image, not restricted to its GT pixels
    (SPEC 2.4 step 5). It does not depend on the bank, so a step's writes are known up front.
    """
    fg_raw = jnp.swapaxes(jnp.take_along_axis(score, labels[:, None, :], axis=2), 1, 2)
    top = jax.lax.top_k(fg_raw, topk)[1]  # [B, L, K]
    return jax.vmap(lambda e, i: e[i])(embed, top)


def _place_writes(
    bank: Bank, rows: jax.Array, ok: jax.Array, new_means: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Where each of T writes (in loop order) lands, and how it changes its class mean.

    The j-th write of a class goes to slot (ptr + j) % M; it survives the step unless the class
    is written M more times; it replaces the slot's content at the step start, or this step's
    write M earlier. Returns slots [T], survives [T] and the class-mean change delta [T, D].
    """
    m = bank.slot_means.shape[1]
    t = rows.shape[0]
    same = (rows[:, None] == rows[None]) & ok[:, None] & ok[None]  # [T, T]
    rank = jnp.sum(same & jnp.tril(jnp.ones((t, t), bool), -1), 1)
    slots = (bank.ptr[rows] + rank) % m
    survives = ok & (rank >= jnp.sum(same, 1) - m)
    replaced = (same & (rank[None] == rank[:, None] - m)).astype(new_means.dtype)
    old = jnp.where((rank >= m)[:, None], replaced @ new_means, bank.slot_means[rows, slots])
    return slots, survives, jnp.where(ok[:, None], (new_means - old) / m, 0.0)


def _seen_writes(num_pairs: int, single_image: bool) -> jax.Array:
    """[T, T] bool: whether pair i's scores see this step's write j (the official loop order).

    Cross-image (SPEC 2.4 "Ordering"), a pair scores after the writes of the pairs before it and
    before its own; in single-image mode (SPEC 2.5) it enqueues first, so it also sees its own.
    """
    earlier = jnp.tril(jnp.ones((num_pairs, num_pairs), bool), -1)
    return (earlier | jnp.eye(num_pairs, dtype=bool)) if single_image else earlier


class _PairScores(NamedTuple):
    """What the pairs of one group see of the bank (L' indexes an image's visited labels)."""

    s_fg: jax.Array  # [B, L, P] S_fg of each pair
    s_labels: jax.Array  # [B, L, P, L'] each pair's scores of its image's visited labels
    s_first: jax.Array | None  # [B, P, N] the whole vocabulary, as the image's first pair sees it
    full_seen: jax.Array  # [B, L, N] the wrap counters each pair sees (warm-up, fix B2)


def _pair_scores(
    bank: Bank,
    embed: jax.Array,
    labels: jax.Array,
    rows: jax.Array,
    seen: jax.Array,
    delta: jax.Array,
    cls_index: jax.Array,
    vocab: bool,
) -> _PairScores:
    """Mean bank cosines of every pair, each against the bank as it is at its turn in the loop.

    A mean cosine over a class's M*K unit vectors is a dot product with the class mean, so a
    pair's score is the step-start score `base` plus the score changes `gain` of the writes it
    sees (`seen` [T, T], `delta` [T, D] from `_place_writes`). Only the image's own labels are
    scored per pair; the whole vocabulary (`s_first`, only if `vocab`) is scored once per image,
    with the bank of its first pair: all that single-label images and unvisited labels need.
    """
    b, l = labels.shape
    dtype = bank.slot_means.dtype
    m = bank.slot_means.shape[1]
    of_column = rows[:, None] == cls_index[None]  # [T, N] write t changes column n
    writes_seen = seen.astype(jnp.int32) @ of_column.astype(jnp.int32)  # [T, N]
    full_seen = bank.full[cls_index] + (bank.ptr[cls_index] + writes_seen) // m  # [T, N]
    f = embed / jnp.linalg.norm(embed, axis=-1, keepdims=True)
    f = f.astype(dtype)
    base = jnp.einsum("bpd,nd->bpn", f, bank.means[cls_index])  # [B, P, N] step start
    gain = jnp.einsum("bpd,td->bpt", f, delta)  # [B, P, T] score change by each write
    seen = seen.reshape(b, l, -1)
    label_of_write = rows.reshape(b, l)[:, :, None] == rows[None, None]  # [B, L', T]
    s_labels = jnp.take_along_axis(base, labels[:, None, :], axis=2)[:, None] + jnp.einsum(
        "bpt,bkjt->bkpj", gain, (seen[:, :, None] & label_of_write[:, None]).astype(dtype)
    )
    s_fg = jnp.moveaxis(jnp.diagonal(s_labels, axis1=1, axis2=3), -1, 1)  # [B, L, P]
    s_first = None
    if vocab:
        s_first = base + jnp.einsum(
            "bpt,btn->bpn", gain, (seen[:, 0, :, None] & of_column[None]).astype(dtype)
        )
    return _PairScores(s_fg, s_labels, s_first, full_seen.reshape(b, l, -1))


def _multi_label_bg(
    scores: _PairScores,
    labels: jax.Array,
    valid: jax.Array,
    present: jax.Array,
    cold_ok: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """S_bg [B, L, P] and background classes [B, L, N] of multi-label images (SPEC 2.4 step 2).

    Every other ground-truth class of the image is background. A visited label is scored as the
    pair sees it (`s_labels`); labels past max_labels are never written this step, so their bank
    is the one the image's first pair sees (`s_first`). `cold_ok` [B, L, N] is all True unless
    fix B2 drops never-wrapped classes.
    """
    l = labels.shape[1]
    dtype = scores.s_labels.dtype
    multi = valid[:, None, :] & ~jnp.eye(l, dtype=bool)[None]  # [B, L, L']
    multi = multi & jnp.take_along_axis(cold_ok, jnp.broadcast_to(labels[:, None], multi.shape), 2)
    visited = jax.vmap(lambda c, v: jnp.zeros(present.shape[-1], bool).at[c].max(v))(labels, valid)
    unvisited = present & ~visited & cold_ok[:, 0]  # [B, N]
    count = jnp.sum(multi, -1) + jnp.sum(unvisited, -1)[:, None]  # [B, L]
    total = (
        jnp.einsum("bkpj,bkj->bkp", scores.s_labels, multi.astype(dtype))
        + jnp.einsum("bpn,bn->bp", scores.s_first, unvisited.astype(dtype))[:, None]
    )
    s_bg = jnp.where(
        count[..., None] > 0, total / jnp.maximum(count, 1)[..., None], 1 - scores.s_fg
    )
    bg_mask = present[:, None] & (jnp.arange(present.shape[-1]) != labels[..., None])
    return s_bg, bg_mask & cold_ok


def _single_label_bg(
    scores: _PairScores,
    score: jax.Array,
    labels: jax.Array,
    cfg: CASettings,
    class_mask: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """S_bg [B, P] and background classes [B, N] of single-label images (their one pair, l = 0).

    Thresholded candidates from the whole vocabulary, filtered by `single_label_background`,
    scored against the bank as the image's pair sees it; 1 - S_fg when none is kept.
    """
    top_mean = top_score_mean(score, cfg.bg_topk)  # [B, N]
    if class_mask is not None:  # padding columns never become background candidates
        top_mean = jnp.where(class_mask, top_mean, -jnp.inf)
    s_fg = scores.s_fg[:, 0]
    mask = jax.vmap(single_label_background, in_axes=(0, 0, 0, 0, 0, None))(
        scores.s_first, s_fg, labels[:, 0], top_mean, scores.full_seen[:, 0], cfg
    )
    return _masked_mean(scores.s_first, mask, 1 - s_fg), mask


def attend(
    bank: Bank,
    embed: jax.Array,
    score: jax.Array,
    present: jax.Array,
    cls_index: jax.Array,
    cfg: CASettings,
    class_mask: jax.Array | None = None,
    *,
    max_labels: int,
) -> tuple[Writes, dict]:
    """Every (image, label) pair of one group: its attention logits and what it enqueues.

    Args:
      bank: this group's bank at the step start (read only; `feats` is never read).
      embed: [B, P, D] unit pixel embeddings; score: [B, P, N] raw cosine scores (both
        stop-gradient here). present: [B, N] image-level labels; cls_index: [N] union rows.
      cfg: the CA-classifier options.
      class_mask: [N] bool, False for padding columns of a sampled vocabulary.
      max_labels: L, the static bound on pairs per image: an image's first L labels (ascending)
        get a pair and a write; the rest only count as background (the train step's setting).

    Returns:
      the step's writes (apply them with `enqueue`) and per-pair arrays [B, L, ...]: "a" [B, L, P]
      attention logits (z-scored S_fg - S_bg, before upsampling), "label", "valid", "warm", and
      "s_fg", "s_bg" [B, L, P], "bg_mask" [B, L, N] for tests.
    """
    embed, score = jax.lax.stop_gradient((embed, score))
    labels, valid, n_labels = pair_list(present, max_labels)
    b, l = labels.shape
    rows, ok = cls_index[labels].reshape(b * l), valid.reshape(b * l)  # T = B * L pairs
    new_feats = _topk_feats(embed, score, labels, cfg.topk).astype(bank.slot_means.dtype)
    new_means = jnp.mean(new_feats, axis=2).reshape(b * l, -1)
    slots, survives, delta = _place_writes(bank, rows, ok, new_means)
    seen = _seen_writes(b * l, cfg.single_image) & ok[None]  # padding pairs write nothing
    scores = _pair_scores(bank, embed, labels, rows, seen, delta, cls_index, cfg.background)
    fg_full = jnp.take_along_axis(scores.full_seen, labels[..., None], axis=-1)[..., 0]
    warm = (fg_full >= cfg.warm_up) & valid  # background classes have no warm-up (SPEC B2)
    if cfg.background:
        full = scores.full_seen
        cold_ok = (full > 0) if cfg.mask_cold_background else jnp.ones_like(full, bool)
        s_bg_multi, bg_multi = _multi_label_bg(scores, labels, valid, present, cold_ok)
        s_bg_single, bg_single = _single_label_bg(scores, score, labels, cfg, class_mask)
        is_multi = (n_labels > 1)[:, None, None]
        s_bg = jnp.where(is_multi, s_bg_multi, s_bg_single[:, None])
        bg_mask = jnp.where(is_multi, bg_multi, bg_single[:, None])
        a = _zscore(scores.s_fg - s_bg, ddof=0, eps=ZSCORE_EPS, axis=-1)
    else:  # SPEC B1: the official code z-scores a singleton axis, which is all zeros.
        s_bg = jnp.zeros_like(scores.s_fg)
        bg_mask = jnp.zeros((b, l, present.shape[-1]), bool)
        a = jnp.zeros_like(scores.s_fg)
    num_rows = bank.slot_means.shape[0]
    writes = Writes(
        jnp.where(ok, rows, num_rows), slots, new_feats.reshape(b * l, cfg.topk, -1), survives
    )
    pairs = {
        "a": jnp.where(valid[..., None], a, 0.0),
        "label": labels,
        "valid": valid,
        "warm": warm,
        "s_fg": scores.s_fg,
        "s_bg": s_bg,
        "bg_mask": bg_mask,
    }
    return writes, pairs


def attentive_ce(
    logits: jax.Array,
    a: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    warm: jax.Array,
    present: jax.Array,
    loss_hw: tuple[int, int],
    num_pairs: jax.Array | None = None,
    class_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Aux CE of mean_p(A_p * logits_p) per pair, same kept-class rule as SPEC 2.3 (step 4).

    A = sigmoid(bilinear_up(a)) lives on the loss grid, and so do the logits it weights, which
    are the bilinear upsampling U z of the feature-grid logits z. Since U is linear,
    mean_p(A_p (U z)_p) = sum_q (U^T A)_q z_q / |loss grid|: the same pooled logits (and
    gradients) from z, at 1/rate^2 of the cost, without the [B, H, W, N] upsampled logits.

    Args:
      logits: [B, h, w, N] feature-grid logits (gradients flow only through these).
      a: [B, L, h*w] attention logits; labels/valid/warm: [B, L]; present: [B, N].
      loss_hw: (H, W) the loss grid (input / downsample rate).
      num_pairs: [] all (image, label) pairs, including any beyond max_labels (default: valid).

    Returns:
      the aux loss, mean over pairs with un-warmed pairs counted as zeros (SPEC B11), and the
      per-pair CE [B, L].
    """
    b, l = labels.shape
    h, w, n = logits.shape[1:]
    big_h, big_w = loss_hw
    maps = a.reshape(b * l, h, w, 1)
    att = jax.nn.sigmoid(interp.resize_bilinear(maps, (big_h, big_w)))  # upsample, then sigmoid
    weights = interp.resize_bilinear_adjoint(att, (h, w)) / (big_h * big_w)
    weights = jax.lax.stop_gradient(weights.reshape(b, l, h * w))
    pooled = jnp.einsum("blq,bqn->bln", weights, logits.reshape(b, h * w, n))
    ce_all = losses.kept_class_ce(pooled, present[:, None, :], class_mask)  # [B, L, N]
    ce = jnp.take_along_axis(ce_all, labels[..., None], axis=-1)[..., 0]
    ce = jnp.where(valid & warm, ce, 0.0)
    num_pairs = jnp.sum(valid) if num_pairs is None else num_pairs
    return jnp.sum(ce) / jnp.maximum(num_pairs, 1), ce
