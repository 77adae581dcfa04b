"""`gqa-convert --dry-run`: what a conversion will do, before it does it: tensors and bytes to copy and to compute,
the shards, the calibration forward and an estimate of its peak memory on its device, against the room there is.

The estimate counts what the toolkit holds at its peak, not the interpreter (about 0.25 GB with torch): for the
per-tensor methods, the largest computed tensor with its source in float32; with calibration, what lies outside the
blocks and the largest block in float32 (read off the skeleton the calibration builds), the calibration
activations (inputs and outputs of a block, and an encoder's last outputs), one block's input moments in float64
(with its converted projections in sequential mode) and one layer's float64 solve.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConversionError
from gqa_toolkit.families.spec import key_pattern
from gqa_toolkit.disk import check_free_space, format_bytes, free_bytes
from ..io.writer import planned_bytes, split_into_shards
from ..methods.block_stream import SEQUENTIAL_NEEDS_NAMES, calibration_footprint

FLOAT32, FLOAT64 = 4, 8


def _numel(shape) -> int:
    return torch.Size(shape).numel()


def _available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _calibration_peak(prepared, options) -> tuple[int, str]:
    """Bytes and their breakdown for the block-by-block calibration and the layer solve."""
    spec, sources = prepared.spec, prepared.sources
    footprint = calibration_footprint(prepared.model_dir, spec.blocks)
    if footprint.whole is not None and options.calibration_mode == "sequential":
        raise ConversionError(SEQUENTIAL_NEEDS_NAMES)
    width, kinds = footprint.width, prepared.record.get("attention_kinds", [])
    # a block's inputs and outputs, and an encoder's last outputs, which its decoder reads throughout
    activations = (2 + spec.encoder_decoder) * options.calibration_samples * _calibration_positions(prepared) \
        * width * FLOAT32
    # one block's: a query input per attention kind, and the encoder states' for cross-attention
    matrices = max(1, sum(1 + b.keys_from_encoder for b in spec.blocks if b.attention in kinds))
    moments = matrices * (width + 1) ** 2 * FLOAT64
    converted = 0
    if options.calibration_mode == "sequential":  # one block's converted projections, run by the stream
        converted = sum(_numel(sources[name].shape) for b in spec.blocks if b.attention in kinds
                        for name in _attention_tensors(sources, b, layer="0")) * FLOAT32
    solve = 3 * sum(_numel(sources[name].shape) for name in _attention_tensors(sources, spec.block, layer="0")) \
        * FLOAT64
    if footprint.whole is not None:
        held = footprint.whole * FLOAT32
        parts = [f"the whole model {format_bytes(held)} (its checkpoint is reshaped on load)"]
    else:
        held = (footprint.outside + footprint.block) * FLOAT32
        parts = [f"outside the blocks {format_bytes(footprint.outside * FLOAT32)}",
                 f"one block {format_bytes(footprint.block * FLOAT32)}"]
    parts += [f"activations {format_bytes(activations)}", f"moments {format_bytes(moments)}",
              *([f"converted layers {format_bytes(converted)}"] if converted else []), f"solve {format_bytes(solve)}"]
    return held + activations + moments + converted + solve, " + ".join(parts)


def _calibration_positions(prepared) -> int:
    """Positions of one calibration sequence: the tokens asked for, or for audio the encoder's window (whisper's
    1500 frames, longer than any transcript the decoder reads)."""
    audio = prepared.spec.audio
    if audio is None:
        return prepared.options.calibration_length
    return prepared.raw_config[audio.positions_attr]


def _attention_tensors(sources, block, layer: str | None = None) -> list[str]:
    """The on-disk q, k, v, o weights (or fused qkv) of a block's layers, or of one of them."""
    patterns = [key_pattern(t + ".weight") for role in ("q", "k", "v", "qkv", "o") for t in getattr(block, role)]
    return [name for name in sources
            if any((m := p.match(name)) and (layer is None or m["layer"] == layer) for p in patterns)]


def describe(prepared) -> list[str]:
    planned, record = prepared.plan.outputs, prepared.record
    copied = [t for t in planned if t.copy_from is not None]
    computed = [t for t in planned if t.copy_from is None]
    total = planned_bytes(planned)
    shards = split_into_shards(planned, prepared.shard_bytes)
    lines = [
        f"source: {prepared.model_dir} ({prepared.raw_config['model_type']}, {record['num_attention_heads']} query "
        f"heads, {record['source_kv_heads']} KV heads) -> {_kv_heads(record)} KV heads by {record['method']}"
        + (f", written as stock {record['native']}" if "native" in record else ""),
        f"output: {prepared.out} (nothing written by this dry run)",
        f"tensors: {len(copied)} copied unchanged ({format_bytes(planned_bytes(copied))}), {len(computed)} "
        f"computed ({format_bytes(planned_bytes(computed))}), in {len(shards)} shard(s) of at most "
        f"{format_bytes(prepared.shard_bytes)}",
    ]
    options = prepared.options
    if not (options.per_layer and options.calibrated):
        largest = max((_numel(t.shape) for t in computed), default=0)
        peak, where, breakdown = 3 * largest * FLOAT32, torch.device("cpu"), "the largest computed tensor in float32"
        lines.append("calibration: none")
    else:
        peak, breakdown = _calibration_peak(prepared, options)
        where = options.device
        data = (f"up to {options.calibration_samples} clips of {record.get('calibration')} (audio: "
                f"{_calibration_positions(prepared)} encoder positions each, and their transcripts)"
                if prepared.spec.audio is not None else
                f"{options.calibration_samples} x {options.calibration_length} tokens of {record.get('calibration')}")
        lines.append(f"calibration: {data}, {options.calibration_mode} mode, one block at a time on {where}")
    lines.append(f"peak memory (estimate, beyond the interpreter): {format_bytes(peak)} on {where} ({breakdown})")
    lines.append(f"disk: {format_bytes(total)} to write, {format_bytes(free_bytes(prepared.out))} free at "
                 f"{prepared.out.parent}")
    memory = _available_memory(where)
    if memory is not None:
        lines.append(f"memory: {format_bytes(memory)} available on {where}")
    check_free_space(prepared.out, total, "--output", ConversionError)
    if memory is not None and memory < peak:
        raise ConversionError(f"the conversion needs about {format_bytes(peak)} on {where} and "
                              f"{format_bytes(memory)} is available; use --device cuda, fewer "
                              f"--calibration-samples, or a bigger machine")
    return lines


def _kv_heads(record: dict) -> str:
    """G, or each kind's under --kind-groups."""
    if "kind_groups" in record:
        return ", ".join(f"{kind} {g}" for kind, g in record["kind_groups"].items())
    return str(record["groups"])
