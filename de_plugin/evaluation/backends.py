"""Candidate evaluation behind one seam: a round's weights go out once, keep-count vectors go in,
fitness values come back in the same order.

Backends (option ``backend=``, with ``workers=``):

* ``serial``: in this process, on the working copy (masks applied in place, then restored).
* ``batched``: several candidates in one pass with ``torch.func.functional_call`` + ``vmap`` over
  stacked masked weights; needs ``val_data`` batches and a metric; falls back to ``serial`` where
  vmap cannot run the model (logged once).
* ``process``: a local pool of forked workers, each holding one model replica and the cached
  validation data (inherited at fork), receiving only candidate vectors. Linux/macOS (fork).
* ``ray``: the same with one Ray actor per worker (``ray.init()`` locally unless ``ray_address``).

A scorer is any object of the :class:`Scorer` protocol (``model``, ``reset()`` to take the model's
weights as the round's, ``score(candidate, floor)`` and ``restore()``): :class:`MagnitudeScorer`
scores magnitude keep-counts (``de_layerwise``); ``de_plugin.coarse.CoarseScorer`` scores channel /
kernel masks (``random_coarse``); :class:`de_plugin.patterns.PatternScorer` scores INC-style pattern
masks (used by the INC adapter).
Every backend has the :class:`Backend` protocol. This module also owns evaluating a model on
batches (:func:`inference`, :func:`metric_on_batches`, :class:`DeviceBatches`) and
:func:`check_score`, the one place a user's score is checked.

Early rejection (``floors``): each candidate may come with the score it must reach to matter (in
DE, the score that would let a trial beat its parent). Where the score is accuracy on ``val_data``
batches, evaluation stops at the first batch after which even an all-correct remainder cannot reach
that floor, and the candidate comes back as a :class:`Bound` (an upper bound, below its floor)
instead of its exact score. Selection is unchanged, so the masks are the same as without it.

Every worker pins its intra-op threads (``threads_per_worker``, default 1); an evaluation is a pure
function of (weights, counts), so ``serial`` run with the same thread count gives bit-identical
fitness, hence identical masks. A worker that raises is reported with its traceback and the
candidate retried once elsewhere; a worker that dies is replaced once; then the search stops.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
import socket
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from pydantic import Field

from ..options import Options
from .batches import Bound, check_score

log = logging.getLogger("de_plugin")
BACKENDS = ("serial", "batched", "process", "ray")


class WorkerError(RuntimeError):
    """An evaluation worker failed; the message carries its traceback."""


class Scorer(Protocol):
    """What a backend scores with: one model, candidates applied in place and undone."""

    model: nn.Module

    def reset(self) -> None:
        """Take the model's current weights as the round's reference."""

    def score(self, candidate: Any, floor: Optional[float] = None) -> float:
        """The candidate's score; may be a :class:`Bound` below ``floor`` when it cannot reach it."""

    def restore(self) -> None:
        """Put the round's reference weights back."""


class Backend(Protocol):
    """Where a round's candidates are scored (:func:`make_backend`)."""

    name: str
    scorer: Scorer

    def start_round(self) -> None:
        """The scorer's model holds the round's weights: snapshot them (and ship them to workers)."""

    def evaluate(self, batch: Sequence[Any], floors: Optional[Sequence[Optional[float]]] = None) -> list[float]:
        """Scores of ``batch`` in order."""

    def end_round(self) -> None:
        """The model holds the round's weights again."""

    def close(self) -> None:
        """Stop workers."""


def finish_round(scorer: Scorer) -> None:
    """The round is over: the model holds its weights again and the scorer lets go of what it held
    per weight for the round (the snapshot, the ranks), so fine-tuning does not carry them."""
    scorer.restore()
    release = getattr(scorer, "release", None)
    if release is not None:
        release()


@contextmanager
def backend_round(backend: Backend) -> Iterator[Scorer]:
    """One round on ``backend``: the model's weights are the round's inside, and again after."""
    backend.start_round()
    try:
        yield backend.scorer
    finally:
        backend.end_round()


