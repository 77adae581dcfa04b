"""Bad input: one clear line naming the problem and the fix, a non-zero exit, and nothing written."""

import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny_model
from faults import mounted_tmpfs
from safetensors import safe_open

from gqa_toolkit.convert.cli import main


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr.strip()


def assert_refused(tmp_path, args, *needles):
    before = set(tmp_path.rglob("*"))
    code, err = run_cli(*args)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("gqa-convert: error: "), err
    for needle in needles:
        assert needle in err, err
    assert set(tmp_path.rglob("*")) == before, "a refused conversion wrote something"


def test_missing_path(tmp_path):
    assert_refused(tmp_path, [tmp_path / "nope", "--groups", "2"], "no such model directory", "nope")


def test_directory_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    assert_refused(tmp_path, [tmp_path / "m", "--groups", "2"], "has no config.json")


def test_directory_without_weights(llama_dir, tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    shutil.copy(llama_dir / "config.json", src)
    assert_refused(tmp_path, [src, "--groups", "2"], "no weight files")


@pytest.mark.parametrize("model_type, needle", [("xlnet", "unsupported model_type 'xlnet'"),
                                                ("bert", "is an encoder"),
                                                ("made_up", "unsupported model_type 'made_up'")])
def test_unsupported_model_type_lists_supported(llama_dir, tmp_path, model_type, needle):
    src = _copy(llama_dir, tmp_path / "m")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    assert_refused(tmp_path, [src, "--groups", "2"], needle, "llama, marian, mbart, mistral")


def test_groups_that_do_not_divide(llama_dir, tmp_path):
    assert_refused(tmp_path, [llama_dir, "--groups", "3", "-o", tmp_path / "o"], "does not divide", "1, 2, 4")


def test_groups_above_current_kv_heads(llama_dir, tmp_path):
    assert_refused(tmp_path, [llama_dir, "--groups", "8", "-o", tmp_path / "o"], "more than", "1, 2, 4")


def test_bigcode_can_only_express_multi_query(family_dirs, tmp_path):
    assert_refused(tmp_path, [family_dirs["gpt_bigcode"], "--groups", "2", "-o", tmp_path / "o"],
                   "can only express 1")


def test_falcon_without_new_decoder_architecture(tmp_path):
    src = save_tiny_model(tmp_path / "falcon", "falcon", dict(hidden_size=64, num_hidden_layers=2, vocab_size=128,
                                                               num_attention_heads=4, multi_query=False))
    assert_refused(tmp_path, [src, "--groups", "2"], "new_decoder_architecture=True")


def test_unknown_method(llama_dir, tmp_path):
    assert_refused(tmp_path, [llama_dir, "--groups", "2", "--method", "median", "-o", tmp_path / "o"],
                   "unknown method 'median'", "first, mean, random")


def test_truncated_safetensors(llama_dir, tmp_path):
    src = _copy(llama_dir, tmp_path / "m")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_refused(tmp_path, [src, "--groups", "2"], "truncated", "re-download")


def test_corrupt_safetensors_header(llama_dir, tmp_path):
    src = _copy(llama_dir, tmp_path / "m")
    data = bytearray((src / "model.safetensors").read_bytes())
    data[8:20] = b"not json at "
    (src / "model.safetensors").write_bytes(bytes(data))
    assert_refused(tmp_path, [src, "--groups", "2"], "corrupt", "re-download")


def test_weights_that_disagree_with_config(llama_dir, tmp_path):
    src = _copy(llama_dir, tmp_path / "m")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 2}))
    assert_refused(tmp_path, [src, "--groups", "1"], "k_proj.weight has shape [64, 64]", "disagree")


@pytest.mark.parametrize("attr, value, needle", [("num_attention_heads", "4", "num_attention_heads='4'"),
                                                 ("num_key_value_heads", 0, "num_key_value_heads=0"),
                                                 ("initializer_range", None, "transformers cannot read")])
def test_config_value_that_cannot_be_read(llama_dir, tmp_path, attr, value, needle):
    src = _copy(llama_dir, tmp_path / "m")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, attr: value}))
    assert_refused(tmp_path, [src, "--groups", "2"], needle)


