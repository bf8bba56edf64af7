"""The train state pytree and the pure, sharded train step (SPEC 2, 3).

One step = `num_groups` virtual devices ("groups") of B images, each group holding one source
with its own crop size. Inside `shard_map` every device runs its groups in a `lax.scan`, and
`lax.switch` on the group's source id runs only that source's forward and loss. The loss of the
step is the mean of the group losses, so the gradient is the mean over virtual devices exactly as
DDP averages the official per-GPU gradients, on any device count.
"""

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from larvseg_jax import ca_bank, ca_classifier, groups, losses, sharding, vocab
from larvseg_jax.sharding import DATA


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Static description of one training source, as the train step needs it."""

    name: str
    kind: str  # "seg" (pixel labels) | "weak" (multi-label) | "single" (one label per image)
    cls_index: tuple[int, ...]  # rows of the union table, in the source's label-id order
    basic_weight: float  # weight of its seg CE or image-level CE (λcls)
    crop: int  # training crop size
    ca_weight: float = 0.0  # weight of the CA-classifier's attentive loss (λaux)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static options of the train step (hashable, bound with functools.partial)."""

    sources: tuple[SourceSpec, ...]
    group_source_ids: tuple[int, ...]  # [G] index into `sources` per group
    images_per_group: int
    seg_normalize: str
    downsample_rate: int
    ca: ca_classifier.CASettings | None = None  # None = no CA-classifier (the baseline)
    sample_classes: int = 0  # R of SPEC 2.6 ("s100"); 0 = full vocabulary
    max_labels: int = 16  # static bound on classes per image (pads pair and sample lists)
    # Gradients of a device's groups computed one group at a time and summed (as the official
    # code's per-GPU backward passes; one group's activations live at once). False: one backward
    # pass through the device's summed loss (same objective, equal to rounding).
    accumulate_gradients: bool = True

    @property
    def num_groups(self) -> int:
        return len(self.group_source_ids)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32
    params: Any
    opt_state: optax.OptState
    rng: jax.Array  # [2] uint32; per-step keys are fold_in(rng, step)
    bank: ca_bank.Bank | None = None  # [G, ...] one memory bank per virtual device


def create_train_state(
    rng: jax.Array,
    model: Any,
    tx: optax.GradientTransformation,
    image_size: int,
    settings: StepSettings | None = None,
) -> TrainState:
    """Random init (pure; use under jax.eval_shape for an abstract state)."""
    init_rng, state_rng, bank_rng = jax.random.split(rng, 3)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    params = model.init(init_rng, images, jnp.zeros((1,), jnp.int32), train=False)["params"]
    bank = None
    if settings is not None and settings.ca is not None:
        num_classes, dim = params["head"]["cls_emb"].shape
        keys = jax.random.split(bank_rng, settings.num_groups)
        bank = jax.vmap(
            lambda k: ca_bank.init_bank(
                k,
                num_classes,
                settings.ca.memory_size,
                settings.ca.topk,
                dim,
                keep_features=settings.ca.keep_features,
            )
        )(keys)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=state_rng,
        bank=bank,
    )


def state_shardings(abstract: TrainState, mesh: Mesh) -> TrainState:
    """Everything replicated except the memory banks: one per group, split over DATA."""
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
    if abstract.bank is not None:
        bank = jax.tree.map(lambda _: sharding.data_sharded(mesh), abstract.bank)
        shardings = shardings.replace(bank=bank)
    return shardings


