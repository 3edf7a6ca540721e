"""INC 3.8+ route: DELayerwiseConfig in INC 3.x's registries (quantize, autotune), prune_and_quantize with
the pruned zeros kept through static / dynamic / RTN quantization, GPTQ refused, sparse int8 on disk.

Runs where ``neural-compressor-pt`` >= 3.8 is installed (CI's second environment, ``.venv-inc``)."""
import copy
import os

import pytest
import torch
from torch import nn

import de_plugin_inc

if de_plugin_inc.ROUTE != "inc3":
    pytest.skip(f"INC 3.8+ route not installed here (neural-compressor {de_plugin_inc.INC_VERSION})",
                allow_module_level=True)

from neural_compressor.torch.quantization import (  # noqa: E402
    DynamicQuantConfig,
    GPTQConfig,
    RTNConfig,
    StaticQuantConfig,
    TuningConfig,
    autotune,
    quantize,
)

from conftest import same_state, state_of  # noqa: E402
from de_plugin.adapter import as_matrix  # noqa: E402
from de_plugin.demo.training import train  # noqa: E402
from de_plugin_inc import DELayerwiseConfig, int_weights, load, prune_and_quantize, save, zeros_kept  # noqa: E402

DE = {"population": 6, "generations": 2}


class ConvNet(nn.Module):
    """Two convs and a classifier on the 8x8 digits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x.view(-1, 1, 8, 8)))))
        return self.out(torch.relu(self.fc(x.flatten(1))))


@pytest.fixture(scope="module")
def _convnet(digits):
    torch.manual_seed(0)
    m = ConvNet()
    train(m, digits.x_train, digits.y_train, epochs=8, lr=3e-3, batch_size=64, seed=0)
    return m.eval()


@pytest.fixture
def convnet(_convnet):
    return copy.deepcopy(_convnet)


@pytest.fixture
def example(digits):
    return (digits.x_val[:8],)


@pytest.fixture
def calib(digits):
    return [digits.x_train[i : i + 64] for i in range(0, 256, 64)]


def sparsity(model, names):
    return {n: float((model.get_submodule(n).weight == 0).float().mean()) for n in names}


def test_quantize_with_our_config_prunes_to_target(mlp, evaluate):
    dense = evaluate(mlp)
    cfg = DELayerwiseConfig(target_sparsity=0.8, eval_fn=evaluate, de_options=DE)
    pruned = quantize(mlp, cfg)  # INC's own entry point selects our registered algorithm
    s = sparsity(pruned, ["fc1", "fc2", "out"])
    total = sum(pruned.get_submodule(n).weight.numel() for n in s)
    overall = sum(s[n] * pruned.get_submodule(n).weight.numel() for n in s) / total
    assert overall == pytest.approx(0.8, abs=2e-3)
    assert pruned.de_plugin_report["sparsity"] == pytest.approx(overall, abs=1e-6)
    assert evaluate(pruned) > dense - 0.15  # one-shot at 80% without fine-tuning


@pytest.mark.parametrize("pattern", ["4x1", "2:4"])
def test_patterns_on_convs_and_linears(convnet, evaluate, pattern):
    # conv1's 9 inputs per filter do not split into runs of 4; the 10-way head not into 4-row blocks
    cfg = DELayerwiseConfig(target_sparsity=0.5 if pattern == "2:4" else 0.7, pattern=pattern, eval_fn=evaluate,
                            excluded_op_names=("conv1", "out"), de_options=DE)
    pruned = quantize(convnet, cfg)
    for name in ("conv2", "fc"):
        w = as_matrix(pruned.get_submodule(name).weight.detach())
        if pattern == "4x1":  # whole 4x1 blocks: the 4 rows of a block are zero together
            blocks = (w.reshape(w.shape[0] // 4, 4, w.shape[1]) == 0)
            assert torch.equal(blocks.all(1), blocks.any(1))
        else:  # at most 2 zeros in each run of 4 (2:4 reaches its ceiling of 50% exactly)
            zeros = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
            assert int(zeros.max()) == 2 and float((w == 0).float().mean()) == pytest.approx(0.5)
    assert float((pruned.conv1.weight == 0).float().mean()) == 0.0


def test_static_int8_keeps_every_pruned_weight_at_the_zero_point(convnet, evaluate, example, calib, digits):
    before = state_of(convnet)
    cfg = DELayerwiseConfig(target_sparsity=0.8, eval_fn=evaluate, de_options=DE)
    q = prune_and_quantize(convnet, cfg, StaticQuantConfig(), example_inputs=example, calib_data=calib)
    assert same_state(before, state_of(convnet))  # the user's model is untouched
    assert set(q.de_plugin_report["zeros_kept"]) == {"conv1", "conv2", "fc", "out"}
    assert all(v == 1.0 for v in q.de_plugin_report["zeros_kept"].values())
    ints = int_weights(q)
    for name, keep in q.de_plugin_masks.items():
        qi, zp = ints[name]
        assert qi.dtype == torch.int8 and torch.all(qi[~keep] == zp.expand_as(qi)[~keep])
    with torch.no_grad():
        acc_q = float((q(digits.x_val).argmax(1) == digits.y_val).float().mean())
    assert acc_q > evaluate(convnet) - 0.2


@pytest.mark.parametrize("quant", [DynamicQuantConfig(), RTNConfig(bits=8, group_size=32),
                                   RTNConfig(bits=4, group_size=32)], ids=["dynamic", "rtn8", "rtn4"])
def test_dynamic_and_weight_only_keep_zeros(mlp, evaluate, example, quant):
    cfg = DELayerwiseConfig(target_sparsity=0.75, eval_fn=evaluate, de_options=DE)
    q = prune_and_quantize(mlp, cfg, copy.deepcopy(quant), example_inputs=example)
    kept = zeros_kept(q, q.de_plugin_masks)
    assert kept and all(v == 1.0 for v in kept.values())


def test_gptq_and_bad_inputs_are_refused_before_work(mlp, evaluate, example, calib):
    before = state_of(mlp)
    cfg = DELayerwiseConfig(target_sparsity=0.8, eval_fn=evaluate, de_options=DE)
    with pytest.raises(ValueError, match="GPTQ .* refills pruned weights"):
        prune_and_quantize(mlp, cfg, GPTQConfig(), example_inputs=example)
    with pytest.raises(ValueError, match="calib_data"):
        prune_and_quantize(mlp, cfg, StaticQuantConfig(), example_inputs=example)
    with pytest.raises(ValueError, match="example_inputs as a tuple"):
        prune_and_quantize(mlp, cfg, StaticQuantConfig(), example_inputs=example[0], calib_data=calib)
    with pytest.raises(TypeError, match="calib_data.* must be an iterable of batches"):
        prune_and_quantize(mlp, cfg, StaticQuantConfig(), example_inputs=example, calib_data=42)
    with pytest.raises(ValueError, match="needs eval_fn"):
        prune_and_quantize(mlp, DELayerwiseConfig(), DynamicQuantConfig(), example_inputs=example)
    with pytest.raises(ValueError, match="at most 50%"):
        quantize(mlp, DELayerwiseConfig(target_sparsity=0.8, pattern="2:4", eval_fn=evaluate))
    with pytest.raises(ValueError, match="unknown pattern"):
        quantize(mlp, DELayerwiseConfig(pattern="2-4", eval_fn=evaluate))
    with pytest.raises(ValueError, match="'out' .* cannot be cut into 4x1"):
        quantize(mlp, DELayerwiseConfig(pattern="4x1", eval_fn=evaluate))
    with pytest.raises(ValueError, match="no layer matches"):
        quantize(mlp, DELayerwiseConfig(op_names=("conv.*",), eval_fn=evaluate))
    with pytest.raises(TypeError, match="prune_and_quantize"):
        DELayerwiseConfig(eval_fn=evaluate) + StaticQuantConfig()
    assert same_state(before, state_of(mlp))


def test_sparse_int8_file_is_small_and_loads_equal(convnet, evaluate, example, calib, digits, tmp_path):
    cfg = DELayerwiseConfig(target_sparsity=0.9, eval_fn=evaluate, de_options=DE)
    q = prune_and_quantize(convnet, cfg, StaticQuantConfig(), example_inputs=example, calib_data=calib)
    ours = save(q, str(tmp_path / "model.dpq"))
    assert ours == os.path.getsize(tmp_path / "model.dpq")
    torch.save(convnet.state_dict(), tmp_path / "dense.pt")
    q.save(example_inputs=example, output_dir=str(tmp_path / "inc"))  # INC's own file: fp32 weights + qdq ops
    inc_bytes = sum(f.stat().st_size for f in (tmp_path / "inc").rglob("*") if f.is_file())
    dense = os.path.getsize(tmp_path / "dense.pt")
    assert ours < 0.2 * dense and ours < 0.2 * inc_bytes
    back = load(str(tmp_path / "model.dpq"))
    with torch.no_grad():
        assert torch.equal(back(digits.x_val[:64]), q(digits.x_val[:64]))


def test_autotune_keeps_the_sparsest_config_within_tolerance(mlp, evaluate):
    dense = evaluate(mlp)
    tune = TuningConfig(config_set=[DELayerwiseConfig(target_sparsity=[0.97, 0.6], eval_fn=evaluate, de_options=DE)],
                        tolerable_loss=0.05)
    best = autotune(mlp, tune, eval_fn=evaluate)
    assert best is not None and evaluate(best) >= dense * 0.95
    assert best.de_plugin_report["sparsity"] == pytest.approx(0.6, abs=2e-3)  # 97% costs more than 5%


def test_de_channel_makes_the_model_smaller_under_the_macs_budget(resnet, images):
    from de_plugin.adapter import count_macs

    from de_plugin_inc import DEChannelConfig

    ev = __import__("de_plugin.demo.training", fromlist=["make_evaluate"]).make_evaluate(images.xv, images.yv)
    x = images.xv[:2]
    dense = count_macs(resnet, x)
    cfg = DEChannelConfig(macs=0.5, eval_fn=ev, train_data=images.batches[:4],
                          channel_options={"population": 6, "generations": 2, "bn_batches": 2})
    small = quantize(copy.deepcopy(resnet), cfg)  # INC's entry point: searched, then sliced
    after = count_macs(small, x)
    assert after["macs_dense"] <= 0.5 * dense["macs_dense"] and after["params_dense"] < dense["params_dense"]
    assert small.de_plugin_report["macs_kept"] == pytest.approx(after["macs_dense"] / dense["macs_dense"])
    assert ev(small) > 0.3  # a working (if untrained) smaller network


def test_de_channel_then_static_int8(resnet, images):
    from de_plugin_inc import DEChannelConfig

    ev = __import__("de_plugin.demo.training", fromlist=["make_evaluate"]).make_evaluate(images.xv, images.yv)
    before = state_of(resnet)
    cfg = DEChannelConfig(params=0.5, eval_fn=ev, train_data=images.batches[:4],
                          channel_options={"population": 6, "generations": 2, "bn_batches": 2})
    q = prune_and_quantize(resnet, cfg, StaticQuantConfig(), example_inputs=(images.xv[:8],),
                           calib_data=[b[0] for b in images.batches[:4]])
    assert same_state(before, state_of(resnet))
    assert q.de_plugin_report["params_kept"] <= 0.5 and "quantized" in q.de_plugin_report["eval"]
    ints = int_weights(q)  # every conv and the head of the smaller model are int8
    assert len(ints) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in resnet.modules())
    assert all(qi.dtype == torch.int8 for qi, _ in ints.values())
    with pytest.raises(TypeError, match="prune_and_quantize"):
        cfg + StaticQuantConfig()
    with pytest.raises(ValueError, match="exactly one budget"):
        quantize(copy.deepcopy(resnet), DEChannelConfig(eval_fn=ev))


@pytest.mark.parametrize("quant, value", [(StaticQuantConfig(w_dtype="int3"), "int3"),
                                          (StaticQuantConfig(act_algo="foo"), "foo")], ids=["w_dtype", "act_algo"])
def test_a_config_inc_rejects_is_said_before_the_search(mlp, example, calib, quant, value):
    called = []
    cfg = DELayerwiseConfig(target_sparsity=0.8, eval_fn=lambda m: called.append(1) or 0.5, de_options=DE)
    before = state_of(mlp)
    with pytest.raises(ValueError, match=rf"INC rejected INT8StaticQuantConfig .*the value '{value}' is not one INC "
                                         r"knows.*nothing was pruned"):
        prune_and_quantize(mlp, cfg, quant, example_inputs=example, calib_data=calib)
    assert not called and same_state(before, state_of(mlp))  # no search ran; the model is as it was


def test_inc3_chatter_is_dropped_and_real_warnings_pass():
    """INC 3.10's per-step INFO lines, its CPU notices and torchao's CUDA-kernel load failures are dropped;
    any other INC warning still reaches its handlers."""
    import logging

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handlers = {name: Keep() for name in ("neural_compressor", "torchao")}
    for name, h in handlers.items():
        logging.getLogger(name).addHandler(h)
    try:
        inc, tao = logging.getLogger("neural_compressor"), logging.getLogger("torchao")
        inc.info("Found 0 matches.")
        inc.warning("Auto detect accelerator: CPU_Accelerator.")
        tao.warning("Failed to load /x/torchao/_C_mxfp8.so: Could not load this library")
        inc.warning("Tuning failed: the config is not supported")
    finally:
        for name, h in handlers.items():
            logging.getLogger(name).removeHandler(h)
    assert seen == ["Tuning failed: the config is not supported"]


def test_de_options_are_validated_once_per_config(mlp, evaluate, monkeypatch):
    from de_plugin.search.allocator import SearchOptions

    built, init = [], SearchOptions.__init__
    monkeypatch.setattr(SearchOptions, "__init__",  # the search's own options (not the grouping check's)
                        lambda self, **d: (type(self) is SearchOptions and built.append(d)) or init(self, **d))
    pruned = quantize(mlp, DELayerwiseConfig(target_sparsity=0.5, eval_fn=evaluate, de_options={**DE, "population": 7}))
    assert pruned.de_plugin_report["sparsity"] == pytest.approx(0.5, abs=2e-3)
    assert len(built) == 1 and built[0]["population"] == 7
