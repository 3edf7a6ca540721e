"""Progress of long work: a tqdm bar on a terminal, a logged line at a fixed interval elsewhere.

tqdm's ``disable=None`` turns the bar off when stderr is not a terminal (CI logs, ``nohup``, a
notebook's captured output), which left a long search silent for many minutes. :func:`progress_bar`
keeps the bar where a terminal shows it and otherwise logs ``desc: n/total (elapsed)`` through
``logging`` every ``log_every`` seconds, and once at the end.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Optional

from tqdm.auto import tqdm

log = logging.getLogger("de_plugin")
LOG_EVERY = 30.0  # seconds between progress lines when no terminal shows a bar


class _Bar(tqdm):
    def __init__(self, iterable: Optional[Iterable] = None, *args: Any, wanted: bool = True,
                 log_every: float = LOG_EVERY, **kwargs: Any):
        total = kwargs.get("total")
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self._desc, self._total = kwargs.get("desc") or "progress", total  # a disabled tqdm keeps neither
        super().__init__(iterable, *args, **kwargs)
        # wanted, but tqdm turned itself off (no terminal): log instead
        self._logging = bool(wanted) and self.disable
        self._done, self._start = 0, time.monotonic()
        self._next = self._start + log_every
        self._every, self._postfix_text = log_every, ""

    def __iter__(self):
        if not self._logging:
            yield from super().__iter__()
            return
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: float = 1) -> Optional[bool]:
        if self._logging:
            self._done += n
            now = time.monotonic()
            if now >= self._next:
                self._next = now + self._every
                self._log(now)
        return super().update(n)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        if self._logging:
            self._postfix_text = ", ".join(f"{k}={v}" for k, v in {**(ordered_dict or {}), **kwargs}.items())
        super().set_postfix(ordered_dict, refresh, **kwargs)

    def _log(self, now: float) -> None:
        total = f"/{self._total:g}" if self._total else ""
        extra = f", {self._postfix_text}" if self._postfix_text else ""
        log.info("%s: %g%s (%.0f s)%s", self._desc, self._done, total, now - self._start, extra)

    def close(self) -> None:
        if self._logging and self._done and time.monotonic() - self._start >= self._every:
            self._log(time.monotonic())
            self._logging = False
        super().close()


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[float] = None, desc: str = "",
                 enabled: bool = True, leave: bool = False, log_every: float = LOG_EVERY) -> tqdm:
    """A bar where a terminal shows one, progress lines in the log otherwise; nothing when not ``enabled``."""
    return _Bar(iterable, total=total, desc=desc, leave=leave, disable=None if enabled else True, wanted=enabled,
                log_every=log_every)
