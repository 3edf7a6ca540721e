"""The base of our INC 3.x configs (``DELayerwiseConfig``, ``DEChannelConfig``)."""
from __future__ import annotations

from neural_compressor.torch.quantization.config import TorchBaseConfig


class PruningConfig(TorchBaseConfig):
    """What our INC 3.x configs share: one mapping for the whole model (one search over all selected
    layers, as INC's PT2E configs map themselves), no per-operator quantization settings, and no
    composition with INC's quantizers."""

    def __add__(self, other):
        # Quirk (INC 3.10): ComposableConfig.to_config_mapping iterates each config's get_model_info(), which is
        # None for StaticQuantConfig / DynamicQuantConfig on the PT2E route ("'NoneType' object is not iterable"),
        # and it maps only local (per-op) configs, so a global RTNConfig() in a composition quantizes nothing.
        raise TypeError(f"INC 3.x cannot compose {type(self).__name__} with a quantization config; prune and quantize "
                        f"in one call instead: de_plugin_inc.prune_and_quantize(model, pruning={type(self).__name__}"
                        "(...), quant=StaticQuantConfig(), example_inputs=..., calib_data=...)")

    @classmethod
    def register_supported_configs(cls) -> None:
        cls.supported_configs = []

    def to_config_mapping(self, config_list=None, model_info=None):
        return {self.name: self}
