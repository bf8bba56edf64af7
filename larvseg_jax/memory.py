"""Per-device memory of the train step, from XLA's own analysis, and the check that it fits.

The compiled step's memory analysis (arguments, outputs, temporaries, donated buffers) is
exact for the backend it was compiled for; the parts are named from the state's and batch's
shapes. `check_fits` runs on the real step before the first training step, and
`python -m larvseg_jax.plan` prints the same numbers for any device count without data.
"""

import os
from typing import Any

import jax
import numpy as np

from larvseg_jax.errors import ConfigError

GIB = 2**30
# What the device may hold at most; the rest is left to the runtime and fragmentation.
USABLE_FRACTION = 0.9
# Tests and "what if" runs: pretend each device has this many bytes.
CAPACITY_ENV = "LARVSEG_DEVICE_MEMORY_BYTES"


def nbytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def breakdown(compiled: Any, state: Any, batch: Any, num_devices: int) -> dict[str, int]:
    """Bytes per device: params and optimizer (replicated), bank and batch (split over the
    devices), temporaries (activations kept for the backward pass, gradients, workspace) and
    the peak XLA plans for (arguments + outputs - donated + temporaries)."""
    mem = compiled.memory_analysis()
    if mem is None:
        raise RuntimeError("this backend gives no memory analysis")
    parts = {
        "params": nbytes(state.params),
        "optimizer": nbytes(state.opt_state),
        "bank": nbytes(state.bank) // num_devices,
        "batch": nbytes(batch) // num_devices,
        "temporaries": int(mem.temp_size_in_bytes),
    }
    parts["arguments"] = int(mem.argument_size_in_bytes)
    parts["peak"] = int(
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    return parts


def capacity(device: Any) -> tuple[int, str]:
    """Bytes one device can hold, and where the number comes from."""
    if os.environ.get(CAPACITY_ENV):
        return int(os.environ[CAPACITY_ENV]), f"${CAPACITY_ENV}"
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    available = host_available()  # CPU devices share the host's memory
    if available > 0:
        return available // jax.local_device_count(), "MemAvailable"
    return -1, "unknown"


def host_available() -> int:
    """The host's MemAvailable in bytes, -1 where /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def knobs(groups_per_device: int, accumulate: bool, remat: bool, images_per_group: int) -> list:
    """Config changes that lower the step's memory, most effective first, that are not on."""
    out = []
    if groups_per_device > 1 and not accumulate:
        out.append("--config.train.accumulate_gradients=True (one group's activations at a time)")
    if not remat:
        out.append("--config.model.remat=True (recompute each block in the backward pass)")
    out.append("more devices (data.num_groups stays; each device runs fewer groups)")
    if images_per_group > 1:
        out.append("a smaller data.images_per_group (a smaller batch: rescale optim.lr)")
    return out


def size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def describe(parts: dict[str, int]) -> str:
    order = ("params", "optimizer", "bank", "batch", "temporaries")
    listed = ", ".join(f"{k} {size(parts[k])}" for k in order)
    return f"{size(parts['peak'])} per device at peak ({listed})"


def check_fits(
    parts: dict[str, int],
    knobs_to_turn: list[str],
    device: Any,
    limit: tuple[int, str] | None = None,
) -> None:
    """Raises a one-line ConfigError when the step's peak exceeds what `device` can hold (or
    `limit`: bytes and where the number comes from, e.g. a command-line flag)."""
    limit, source = capacity(device) if limit is None else limit
    if limit <= 0 or parts["peak"] <= USABLE_FRACTION * limit:
        return
    raise ConfigError(
        f"the train step needs {size(parts['peak'])} per device (XLA's memory analysis: "
        f"{size(parts['temporaries'])} of activations and other temporaries) but {source} "
        f"allows {size(int(USABLE_FRACTION * limit))}; try " + "; or ".join(knobs_to_turn)
    )
