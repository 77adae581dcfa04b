"""The dtypes the toolkit reads, writes and names: safetensors' codes, and the names users write (--dtype, recipes,
config.json's `dtype`)."""

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def computes_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: a GPU that supports it, or a CPU with AVX512-BF16 or
    AMX (where bf16 matrix products ran 4.7x faster than float32 on the project's 2-core CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own CPU checks, private but stable
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
