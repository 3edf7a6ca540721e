"""Op tables of the coupling pass (:mod:`de_plugin.channels.coupling`): which modules and functions keep the
channel axis as it is, which combine operands element-wise, which move or merge axes."""
from __future__ import annotations

import operator
import os
import traceback

import torch
import torch.nn.functional as F
from torch import nn

#: modules that keep every channel where it is (activations, pooling, dropout, padding)
SAME_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Mish, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.MaxPool2d,
    nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d,
    nn.ReflectionPad2d, nn.ReplicationPad2d,
)
SAME_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.mish,
    torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, F.dropout, F.dropout2d, F.interpolate, torch.clone, torch.nn.functional.relu_,
}
SAME_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone", "float", "to", "detach",
                "type_as", "half", "double"}
#: wrapped leaf functions known by name: torchvision.ops.stochastic_depth (registered with torch.fx.wrap;
#: EfficientNet, ConvNeXt, Swin, MaxViT) scales whole samples, never mixes channels
SAME_NAMES = {"stochastic_depth", "drop_path"}
#: wrapped leaf functions whose input channels are something other than feature maps, so never pruned:
#: Swin V2's continuous position bias (torchvision ``_get_relative_position_bias``) takes one channel per
#: attention head from its MLP
LOCK_NAMES = {"_get_relative_position_bias": "one bias per attention head"}
ELEMENTWISE = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
               torch.add, torch.sub, torch.mul, torch.div, "add", "add_", "sub", "mul", "mul_", "div"}
REDUCE = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}
RESHAPES = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}
#: ops that return a tuple of parts of their input along one axis
SPLITS = {torch.chunk, torch.split, "chunk", "split"}
PERMUTES = {torch.permute, "permute", torch.transpose, "transpose", torch.swapaxes, "swapaxes"}


def where(exc: BaseException) -> str:
    """``" at file:line in function"`` for the innermost frame of ``exc`` outside torch, else ``""``:
    the line of the user's ``forward`` that torch.fx could not trace."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(skip)]
    if not frames:
        return ""
    f = frames[-1]
    return f", at {f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
