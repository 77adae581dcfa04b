"""Method names that carry options, for places that name a conversion by one string (the ablation runner's
`methods`): `aligned+similarity+norm` is `--method aligned --grouping similarity --preserve-norm`.

Options: `similarity` (grouping), `norm` (preserve_norm), `weights` (calibration none: weights only), `calib`
(calibration python-stdlib), `sequential` (calibration_mode sequential).
"""

from __future__ import annotations

from typing import Any

from ..errors import ConversionError
from .calibration import BUILTIN
from .registry import all_method_names, method_choices

OPTIONS: dict[str, dict[str, Any]] = {
    "similarity": {"grouping": "similarity"},
    "norm": {"preserve_norm": True},
    "weights": {"calibration": "none"},
    "calib": {"calibration": BUILTIN},
    "sequential": {"calibration_mode": "sequential"},
}


def parse_variant(name: str) -> dict[str, Any]:
    """`method+option+...` -> keyword arguments of convert_checkpoint (method included)."""
    method, *options = name.split("+")
    if method not in all_method_names():
        raise ConversionError(f"unknown method {method!r}; choose from {method_choices()}; each optionally "
                              f"followed by +{', +'.join(OPTIONS)}")
    kwargs: dict[str, Any] = {"method": method}
    for option in options:
        if option not in OPTIONS:
            raise ConversionError(f"unknown option {option!r} in {name!r}; choose from: {', '.join(OPTIONS)}")
        kwargs.update(OPTIONS[option])
    return kwargs
