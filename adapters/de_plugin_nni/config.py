"""One compression config (YAML, JSON or dict) run end to end through NNI's own pipeline.

    pruner: de_layerwise            # any name of de_plugin_nni.list_pruners()
    options: {rounds: 3, finetune_epochs: 1}
    config_list:                    # NNI's config_list, unchanged
      - {op_types: [Linear], sparse_ratio: 0.95}
    speedup: false                  # ModelSpeedup (structured masks only); speedup_engine: auto | nni | de_plugin
    quantizer: {name: qat, config_list: [...], steps: 200, quant_start_step: 50}
    # for the command line only: what to train and on which data
    model: lenet300                 # de_plugin.demo.models name
    data: /usr/share/datasets/fashion-mnist
    train: {epochs: 10, lr: 0.001, batch_size: 128}

``run_config(cfg)`` builds the model and an NNI ``TorchEvaluator`` from ``model``/``data``/``train``;
``run_config(cfg, model=..., evaluator=...)`` uses yours instead.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

import nni
import torch
import torch.nn.functional as F
from nni.compression import TorchEvaluator
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from de_plugin.adapter import apply_masks, check_out_dir, count_macs, measure_latency, validate_options

from .names import PRUNERS, SCHEDULERS, core_weight_pruner, create_pruner, get_pruner_class, lookup
from .quantize import QUANTIZERS, finetune, int8_storage, quantize
from .tracing import flat_masks
from .tracing import speedup as run_speedup

log = logging.getLogger("de_plugin_nni")


class QuantizerSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    config_list: List[Dict[str, Any]]
    steps: int = Field(100, ge=1, description="training steps of QAT (ignored by PTQ)")
    quant_start_step: int = Field(0, ge=0)


class TrainSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(10, ge=0)
    lr: float = Field(1e-3, gt=0)
    finetune_lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(128, ge=1)
    seed: int = 0
    val_size: int = Field(5000, ge=1)
    train_limit: Optional[int] = Field(None, ge=1)


class CompressionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pruner: str
    options: Dict[str, Any] = Field(default_factory=dict)
    config_list: List[Dict[str, Any]]
    speedup: bool = False
    #: "auto": NNI's ModelSpeedup, the core's channel slicing where it fails; "nni"; "de_plugin"
    speedup_engine: Literal["auto", "nni", "de_plugin"] = "auto"
    finetune_epochs: int = Field(0, ge=0, description="epochs of training after pruning/speedup (zeros kept)")
    schedule_steps: Optional[int] = Field(None, ge=1, description="training steps for linear/agp schedules")
    quantizer: Optional[QuantizerSection] = None
    model: Optional[str] = None
    data: Optional[str] = None
    train: TrainSection = Field(default_factory=TrainSection)


def _read_config_file(path: Path) -> Any:
    """The file's data; a syntax error names the file and the line (YAML for .yaml/.yml, else JSON)."""
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"{path} is not valid YAML{where}: {problem}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg} "
                         f"(YAML files need the .yaml suffix)") from None


def load_config(source: str | Path | Dict[str, Any]) -> CompressionConfig:
    """Read and validate a config; unknown keys are errors that name the valid ones."""
    if isinstance(source, (str, Path)):
        raw = _read_config_file(Path(source))
    else:
        raw = copy.deepcopy(source)
    if not isinstance(raw, dict):
        raise ValueError("a compression config must be a mapping with at least 'pruner' and 'config_list'")
    cfg = validate_options(CompressionConfig, str(source) if isinstance(source, (str, Path)) else "config", raw,
                           what="keys in the compression config")
    if cfg.quantizer is not None and cfg.quantizer.name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {cfg.quantizer.name!r}; valid: {', '.join(sorted(QUANTIZERS))}")
    return cfg


def torch_evaluator(model: nn.Module, data, train: TrainSection, lr: float, evaluate) -> TorchEvaluator:
    """An NNI TorchEvaluator over tensors: Adam (traced, as NNI requires), cross-entropy."""

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        model.train()
        steps = 0
        for _ in range(max_epochs if max_epochs is not None else 10**9):
            perm = torch.randperm(len(data.y_train))
            for i in range(0, len(perm), train.batch_size):
                idx = perm[i : i + train.batch_size]
                optimizers.zero_grad()
                training_step((data.x_train[idx], data.y_train[idx]), model).backward()
                optimizers.step()
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    return

    def training_step(batch, model):
        return F.cross_entropy(model(batch[0]), batch[1])

    optimizer = nni.trace(torch.optim.Adam)(model.parameters(), lr=lr)
    return TorchEvaluator(training_func, optimizer, training_step, evaluating_func=evaluate, dummy_input=data.x_val[:2])


