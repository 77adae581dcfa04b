"""gqa-convert against damaged sources, hostile folders, bad options and real faults (tmpfs, SIGKILL).

Every case exits 2 with one `gqa-convert: error:` line naming the problem and the fix, leaves the source as it
was, and writes nothing (assert_refused compares the whole tree before and after).
"""

import itertools
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from contextlib import ExitStack

import pytest
import torch
from faults import mounted_tmpfs
from safetensors.torch import load_file, save_file
from test_convert_errors import assert_refused, run_cli


def _source(llama_dir, tmp_path):
    return shutil.copytree(llama_dir, tmp_path / "src")


def _rewrite_header(path, edit):
    """Rewrite a safetensors file's JSON header with `edit(header)`, keeping the data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n:])


def _negative_dim(header):
    name = next(k for k in header if k.endswith("input_layernorm.weight"))
    header[name]["shape"] = [-8, -8]  # -8 * -8 * 4 bytes: the byte span still "agrees" with the shape
    return header


def _sharded(src, index_text):
    weights = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    save_file(weights, src / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(index_text)


def _nan_in_kv(src):
    weights = load_file(src / "model.safetensors")
    weights["model.layers.1.self_attn.k_proj.weight"][3, 5] = float("nan")
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})


def _weights_link_outside(src):
    outside = src.parent / "elsewhere.safetensors"
    shutil.move(src / "model.safetensors", outside)
    (src / "model.safetensors").symlink_to(outside)


DAMAGED = {
    "header is a JSON list": (lambda s: _rewrite_header(s / "model.safetensors", lambda h: [h]), "not an object"),
    "negative dimension outside K/V": (lambda s: _rewrite_header(s / "model.safetensors", _negative_dim),
                                       "input_layernorm.weight"),
    "index is not JSON": (lambda s: _sharded(s, "{not json"), "is not valid JSON"),
    "index has no weight_map": (lambda s: _sharded(s, json.dumps({"metadata": {}})), "has no weight_map"),
    "index names a path": (lambda s: _sharded(s, json.dumps({"weight_map": {"x": "../x.safetensors"}})),
                           "in the same directory"),
    "NaN in a source K/V": (_nan_in_kv, "model.layers.1.self_attn.k_proj.weight"),
    "weights link outside the source": (_weights_link_outside, "outside the source directory"),
}


@pytest.mark.parametrize("case", DAMAGED, ids=list(DAMAGED))
def test_damaged_or_hostile_sources(case, llama_dir, tmp_path):
    damage, needle = DAMAGED[case]
    src = _source(llama_dir, tmp_path)
    damage(src)
    before = {p: p.read_bytes() for p in src.iterdir()}
    assert_refused(tmp_path, [src, "--groups", "2", "-o", tmp_path / "out", "-q"], needle)
    assert {p: p.read_bytes() for p in src.iterdir()} == before


OPTIONS = {
    "shard size that is not a number": (["--max-shard-size", "."], "--max-shard-size '.'"),
    "shard size without a unit": (["--max-shard-size", "5"], "has no unit"),
    "zero shard size": (["--max-shard-size", "0GB"], "positive size"),
    "no calibration samples": (["--method", "fit", "--calibration-samples", "0"], "at least 1"),
    "negative calibration length": (["--method", "fit", "--calibration-length", "-5"], "at least 2 tokens"),
    "missing --groups": ([], "--groups is required"),
    "unknown device": (["--method", "fit", "--device", "tpu"], "unknown --device 'tpu'"),
}


@pytest.mark.parametrize("case", OPTIONS, ids=list(OPTIONS))
def test_bad_options(case, llama_dir, tmp_path):
    args, needle = OPTIONS[case]
    groups = [] if case == "missing --groups" else ["--groups", "2"]
    assert_refused(tmp_path, [llama_dir, *groups, *args, "-o", tmp_path / "out"], needle)


def test_mistyped_relative_path_is_not_a_hub_download(llama_dir, tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert_refused(tmp_path, ["runs/modle", "--groups", "2"], "no such model directory")


def test_links_outside_the_source_are_not_copied_and_foreign_code_is_named(llama_dir, tmp_path):
    src = _source(llama_dir, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("a file from elsewhere on the machine")
    (src / "notes.txt").symlink_to(secret)
    (src / "modeling_custom.py").write_text("# the source's own code\n")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "modeling_custom.Cfg"}}))
    script = shutil.which("gqa-convert", path=os.path.dirname(sys.executable))
    done = subprocess.run([script, str(src), "--groups", "2", "-o", str(tmp_path / "out"), "-q"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    warnings = done.stderr.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("gqa-convert: warning: ") for w in warnings), warnings
    assert "notes.txt" in warnings[0] and "outside the source" in warnings[0]
    assert "modeling_custom.py" in warnings[1] and "auto_map AutoConfig" in warnings[1]
    assert not (tmp_path / "out" / "notes.txt").exists()
    assert "modeling_custom.py" in (tmp_path / "out" / "README.md").read_text()


def test_hub_cache_snapshot_links_into_its_blobs_still_convert(llama_dir, tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(llama_dir.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    code, err = run_cli(snapshot, "--groups", "2", "-o", tmp_path / "out", "-q")
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "model.safetensors").is_symlink()


def test_default_output_of_a_hub_snapshot_is_never_inside_the_cache(llama_dir, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("b" * 40)
    shutil.copytree(llama_dir, snapshot)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    code, err = run_cli(snapshot, "--groups", "2", "-q")
    assert code == 0, err
    assert (tmp_path / "work" / "tiny-gqa2-mean" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "hub" / "models--org--tiny" / "snapshots").iterdir()) == ["b" * 40]


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, *options) -> a real tmpfs mount point; unmounted afterwards."""
    numbers = itertools.count()
    with ExitStack() as mounts:
        yield lambda size, *options: mounts.enter_context(
            mounted_tmpfs(tmp_path / f"mnt{next(numbers)}", *options, size=size))


