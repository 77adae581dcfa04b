"""The source's config attributes, read from config.json as its transformers config class would give them.

Loading a config through `AutoConfig` imports much of transformers (about 4 s), and conversion needs only a few
attributes: head counts, head size, layer counts, the init scale and a few flags. `SourceConfig` answers them from
config.json through the spec's `ConfigSchema` (the class's attribute_map and defaults, as data). An attribute the
schema cannot answer comes from AutoConfig, loaded once and only then, so an answer never differs from
transformers'. `TransformersConfig` gives the same interface over a loaded config object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..errors import ConversionError

if TYPE_CHECKING:
    from .spec import ConfigSchema

_UNANSWERED = object()


class ConfigReader(Protocol):
    model_type: str

    def get(self, path: str) -> Any:
        """The attribute `path` (dotted: a key of a dict attribute, as in "rope_parameters.partial_rotary_factor"),
        None where the config has no such attribute."""


class TransformersConfig:
    """A transformers config object (attribute_map and class defaults applied) behind `ConfigReader`."""

    def __init__(self, config: Any, keys: dict[str, tuple[str, ...]] | None = None):
        self.config = config
        self.model_type: str = config.model_type
        # attribute -> further attributes to read where it is None, in order (ConfigSchema's keys: a fallback chain)
        self.keys = keys or {}

    def get(self, path: str) -> Any:
        attr, *rest = path.split(".")
        chain = (attr, *self.keys.get(attr, ()))
        value = next((v for key in chain if (v := getattr(self.config, key, None)) is not None), None)
        for part in rest:
            value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
        return value


def check_not_quantized_config(raw: dict[str, Any]) -> None:
    """A checkpoint saved quantized (bitsandbytes, GPTQ, AWQ, fp8, ...) keeps per-head scales that pooling would
    leave with H heads: refused, with the fix."""
    quantization = raw.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        named = f" ({method})" if isinstance(method, str) and len(method) < 40 else ""
        raise ConversionError(f"config.json has a quantization_config{named}: the weights are quantized; dequantize "
                              f"them first (load the model and save_pretrained in float16, bfloat16 or float32 "
                              f"without quantization_config), then convert that")


class SourceConfig:
    """config.json read through a `ConfigSchema`; AutoConfig (from `load`) answers what the schema cannot."""

    def __init__(self, raw: dict[str, Any], schema: ConfigSchema, load: Callable[[], ConfigReader]):
        check_not_quantized_config(raw)
        self.raw = raw
        self.schema = schema
        self.model_type: str = raw["model_type"]
        self._defaults = schema.defaults_for(self.model_type)
        self._load = load
        self._loaded: ConfigReader | None = None

    def get(self, path: str) -> Any:
        attr, *rest = path.split(".")
        value = self.attribute(attr)
        for part in rest:
            value = value.get(part) if isinstance(value, dict) else None
        return value

    def attribute(self, attr: str) -> Any:
        keys = self.schema.keys.get(attr, (attr,))
        values = [self.raw[key] for key in keys if key in self.raw]
        for value in values:
            if value is not None:
                return value
        default = self._defaults.get(attr, _UNANSWERED)
        # A null in config.json is the same input to the class as a missing key only when the class default is None
        answered = default is not _UNANSWERED and (not values or default is None)
        return default if answered else self.transformers().get(attr)

    def transformers(self) -> ConfigReader:
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded
