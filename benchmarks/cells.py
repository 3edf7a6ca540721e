"""Results that accumulate cell by cell across runs: a study too long for one sitting resumes where it
stopped, and a cell already measured is never recomputed.

A cell is one (model, seed, method, ...) measurement; its key is the tuple joined with "|". The file
holds the study's ``protocol`` (what every cell must share: fine-tune budget, data, rungs...) and the
cells; a rerun with a different protocol is refused instead of mixing incomparable numbers. The file is
written after every cell (through a temporary file and a rename, so an interrupted write never leaves a
half file), merged with the cells other runs wrote to the same file meanwhile (under a lock), so runs of
the same study over different seeds can share one file side by side.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional


def check_protocol(path: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Cells accumulate across runs only under the same protocol: refuse, naming what differs."""
    diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
    if diff:
        raise ValueError(f"{path} holds cells measured under another protocol (saved, this run: {diff}): "
                         "give another output folder, or the same settings to add cells to it")


def write_merged(path: Path, merge: Callable[[Optional[dict]], dict]) -> None:
    """Write ``merge(what is on disk now, or None)`` to ``path`` under an exclusive lock, through a per-process
    temporary file and a rename: runs that share a results file never lose each other's cells."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = merge(json.loads(path.read_text()) if path.exists() else None)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)


class Cells:
    def __init__(self, path: str | os.PathLike, protocol: dict[str, Any]):
        self.path = Path(path)
        self.protocol = json.loads(json.dumps(protocol))  # as it will read back from the file
        data = json.loads(self.path.read_text()) if self.path.exists() else {"protocol": self.protocol, "cells": {}}
        check_protocol(self.path, data["protocol"], self.protocol)
        self.cells: dict[str, Any] = data["cells"]
        self.computed = 0

    @classmethod
    def stored(cls, path: str | os.PathLike) -> "Cells":
        """The cells a file holds, under the protocol it records: for re-making a summary without measuring."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no cells stored there; give the --out folder of a study that has run")
        return cls(path, json.loads(path.read_text())["protocol"])

    @staticmethod
    def key(*parts: Any) -> str:
        return "|".join(str(p) for p in parts)

    def __contains__(self, parts: tuple) -> bool:
        return self.key(*parts) in self.cells

    def get(self, parts: tuple, default: Any = None) -> Any:
        return self.cells.get(self.key(*parts), default)

    def parts(self) -> list[tuple[str, ...]]:
        """Every stored cell's key, split back into its parts (as strings): what a summary of the whole study
        covers, whichever run measured each cell."""
        return [tuple(k.split("|")) for k in self.cells]

    def run(self, parts: tuple, compute: Callable[[], Any]) -> Any:
        """The cell's stored value, or ``compute()``'s, stored at once."""
        k = self.key(*parts)
        if k not in self.cells:
            self.cells[k] = json.loads(json.dumps(compute()))
            self.computed += 1
            self.save()
        return self.cells[k]

    def save(self) -> None:
        """Write this run's cells with those on disk (another run's, same protocol); this run's win a clash."""
        def merge(disk: Optional[dict]) -> dict:
            if disk is not None:
                check_protocol(self.path, disk["protocol"], self.protocol)
                self.cells = {**disk["cells"], **self.cells}
            return {"protocol": self.protocol, "cells": self.cells}
        write_merged(self.path, merge)