# ---------------------------------------------------------------------------------------- serial
class SerialBackend:
    name = "serial"

    def __init__(self, scorer: Scorer):
        self.scorer = scorer

    def start_round(self) -> None:
        self.scorer.reset()

    def evaluate(self, batch: Sequence[np.ndarray], floors: Optional[Sequence[Optional[float]]] = None) -> list[float]:
        """Scores of ``batch`` in order; with ``floors``, candidates may come back as :class:`Bound`."""
        floors = floors if floors is not None else [None] * len(batch)
        try:
            return [self.scorer.score(c, f) for c, f in zip(batch, floors)]
        finally:  # between batches the model holds the round's weights, as with remote workers
            self.scorer.restore()

    def end_round(self) -> None:
        finish_round(self.scorer)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------- batched
class BatchedBackend(SerialBackend):
    """K candidates per forward: the targets' masked weights stacked on a leading dim and vmapped."""

    name = "batched"

    def __init__(self, scorer: "Scorer", batches: Sequence[tuple[torch.Tensor, torch.Tensor]], metric: Callable,
                 chunk: int = 8):
        super().__init__(scorer)
        self.xs = [b[0] for b in batches]
        self.y = torch.cat([b[1] for b in batches])
        self.metric, self.chunk = metric, chunk
        self.fallback = False

    def _forward(self, stacked: dict[str, torch.Tensor]) -> torch.Tensor:
        from torch.func import functional_call, vmap

        model = self.scorer.model
        dev = next(model.parameters()).device
        outs = []
        for x in self.xs:
            x = x.to(dev)
            outs.append(vmap(lambda p: functional_call(model, p, (x,)))(stacked))
        return torch.cat(outs, dim=1)  # [K, N, classes]

    def evaluate(self, batch: Sequence[np.ndarray], floors: Optional[Sequence[Optional[float]]] = None) -> list[float]:
        """Exact scores (a vmapped chunk runs every batch, so ``floors`` only apply after a fallback)."""
        if self.fallback:
            return SerialBackend.evaluate(self, batch, floors)
        s = self.scorer
        names = [f"{t.module_name}.{t.param_name}" if t.module_name else t.param_name for t in s.targets]
        if any(n not in dict(s.model.named_parameters()) for n in names):
            self.fallback = True  # masks attached as _orig parameters: not a plain functional_call
            return SerialBackend.evaluate(self, batch, floors)
        out: list[float] = []
        was = s.model.training
        s.model.eval()
        try:
            for start in range(0, len(batch), self.chunk):
                part = batch[start:start + self.chunk]
                stacked = {}
                with torch.no_grad():
                    for li, (name, w0) in enumerate(zip(names, s.w0)):
                        mask = s.stacked_masks(li, [int(c[li]) for c in part])
                        stacked[name] = torch.where(mask, w0.unsqueeze(0), torch.zeros((), dtype=w0.dtype))
                with torch.inference_mode():
                    logits = self._forward(stacked)
                out += [check_score(self.metric(logits[j], self.y.to(logits.device))) for j in range(len(part))]
        except Exception as exc:  # noqa: BLE001 - vmap cannot run every model; serial always can
            log.warning("batched evaluation is not possible for this model (%s); using serial", exc)
            self.fallback = True
            return out + SerialBackend.evaluate(self, batch[len(out):], None if floors is None else floors[len(out):])
        finally:
            s.model.train(was)
        return out


# --------------------------------------------------------------------------------------- process
_PAYLOAD: Any = None  # the scorer, inherited by forked workers


def _plain(v: Any) -> float:
    return v if isinstance(v, Bound) else float(v)


def _worker_main(conn, threads: int) -> None:
    torch.set_num_threads(threads)
    scorer = _PAYLOAD  # the parent's scorer, inherited at fork: a model replica and cached data
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        kind = msg[0]
        try:
            if kind == "round":
                scorer.model.load_state_dict(msg[1])
                scorer.reset()
                conn.send(("ok", None))
            elif kind == "eval":
                conn.send(("ok", scorer.score(msg[1], msg[2])))
            elif kind == "stop":
                return
        except Exception:  # noqa: BLE001 - report everything to the parent
            conn.send(("error", traceback.format_exc()))


