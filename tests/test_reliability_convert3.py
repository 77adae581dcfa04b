"""gqa-convert and its Python API against the third battery of hostile inputs: runs that must not lose data, configs
and weights the methods cannot convert, paths the filesystem cannot take, concurrent writers, and API values of the
wrong type.

Every CLI case exits 2 with one `gqa-convert: error:` line naming the problem, leaves the source as it was and writes
nothing (assert_refused compares the whole tree before and after); every API case raises ConversionError.
"""

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_convert_errors import assert_refused, run_cli

from gqa_toolkit.convert import ConversionError, convert_checkpoint
from gqa_toolkit.lock import exclusive


def _source(llama_dir, tmp_path):
    return shutil.copytree(llama_dir, tmp_path / "src")


def _tree(folder):
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def _edit_config(src, **changes):
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **changes}))


def _edit_weights(src, edit):
    weights = load_file(src / "model.safetensors")
    edit(weights)
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})


def _int8_weights(weights):
    """A bitsandbytes-style int8 checkpoint: int8 matrices with per-row scales."""
    for name in [n for n in weights if n.endswith("proj.weight")]:
        w = weights[name]
        scale = w.abs().amax(dim=1) / 127
        weights[name] = (w / scale[:, None]).round().to(torch.int8)
        weights[name.removesuffix("weight") + "SCB"] = scale


def _fp8_kv(weights):
    name = "model.layers.0.self_attn.k_proj.weight"
    weights[name] = weights[name].to(torch.float8_e4m3fn)


SOURCES = {  # damage -> needles of the refusal
    "model_type is a list": (lambda s: _edit_config(s, model_type=["llama"]), ["model_type [\"llama\"]"]),
    "config.json is a JSON string": (lambda s: (s / "config.json").write_text('"llama"'),
                                     ["JSON str", "not an object"]),
    "config.json is not UTF-8": (lambda s: (s / "config.json").write_bytes(b'{"model_type": "ll\xe1ma"}'),
                                 ["not UTF-8 text"]),
    "KV heads do not divide the query heads": (lambda s: _edit_config(s, num_key_value_heads=3),
                                               ["num_key_value_heads=3 for 4 query heads", "must divide"]),
    "more KV heads than query heads": (lambda s: _edit_config(s, num_key_value_heads=8),
                                       ["num_key_value_heads=8 for 4 query heads", "one of: 1, 2, 4"]),
    "quantization_config": (lambda s: _edit_config(s, quantization_config={"quant_method": "bitsandbytes"}),
                            ["quantization_config (bitsandbytes)", "dequantize them first"]),
    "int8 weights with row scales": (lambda s: _edit_weights(s, _int8_weights), ["as int8", "dequantize it first"]),
    "fp8 K weights": (lambda s: _edit_weights(s, _fp8_kv), ["k_proj.weight as float8_e4m3fn", "dequantize"]),
}


@pytest.mark.parametrize("case", SOURCES, ids=list(SOURCES))
def test_sources_the_methods_cannot_convert(case, llama_dir, tmp_path):
    damage, needles = SOURCES[case]
    src = _source(llama_dir, tmp_path)
    damage(src)
    before = _tree(src)
    assert_refused(tmp_path, [src, "--groups", "2", "-o", tmp_path / "out", "-q"], *needles)
    assert _tree(src) == before


@pytest.mark.parametrize("value, needles", [("abc", ["partial_rotary_factor='abc'", "from 0 to 1"]),
                                            (1.5, ["partial_rotary_factor=1.5", "fix it in config.json"])])
def test_partial_rotary_factor_that_is_no_fraction(value, needles, llama_dir, tmp_path):
    src = _source(llama_dir, tmp_path)
    _edit_config(src, partial_rotary_factor=value)
    assert_refused(tmp_path, [src, "--groups", "2", "--method", "aligned", "--calibration", "none",
                              "-o", tmp_path / "out"], *needles)


