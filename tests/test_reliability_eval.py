"""gqa-eval against bad options, missing or mismatched checkpoints, unsafe results dirs and real disk faults (tmpfs).

Every case exits 2 with one `gqa-eval: error:` line naming the problem and the fix, no traceback, leaves its inputs
as they were and writes nothing (`assert_refused` compares the trees before and after).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from faults import mounted_tmpfs, remount

from gqa_toolkit.eval.ablation_recipe import BuildOriginal
from gqa_toolkit.eval.cli import main
from gqa_toolkit.eval.errors import EvalError
from gqa_toolkit.eval.original import write_initial_model
from gqa_toolkit.eval.outputs import write_files
from conftest import toolkit_tokenizer as load_tokenizer

# The smallest ablation on the session's tiny llama: one conversion, no uptraining, one speed point.
TINY_ABLATION = {
    "methods": ["mean"], "groups": [2], "fractions": [0],
    "data": {"block_size": 32, "max_documents": 40, "eval_blocks": 2},
    "eval_batch_size": 2,
    "speed": {"contexts": [8], "batch_sizes": [1], "decode_steps": 1, "repeats": 1},
}


def tree(*roots: Path) -> dict:
    """Every path under `roots`, with each file's size and modification time."""
    return {p: None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns) for root in roots if root.exists()
            for p in [root, *root.rglob("*")]}


def digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def invoke(args):
    result = CliRunner().invoke(main, [str(a) for a in args], prog_name="gqa-eval")
    return result.exit_code, result.stderr


def assert_one_error_line(code: int, stderr: str, *needles: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("gqa-eval: error: "), stderr
    assert stderr.strip().splitlines()[-1] == errors[0], stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def assert_refused(args, needles, *watched: Path) -> None:
    before = tree(*watched)
    assert_one_error_line(*invoke(args), *needles)
    assert tree(*watched) == before, "a refused command changed its inputs or wrote something"


@pytest.fixture
def inputs(uptrain_models, tmp_path, no_native_dirs):
    """Names the cases' arguments refer to: the session's tiny checkpoints and some broken neighbours of them."""
    orphan = shutil.copytree(uptrain_models["gqa"], tmp_path / "orphan")
    config = json.loads((orphan / "config.json").read_text())
    config["gqa_conversion"]["source"] = str(tmp_path / "deleted-mha")
    (orphan / "config.json").write_text(json.dumps(config))

    other_vocab = shutil.copytree(uptrain_models["mha"], tmp_path / "other-vocab")
    config = json.loads((other_vocab / "config.json").read_text())
    (other_vocab / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))

    bad_config = shutil.copytree(uptrain_models["gqa"], tmp_path / "bad-config")
    (bad_config / "config.json").write_text("{not json")

    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "a-file").write_text("x\n")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    (foreign / "data").mkdir()
    for name, text in {"other-ablation": "results_dir: elsewhere\n", "broken-ablation": "a: [1\n"}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "ablation-recipe.yaml").write_text(text)

    recipe = tmp_path / "ablation.yaml"
    recipe.write_text(yaml.safe_dump({
        **TINY_ABLATION, "results_dir": str(tmp_path / "results"),
        "original": {"path": str(uptrain_models["mha"]), "original_steps": 20},
        "data": {**TINY_ABLATION["data"], "cache_dir": str(uptrain_models["cache"])},
    }))
    return {"mha": uptrain_models["mha"], "gqa": uptrain_models["gqa"], "models": uptrain_models["mha"].parent,
            "whisper": no_native_dirs["whisper"],
            "missing": tmp_path / "missing", "orphan": orphan, "other_vocab": other_vocab, "recipe": recipe,
            "tmp": tmp_path}


