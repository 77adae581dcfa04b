"""Bad input for the families served by the toolkit's own modeling code, and spec validation for them."""

import json

import pytest
import torch
from conftest import build_tiny_no_native
from families import NO_NATIVE_FAMILIES, NO_NATIVE_IDS
from pydantic import ValidationError
from test_convert_errors import assert_refused

from gqa_toolkit.families.spec import ArchitectureSpec, all_specs
from gqa_toolkit.families.transformers_names import output_cache


def test_unknown_attention_scope_lists_choices(no_native_dirs, llama_dir, tmp_path):
    assert_refused(tmp_path, [no_native_dirs["t5"], "-g", "2", "--attention", "encoder", "-o", tmp_path / "o"],
                   "--attention 'encoder'", "decoder, all")
    assert_refused(tmp_path, [llama_dir, "-g", "2", "--attention", "decoder", "-o", tmp_path / "o"], "choose one of: all")


def test_gpt2_with_cross_attention_is_refused(tmp_path):
    family = NO_NATIVE_FAMILIES[NO_NATIVE_IDS.index("gpt2")]
    family = type(family)("gpt2", {**family.config, "add_cross_attention": True})
    build_tiny_no_native(family).save_pretrained(tmp_path / "src")
    assert_refused(tmp_path, [tmp_path / "src", "-g", "2"], "add_cross_attention=False")


def test_stock_config_with_a_stray_kv_head_count_is_still_mha(no_native_dirs, tmp_path):
    """Stock gpt2 ignores num_key_value_heads, so the converter must too: the source has H KV heads."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(no_native_dirs["gpt2"], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 2}))
    from gqa_toolkit.convert import convert_checkpoint

    out = convert_checkpoint(src, tmp_path / "out", groups=4, progress=False)
    assert json.loads((out / "config.json").read_text())["gqa_conversion"]["source_kv_heads"] == 4


def test_specs_ship_their_modeling_files_and_reject_unknown_kinds():
    from importlib import resources

    for model_type in ("t5", "gpt2", "gpt_neox", "opt"):
        spec = all_specs()[model_type]
        assert (resources.files("gqa_toolkit.families.modeling") / spec.modeling.file).is_file()
        assert spec.modeling.model_type in spec.model_types
    with pytest.raises(ValidationError, match="not declared"):
        ArchitectureSpec.model_validate({"model_types": ["x"], "tensors": [
            {"key": "l.{layer}.k", "part": "k", "required": True, "attention": "encoder"},
            {"key": "l.{layer}.v", "part": "v", "required": True}]})


def test_registered_without_trust_remote_code(no_native_dirs, tmp_path):
    """A process that imported the toolkit loads converted checkpoints with no trust_remote_code."""
    from transformers import AutoModelForCausalLM

    from gqa_toolkit.convert import convert_checkpoint

    out = convert_checkpoint(no_native_dirs["opt"], tmp_path / "out", groups=1, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__module__ == "gqa_toolkit.families.modeling.gqa_opt"
    assert model.model.decoder.layers[0].self_attn.k_proj.weight.shape == (16, 64)
    with torch.no_grad():
        cache = output_cache(model(torch.tensor([[1, 2, 3]]), use_cache=True))
    assert cache.layers[0].keys.shape == (1, 1, 3, 16)


def test_refresh_modeling_repairs_an_earlier_output_in_place(no_native_dirs, llama_dir, tmp_path):
    """An output written with an earlier modeling file gets this version's, and nothing else changes."""
    from importlib import resources

    from click.testing import CliRunner

    from gqa_toolkit.convert import convert_checkpoint
    from gqa_toolkit.convert.cli import main

    out = convert_checkpoint(no_native_dirs["opt"], tmp_path / "out", groups=2, progress=False)
    (out / "gqa_opt.py").write_text("raise ImportError('an earlier, broken modeling file')\n")
    (out / "gqa_attention.py").unlink()  # earlier outputs had no core file
    before = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.endswith(".py")}
    result = CliRunner().invoke(main, ["--refresh-modeling", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"rewrote {out / 'gqa_attention.py'}", f"rewrote {out / 'gqa_opt.py'}"]
    package = resources.files("gqa_toolkit.families.modeling")
    for name in ("gqa_attention.py", "gqa_opt.py"):
        assert (out / name).read_text() == (package / name).read_text()
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.endswith(".py")} == before
    assert not [p for p in out.iterdir() if "partial" in p.name]
    assert_refused(tmp_path, ["--refresh-modeling", llama_dir], "runs on stock transformers code")


def test_core_refuses_a_stock_argument_it_does_not_know():
    """A release that adds or renames an attention argument fails at import, naming it, instead of dropping it."""
    from torch import nn

    from gqa_toolkit.families.modeling.gqa_attention import GroupedAttention

    class StockAttention(nn.Module):
        def forward(self, hidden_states, attention_mask=None, cache=None, sliding_window_size=None, **kwargs):
            return hidden_states

    with pytest.raises(ImportError, match="sliding_window_size"):
        class Unaware(GroupedAttention, StockAttention):  # noqa: F841
            def attend(self, hidden_states, cache=None, attention_mask=None, **kwargs):
                return hidden_states

    class Aware(GroupedAttention, StockAttention):
        def attend(self, hidden_states, cache=None, attention_mask=None, sliding_window_size=None, **kwargs):
            return cache

    # the cache arrives as `cache` whichever of its names the caller used
    for name in ("cache", "past_key_values", "layer_past"):
        assert Aware()(torch.zeros(1), **{name: "the cache"}) == "the cache"
    with pytest.raises(TypeError, match="more than one cache"):
        Aware()(torch.zeros(1), cache="a", past_key_values="b")