def test_existing_output_needs_force_and_must_be_the_toolkits(llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert_refused(tmp_path, [llama_dir, "--groups", "2", "-o", out, "--force"], "not a gqa-convert output",
                   "never replaced")
    assert (out / "keep.txt").read_text() == "user data"
    out.joinpath("keep.txt").unlink()
    out.rmdir()
    code, err = run_cli(llama_dir, "--groups", "2", "-o", out, "-q")
    assert code == 0, err
    stale = out / "model-00002-of-00002.safetensors"  # a shard of an earlier, differently sharded conversion
    shutil.copy(out / "model.safetensors", stale)
    assert_refused(tmp_path, [llama_dir, "--groups", "2", "-o", out], "already exists", "--force")
    code, err = run_cli(llama_dir, "--groups", "2", "-o", out, "--force", "-q")
    assert code == 0, err
    assert not stale.exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("where, needle", [("source", "is the source"), ("parent", "a folder above the source"),
                                           ("inside", "inside the source")])
def test_output_never_replaces_holds_or_sits_in_the_source(llama_dir, tmp_path, where, needle):
    src = tmp_path / "parent" / "src"
    shutil.copytree(llama_dir, src)
    (tmp_path / "parent" / "beside.txt").write_text("a user's file beside the source")
    out = {"source": src, "parent": tmp_path / "parent", "inside": src / "out"}[where]
    assert_refused(tmp_path, [src, "--groups", "2", "-o", out, "--force"], needle)
    assert (tmp_path / "parent" / "beside.txt").is_file() and (src / "model.safetensors").is_file()


def test_output_on_another_filesystem(llama_dir, tmp_path):
    """copy_file_range refuses to cross filesystems (EXDEV); unchanged tensors are then copied through a buffer."""
    with mounted_tmpfs(tmp_path / "mnt", size="64m") as mnt:
        code, err = run_cli(llama_dir, "--groups", "2", "-o", mnt / "out", "-q")
        assert code == 0, err
        with safe_open(mnt / "out" / "model.safetensors", "pt") as f, \
                safe_open(llama_dir / "model.safetensors", "pt") as g:
            for name in g.keys():
                if "k_proj" not in name and "v_proj" not in name:
                    assert torch.equal(f.get_tensor(name), g.get_tensor(name)), name


def test_a_killed_conversions_leftovers_are_removed(llama_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f".out.partial-{socket.gethostname()}-{dead.pid}"
    elsewhere = tmp_path / f".out.partial-another-host-{dead.pid}"  # a conversion on another machine: kept
    elsewhere.mkdir()
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    code, err = run_cli(llama_dir, "--groups", "2", "-o", tmp_path / "out", "-q")
    assert code == 0, err
    assert not leftover.exists() and elsewhere.is_dir()


def test_bin_that_needs_unsafe_unpickling(llama_dir, tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    shutil.copy(llama_dir / "config.json", src)
    torch.save({"weights": torch.zeros(2), "callback": subprocess.Popen}, src / "pytorch_model.bin")
    assert_refused(tmp_path, [src, "--groups", "2"], "unsafe unpickling", "safetensors")


def test_interrupted_conversion_leaves_nothing(llama_dir, tmp_path, monkeypatch):
    import gqa_toolkit.convert.api as api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "write_metadata", interrupted)
    code, err = run_cli(llama_dir, "--groups", "2", "-o", tmp_path / "out")
    assert code == 130 and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_console_script_runs_and_reports_errors(llama_dir, tmp_path):
    script = shutil.which("gqa-convert", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert script, "gqa-convert is not installed beside the test interpreter"
    done = subprocess.run([script, str(llama_dir), "--groups", "2", "-o", str(tmp_path / "out"), "-q"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == str(tmp_path / "out")
    bad = subprocess.run([script, str(llama_dir), "--groups", "5"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 GB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")])
def test_running_out_of_memory_in_calibration_says_what_to_lower(error, uptrain_models, tmp_path, monkeypatch):
    from gqa_toolkit.convert.methods import block_stream

    def exhausted(*args, **kwargs):
        raise error

    monkeypatch.setattr(block_stream, "_run", exhausted)
    code, err = run_cli(uptrain_models["mha"], "-g", "2", "--method", "fit", "--calibration-samples", "4", "-o",
                        tmp_path / "out", "-q")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("gqa-convert: error: out of memory (") and "lower --calibration-samples" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