BAD_INPUTS = {
    # 1. a missing model
    "speed: missing model dir": (["speed", "{missing}"], ["MODEL_DIR", "is missing"]),
    "tasks: missing model dir": (["tasks", "{missing}", "--tasks", "hellaswag"], ["MODEL_DIR:", "is missing"]),
    "perplexity: not a model": (["perplexity", "{tmp}/not-a-model"], ["no config.json"]),
    "fidelity: config.json not JSON": (["fidelity", "{tmp}/bad-config"], ["cannot read", "not a valid JSON file"]),
    "speed: config.json not JSON": (["speed", "{tmp}/bad-config"], ["cannot read", "not a valid JSON file"]),
    # 2. speed options, refused while parsing
    "speed: --contexts abc": (["speed", "{gqa}", "--contexts", "abc"],
                              ["'--contexts'", "'abc'", "comma-separated list of positive integers", "128,512"]),
    "speed: --contexts -5": (["speed", "{gqa}", "--contexts", "-5"], ["'--contexts'", "'-5'"]),
    "speed: --contexts 8,": (["speed", "{gqa}", "--contexts", "8,"], ["'--contexts'", "'8,'"]),
    "speed: --batch-sizes 0": (["speed", "{gqa}", "--batch-sizes", "0"], ["'--batch-sizes'", "'0'", "e.g. 1,8"]),
    "speed: --decode-steps 0": (["speed", "{gqa}", "--decode-steps", "0"],
                                ["'--decode-steps'", "0 is too small", "at least 1"]),
    "speed: --decode-steps -3": (["speed", "{gqa}", "--decode-steps", "-3"], ["'--decode-steps'", "-3"]),
    "speed: --decode-steps x": (["speed", "{gqa}", "--decode-steps", "x"], ["'--decode-steps'", "'x' is not an integer"]),
    "speed: context past the model's": (["speed", "{gqa}", "--contexts", "4096"],
                                        ["--contexts 4096 plus 16 decode steps", "context of 256 tokens"]),
    "perplexity: --block-size 0": (["perplexity", "{mha}", "--block-size", "0"], ["'--block-size'", "at least 2"]),
    "perplexity: --batch-size 0": (["perplexity", "{mha}", "--batch-size", "0"], ["'--batch-size'", "at least 1"]),
    "perplexity: --max-blocks 0": (["perplexity", "{mha}", "--max-blocks", "0"], ["'--max-blocks'", "at least 1"]),
    "perplexity: empty data file": (["perplexity", "{mha}", "--data", "{tmp}/empty.txt", "--split", "train",
                                     "--block-size", "32"], ["gives no block of 32 tokens"]),
    "unknown option": (["perplexity", "{mha}", "--blocksize", "8"], ["No such option", "gqa-eval perplexity --help"]),
    "unknown command": (["perplexity-of", "{mha}"], ["No such command", "gqa-eval --help"]),
    # 3. the source fidelity and speed compare with
    "fidelity: recorded source deleted": (["fidelity", "{orphan}"], [
        "the MHA source checkpoint recorded by gqa-convert", "deleted-mha", "is missing", "pass --source MHA_DIR"]),
    "speed: recorded source deleted": (["speed", "{orphan}"], [
        "the MHA source checkpoint recorded by gqa-convert", "is missing", "pass --source MHA_DIR"]),
    "fidelity: --source missing": (["fidelity", "{gqa}", "--source", "{missing}"], ["--source", "is missing"]),
    "fidelity: --source is a file": (["fidelity", "{gqa}", "--source", "{tmp}/a-file"], ["is a file"]),
    "fidelity: --source of another vocabulary": (["fidelity", "{gqa}", "--source", "{other_vocab}"],
                                                 ["vocab_size 520 but MODEL_DIR has 512"]),
    # 4. overrides that are not YAML
    "ablation: override train.lr=[1": (["ablation", "{recipe}", "train.lr=[1"], ["'train.lr=[1'", "not valid YAML"]),
    "ablation: override uptrain.lr=[1": (["ablation", "{recipe}", "uptrain.lr=[1"], ["not valid YAML"]),
    # 5. results_dir: apart from the original, and new, empty or the ablation's own
    "ablation: results_dir is the original": (["ablation", "{recipe}", "results_dir={mha}"],
                                              ["is the original checkpoint", "original.path"]),
    "ablation: results_dir inside the original": (["ablation", "{recipe}", "results_dir={mha}/results"],
                                                  ["is inside the original checkpoint"]),
    "ablation: results_dir above the original": (["ablation", "{recipe}", "results_dir={models}"],
                                                 ["holds the original checkpoint"]),
    "ablation: results_dir of other files": (["ablation", "{recipe}", "results_dir={tmp}/foreign"],
                                             ["is not empty and holds no ablation", "data/, notes.txt"]),
    "ablation: results_dir is a file": (["ablation", "{recipe}", "results_dir={tmp}/a-file"], ["is a file"]),
    "ablation: results_dir of another recipe": (["ablation", "{recipe}", "results_dir={tmp}/other-ablation"],
                                                ["holds results of a different recipe"]),
    "ablation: results_dir with a broken recipe": (["ablation", "{recipe}", "results_dir={tmp}/broken-ablation"],
                                                   ["is not a readable ablation recipe"]),
    # 7. other recipe values that used to fail late
    "ablation: speed.contexts=[0]": (["ablation", "{recipe}", "speed.contexts=[0]"],
                                     ["speed.contexts: give one or more positive integers"]),
    "ablation: no methods": (["ablation", "{recipe}", "methods=[]"], ["methods"]),
    "ablation: launcher not installed": (["ablation", "{recipe}", "launcher=no-such-launcher", "fractions=[0.5]"],
                                         ["no-such-launcher is not an installed command"]),
    "ablation: original.path not a model": (["ablation", "{recipe}", "original.path={tmp}/not-a-model"],
                                            ["original.path", "has no config.json"]),
    "ablation: original.path an audio model": (["ablation", "{recipe}", "original.path={whisper}"],
                                               ["whisper has no preprocessor_config.json (the audio feature "
                                                "extractor", "copy the source model's preprocessor_config.json or"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_error_line(case, inputs):
    args, needles = BAD_INPUTS[case]
    args = [a.format(**inputs) for a in args]
    assert_refused(args, needles, inputs["tmp"], inputs["mha"], inputs["gqa"])


# -- real disk faults -------------------------------------------------------------------------------------------
@contextmanager
def full(folder: Path):
    """The file system under `folder` with no byte left, while the block runs."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 65536):
                pass
        except OSError:
            pass
    try:
        yield
    finally:
        filler.unlink()


@contextmanager
def read_only(point: Path):
    remount(point, "ro")
    try:
        yield
    finally:
        remount(point, "rw")


def _ablation_recipe(folder: Path, uptrain_models, results: Path) -> Path:
    recipe = folder / "ablation.yaml"
    recipe.write_text(yaml.safe_dump({
        **TINY_ABLATION, "results_dir": str(results),
        "original": {"path": str(uptrain_models["mha"]), "original_steps": 20},
        "data": {**TINY_ABLATION["data"], "cache_dir": str(uptrain_models["cache"])},
    }))
    return recipe


@pytest.mark.parametrize("fault, needle", [("full", "the disk is full"), ("ro", "the filesystem is read-only")])
def test_fresh_results_dir_on_a_faulty_disk(fault, needle, uptrain_models, tmp_path):
    with mounted_tmpfs(tmp_path / "mnt", *(["ro"] if fault == "ro" else [])) as point:
        results = point / "results"
        recipe = _ablation_recipe(tmp_path, uptrain_models, results)
        with full(point) if fault == "full" else nullcontext():
            before = tree(point)
            assert_one_error_line(*invoke(["ablation", recipe, "-q"]), f"cannot write {results}", needle)
            assert tree(point) == before and not results.exists()


@pytest.fixture(scope="module")
def finished_on_tmpfs(uptrain_models, tmp_path_factory):
    """A finished tiny ablation whose results_dir is on a 2 MB tmpfs."""
    root = tmp_path_factory.mktemp("faults")
    with mounted_tmpfs(root / "mnt") as point:
        recipe = _ablation_recipe(root, uptrain_models, point / "results")
        code, stderr = invoke(["ablation", recipe, "-q"])
        assert code == 0, stderr
        yield recipe, point


@pytest.mark.parametrize("fault, needle", [("full", "the disk is full"), ("ro", "the filesystem is read-only")])
def test_rendering_results_on_a_faulty_disk_keeps_the_old_ones(fault, needle, finished_on_tmpfs):
    recipe, point = finished_on_tmpfs
    results = point / "results"
    old = digests(results)
    with full(point) if fault == "full" else read_only(point):
        assert_one_error_line(*invoke(["ablation", recipe, "-q"]), f"cannot write {results}/results.csv", needle)
    assert digests(results) == old
    assert not [p for p in point.rglob("*") if ".partial-" in p.name]


def test_write_files_is_all_or_nothing_on_a_full_disk(tmp_path):
    with mounted_tmpfs(tmp_path / "mnt") as point:
        (point / "results.md").write_text("old table\n")
        with full(point), pytest.raises(EvalError, match="cannot write .*: the disk is full; free space there"):
            write_files({point / "results.md": "new table\n" * 1000, point / "results.csv": "a,b\n"})
        assert sorted(p.name for p in point.iterdir()) == ["results.md"]
        assert (point / "results.md").read_text() == "old table\n"


def test_built_original_on_a_disk_too_small_leaves_nothing(uptrain_models, tmp_path):
    build = BuildOriginal(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                          max_position_embeddings=128)
    with mounted_tmpfs(tmp_path / "mnt", size="64k") as point:  # room for config.json, not for the weights
        with pytest.raises(EvalError, match="cannot write .*original-init: the disk is full"):
            write_initial_model(point / "original-init", build, load_tokenizer(uptrain_models["mha"]))
        assert list(point.iterdir()) == []


def test_result_to_stdout_on_a_full_disk(uptrain_models, tmp_path):
    with mounted_tmpfs(tmp_path / "mnt") as point, full(point):
        with open(point / "speed.txt", "w") as out:
            done = subprocess.run([sys.executable, "-m", "gqa_toolkit.eval", "speed", str(uptrain_models["mha"]),
                                   "--contexts", "4", "--batch-sizes", "1", "--decode-steps", "1"],
                                  stdout=out, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "GQA_EVAL_DEVICE": "cpu"})
        assert_one_error_line(done.returncode, done.stderr, "cannot write the standard output", "the disk is full")

