"""JSON files that readers never see half-written (eval reports, source metadata, conversion
state): written to a temporary sibling, then renamed over the target."""

import json
import os
from typing import Any


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Strict JSON (NaN refused) via a temporary sibling; an old file survives a failure."""
    tmp = f"{os.fspath(path)}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1, allow_nan=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