def _layer_table(masks: Dict[str, Dict[str, torch.Tensor]]) -> List[Dict[str, Any]]:
    rows = []
    for name, t in sorted(masks.items()):
        m = t.get("weight")
        if m is None:
            continue
        rows.append({"layer": name, "params": int(m.numel()), "kept": int(m.sum()), "sparsity": 1.0 - float(m.mean())})
    return rows


#: constructor keywords of our NNI pruners that are not pruner options
PRUNER_KEYWORDS = ("seed", "progress", "train_data")


def precheck(cfg: CompressionConfig, model: nn.Module | None = None) -> Any:
    """What can be checked without data or training, checked first: the pruner's name, our pruners'
    options and every config_list entry (against an untrained copy of the demo model when the
    config names one). Our pruners' options come back validated (the pruner is built from that object);
    None for NNI's own pruners."""
    from de_plugin.adapter import ChannelOptions, CoarseOptions

    from .entries import validated_entries

    lookup(PRUNERS, cfg.pruner, "NNI pruner")
    if model is None and cfg.model is None:
        raise ValueError("the config needs 'model' (e.g. lenet300) when no model object is given")
    if model is None:
        from de_plugin.demo.models import create_model

        model = create_model(cfg.model)
    opts = {k: v for k, v in cfg.options.items() if k not in PRUNER_KEYWORDS}
    if core_weight_pruner(cfg.pruner):
        o = validate_options(get_pruner_class(cfg.pruner).Options, cfg.pruner, opts)
        from .pruner import parse_config_list

        parse_config_list(model, cfg.config_list, cfg.pruner)
        return o
    if cfg.pruner == "random_coarse":
        o = validate_options(CoarseOptions, cfg.pruner, opts)
        from .coarse import parse_coarse_config

        parse_coarse_config(model, cfg.config_list)
        return o
    if cfg.pruner == "de_channel":
        o = validate_options(ChannelOptions, cfg.pruner, opts)
        from .channel import parse_channel_config

        parse_channel_config(model, cfg.config_list, o.include_linear)
        return o
    if cfg.pruner in SCHEDULERS:
        lookup(PRUNERS, cfg.options.get("pruner", "level"), "NNI pruner")
    validated_entries(model, cfg.config_list, cfg.pruner, "{'op_types': ['Linear'], 'sparse_ratio': 0.5}")
    return None


def run_config(source, model: nn.Module | None = None, evaluator=None, test_evaluate=None,
               out_dir: str | Path | None = None, overwrite: bool = False) -> Dict[str, Any]:
    """Prune (and optionally speed up and quantize) as the config says; return and print a report
    (written to ``out_dir``/result.json, refused before any work if one is there and not ``overwrite``)."""
    cfg = load_config(source)
    options = precheck(cfg, model)
    if out_dir is not None:
        check_out_dir(out_dir, overwrite)
    data = None
    if model is None:
        model, evaluator, test_evaluate, data = _demo(cfg)
    elif evaluator is None and (cfg.pruner != "level" or cfg.quantizer is not None):
        raise ValueError("give an NNI evaluator together with your model")
    metric = (lambda m: float(evaluator.evaluating_func(m))) if evaluator is not None else None
    report: Dict[str, Any] = {"pruner": cfg.pruner, "config_list": cfg.config_list}
    _measure(report, "dense", model, metric, test_evaluate)
    masks = _compress(cfg, model, evaluator, data, options)
    report["layers"] = _layer_table(masks)
    total = sum(r["params"] for r in report["layers"])
    report["sparsity"] = 1.0 - sum(r["kept"] for r in report["layers"]) / total
    _measure(report, "pruned", model, metric, test_evaluate)
    if cfg.speedup:
        report["speedup"] = _speedup(cfg, model, evaluator, masks)
    if cfg.finetune_epochs:
        if evaluator is None:
            raise ValueError("finetune_epochs needs an evaluator")
        finetune(model, evaluator, cfg.finetune_epochs)
        _measure(report, "finetuned", model, metric, test_evaluate)
    if cfg.quantizer is not None:
        q = cfg.quantizer
        qmodel, calib = quantize(model, q.name, q.config_list, evaluator, steps=q.steps,
                                 quant_start_step=q.quant_start_step)
        report["quantizer"] = q.name
        report["storage"] = int8_storage(qmodel, calib)
        _measure(report, "quantized", qmodel, metric, test_evaluate)
    _print(report)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(report, indent=2, default=str))
    report["model"] = model
    return report


