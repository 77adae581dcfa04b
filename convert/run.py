"""The conversion loop: every attention unit in the model's order, converted and handed to the writer.

    unit -> its calibration moments (when the method reads any) -> convert_unit -> writer.put
                                  (sequential mode: the converted unit back into the stream, which runs it)

With calibration the stream sets the order: it runs the source block by block, and each block's units are
converted as soon as its attention inputs are measured, so memory holds one block and its moments. Without
calibration the units go in the checkpoint's order. Tensors outside every unit are copied first.
"""

from __future__ import annotations

from contextlib import closing
from typing import Callable

import torch

from .io.writer import CheckpointWriter
from .methods.block_stream import KEYS, QUERY, BlockStream
from .methods.refinement import RefineSettings
from .methods.refinement import refine as refine_unit
from .methods.unit import UnitConversion, convert_unit, source_shaped
from .plan.planner import AttentionUnit, Plan


def run_conversion(plan: Plan, read: Callable[[str], torch.Tensor], writer: CheckpointWriter, how: UnitConversion,
                   stream: BlockStream | None = None, refine: RefineSettings | None = None) -> dict[str, list[float]]:
    """Returns, with `refine`, each unit's attention-output error before and after refinement
    ("kind.layer" -> [before, after]); else {}."""
    writer.copy_unchanged()
    for t in plan.copied():
        data = read(t.name)
        writer.put(t.name, data.T.contiguous() if t.name in plan.transposed else data)
    if stream is None:
        for unit in plan.units:
            _write(writer, convert_unit(unit, read, how))
        return {}
    errors = {}
    left = list(plan.units)
    with closing(iter(stream)) as steps:  # closed after the last unit: the stream frees what it holds then
        for step in steps:
            for unit in [u for u in left if (u.kind, QUERY, u.layer) in step.moments]:
                converted = convert_unit(unit, read, how, step.moments[(unit.kind, QUERY, unit.layer)],
                                         step.moments.get((unit.kind, KEYS, unit.layer)))
                if refine is not None:
                    refined = refine_unit(converted, step.attention[unit.kind], refine,
                                          lambda tensors, u=unit: source_shaped(u, tensors))
                    converted = refined.tensors
                    errors[f"{unit.kind}.{unit.layer}"] = [refined.error_before, refined.error_after]
                _write(writer, converted)
                if stream.sequential:
                    step.converted.update(source_shaped(unit, converted))
                left.remove(unit)
            if not left:
                break
    if left:
        raise RuntimeError(f"the calibration stream never reached {_where(left[0])}")
    return errors


def _write(writer: CheckpointWriter, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        writer.put(name, tensor)


def _where(unit: AttentionUnit) -> str:
    return f"the {unit.kind} attention of layer {unit.layer}"
