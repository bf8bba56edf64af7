"""The project's per-user cache folder, shared by what it caches (synthetic worlds, the compiled
CPU attention kernel); each may be redirected by its own variable."""

import os


def root() -> str:
    """$XDG_CACHE_HOME/larvseg_jax, else ~/.cache/larvseg_jax."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "larvseg_jax")