def group_loss(
    params: Any,
    images: jax.Array,
    labels: jax.Array,
    rng: jax.Array,
    *,
    model: Any,
    spec: SourceSpec,
    settings: StepSettings,
    bank: ca_bank.Bank | None = None,
) -> tuple[jax.Array, dict]:
    """Weighted loss of one virtual device holding `spec`'s source (SPEC 2.2-2.4, 2.7).

    Args:
      images: [B, H, W, 3]; labels: [B, H, W] local class ids, IGNORE = -1.
      bank: this group's memory bank at the step start (unbatched, read only; `feats` may be
        None), or None without the CA-classifier.

    Returns:
      the weighted loss and aux: "basic" and "aux" (unweighted losses), "unvisited" (image
      labels past max_labels, which get no CA pair) and "writes" (what the group enqueues; the
      caller applies them with `ca_bank.enqueue`).
    """
    cls_index = jnp.asarray(spec.cls_index, jnp.int32)
    drop_rng, sample_rng = jax.random.split(rng)
    class_mask = None
    if settings.sample_classes:  # SPEC 2.6, on every source; present classes at full res (D3)
        n = cls_index.shape[0]
        size = min(n, settings.sample_classes + images.shape[0] * settings.max_labels)
        present = jnp.any(losses.present_classes(labels, n), axis=0)
        positions, class_mask = vocab.sample_classes(
            sample_rng, present, settings.sample_classes, size
        )
        cls_index = cls_index[positions]
        labels = vocab.remap_labels(labels, positions, class_mask, n)
    logits, head_aux = model.apply(
        {"params": params}, images, cls_index, class_mask, train=True, rngs={"dropout": drop_rng}
    )
    feature_hw, feature_logits = logits.shape[1:3], logits
    logits, labels = losses.loss_grid_inputs(logits, labels, settings.downsample_rate)
    aux_loss = jnp.zeros((), jnp.float32)
    writes, unvisited = None, jnp.zeros((), jnp.int32)
    if spec.kind == "seg":
        basic = losses.seg_ce(
            logits, labels, normalize=settings.seg_normalize, class_mask=class_mask
        )
    else:
        basic, info = losses.image_level_ce(logits, labels, class_mask)
        if bank is not None and spec.ca_weight:
            b, p = images.shape[0], feature_hw[0] * feature_hw[1]
            writes, pairs = ca_classifier.attend(
                bank,
                head_aux["embed"].reshape(b, p, -1),
                head_aux["score"].reshape(b, p, -1),
                info["present"],
                cls_index,
                settings.ca,
                class_mask,
                max_labels=settings.max_labels,
            )
            aux_loss, _ = ca_classifier.attentive_ce(
                feature_logits,
                pairs["a"],
                pairs["label"],
                pairs["valid"],
                pairs["warm"],
                info["present"],
                labels.shape[1:3],
                num_pairs=info["num_pairs"],
                class_mask=class_mask,
            )
            n_labels = jnp.sum(info["present"], axis=-1)
            unvisited = jnp.sum(jnp.maximum(n_labels - settings.max_labels, 0))
    if bank is not None and writes is None:  # same output structure on every switch branch
        writes = ca_bank.no_writes(bank, images.shape[0] * settings.max_labels, settings.ca.topk)
    loss = spec.basic_weight * basic + spec.ca_weight * aux_loss
    aux = {"basic": basic, "aux": aux_loss, "unvisited": unvisited, "writes": writes}
    return loss, aux


def _device_loss(params, batch, banks, rng, *, model, settings, groups_per_device, grads=False):
    """Sum over this device's groups of loss_g / G, per-group losses and the bank writes; with
    `grads`, also d(sum)/d(params), accumulated group by group inside the scan."""
    num_sources = len(settings.sources)
    first = jax.lax.axis_index(DATA) * groups_per_device
    all_ids = jnp.asarray(settings.group_source_ids, jnp.int32)
    local_ids = jax.lax.dynamic_slice(all_ids, (first,), (groups_per_device,))
    global_index = first + jnp.arange(groups_per_device)

    def branch(s, params, group_batch, local_g, key):
        spec = settings.sources[s]
        data = group_batch[spec.name]
        # Indexed here, not sliced by the scan: a slice fed to the switch would be a copy of
        # the group's bank; here only what the CA-classifier reads of it is touched.
        bank = None if banks is None else jax.tree.map(lambda x: x[local_g], banks)
        loss, aux = group_loss(
            params,
            data["image"],
            data["label"],
            key,
            model=model,
            spec=spec,
            settings=settings,
            bank=bank,
        )
        onehot = jax.nn.one_hot(s, num_sources)
        per_source = {
            "basic": onehot * aux["basic"],
            "aux": onehot * aux["aux"],
            "unvisited": onehot * aux["unvisited"],
        }
        return loss, per_source, aux["writes"]

    def branch_with_grads(s, params, group_batch, local_g, key):
        # Differentiated inside the branch: the switch then carries only what each branch
        # returns. Differentiating through the switch instead keeps the residuals of every
        # branch (the untaken ones zero-filled) for the backward pass.
        def loss_of(p):
            loss, per_source, writes = branch(s, p, group_batch, local_g, key)
            return loss, (per_source, writes)

        (loss, (per_source, writes)), group_grads = jax.value_and_grad(loss_of, has_aux=True)(
            params
        )
        return loss, per_source, writes, group_grads

    chosen = branch_with_grads if grads else branch
    branches = [functools.partial(chosen, s) for s in range(num_sources)]

    def body(carry, xs):
        total, grad_sum = carry
        source_id, g, group_batch = xs
        key = jax.random.fold_in(rng, g)  # same key for group g on any device count
        out = jax.lax.switch(source_id, branches, params, group_batch, g - first, key)
        loss, per_source, writes = out[:3]
        if grads:
            grad_sum = jax.tree.map(jnp.add, grad_sum, out[3])
        counts = jax.nn.one_hot(source_id, num_sources)
        return (total + loss, grad_sum), (loss, per_source, counts, writes)

    zero_grads = jax.tree.map(jnp.zeros_like, params) if grads else None
    (total, grad_sum), (group_losses, per_source, counts, writes) = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zero_grads), (local_ids, global_index, batch)
    )
    sums = {
        "basic_sum": per_source["basic"].sum(0),
        "aux_sum": per_source["aux"].sum(0),
        "unvisited_sum": per_source["unvisited"].sum(0),
        "count": counts.sum(0),
    }
    out = total / settings.num_groups, (sums, group_losses, writes)
    if grads:
        return out, jax.tree.map(lambda x: x / settings.num_groups, grad_sum)
    return out