class ProcessBackend:
    """Forked local workers; each receives the round's weights once, then only count vectors."""

    name = "process"

    def __init__(self, scorer: Scorer, workers: int, threads: int):
        if "fork" not in mp.get_all_start_methods():
            raise RuntimeError("backend='process' needs the fork start method (Linux/macOS); use 'ray' instead")
        self.scorer, self.n, self.threads = scorer, workers, threads
        self.ctx = mp.get_context("fork")
        self.workers: list[tuple[Any, Any]] = []
        self.round_state: Optional[dict] = None
        for _ in range(workers):
            self.workers.append(self._spawn())

    def _spawn(self):
        global _PAYLOAD
        _PAYLOAD = self.scorer
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker_main, args=(child, self.threads), daemon=True)
        proc.start()
        child.close()
        _PAYLOAD = None
        if self.round_state is not None:
            parent.send(("round", self.round_state))
            self._reply(parent, proc)
        return parent, proc

    def _reply(self, conn, proc):
        try:
            if not conn.poll(None):
                raise EOFError
            status, value = conn.recv()
        except (EOFError, ConnectionError, OSError):
            raise WorkerError(f"evaluation worker pid {proc.pid} died (exit code {proc.exitcode})") from None
        if status == "error":
            raise WorkerError(f"evaluation worker pid {proc.pid} raised:\n{value}")
        return value

    def start_round(self) -> None:
        self.scorer.reset()
        self.round_state = {k: v.detach().cpu().clone() for k, v in self.scorer.model.state_dict().items()}
        for conn, proc in self.workers:
            conn.send(("round", self.round_state))
        for conn, proc in self.workers:
            self._reply(conn, proc)

    def evaluate(self, batch: Sequence[np.ndarray], floors: Optional[Sequence[Optional[float]]] = None) -> list[float]:
        floors = floors if floors is not None else [None] * len(batch)
        out: list[Optional[float]] = [None] * len(batch)
        pending = list(range(len(batch)))
        retries: dict[int, int] = {}
        while pending:
            busy = []
            for w, idx in zip(range(len(self.workers)), pending[: len(self.workers)]):
                conn, proc = self.workers[w]
                try:
                    conn.send(("eval", batch[idx], floors[idx]))
                except (BrokenPipeError, OSError):
                    pass  # reported by _reply below
                busy.append((w, idx))
            pending = pending[len(busy):]
            for w, idx in busy:
                conn, proc = self.workers[w]
                try:
                    out[idx] = self._reply(conn, proc)
                except WorkerError as exc:
                    retries[idx] = retries.get(idx, 0) + 1
                    log.warning("%s; candidate %d %s", exc, idx, "retried" if retries[idx] <= 1 else "failed twice")
                    if retries[idx] > 1:
                        raise
                    if not proc.is_alive():
                        self.workers[w] = self._spawn()
                    pending.insert(0, idx)
        return [_plain(v) for v in out]

    def end_round(self) -> None:
        finish_round(self.scorer)
        self.round_state = None  # a copy of the model: only needed to restart a worker mid-round

    def close(self) -> None:
        for conn, proc in self.workers:
            try:
                conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        self.workers = []


# ------------------------------------------------------------------------------------------- ray
def _ray_init(ray: Any, address: Optional[str], runtime_env: Optional[dict], cpus: int, timeout: float) -> None:
    """``ray.init`` for a local Ray or a cluster; an address nobody answers at, or a cluster running
    another Ray, is said in plain words instead of a hang or Ray's internals."""
    if not address:
        ray.init(num_cpus=max(cpus, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                 configure_logging=False, runtime_env=runtime_env)
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError):
        raise ConnectionError(f"no Ray cluster answered at ray_address={address!r} within {timeout:.0f} s: start one "
                              "there (ray start --head --port <port>) or fix the address (host:port of the head node, "
                              "or ray://host:10001 for Ray Client)") from None
    try:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
    except Exception as exc:  # noqa: BLE001 - Ray raises RuntimeError / ConnectionError with its own text
        if "version" in str(exc).lower() and "mismatch" in str(exc).lower():
            raise RuntimeError(f"the Ray cluster at {address} runs another Ray or Python version than this process "
                               f"(Ray {ray.__version__} here); install the cluster's Ray here, or start the cluster "
                               f"with this one. Ray said: {str(exc).splitlines()[0]}") from None
        raise


def _ray_actor(ray: Any, threads: int, gpu: bool) -> Any:
    """The worker actor class: one per GPU when the model is on CUDA, else ``threads`` CPUs each."""

    @ray.remote(num_cpus=0 if gpu else threads, num_gpus=1 if gpu else 0)
    class _Actor:
        def __init__(self, scorer, threads):
            torch.set_num_threads(threads)
            self.scorer = scorer

        def where(self):
            ctx = ray.get_runtime_context()
            return socket.gethostname(), ctx.get_node_id(), list(ctx.get_accelerator_ids().get("GPU", []))

        def start_round(self, state):
            self.scorer.model.load_state_dict(state)
            self.scorer.reset()

        def score(self, candidate, floor):
            return self.scorer.score(candidate, floor)

    return _Actor


