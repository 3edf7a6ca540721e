"""Atomic save / resume of a whole pruning search.

The file holds everything a killed run needs to finish with exactly the masks an uninterrupted run
gives: the model's weights and the loop's state at the start of the current round, the history,
every RNG state, and, mid-round, the DE solver's state and the fitness cache. It is written to a
temporary file in the same folder and renamed over the old one, so a kill during the write leaves
the previous checkpoint intact. A fingerprint of the model's prunable layers, the goal, the seed and
the search options is stored with it; resuming with a different model or config says what differs.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

FORMAT = "de_plugin.search/1"
#: options that may change between the killed run and the resumed one (how, not what, is computed)
VOLATILE = {"checkpoint", "resume", "backend", "workers", "threads_per_worker", "ray_address", "ray_runtime_env", "low_memory", "device",
            "time_limit"}


def fingerprint(pruner: str, ctx, options: dict[str, Any]) -> dict[str, Any]:
    return {
        "pruner": pruner,
        "targets": [[t.name, list(t.shape)] for t in ctx.targets],
        "sparsity": ctx.sparsity,
        "max_accuracy_drop": ctx.max_accuracy_drop,
        "seed": ctx.seed,
        "options": {k: v for k, v in sorted(options.items()) if k not in VOLATILE},
    }


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    for key in current:
        a, b = saved.get(key), current[key]
        if key == "options":
            for k in sorted(set(a or {}) | set(b)):
                if (a or {}).get(k) != b.get(k):
                    out.append(f"option {k}: checkpoint {(a or {}).get(k)!r}, now {b.get(k)!r}")
        elif key == "targets" and a != b:
            sa, sb = {n: s for n, s in a or []}, {n: s for n, s in b}
            for n in sorted(set(sa) | set(sb)):
                if sa.get(n) != sb.get(n):
                    out.append(f"layer {n}: checkpoint {sa.get(n)}, now {sb.get(n)}")
        elif a != b:
            out.append(f"{key}: checkpoint {a!r}, now {b!r}")
    return out


def save(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically (temporary file in the same folder, fsync, rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".de_plugin_ckpt_", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: str | os.PathLike, expected: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save` and check it belongs to this model and config.

    The file is the user's own search state (it holds numpy RNG states, so it is unpickled with
    ``weights_only=False``): never resume from a file you did not write.
    """
    path = os.fspath(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt or not a torch file
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc}); delete it to start "
                         f"afresh or point `checkpoint` at another file") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a de_plugin search checkpoint (format {FORMAT})")
    diff = differences(payload.get("fingerprint", {}), expected)
    if diff:
        raise ValueError(f"checkpoint {path} was written for another model or config: " + "; ".join(diff)
                         + ". Use a new checkpoint path for this run (the file was left as it is)")
    return payload
