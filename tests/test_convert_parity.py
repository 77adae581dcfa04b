"""Parity with stock transformers: every family converts, loads with no missing or unexpected keys, and its logits
equal those of the independently built reference (or of the source itself when G equals its KV heads)."""

import pytest
import torch
from conftest import load_model, logits, read_config, tolerance
from families import FAMILIES, FAMILY_IDS
from reference import apply_reference

from gqa_toolkit.convert import convert_checkpoint

pytest.importorskip("transformers")


def _kv_heads(config: dict) -> int:
    if config.get("new_decoder_architecture"):
        return config["num_kv_heads"]
    if config.get("multi_query"):
        return 1
    return config.get("num_kv_heads") or config.get("num_key_value_heads") or config["num_attention_heads"]


@pytest.mark.parametrize("method", ["mean", "first"])
@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_grouped_logits_equal_reference(family, method, family_dirs, tmp_path):
    src = family_dirs[family.model_type]
    out = convert_checkpoint(src, tmp_path / "out", method=method, groups=family.groups, progress=False)

    converted = load_model(out)
    assert _kv_heads(read_config(out)) == family.groups
    reference = load_model(src)
    apply_reference(reference, family, family.groups, method)
    torch.testing.assert_close(logits(converted), logits(reference), **tolerance(rtol=1e-5, atol=1e-5))
    # the conversion changed the function: the reference is not just the source
    assert not torch.allclose(logits(load_model(src)), logits(converted), atol=1e-4)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.groups > 1 or f.model_type == "falcon"],
                         ids=lambda f: f.model_type)
def test_mean_with_all_heads_reproduces_source_exactly(family, family_dirs, tmp_path):
    src = family_dirs[family.model_type]
    kv_heads = _kv_heads(read_config(src))
    out = convert_checkpoint(src, tmp_path / "out", method="mean", groups=kv_heads, progress=False)
    torch.testing.assert_close(logits(load_model(out)), logits(load_model(src)), **tolerance(rtol=0, atol=0))