def _demo(cfg: CompressionConfig) -> tuple:
    """The config's demo model (``model: lenet300`` ...) trained on Fashion-MNIST (or ``data:``), with an NNI
    evaluator over its validation split and a test-set evaluate: the CLI's main job, not a user's model."""
    from de_plugin.demo.data import FASHION_MNIST_DIR, load_idx_dataset
    from de_plugin.demo.models import DEEP_MODELS
    from de_plugin.demo.training import dense_model, make_evaluate

    folder = cfg.data or FASHION_MNIST_DIR
    deep = cfg.model in DEEP_MODELS  # CIFAR-style models: 32x32 inputs, one channel here
    data = load_idx_dataset(folder, val_size=cfg.train.val_size, train_limit=cfg.train.train_limit,
                            seed=cfg.train.seed, size=32 if deep else None)
    model = dense_model(cfg.model, data, cfg.train.epochs, cfg.train.seed, folder, **({"in_channels": 1} if deep else {}))
    evaluator = torch_evaluator(model, data, cfg.train, cfg.train.finetune_lr, make_evaluate(data.x_val, data.y_val))
    return model, evaluator, make_evaluate(data.x_test, data.y_test), data


def _measure(report: Dict[str, Any], when: str, model: nn.Module, metric, test_evaluate) -> None:
    if metric is not None:
        report[f"val_accuracy_{when}"] = metric(model)
    if test_evaluate is not None:
        report[f"test_accuracy_{when}"] = test_evaluate(model)


def _compress(cfg: CompressionConfig, model: nn.Module, evaluator, data, validated: Any = None,
              ) -> Dict[str, Dict[str, Any]]:
    """The config's pruner on ``model`` (NNI's compress, scheduled when it is a scheduler); the masks, also
    applied to the weights (what NNI's wrappers applied in forward). ``validated``: our pruner's options
    as :func:`precheck` validated them, passed on as that object."""
    options = dict(cfg.options)
    if validated is not None:
        options = {k: v for k, v in options.items() if k in PRUNER_KEYWORDS}
        options["options"] = validated
    weights = core_weight_pruner(cfg.pruner)
    if weights:
        options.setdefault("progress", True)
    if (weights or cfg.pruner in ("random_coarse", "de_channel")) and data is not None:  # adaptive BN's training batches
        bs = cfg.train.batch_size
        options.setdefault("train_data", [(data.x_train[i:i + bs], data.y_train[i:i + bs])
                                          for i in range(0, min(len(data.y_train), 100 * bs), bs)])
    pruner = create_pruner(cfg.pruner, model, cfg.config_list, evaluator, **options)
    if cfg.pruner in SCHEDULERS:
        if cfg.schedule_steps is None:
            raise ValueError(f"pruner {cfg.pruner!r} trains while pruning: set schedule_steps in the config")
        _, masks = pruner.compress(max_steps=cfg.schedule_steps, max_epochs=None)
    else:
        _, masks = pruner.compress()
    pruner.unwrap_model()
    masks = {k: dict(v) for k, v in masks.items()}
    apply_masks(model, flat_masks(masks), strict=False)
    return masks


def _speedup(cfg: CompressionConfig, model: nn.Module, evaluator, masks) -> Any:
    """The model made physically smaller (structured masks only); parameters, MACs and latency before / after."""
    if cfg.pruner == "level" or core_weight_pruner(cfg.pruner):
        return "skipped: weight-level masks leave every layer's shape as it is (no speedup)"
    dummy = evaluator.get_dummy_input() if evaluator is not None else None
    before = _cost(model, dummy)
    run_speedup(model, dummy, masks, engine=cfg.speedup_engine)
    after = _cost(model, dummy)
    return {f"{k}_{when}": v for when, c in (("before", before), ("after", after)) for k, v in c.items()}


def _cost(model: nn.Module, dummy: Any) -> Dict[str, Any]:
    """Parameters, MACs of one sample and measured latency (ms, median; batch 1 and 64) on this machine."""
    out: Dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    if dummy is not None:
        out["macs"] = count_macs(model, dummy)["macs_dense"]
        for batch in (1, 64):
            out[f"latency_ms_b{batch}"] = 1000 * measure_latency(model, dummy, batch, repeats=20 if batch == 1 else 5)
    return out


def _print(report: Dict[str, Any]) -> None:
    print(f"{'layer':24s} {'params':>8s} {'kept':>8s} {'sparsity':>9s}")
    for r in report["layers"]:
        print(f"{r['layer']:24s} {r['params']:8d} {r['kept']:8d} {r['sparsity']:9.4f}")
    print(f"overall sparsity (pruned layers) {report['sparsity']:.4f} = {1 / max(1e-12, 1 - report['sparsity']):.1f}x")
    for key in ("val_accuracy_dense", "val_accuracy_pruned", "val_accuracy_finetuned", "val_accuracy_quantized",
                "test_accuracy_dense", "test_accuracy_pruned", "test_accuracy_finetuned", "test_accuracy_quantized",
                "speedup", "storage"):
        if key in report:
            print(f"{key}: {report[key]}")
