"""The options around the new methods: norm preservation, calibration text, method names that carry options (the
ablation runner's), the CLI flags and the layer-level API's input checks."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import load_model, logits
from safetensors.torch import load_file

from gqa_toolkit.convert import AttentionWeights, ConversionError, convert_checkpoint, convert_layer
from gqa_toolkit.convert.cli import main as convert_cli
from gqa_toolkit.convert.methods.variants import parse_variant
from gqa_toolkit.eval.ablation_recipe import AblationRecipe


def _heads(path, name, kv_heads):
    return load_file(path / "model.safetensors")[name].view(kv_heads, -1)  # (G, hd*d)


def test_preserve_norm_scales_pooled_heads_to_the_group_mean(llama_dir, tmp_path):
    out = convert_checkpoint(llama_dir, tmp_path / "o", method="mean", groups=1, preserve_norm=True,
                             progress=False)
    name = "model.layers.0.self_attn.k_proj.weight"
    source, pooled = _heads(llama_dir, name, 4), _heads(out, name, 1)
    torch.testing.assert_close(pooled.norm(dim=1), source.norm(dim=1).mean().reshape(1))
    plain = _heads(convert_checkpoint(llama_dir, tmp_path / "p", method="mean", groups=1, progress=False), name, 1)
    torch.testing.assert_close(pooled / pooled.norm(), plain / plain.norm())  # same direction as the mean
    assert plain.norm() < 0.9 * source.norm(dim=1).mean()  # mean-pooling did shrink it
    assert json.loads((out / "config.json").read_text())["gqa_conversion"]["preserve_norm"] is True


def test_preserve_norm_on_the_layer_path(llama_dir, tmp_path):
    out = convert_checkpoint(llama_dir, tmp_path / "o", method="aligned", groups=1, preserve_norm=True,
                             progress=False)
    name = "model.layers.1.self_attn.v_proj.weight"
    torch.testing.assert_close(_heads(out, name, 1).norm(dim=1), _heads(llama_dir, name, 4).norm(dim=1).mean()
                               .reshape(1))


def test_calibration_uses_only_the_corpus_training_files():
    from gqa_toolkit.corpus import stdlib_files
    from gqa_toolkit.convert.methods.calibration import BUILTIN, _text_files

    calibration = set(_text_files(BUILTIN))
    assert calibration and calibration.isdisjoint(stdlib_files("heldout"))


def test_calibration_needs_a_tokenizer_or_none(llama_dir, tmp_path):
    with pytest.raises(ConversionError, match="--calibration none"):
        convert_checkpoint(llama_dir, tmp_path / "o", method="fit", groups=2, progress=False)
    convert_checkpoint(llama_dir, tmp_path / "o", method="fit", groups=2, progress=False, calibration="none")


def test_calibration_from_a_text_file(uptrain_models, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    out = convert_checkpoint(uptrain_models["mha"], tmp_path / "o", method="fit", groups=2, progress=False,
                             calibration=str(text), calibration_samples=8, calibration_length=32)
    record = json.loads((out / "config.json").read_text())["gqa_conversion"]
    assert record["calibration"] == str(text) and record["calibration_sequences"] == 8
    assert record["calibration_tokens"] == 8 * 32
    load_model(out)


def test_method_names_carry_options():
    assert parse_variant("aligned+similarity+norm") == {"method": "aligned", "grouping": "similarity",
                                                        "preserve_norm": True}
    assert parse_variant("fit+weights") == {"method": "fit", "calibration": "none"}
    with pytest.raises(ConversionError, match="unknown option 'fast'"):
        parse_variant("mean+fast")
    recipe = AblationRecipe.model_validate({"results_dir": "r", "original": {"path": "m", "original_steps": 10},
                                            "methods": ["mean", "fit+similarity", "mean+norm"]})
    assert recipe.methods == ("mean", "fit+similarity", "mean+norm")


def test_cli_grouping_and_norm_flags(llama_dir, tmp_path):
    result = CliRunner().invoke(convert_cli, [str(llama_dir), "-g", "2", "--grouping", "similarity",
                                              "--preserve-norm", "-q", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "config.json").read_text())["gqa_conversion"]["grouping"] == "similarity"
    logits(load_model(tmp_path / "o"))
    result = CliRunner().invoke(convert_cli, [str(llama_dir), "-g", "2", "--method", "fit", "--preserve-norm",
                                              "--calibration", "none", "-o", str(tmp_path / "p")])
    assert result.exit_code == 2 and "drop the option" in result.output


def test_layer_api_names_bad_shapes():
    w = AttentionWeights(q=torch.randn(64, 64), k=torch.randn(48, 64), v=torch.randn(64, 64), o=torch.randn(64, 64))
    with pytest.raises(ConversionError, match=r"k \[48, 64\] does not hold 4 heads of 16"):
        convert_layer(w, heads=4, kv_heads=4, groups=2)
    with pytest.raises(ConversionError, match="unknown grouping 'best'"):
        convert_layer(w, heads=4, kv_heads=4, groups=2, grouping="best")


def test_layer_plan_shapes_of_a_70b_shaped_checkpoint():
    """The per-layer plan knows every output shape before reading data (nothing is converted here)."""
    from gqa_toolkit.families.geometry import Geometry
    from gqa_toolkit.families.spec import spec_for
    from gqa_toolkit.convert.io.tensors import SourceTensor
    from gqa_toolkit.convert.plan.planner import plan_conversion

    d, layers = 8192, 80
    shapes = {"model.embed_tokens.weight": (32000, d)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.self_attn.{p}_proj.weight": (d, d) for p in "qkvo"})
    sources = {name: SourceTensor(torch.bfloat16, shape) for name, shape in shapes.items()}
    plan = plan_conversion(sources, spec_for("llama"),
                           Geometry(num_layers=layers, heads=64, kv_heads=64, head_dim=128, init_std=0.02), 8,
                           per_layer=True)
    assert [t.name for t in plan.outputs] == list(shapes)
    assert len(plan.units) == layers and all(set(u.projections) >= {"q", "k", "v", "o"} for u in plan.units)
    for t in plan.outputs:
        kv = t.name.endswith(("k_proj.weight", "v_proj.weight"))
        assert t.shape == ((8 * 128, d) if kv else shapes[t.name]), t.name


def test_calibration_for_a_method_that_reads_weights_only_is_refused(llama_dir, tmp_path):
    with pytest.raises(ConversionError, match="--calibration applies to the layer methods .* drop --calibration"):
        convert_checkpoint(llama_dir, tmp_path / "o", groups=2, method="mean", calibration="python-stdlib",
                           progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method, calibration", [("mean", None), ("aligned", None), ("fit", "none")])
def test_sequential_mode_without_calibration_is_refused(method, calibration, llama_dir, tmp_path):
    """Nothing would be calibrated, so the mode would silently do nothing."""
    with pytest.raises(ConversionError, match=f"--method {method} here calibrates on none; give calibration text"):
        convert_checkpoint(llama_dir, tmp_path / "o", groups=2, method=method, calibration=calibration,
                           calibration_mode="sequential", progress=False)
    assert not (tmp_path / "o").exists()


def test_the_dry_run_of_a_calibrated_encoder_decoder_counts_one_block(no_native_dirs):
    """t5 calibrates block by block too: the estimate holds what is outside the blocks (the shared embeddings, the
    final norms) and the larger of the two stacks' blocks, the decoder's (self- and cross-attention), in float32."""
    from safetensors import safe_open

    from gqa_toolkit.convert import describe_conversion
    from gqa_toolkit.disk import format_bytes

    src = no_native_dirs["t5"]
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        numel = {name: f.get_slice(name).get_shape() for name in f.keys()}
    size = lambda names: format_bytes(4 * sum(torch.Size(numel[n]).numel() for n in names))  # noqa: E731
    decoder_block = size([n for n in numel if n.startswith("decoder.block.0.")])
    assert decoder_block != size([n for n in numel if n.startswith("encoder.block.0.")])
    text = "\n".join(describe_conversion(src, groups=2, method="fit"))
    assert "source mode, one block at a time on cpu" in text
    assert f"outside the blocks {size([n for n in numel if '.block.' not in n])} + one block {decoder_block}" in text


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_the_dry_run_counts_activations_at_the_model_width(model_type, no_native_dirs):
    """Both have d = 64: a block's inputs and outputs and the encoder's last outputs, 256 x 128 tokens each, in
    float32 (bart's final_logits_bias, as wide as the vocabulary, is not the width)."""
    from gqa_toolkit.convert import describe_conversion

    text = "\n".join(describe_conversion(no_native_dirs[model_type], groups=2, method="fit"))
    assert f"activations {3 * 256 * 128 * 64 * 4 / 2**20:.1f} MiB" in text


def test_sequential_calibration_of_a_checkpoint_reshaped_on_load_is_refused_by_the_dry_run(family_dirs):
    """mixtral's experts are merged by transformers while it loads them: the dry run says so, as the run would."""
    from gqa_toolkit.convert import describe_conversion

    text = "\n".join(describe_conversion(family_dirs["mixtral"], groups=2, method="fit"))
    assert "the whole model" in text and "reshaped on load" in text
    with pytest.raises(ConversionError, match="transformers reshapes this one while loading it"):
        describe_conversion(family_dirs["mixtral"], groups=2, method="fit", calibration_mode="sequential")


@pytest.mark.parametrize("model_type", ["t5", "gptj", "bart"])
def test_a_source_without_tokenizer_files_is_refused_for_calibration(model_type, no_native_dirs, tmp_path):
    """transformers builds an empty tokenizer for such a folder, which would calibrate on special tokens only."""
    with pytest.raises(ConversionError, match="has no vocabulary .*--calibration none"):
        convert_checkpoint(no_native_dirs[model_type], tmp_path / "o", method="fit", groups=2, progress=False)
    assert not (tmp_path / "o").exists()


def test_calibration_longer_than_the_context_is_refused(no_native_dirs, tmp_path):
    with pytest.raises(ConversionError, match="--calibration-length 200 is longer than the model's context of 128"):
        convert_checkpoint(no_native_dirs["gptj"], tmp_path / "o", method="fit", groups=2, calibration_length=200,
                           progress=False)
    ids = torch.randint(0, 128, (2, 129))
    with pytest.raises(ConversionError, match="token ids' length 129 is longer than the model's context of 128"):
        convert_checkpoint(no_native_dirs["bart"], tmp_path / "o", method="fit", groups=2, calibration=ids,
                           progress=False)


def test_calibration_ids_of_one_dimension_are_refused_with_the_shape_to_give(llama_dir, tmp_path):
    with pytest.raises(ConversionError, match="shape \\(16,\\); give a \\(sequences, tokens\\) tensor"):
        convert_checkpoint(llama_dir, tmp_path / "o", method="fit", groups=2, calibration=torch.arange(16),
                           progress=False)


def test_quiet_calibration_of_an_encoder_decoder_shows_no_loading_bar(no_native_dirs, tmp_path, capfd):
    capfd.readouterr()
    convert_checkpoint(no_native_dirs["t5"], tmp_path / "o", method="fit", groups=2, progress=False,
                       calibration=torch.randint(3, 128, (4, 8)))
    assert "Loading weights" not in capfd.readouterr().err


def test_the_layer_apis_earlier_homes_still_import():
    """gqa_toolkit.convert.layer_api and gqa_toolkit.convert.rope moved; the old names keep working for a release."""
    from gqa_toolkit.convert import layer_api, rope
    from gqa_toolkit.families.rope import RopeLayout
    from gqa_toolkit.convert.methods.layer import convert_layer as moved

    assert layer_api.convert_layer is moved and rope.RopeLayout is RopeLayout


def test_modules_moved_into_the_kernel_answer_at_their_old_paths():
    """The families, the checkpoint folder readers, the corpus and the command wrapper moved from
    gqa_toolkit.convert into the kernel; their old import paths give the same module objects for a release."""
    import importlib
    import subprocess
    import sys

    import gqa_toolkit.convert  # noqa: F401  (installs the old paths)
    from gqa_toolkit.moved import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    from gqa_toolkit.convert.families.spec import spec_for
    from gqa_toolkit.families import spec

    assert spec_for is spec.spec_for
    # a fresh process whose first import is an old path
    code = "import gqa_toolkit.convert.families.modeling as m, gqa_toolkit.families.modeling as n; assert m is n"
    subprocess.run([sys.executable, "-c", code], check=True)
