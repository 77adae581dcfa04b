"""gpt2 converted to one KV head is written as stock gpt_bigcode with multi_query: it loads in transformers with
no remote code, computes what an independent reference computes, and decodes with its cache as with full
forwards. Where the mapping would not be exact, or the user opts out, the toolkit's gqa_gpt2 is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from families import NO_NATIVE_FAMILIES, NO_NATIVE_IDS
from gqa_toolkit.convert import convert_checkpoint
from reference import apply_reference_no_native

GPT2 = NO_NATIVE_FAMILIES[NO_NATIVE_IDS.index("gpt2")]


def _config(out):
    return json.loads((out / "config.json").read_text())


def _stock(model_dir):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("method", ["mean", "first"])
def test_gpt2_at_one_kv_head_is_stock_gpt_bigcode_equal_to_the_reference(no_native_dirs, tmp_path, method):
    out = convert_checkpoint(no_native_dirs["gpt2"], tmp_path / "out", groups=1, method=method, progress=False)
    config = _config(out)
    assert (config["model_type"], config["multi_query"], config["architectures"]) == \
        ("gpt_bigcode", True, ["GPTBigCodeForCausalLM"])
    assert "auto_map" not in config and not list(out.glob("*.py")) and config["gqa_conversion"]["native"]
    converted = _stock(out)
    assert type(converted).__name__ == "GPTBigCodeForCausalLM"
    reference = _stock(no_native_dirs["gpt2"])
    apply_reference_no_native(reference, "gpt2", 1, method)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
        greedy = converted.generate(ids[:1, :4], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        full = ids[:1, :4]
        for _ in range(6):
            full = torch.cat([full, converted(full).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, full)


def test_no_native_keeps_the_toolkit_family(no_native_dirs, tmp_path):
    from gqa_toolkit.convert.cli import main
    from click.testing import CliRunner

    result = CliRunner().invoke(main, [str(no_native_dirs["gpt2"]), "--groups", "1", "-o", str(tmp_path / "out"),
                                       "-q", "--no-native"])
    assert result.exit_code == 0, result.output
    assert _config(tmp_path / "out")["model_type"] == "gqa_gpt2"


@pytest.mark.parametrize("case", ["reorder_and_upcast_attn", "groups 2", "layer method"])
def test_where_the_mapping_is_not_exact_the_toolkit_family_is_written(no_native_dirs, tmp_path, case):
    src, options = no_native_dirs["gpt2"], {"groups": 1}
    if case == "reorder_and_upcast_attn":  # bigcode has no such option: its scores would differ
        src = tmp_path / "src"
        shutil.copytree(no_native_dirs["gpt2"], src)
        config = _config(src)
        (src / "config.json").write_text(json.dumps({**config, "reorder_and_upcast_attn": True}))
    elif case == "groups 2":
        options = {"groups": 2}
    else:
        options = {"groups": 1, "method": "aligned", "calibration": "none"}
    out = convert_checkpoint(src, tmp_path / "out", progress=False, **options)
    assert _config(out)["model_type"] == "gqa_gpt2" and "native" not in _config(out)["gqa_conversion"]