def _finished_uptrain_run(llama_dir, run):
    """What gqa-uptrain leaves in output.dir: the final model (conversion and uptraining records), its recipe,
    metrics and checkpoints, and a file of the user's."""
    code, err = run_cli(llama_dir, "--groups", "2", "-o", run, "-q")
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "gqa_uptraining": {"steps": 4}}))
    (run / "uptrain_recipe.yaml").write_text("model: {path: x}\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    (run / "checkpoints" / "step-4" / "state.json").write_text("{}")
    (run / "notes.txt").write_text("my notes on this run\n")


def test_force_never_replaces_an_uptrain_run(llama_dir, tmp_path):
    run = tmp_path / "run"
    _finished_uptrain_run(llama_dir, run)
    before = _tree(run)
    assert_refused(tmp_path, [llama_dir, "--groups", "1", "-o", run, "--force", "-q"],
                   "did not write", "an uptrained model", "choose another --output")
    assert _tree(run) == before


@pytest.mark.parametrize("entry", ["notes.txt", "checkpoints/"])
def test_force_never_replaces_what_the_user_added_to_an_output(entry, llama_dir, tmp_path):
    out = tmp_path / "out"
    code, err = run_cli(llama_dir, "--groups", "2", "-o", out, "-q")
    assert code == 0, err
    if entry.endswith("/"):
        (out / entry).mkdir()
    else:
        (out / entry).write_text("mine\n")
    before = _tree(out)
    assert_refused(tmp_path, [llama_dir, "--groups", "1", "-o", out, "--force", "-q"], entry, "did not write")
    assert _tree(out) == before


def test_a_second_writer_of_one_output_is_refused(llama_dir, tmp_path):
    out = tmp_path / "out"
    with exclusive(out, "held by the test", ConversionError):  # a conversion writing `out` right now
        before = set(tmp_path.rglob("*"))
        code, err = run_cli(llama_dir, "--groups", "2", "-o", out, "-q")
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "another conversion is writing --output" in err, err
        assert set(tmp_path.rglob("*")) == before
    code, err = run_cli(llama_dir, "--groups", "2", "-o", out, "-q")  # once it is done, the output is free
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_under_a_regular_file(llama_dir, tmp_path):
    (tmp_path / "a-file").write_text("x")
    assert_refused(tmp_path, [llama_dir, "--groups", "2", "-o", tmp_path / "a-file" / "out"], "which is a file")


def test_output_name_too_long_for_its_staging_sibling(llama_dir, tmp_path):
    name = "m" * 240  # fits the filesystem's 255 bytes; `.NAME.partial-HOST-PID` does not
    assert_refused(tmp_path, [llama_dir, "--groups", "2", "-o", tmp_path / name], "is too long", "staging prefix")


def test_output_path_past_the_system_limit(llama_dir, tmp_path):
    deep = tmp_path.joinpath(*["d" * 200] * 21)
    assert_refused(tmp_path, [llama_dir, "--groups", "2", "-o", deep], "past this system's limit")


def test_push_to_hub_name_is_checked_before_any_work(llama_dir, tmp_path):
    for extra in ([], ["--dry-run"]):
        assert_refused(tmp_path, [llama_dir, "--groups", "2", "-o", tmp_path / "out", "--push-to-hub", "a/b/c",
                                  *extra], "--push-to-hub 'a/b/c' is not a hub repository name")


def test_float16_overflow_names_the_dtype_not_a_damaged_source(llama_dir, tmp_path):
    src = _source(llama_dir, tmp_path)
    _edit_weights(src, lambda w: w["model.layers.0.self_attn.k_proj.weight"].__setitem__((0, 0), 1e6))
    assert_refused(tmp_path, [src, "--groups", "2", "--dtype", "float16", "-o", tmp_path / "out", "-q"],
                   "past float16's range", "--dtype float32")


def test_refresh_modeling_where_a_modeling_file_is_a_folder(no_native_dirs, tmp_path):
    out = tmp_path / "out"
    code, err = run_cli(no_native_dirs["opt"], "--groups", "2", "-o", out, "-q")
    assert code == 0, err
    modeling = out / "gqa_opt.py"
    modeling.unlink()
    modeling.mkdir()
    before = _tree(out)
    assert_refused(tmp_path, [out, "--refresh-modeling"], modeling.name, "is a folder where the modeling file goes")
    assert _tree(out) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its permissions")
def test_unreadable_shard(llama_dir, tmp_path):
    src = _source(llama_dir, tmp_path)
    (src / "model.safetensors").chmod(0)
    assert_refused(tmp_path, [src, "--groups", "2", "-o", tmp_path / "out"], "cannot read", "permissions")


API = {  # keyword options of convert_checkpoint -> needle
    "groups='2'": (dict(groups="2"), "groups='2' must be a whole number"),
    "groups=2.0": (dict(groups=2.0), "groups=2.0 must be a whole number"),
    "groups=True": (dict(groups=True), "groups=True must be a whole number"),
    "groups=0": (dict(groups=0), "at least 1"),
    "seed=-1": (dict(groups=2, seed=-1), "seed=-1"),
    "dtype=torch.int8": (dict(groups=2, dtype=torch.int8), "dtype int8 cannot hold converted weights"),
    "dtype=torch.float8": (dict(groups=2, dtype=torch.float8_e4m3fn), "float8_e4m3fn cannot hold"),
    "dtype=3": (dict(groups=2, dtype=3), "unknown dtype 3"),
    "device='meta' with fit": (dict(groups=2, method="fit", device="meta"), "unknown --device 'meta'"),
    "device=torch.device('meta') with fit": (dict(groups=2, method="fit", device=torch.device("meta")),
                                             "device 'meta' cannot run calibration"),
    "device=0": (dict(groups=2, method="fit", device=0), "device must be a name"),
    "float calibration ids": (dict(groups=2, method="fit", calibration=torch.rand(2, 8) * 100),
                              "calibration token ids are float32"),
    "calibration a list": (dict(groups=2, method="fit", calibration=[[1, 2, 3]]), "not a list"),
    "method=None": (dict(groups=2, method=None), "method=None must be a string"),
    "force='yes'": (dict(groups=2, force="yes"), "force='yes' must be True or False"),
    "max_shard_size=1.5": (dict(groups=2, max_shard_size=1.5), "max_shard_size must be bytes"),
    "calibration_samples='8'": (dict(groups=2, method="fit", calibration_samples="8"), "calibration_samples='8'"),
}


@pytest.mark.parametrize("case", API, ids=list(API))
def test_api_values_are_checked_where_they_enter(case, llama_dir, tmp_path):
    kwargs, needle = API[case]
    with pytest.raises(ConversionError, match=None) as caught:
        convert_checkpoint(llama_dir, tmp_path / "out", progress=False, **kwargs)
    assert needle in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_calibration_that_will_not_fit_never_starts(llama_dir, tmp_path):
    """--dry-run refused it; the real run used to calibrate for minutes before failing."""
    args = [llama_dir, "--groups", "2", "--method", "fit", "--calibration-samples", "100000000", "--device", "cpu",
            "-o", tmp_path / "out", "-q"]
    assert_refused(tmp_path, [*args, "--dry-run"], "needs about")
    assert_refused(tmp_path, args, "needs about")