class RayBackend:
    """One Ray actor per worker, each with a model replica; candidate vectors are the only traffic
    besides the round's weights (``ray.put`` once per round).

    Without ``address`` a local Ray starts in this process; with one (``"127.0.0.1:6379"`` from
    ``ray start --head``, or ``"ray://host:10001"``) the actors run on that cluster's nodes, one per GPU
    when the model is on CUDA, else one per ``threads`` CPUs. ``runtime_env`` goes to ``ray.init``: the
    cluster's workers import the model's class and the scoring code, so code that is not installed on
    the nodes travels as ``{"py_modules": [...]}`` or ``{"working_dir": "."}``."""

    name = "ray"
    CONNECT_TIMEOUT = 5.0  # seconds for a cluster to answer at ray_address before we say none did

    def __init__(self, scorer: Scorer, workers: int, threads: int, address: Optional[str] = None,
                 runtime_env: Optional[dict] = None):
        try:
            import ray
        except ImportError:
            raise ImportError("backend='ray' needs Ray: pip install 'de-plugin[ray]' (or pip install ray)") from None
        self.ray, self.scorer = ray, scorer
        gpu = any(p.is_cuda for p in scorer.model.parameters())
        if not ray.is_initialized():
            _ray_init(ray, address, runtime_env, workers * threads, self.CONNECT_TIMEOUT)
        elif address or runtime_env:
            log.warning("Ray is already initialised in this process (%s): ray_address / ray_runtime_env are not "
                        "applied; call ray.shutdown() first to join another cluster",
                        ray.get_runtime_context().gcs_address)
        if gpu and ray.cluster_resources().get("GPU", 0) < 1:
            raise ValueError("the model is on CUDA but the Ray cluster has no GPU (ray.cluster_resources() lists "
                             "none): start its nodes with GPUs (ray start --num-gpus N) or search on the CPU")
        payload = ray.put(scorer)  # model replica, cached data and scoring code, shipped once
        actor = _ray_actor(ray, threads, gpu).options(scheduling_strategy="SPREAD")  # over the nodes
        self.actors = [actor.remote(payload, threads) for _ in range(workers)]
        self.placement = self._where()

    def _where(self) -> dict:
        """Which node each worker runs on (and says so in the log and the result); an actor that cannot
        unpickle the model (its class not importable on the node) fails here, before any search."""
        where, alive, error = [], [], None
        for a in self.actors:
            try:
                where.append(self.ray.get(a.where.remote()))
                alive.append(a)
            except self.ray.exceptions.RayActorError as exc:  # its node died, or it cannot unpickle the model
                error = exc
                if "No module named" not in str(exc):
                    log.warning("ray: a worker died at start (%s); going on without it", str(exc).splitlines()[0])
        self.actors = alive
        if error is not None and (not alive or "No module named" in str(error)):
            exc = error
            self.close()
            missing = re.search(r"No module named '([^']+)'", str(exc))
            if missing:
                raise ImportError(
                    f"the Ray workers cannot import {missing.group(1)!r}, which the model or scoring code comes from: "
                    f"ship it with ray_runtime_env={{'py_modules': ['path/to/{missing.group(1).split('.')[0]}']}} "
                    "(a module file or package directory), or {'working_dir': '.'} to send the current directory, "
                    "or install it on every node") from None
            raise exc
        nodes: dict[str, int] = {}
        for host, node, _gpus in where:
            key = f"{host}/{node[:8]}"
            nodes[key] = nodes.get(key, 0) + 1
        log.info("ray: %d workers on %d node(s): %s%s", len(where), len(nodes),
                 ", ".join(f"{h} ({n})" for h, n in nodes.items()),
                 "; GPUs " + ", ".join(str(g) for *_, g in where) if any(g for *_, g in where) else "")
        return {"workers": len(where), "nodes": nodes, "gpus": [g for *_, g in where]}

    def start_round(self) -> None:
        self.scorer.reset()
        state = self.ray.put({k: v.detach().cpu().clone() for k, v in self.scorer.model.state_dict().items()})
        futures = [(a, a.start_round.remote(state)) for a in self.actors]
        for a, f in futures:
            try:
                self.ray.get(f)
            except self.ray.exceptions.RayActorError as exc:  # its node died between rounds
                if len(self.actors) == 1:
                    raise WorkerError(f"the last Ray worker died: {exc}") from exc
                log.warning("ray: a worker died (%s); going on without it", str(exc).splitlines()[0])
                self.actors.remove(a)
                self.placement["workers"] = len(self.actors)

    def evaluate(self, batch: Sequence[np.ndarray], floors: Optional[Sequence[Optional[float]]] = None) -> list[float]:
        floors = floors if floors is not None else [None] * len(batch)
        sent = [(self.actors[i % len(self.actors)], c, fl) for i, (c, fl) in enumerate(zip(batch, floors))]
        futures = [a.score.remote(c, fl) for a, c, fl in sent]
        out = []
        for i, f in enumerate(futures):
            try:
                out.append(_plain(self.ray.get(f)))
            except Exception as exc:  # noqa: BLE001 - Ray wraps the worker's exception
                out.append(self._retry(sent[i], i, exc))
        return out

    def _retry(self, sent: tuple, i: int, exc: Exception) -> float:
        """A candidate whose worker failed: a dead worker (its node gone) leaves the pool and the candidate
        goes to the next live one; any other failure is retried once elsewhere. Scores do not depend on
        the worker, so the search goes on exactly as it would have."""
        actor, candidate, floor = sent
        dead = isinstance(exc, self.ray.exceptions.RayActorError)
        log.warning("ray worker failed on candidate %d (%s); %s", i, str(exc).splitlines()[0][:200],
                    "dropping it, retrying on another worker" if dead else "retrying once")
        tries = len(self.actors) if dead else 1
        for _ in range(tries):
            if dead and actor in self.actors and len(self.actors) > 1:
                self.actors.remove(actor)
                self.placement["workers"] = len(self.actors)
            others = [a for a in self.actors if a is not actor] or self.actors
            actor = others[i % len(others)]
            try:
                return _plain(self.ray.get(actor.score.remote(candidate, floor)))
            except Exception as exc2:  # noqa: BLE001
                exc, dead = exc2, isinstance(exc2, self.ray.exceptions.RayActorError)
        raise WorkerError(f"ray evaluation failed on every worker tried: {exc}") from exc

    def end_round(self) -> None:
        finish_round(self.scorer)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []


