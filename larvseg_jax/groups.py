"""Virtual devices ("groups"): which source each block of B images of a step holds (SPEC 3).

The official code gives GPU r the dataset `sources[r % n]`, so a 1-GPU run trains on one source
only (SPEC B15). Here the step is split into `num_groups` groups independent of the device count;
group g holds one source, groups follow the source ratio round-robin (for 3:3:2 over 8 groups
this is exactly rank % 3), and the devices split the groups evenly. The loss of a step is the
mean of the per-group losses, so 1 device and 8 devices compute the same objective.
"""

from collections.abc import Sequence

import jax
from jax.sharding import Mesh

from larvseg_jax.errors import ConfigError


def group_sources(sources: Sequence[str], ratio: Sequence[int], num_groups: int) -> list[str]:
    """Source of each group, round-robin over the sources with ratio[i] groups per repeat.

    Args:
      sources: training source names, e.g. ("wa150", "c171").
      ratio: groups per source within one repeat of the pattern, e.g. (4, 4) or (3, 3, 2).
      num_groups: G, must be a multiple of sum(ratio).
    """
    if len(sources) != len(ratio):
        raise ConfigError(f"{len(sources)} sources but {len(ratio)} ratios")
    if any(r < 1 for r in ratio):
        raise ConfigError(f"config data.sources.*.ratio must be >= 1, got {tuple(ratio)}")
    period = sum(ratio)
    if num_groups % period:
        raise ConfigError(
            f"config data.num_groups={num_groups} must be a multiple of the sources' total "
            f"ratio {period} (data.sources.*.ratio)"
        )
    pattern: list[str] = []
    left = list(ratio)
    while any(left):
        for i, name in enumerate(sources):
            if left[i]:
                pattern.append(name)
                left[i] -= 1
    return pattern * (num_groups // period)


def groups_per_device(num_groups: int, num_devices: int) -> int:
    """Groups each device processes sequentially in one step."""
    if num_groups % num_devices:
        raise ConfigError(
            f"config data.num_groups={num_groups} must be a multiple of the device count {num_devices}; "
            f"set --config.data.num_groups to a multiple of {num_devices}"
        )
    return num_groups // num_devices


def local_group_indices(num_groups: int, mesh: Mesh) -> list[int]:
    """Global group indices whose rows live on this process's devices (contiguous per device)."""
    per_device = groups_per_device(num_groups, mesh.devices.size)
    rows = []
    for pos, device in enumerate(mesh.devices.flat):
        if device.process_index == jax.process_index():
            rows.extend(range(pos * per_device, (pos + 1) * per_device))
    return rows
