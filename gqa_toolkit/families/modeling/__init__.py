"""GQA modeling code for families whose transformers modeling has no KV-head count (each spec with a `modeling`
section names its file and classes).

Each `gqa_<family>.py` imports only torch, transformers and the shared attention core `gqa_attention.py`, because
the converter copies both files into every output directory for `trust_remote_code=True` loading. Importing this package registers the classes with the Auto
classes, so the process then loads converted checkpoints without `trust_remote_code`; `convert_checkpoint` imports
it for these families. It is not imported by `gqa_toolkit.convert` itself: it pulls in transformers' modeling
stacks (about 4 s), which converting any other family does not need.
"""

from __future__ import annotations

import importlib

import transformers


def register() -> None:
    """Register each spec's modeling classes with the Auto classes its `auto_map` names (AutoConfig and the model's
    Auto class), so the registrations follow the specs and no list of classes is kept here."""
    from ..spec import all_specs

    shipped = {spec.modeling.model_type: spec.modeling for spec in all_specs().values() if spec.modeling is not None}
    for modeling in shipped.values():
        module = importlib.import_module(f"{__name__}.{modeling.file.removesuffix('.py')}")
        classes = {auto: getattr(module, target.rsplit(".", 1)[1]) for auto, target in modeling.auto_map.items()}
        config_class = classes.pop("AutoConfig")
        transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto, model_class in classes.items():
            getattr(transformers, auto).register(config_class, model_class, exist_ok=True)


register()