class BackendOptions(Options):
    """Where candidates are scored; shared by the pruners that score many candidates."""

    backend: Literal["serial", "batched", "process", "ray"] = Field(
        "serial", description="where candidates are evaluated (de_plugin.evaluation)")
    workers: int = Field(1, ge=1, description="process / ray: evaluation workers")
    threads_per_worker: int = Field(1, ge=1, description="process / ray: intra-op threads pinned in each worker")
    ray_address: Optional[str] = Field(None, description="ray: join this cluster instead of starting a local one")
    ray_runtime_env: Optional[dict] = Field(None, description="ray: runtime_env for ray.init, e.g. {'py_modules': "
                                            "['mymodels.py']} when the model's class is not installed on the nodes")


def make_backend(name: str, scorer: Any, workers: int = 1, threads: int = 1, address: Optional[str] = None,
                 val_batches: Optional[list] = None, metric: Optional[Callable] = None,
                 runtime_env: Optional[dict] = None):
    """The evaluation backend named ``name`` (see the module docstring)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if name == "serial":
        return SerialBackend(scorer)
    if name == "batched":
        if not getattr(scorer, "batchable", False):  # the magnitude scorer's stacked masked weights
            raise ValueError(f"backend='batched' stacks magnitude-masked weights and is not available for "
                             f"{type(scorer).__name__}; use 'serial', 'process' or 'ray'")
        if not val_batches or metric is None:
            log.warning("backend='batched' needs val_data batches and a metric name; using serial")
            return SerialBackend(scorer)
        if scorer.calib:
            log.warning("backend='batched' cannot re-estimate BatchNorm per candidate (adaptive BN); using serial")
            return SerialBackend(scorer)
        return BatchedBackend(scorer, val_batches, metric)
    if name == "process":
        return ProcessBackend(scorer, workers, threads)
    return RayBackend(scorer, workers, threads, address, runtime_env)
