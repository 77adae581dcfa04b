"""Modules that moved into the kernel keep answering at their old import paths for one release: importing
`gqa_toolkit.convert.families.spec` gives the very module `gqa_toolkit.families.spec` (one module object, so its
registries, classes and monkeypatches are shared), not a second copy."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {  # old dotted path -> where it lives now
    "gqa_toolkit.convert.families": "gqa_toolkit.families",
    "gqa_toolkit.convert.corpus": "gqa_toolkit.corpus",
    "gqa_toolkit.convert.io.model_dir": "gqa_toolkit.model_dir",
    "gqa_toolkit.convert.io.disk": "gqa_toolkit.disk",
    "gqa_toolkit.convert.io.hub": "gqa_toolkit.hub",
    "gqa_toolkit.convert.io.records": "gqa_toolkit.records",
    "gqa_toolkit.convert.io.output_dir": "gqa_toolkit.output_dir",
    "gqa_toolkit.convert.io.lock": "gqa_toolkit.lock",
    "gqa_toolkit.convert.io.dtypes": "gqa_toolkit.dtypes",
    "gqa_toolkit.convert.command": "gqa_toolkit.command",
}


def new_name(name: str) -> str | None:
    for old, new in MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return None


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    real_specs: dict = {}

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if new_name(name) else None

    def create_module(self, spec):
        module = importlib.import_module(new_name(spec.name))
        self.real_specs[module.__name__] = module.__spec__  # the import system sets the alias's spec on it next
        return module

    def exec_module(self, module):
        module.__spec__ = self.real_specs[module.__name__]  # put the real one back; the module already ran


def install() -> None:
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModules())
