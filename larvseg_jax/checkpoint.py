"""Orbax checkpoints of the whole train state plus the data-iterator position and the config.

Resume order (written once, as big_vision does): latest checkpoint in the workdir > pretrained
weights named by the config > random init. Restores always go through an abstract target that
carries the current mesh's shardings, so a checkpoint written on 8 devices restores on 1.
"""

import asyncio
import os
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from larvseg_jax.errors import CheckpointError, MissingError

# Test hook (tests/test_faults.py): "<step>" makes the save of that step write everything, then
# wait before its atomic rename, so a test can SIGKILL the process in the middle of an async save
# deterministically. Never set in normal use.
PAUSE_BEFORE_COMMIT_ENV = "LARVSEG_TEST_PAUSE_BEFORE_COMMIT"


def _install_commit_pause(step: str) -> None:
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
        if self._final_path.name == step:
            print(f"LARVSEG_TEST: save of step {step} paused before its commit", flush=True)
            await asyncio.sleep(3600)
        return await original(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


if os.environ.get(PAUSE_BEFORE_COMMIT_ENV):
    _install_commit_pause(os.environ[PAUSE_BEFORE_COMMIT_ENV])

FREE_SPACE_MARGIN = 1.1  # the state's bytes plus room for the metadata and the data position
FAILURES_IN_A_ROW = 3  # failed saves (I/O errors) tolerated in a row before the run stops


class Checkpointer:
    """Saves (state, data iterator, metadata) under <workdir>/checkpoints/<step>/.

    A save that fails with an I/O error (a network filesystem hiccup, a quota briefly hit) is
    reported in one line and training goes on to the next save; FAILURES_IN_A_ROW failures in
    a row stop the run. Asynchronous writes fail late: their error surfaces when the next save
    starts or at `wait()`.
    """

    def __init__(
        self,
        directory: str,
        *,
        max_to_keep: int,
        save_every_steps: int,
        keep_every_steps: int = 0,
    ):
        """`keep_every_steps` > 0 keeps every checkpoint whose step is a multiple of it, on top
        of the `max_to_keep` most recent ones."""
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_every_steps or None,
            save_interval_steps=save_every_steps,
            enable_async_checkpointing=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._remove_partial()  # what a killed run left half-written
        self._in_flight: int | None = None  # the step of the async save not yet settled
        self.failures_in_a_row = 0

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_iter: Any = None,
        meta: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Starts an async save if the step is due (or `force`); returns whether it saved.

        Free space is checked first: a full disk stops the run with one line before anything
        is written, instead of a half-written checkpoint and an I/O traceback.
        """
        if not (force or self._manager.should_save(step)):
            return False
        self.wait()
        self._check_free_space(step, state)
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        except OSError as error:
            self._failed(step, error)
            return False
        self._in_flight = step if saved else None
        return saved

    def wait(self) -> None:
        """Waits for the save in flight; reports (or, too many in a row, raises) its failure."""
        step, self._in_flight = self._in_flight, None
        try:
            self._manager.wait_until_finished()
        except OSError as error:
            self._failed(step, error)
            return
        if step is not None:
            self.failures_in_a_row = 0

    def _remove_partial(self, prefix: str = "") -> None:
        """Deletes uncommitted saves (names starting with `prefix`) on the primary process:
        orbax never reads them, and on a nearly full disk they are what stands in the way."""
        if jax.process_index() != 0:
            return
        for name in os.listdir(self.directory):
            if name.startswith(prefix) and ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def _failed(self, step: int | None, error: OSError) -> None:
        if step is not None:
            self._remove_partial(f"{step}.")
        self.failures_in_a_row += 1
        what = f"the checkpoint of step {step} could not be written to {self.directory} ({error})"
        if self.failures_in_a_row >= FAILURES_IN_A_ROW:
            raise CheckpointError(
                f"{what}; {self.failures_in_a_row} failed saves in a row: check that disk "
                "(space, quota, mount), then run the same command to resume from the latest "
                f"checkpoint ({self.latest_step()})"
            ) from error
        logging.warning(
            "%s: training goes on and the next save tries again (%d failed in a row; the run "
            "stops at %d)",
            what,
            self.failures_in_a_row,
            FAILURES_IN_A_ROW,
        )

    def _check_free_space(self, step: int, state: Any) -> None:
        needed = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state))
        free = shutil.disk_usage(self.directory).free
        if free < needed * FREE_SPACE_MARGIN:
            raise CheckpointError(
                f"not enough free space for the checkpoint of step {step} in {self.directory}: "
                f"it needs about {needed / 1e9:.2f} GB and {free / 1e9:.2f} GB are free; free "
                "some space or use a --workdir on a bigger disk"
            )

    def restore(
        self, step: int, abstract_state: Any, data_iter: Any = None, config: dict | None = None
    ) -> Any:
        """Restores the state onto `abstract_state`'s shardings; moves `data_iter` in place.

        `config` (the run's config as JSON) lets a mismatch name the config keys that differ
        from the ones the checkpoint was written with.
        """
        if step not in self._manager.all_steps():
            raise MissingError(
                f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}"
            )
        # Shapes are compared from the metadata first: a read that orbax starts and then fails
        # leaves coroutines behind that print tracebacks at exit, under the one-line error.
        detail = _shape_mismatch(self._stored_shapes(step), abstract_state)
        if detail is not None:
            raise self._does_not_fit(step, config, detail)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:  # orbax explains a layout mismatch over many lines
            detail = _mismatch(str(e))
            if detail is None:
                raise
            raise self._does_not_fit(step, config, detail) from None
        return restored["state"]

    def _stored_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """{"bank.means": shape, ...} of the checkpoint's state arrays; {} where its metadata
        cannot be read (orbax's own checks then apply)."""
        try:
            tree = self._manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - any failure here only skips the early check
            return {}
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {_path_name(p): tuple(leaf.shape) for p, leaf in leaves if hasattr(leaf, "shape")}

    def _does_not_fit(self, step: int, config: dict | None, detail: str) -> CheckpointError:
        changed = self._config_changes(step, config)
        return CheckpointError(
            f"checkpoint {self.directory}/{step} does not fit this config's train state "
            f"({changed or detail}): resume with the config it was written with (its meta "
            "holds it) or use a fresh --workdir"
        )

    def _config_changes(self, step: int, config: dict | None) -> str:
        """ "model.variant 'micro' -> 'tiny', ..." between the checkpoint's config and `config`."""
        if config is None:
            return ""
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError):
            return ""
        changes = config_changes(meta["meta"].get("config", {}), config)
        changes = [c for c in changes if c[0].startswith(STATE_KEYS)] or changes
        if not changes:
            return ""
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changes[:4])
        more = f" and {len(changes) - 4} more" if len(changes) > 4 else ""
        return f"written with other settings: {shown}{more}"

    def close(self) -> None:
        self._manager.close()


def _path_name(path) -> str:
    """orbax's name of a tree leaf: its keys joined by dots ("opt_state.0.trace", "bank.ptr")."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shape_mismatch(stored: dict[str, tuple[int, ...]], abstract_state: Any) -> str | None:
    """The first array of `abstract_state` whose shape differs from the stored one, worded as
    orbax words it; None when every array present in both agrees."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
        name = _path_name(path)
        if name in stored and tuple(leaf.shape) != stored[name]:
            return (
                f"Requested shape: {tuple(leaf.shape)} is not compatible with the stored shape: "
                f"{stored[name]} at {name}"
            )
    return None


def _mismatch(message: str) -> str | None:
    """The first differing key or shape of an orbax restore error; None for other errors."""
    lines = [line.strip() for line in message.splitlines()]
    if "do not match" in lines[0]:
        keys = [line[:-1] for line in lines[1:] if line.endswith(":") and line[0] != "-"]
        return f"the state differs at {keys[0] if keys else 'its tree structure'}"
    if "not compatible with the stored shape" in lines[0]:
        return lines[0].split(". ")[0]
    return None


STATE_KEYS = (
    "model.",
    "ca.",
    "data.sources",
    "data.num_groups",
    "data.eval_source",
    "data.base_from",
)


def config_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every leaf that differs; keys that shape the train
    state (model, CA, sources, vocabulary) first."""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    keys.sort(key=lambda k: not k.startswith(STATE_KEYS))
    return [(k, a.get(k), b.get(k)) for k in keys]


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `abstract` (from jax.eval_shape) carrying `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