def _all_finite(tree) -> jax.Array:
    """True when every float of the tree is finite."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def metric_names(settings: StepSettings) -> list[str]:
    """Names of the scalar metrics `train_step` returns (besides "group_loss")."""
    names = ["loss", "lr"]
    for spec in settings.sources:
        names.append(f"loss_{spec.name}")
        if settings.ca is not None and spec.ca_weight:
            names += [f"aux_{spec.name}", f"unvisited_labels_{spec.name}"]
    return names


def _device_gradients(params, local_batch, banks, rng, *, model, settings, groups_per_device):
    """One device's part of the step (inside shard_map): its groups' losses and gradients,
    summed over devices, and its banks with this step's writes (none when not finite)."""
    fn = functools.partial(
        _device_loss, model=model, settings=settings, groups_per_device=groups_per_device
    )
    # The groups only read their banks (never the [C, M, K, D] features); the writes are
    # applied once, in place, after the scan instead of moving whole banks through it.
    view = None if banks is None else banks._replace(feats=None)
    if settings.accumulate_gradients:
        (loss, (sums, group_losses, writes)), grads = fn(params, local_batch, view, rng, grads=True)
    else:
        (loss, (sums, group_losses, writes)), grads = jax.value_and_grad(fn, has_aux=True)(
            params, local_batch, view, rng
        )
    loss, sums, grads = jax.lax.psum((loss, sums, grads), DATA)
    grads_finite = _all_finite(grads)
    finite = jnp.isfinite(loss) & grads_finite
    if banks is not None:  # a non-finite step writes nothing (its features may be NaN)
        banks = jax.lax.cond(finite, jax.vmap(ca_bank.enqueue), lambda b, _: b, banks, writes)
    return (loss, sums, grads, finite, grads_finite), group_losses, banks


def train_step(
    state: TrainState,
    batch: Any,
    *,
    model: Any,
    tx: optax.GradientTransformation,
    settings: StepSettings,
    mesh: Mesh,
    schedule: optax.Schedule,
) -> tuple[TrainState, dict]:
    """One SGD step over the global batch.

    Args:
      state: TrainState, replicated except the bank (sharded over DATA on its group axis).
      batch: {source: {"image": [G, B, H_s, W_s, 3], "label": [G, B, H_s, W_s]}} sharded over
        DATA on the group axis; rows of groups holding another source are padding.

    Returns:
      the new state and metrics: "loss" (the step objective), "loss_<source>" and
      "aux_<source>" (mean unweighted basic / CA loss over that source's groups),
      "unvisited_labels_<source>" (labels past max_labels in the step: no CA pair), "lr",
      "group_loss" [G] (weighted loss per group), "finite" (False: loss or gradients had a NaN
      or inf and the state was left unchanged), "grads_finite" and "step" (this step's index).
    """
    per_device = functools.partial(
        _device_gradients,
        model=model,
        settings=settings,
        groups_per_device=groups.groups_per_device(settings.num_groups, mesh.devices.size),
    )
    step_rng = jax.random.fold_in(state.rng, state.step)
    # check_vma=False: gradients stay per-device until the explicit psum (no implicit reduction).
    (loss, sums, grads, finite, grads_finite), group_losses, bank = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(DATA), P(DATA), P()),
        out_specs=(P(), P(DATA), P(DATA)),
        check_vma=False,
    )(state.params, batch, state.bank, step_rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient leaves params, optimizer and bank as they were; the step
    # counter (and the data) moves on. The host learns of it from the metrics at the next log
    # window (no extra sync per step) and stops or counts it (train.nonfinite).
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        (params, opt_state),
        (state.params, state.opt_state),
    )
    metrics = {
        "loss": loss,
        "lr": schedule(state.step),
        "group_loss": group_losses,
        "finite": finite,
        "grads_finite": grads_finite,
        "step": state.step,
    }
    for s, spec in enumerate(settings.sources):
        count = jnp.maximum(sums["count"][s], 1)
        metrics[f"loss_{spec.name}"] = sums["basic_sum"][s] / count
        if state.bank is not None and spec.ca_weight:
            metrics[f"aux_{spec.name}"] = sums["aux_sum"][s] / count
            metrics[f"unvisited_labels_{spec.name}"] = sums["unvisited_sum"][s]
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, bank=bank)
    return new_state, metrics