def test_disk_too_small_is_refused_before_writing(llama_dir, tmp_path, tmpfs):
    small = tmpfs("64k")
    assert_refused(small, [llama_dir, "--groups", "2", "-o", small / "out"], "free", "needs")
    assert list(small.iterdir()) == []


def test_read_only_destination(llama_dir, tmp_path, tmpfs):
    read_only = tmpfs("4m", "ro")
    assert_refused(tmp_path, [llama_dir, "--groups", "2", "-o", read_only / "out"], "read-only",
                   "choose --output on a writable disk")


def test_disk_full_while_writing_leaves_nothing(llama_dir, tmp_path, tmpfs, monkeypatch):
    """The free-space check passes (it is told the disk is big), then the real disk fills up mid-write."""
    import gqa_toolkit.convert.api as api

    small = tmpfs("96k")
    monkeypatch.setattr(api, "check_free_space", lambda *args: None)
    assert_refused(small, [llama_dir, "--groups", "2", "-o", small / "out", "-q"], "the disk is full", "free space")
    assert list(small.iterdir()) == []


_KILLED = textwrap.dedent("""
    import os, signal, sys
    import gqa_toolkit.convert.api as api
    api.write_metadata = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # die with the weights half-done
    api.convert_checkpoint(sys.argv[1], sys.argv[2], groups=2, progress=False)
""")


def test_sigkill_leftovers_are_removed_by_the_next_run(llama_dir, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", _KILLED, str(llama_dir), str(out)])
    assert done.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(leftovers) == 1 and not out.exists()
    code, err = run_cli(llama_dir, "--groups", "2", "-o", out, "-q")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert torch.equal(load_file(out / "model.safetensors")["model.embed_tokens.weight"],
                       load_file(llama_dir / "model.safetensors")["model.embed_tokens.weight"])


def test_dry_run_describes_and_writes_nothing(llama_dir, tmp_path):
    before = set(tmp_path.rglob("*")) | set(llama_dir.parent.rglob("*"))
    code, out = _run_stdout(llama_dir, "--groups", "2", "--method", "fit", "--dry-run", "-o", tmp_path / "out")
    assert code == 0, out
    text = "\n".join(out)
    assert "copied unchanged" in text and "computed" in text and "one block at a time on cpu" in text
    assert "peak memory (estimate" in text and "available on cpu" in text
    assert set(tmp_path.rglob("*")) | set(llama_dir.parent.rglob("*")) == before


def test_dry_run_refuses_what_will_not_fit(llama_dir, tmp_path, tmpfs):
    small = tmpfs("64k")
    assert_refused(small, [llama_dir, "--groups", "2", "--dry-run", "-o", small / "out"], "needs", "free")


def _run_stdout(*args):
    from click.testing import CliRunner

    from gqa_toolkit.convert.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout.splitlines()
