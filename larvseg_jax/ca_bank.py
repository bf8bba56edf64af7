"""The CA-classifier's memory bank (SPEC 2.4 state): per class, M FIFO slots of K unit pixel
features, kept as class and slot means (all that scores read, see ca_classifier).

Functional state: `Bank` plus pure functions, carried in the train state, one bank per virtual
device (group), never synchronised. A step's enqueues are computed up front as `Writes`
(ca_classifier.attend) and applied once per group by `enqueue`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# The initial random features are drawn for chunks of classes of at most this many values (one
# draw when the whole bank fits), so a 21K-class bank is never materialised to take its means.
MAX_INIT_VALUES = 2**27


class Bank(NamedTuple):
    feats: jax.Array | None  # [C, M, K, D] unit top-K pixel features, M FIFO slots per class
    slot_means: jax.Array  # [C, M, D] mean over K of each slot
    means: jax.Array  # [C, D] mean over M of slot_means: every score reads only these
    ptr: jax.Array  # [C] int32 next slot to overwrite
    full: jax.Array  # [C] int32 completed passes over the M slots (warm-up reads this)


class Writes(NamedTuple):
    """One step's enqueues, in loop order: pair t puts feats[t] into slot slots[t] of rows[t]."""

    rows: jax.Array  # [T] int32 union rows; C (out of range) for padding pairs
    slots: jax.Array  # [T] int32
    feats: jax.Array  # [T, K, D]
    survives: jax.Array  # [T] bool: not overwritten by a later write of this step


def init_bank(
    rng: jax.Array,
    num_classes: int,
    memory_size: int,
    topk: int,
    dim: int,
    dtype=jnp.float32,
    keep_features: bool = True,
) -> Bank:
    """Random unit vectors, pointers and wrap counters at zero (SPEC 2.4 state); without
    `keep_features` only their means are kept (the same means for the same key)."""

    def draw(key, n):
        feats = jax.random.normal(key, (n, memory_size, topk, dim), dtype)
        return feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)

    chunk = max(1, min(num_classes, MAX_INIT_VALUES // (memory_size * topk * dim)))
    if chunk == num_classes:
        feats = draw(rng, num_classes)
        slot_means = jnp.mean(feats, axis=2)
    else:
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(-(-num_classes // chunk)))
        if keep_features:
            feats = lax.map(lambda k: draw(k, chunk), keys)
            feats = feats.reshape(-1, *feats.shape[2:])[:num_classes]
            slot_means = jnp.mean(feats, axis=2)
        else:
            slot_means = lax.map(lambda k: jnp.mean(draw(k, chunk), axis=2), keys)
            slot_means = slot_means.reshape(-1, *slot_means.shape[2:])[:num_classes]
    zeros = jnp.zeros((num_classes,), jnp.int32)
    feats = feats if keep_features else None
    return Bank(feats, slot_means, jnp.mean(slot_means, axis=1), zeros, zeros)


def enqueue(bank: Bank, writes: Writes) -> Bank:
    """Applies a step's writes: FIFO pointers and wrap counts advance, surviving slots change.

    Kept out of `attend` so that the train step can run it once, in place, on every group's
    bank after the per-group scan instead of moving whole banks through it.
    """
    num_rows, m = bank.slot_means.shape[:2]
    n_writes = jnp.zeros((num_rows,), jnp.int32).at[writes.rows].add(1, mode="drop")
    target = (jnp.where(writes.survives, writes.rows, num_rows), writes.slots)
    new_means = jnp.mean(writes.feats, axis=1).astype(bank.slot_means.dtype)
    feats = bank.feats
    if feats is not None:
        feats = feats.at[target].set(
            writes.feats.astype(feats.dtype), mode="drop", unique_indices=True
        )
    slot_means = bank.slot_means.at[target].set(new_means, mode="drop", unique_indices=True)
    touched = jnp.mean(slot_means[jnp.minimum(writes.rows, num_rows - 1)], axis=1)
    return Bank(
        feats=feats,
        slot_means=slot_means,
        means=bank.means.at[writes.rows].set(touched, mode="drop"),
        ptr=(bank.ptr + n_writes) % m,
        full=bank.full + (bank.ptr + n_writes) // m,
    )


def no_writes(bank: Bank, num_pairs: int, topk: int) -> Writes:
    """The `Writes` of a group that enqueues nothing (a segmentation group, a CA-off source)."""
    num_rows, _, dim = bank.slot_means.shape
    rows = jnp.full((num_pairs,), num_rows, jnp.int32)
    feats = jnp.zeros((num_pairs, topk, dim), bank.slot_means.dtype)
    return Writes(rows, jnp.zeros_like(rows), feats, jnp.zeros((num_pairs,), bool))
