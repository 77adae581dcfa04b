"""Block-wise refinement: each converted attention unit trained against the source's attention output on the
calibration activations. It lowers every unit's error, and the whole model's KL to the stock source on held-out
tokens drawn as the calibration was, on a decoder with RoPE, a fused Conv1D layout and an encoder-decoder."""

import pytest
import torch
import transformers
from conftest import build_tiny_model, build_tiny_no_native, read_config
from families import FAMILIES, NO_NATIVE_FAMILIES, family_config

from gqa_toolkit.convert import ConversionError, convert, convert_checkpoint


def _stock(model_type):
    """The source model, and the Auto class that loads it and its conversion."""
    own = {f.model_type: f for f in NO_NATIVE_FAMILIES}
    if model_type in own:
        return build_tiny_no_native(own[model_type]), getattr(transformers, own[model_type].auto)
    family = next(f for f in FAMILIES if f.model_type == model_type)
    return build_tiny_model(model_type, family_config(family)), transformers.AutoModelForCausalLM


def _inputs(model_type, ids, src):
    if model_type != "t5":
        return {"input_ids": ids}
    start = torch.full((len(ids), 1), read_config(src)["decoder_start_token_id"])
    return {"input_ids": ids, "decoder_input_ids": torch.cat([start, ids[:, :-1]], 1)}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "t5"])
def test_refinement_lowers_each_units_error_and_the_models_kl(model_type, tmp_path):
    model, auto = _stock(model_type)
    model.save_pretrained(tmp_path / "src")
    g = torch.Generator().manual_seed(3)
    calibration = torch.randint(3, 128, (16, 24), generator=g)
    held_out = _inputs(model_type, torch.randint(3, 128, (4, 24), generator=g), tmp_path / "src")
    with torch.no_grad():
        p = model(**held_out).logits.log_softmax(-1)  # the stock source, built independently of the converter

    def kl(steps):
        # from mean-pooling, far from the best: `fit` on a random model starts too close for a clear margin
        result = convert(tmp_path / "src", tmp_path / f"r{steps}", method="mean", groups=1,
                         calibration=calibration if steps else None, refine_steps=steps, progress=False)
        with torch.no_grad():
            q = auto.from_pretrained(result.output).eval()(**held_out).logits.log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1).mean().item(), result

    plain, _ = kl(0)
    refined, result = kl(60)
    units = result.refinement_error
    assert units and all(after < before for before, after in units.values()), units
    record = read_config(result.output)["gqa_conversion"]
    assert record["refine_steps"] == 60 and record["refinement_error"] == units
    assert refined < plain, (refined, plain)


def test_refinement_needs_calibration(llama_dir, tmp_path):
    with pytest.raises(ConversionError, match="--refine-steps trains on calibration activations"):
        convert_checkpoint(llama_dir, tmp_path / "o", groups=2, method="fit", calibration="none", refine_steps=5,
                           progress=False)
    with pytest.raises(ConversionError, match="--refine-steps -1 must be a whole number"):
        convert_checkpoint(llama_dir, tmp_path / "o", groups=2, refine_steps=-1, progress=False)
    assert not (tmp_path / "o").exists()
