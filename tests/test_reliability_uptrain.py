"""gqa-uptrain under bad input and real disk faults: one `error:` line naming the problem and the fix, exit code 2,
no traceback, the source checkpoints untouched, nothing half-written left behind, and a rerun that resumes.

Disk faults are real: a tmpfs mount filled up or remounted read-only at the moment a write happens (root only; the
tests skip elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from faults import fill, mounted_tmpfs, remount

from gqa_toolkit import corpus
from gqa_toolkit.uptrain import load_recipe
from gqa_toolkit.uptrain import loop as loop_module
from gqa_toolkit.uptrain.cli import main
from gqa_toolkit.uptrain.metrics import MetricsLog
from gqa_toolkit.uptrain.run_dir import write_recipe as save_run_recipe


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error(result) -> str:
    """The single `error:` line of a refused run, after checking the exit code and that nothing else was printed."""
    assert result.exit_code == 2, (result.output, result.exc_info and traceback.format_exception(*result.exc_info))
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("gqa-uptrain: error: ")]
    assert len(errors) == 1 and result.output.strip() == errors[0], result.output
    return errors[0]


def snapshot(path: Path) -> dict[str, str] | None:
    """Every file under `path` with its hash; None when `path` does not exist."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def local_docs(tmp_path_factory) -> Path:
    """40 documents as a local jsonl file: it loads in milliseconds, where python-stdlib scans the whole stdlib."""
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in corpus.iter_texts("train", limit=40)))
    return path


@pytest.fixture
def recipe(write_recipe, local_docs):
    """write_recipe for fast runs: local data, no held-out blocks, no trackers (tensorboard would hold files open)."""

    def write(**sections):
        data = {"source": str(local_docs), "max_documents": None, "eval_blocks": 0, **sections.pop("data", {})}
        output = {"trackers": [], **sections.pop("output", {})}
        return write_recipe(data=data, output=output, **sections)

    return write


@pytest.fixture(autouse=True)
def sources_untouched(uptrain_models):
    """The converted checkpoint and its MHA source are never written, whatever a test does."""
    before = {k: snapshot(uptrain_models[k]) for k in ("mha", "gqa")}
    yield
    assert {k: snapshot(uptrain_models[k]) for k in ("mha", "gqa")} == before


# ---- bad input: each case makes its files and returns the command, what the error line must say, and the
# ---- output.dir (which must be as it was before the command: absent, or unchanged)

@dataclass
class Ctx:
    write_recipe: Callable[..., Path]
    models: dict[str, Path]
    tmp: Path
    monkeypatch: pytest.MonkeyPatch


@dataclass
class Case:
    args: list
    expect: list[str]
    out: Path
    extra: dict = field(default_factory=dict)


def _out_is_model(c: Ctx) -> Case:
    gqa = c.models["gqa"]
    return Case([c.write_recipe(), f"output.dir={gqa}"], ["output.dir", f"is model.path {gqa}", "outside it"], gqa)


def _out_inside_model(c: Ctx) -> Case:
    gqa = c.models["gqa"]
    return Case([c.write_recipe(), f"output.dir={gqa / 'sub'}"], ["is inside model.path", "outside it"], gqa / "sub")


def _out_above_model(c: Ctx) -> Case:
    parent = c.models["gqa"].parent
    return Case([c.write_recipe(), f"output.dir={parent}"], ["is a folder above model.path", "outside it"], parent)


def _out_inside_teacher(c: Ctx) -> Case:
    mha = c.models["mha"]
    recipe = c.write_recipe(objective={"distill_weight": 0.5}, output={"dir": str(mha / "run")})
    return Case([recipe], [f"is inside the distillation teacher {mha}"], mha / "run")


def _out_holds_user_files(c: Ctx) -> Case:
    other = c.tmp / "other"
    (other / "data").mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    return Case([c.write_recipe(), f"output.dir={other}"],
                ["holds no uptrain run", "notes.txt", "data/", "choose a new or empty output.dir"], other)


def _malformed_override(c: Ctx) -> Case:
    return Case([c.write_recipe(), "train.lr=[1"], ["override 'train.lr=[1'", "not valid YAML", "train.lr=3e-4"],
                c.tmp / "run")


def _tokenizer_larger_than_vocab(c: Ctx) -> Case:
    small = c.tmp / "small-vocab"
    shutil.copytree(c.models["gqa"], small)
    config = json.loads((small / "config.json").read_text())
    ids, config["vocab_size"] = config["vocab_size"], config["vocab_size"] - 100
    (small / "config.json").write_text(json.dumps(config))
    return Case([c.write_recipe(model={"path": str(small)})],
                [f"has {ids} token ids", f"vocab_size is {ids - 100}", "tokenizer"], c.tmp / "run")


def _corrupt_saved_recipe(c: Ctx) -> Case:
    out = c.tmp / "run"
    out.mkdir()
    (out / "uptrain_recipe.yaml").write_text("model: [path: oops\n")
    return Case([c.write_recipe()], [f"{out / 'uptrain_recipe.yaml'} is not valid YAML", "restore that file"], out)


def _run_dir_with_checkpoint(c: Ctx, state_text: str | None) -> Case:
    recipe = c.write_recipe()
    out = c.tmp / "run"
    save_run_recipe(out, load_recipe(recipe).resolved())
    checkpoint = out / "checkpoints" / "step-00000002"
    checkpoint.mkdir(parents=True)
    if state_text is not None:
        (checkpoint / "trainer_state.json").write_text(state_text)
    return Case([recipe], [str(checkpoint), "trainer_state.json", "delete that folder"], out)


def _checkpoint_without_state(c: Ctx) -> Case:
    return _run_dir_with_checkpoint(c, None)


def _checkpoint_with_torn_state(c: Ctx) -> Case:
    return _run_dir_with_checkpoint(c, '{"step": 2, "tok')


def _hub_typo_offline(c: Ctx) -> Case:
    import datasets
    import huggingface_hub.constants

    c.monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    c.monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return Case([c.write_recipe(data={"source": "pythn-stdlib"})],
                ["'pythn-stdlib'", "neither a local path nor", "'python-stdlib'", "data.source"], c.tmp / "run")


def _hub_typo_no_network(c: Ctx) -> Case:
    # without network the hub is unreachable; with it, the hub says there is no such dataset: the same line
    return Case([c.write_recipe(data={"source": "pythn-stdlib"})],
                ["'pythn-stdlib'", "neither a local path nor", "'python-stdlib'", "data.source"], c.tmp / "run",
                extra={"max_seconds": 20})


def _teacher_missing(c: Ctx) -> Case:
    recipe = c.write_recipe(objective={"distill_weight": 0.5, "teacher": str(c.tmp / "no-teacher")})
    return Case([recipe], ["objective.teacher", "the MHA source checkpoint"], c.tmp / "run")


def _recorded_teacher_missing(c: Ctx) -> Case:
    student = c.tmp / "student"
    shutil.copytree(c.models["gqa"], student)
    config = json.loads((student / "config.json").read_text())
    config["gqa_conversion"]["source"] = str(c.tmp / "moved-away")
    (student / "config.json").write_text(json.dumps(config))
    recipe = c.write_recipe(model={"path": str(student)}, objective={"distill_weight": 0.5})
    return Case([recipe], ["gqa_conversion.source", "the MHA source checkpoint", "objective.teacher"], c.tmp / "run")


def _two_budget_overrides(c: Ctx) -> Case:
    return Case([c.write_recipe(), "train.max_steps=2", "train.max_tokens=512"], ["only one of"], c.tmp / "run")


BAD_INPUTS = [_out_is_model, _out_inside_model, _out_above_model, _out_inside_teacher, _out_holds_user_files,
              _malformed_override, _tokenizer_larger_than_vocab, _corrupt_saved_recipe, _checkpoint_without_state,
              _checkpoint_with_torn_state, _hub_typo_offline, _hub_typo_no_network, _teacher_missing,
              _recorded_teacher_missing, _two_budget_overrides]


@pytest.mark.parametrize("make", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_is_refused_in_one_line(make, recipe, uptrain_models, tmp_path, monkeypatch):
    case = make(Ctx(recipe, uptrain_models, tmp_path, monkeypatch))
    before = snapshot(case.out)
    started = time.monotonic()
    line = one_error(invoke(*case.args))
    assert time.monotonic() - started < case.extra.get("max_seconds", 60)
    for text in case.expect:
        assert text in line, line
    assert snapshot(case.out) == before


def test_a_budget_override_replaces_the_recipes_budget(recipe):
    result = invoke(recipe(train={"max_steps": None, "original_steps": 2000}), "train.max_steps=1", "--print-recipe")
    assert result.exit_code == 0, result.output
    budget = yaml.safe_load(result.output)["train"]
    assert budget["max_steps"] == 1 and budget["original_steps"] is None


def test_a_damaged_block_cache_is_rebuilt_and_said_so(recipe, tmp_path):
    recipe = recipe(data={"cache_dir": str(tmp_path / "cache")}, train={"max_steps": 1})
    assert invoke(recipe).exit_code == 0
    arrows = sorted((tmp_path / "cache").glob("*/*.arrow"))
    assert arrows
    for arrow in arrows:
        with arrow.open("r+b") as f:
            f.truncate(arrow.stat().st_size // 2)
    shutil.rmtree(tmp_path / "run")
    result = invoke(recipe)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("gqa-uptrain: warning: ")]
    assert len(warnings) == len(arrows) and "Traceback" not in result.output
    assert all("block cache" in w and str(tmp_path / "cache") in w and "rebuilding it" in w for w in warnings)
    assert invoke(recipe, f"output.dir={tmp_path / 'again'}").output.count("warning:") == 0


# ---- real disk faults on a tmpfs: at the moment a write happens the disk fills up or turns read-only

@pytest.fixture
def tmpfs(tmp_path):
    with mounted_tmpfs(tmp_path / "mnt", size="8m") as mnt:
        yield mnt


def _model_file_fits(mnt: Path) -> int:
    """Room for a checkpoint's model.safetensors but not its optimizer: the full disk then hits torch's zip writer,
    which says only `unexpected pos`."""
    return (mnt / "run" / "checkpoints" / "step-00000001" / "model.safetensors").stat().st_size + (64 << 10)


@dataclass
class Fault:
    name: str
    target: tuple[object, str]  # (module or class, attribute): the call to wrap
    when: Callable[..., bool]  # the wrapped call's arguments -> whether to fault now
    fault: str  # "full" or "read-only"
    says: str  # what the error line names
    resumes_from: str  # the checkpoint the rerun resumes from
    leave: Callable[[Path], int] | None = None  # mnt -> bytes to leave free when filling the disk


def _checkpoint_at(step: int):
    return lambda accelerator, out, state, keep_last: state["step"] == step


def _log_at(step: int):
    return lambda log, logged_step, metrics: logged_step == step


FAULTS = [
    Fault("checkpoint-full", (loop_module, "save_checkpoint"), _checkpoint_at(2), "full", "cannot write checkpoint",
          "step-00000001"),
    Fault("checkpoint-full-torch-writer", (loop_module, "save_checkpoint"), _checkpoint_at(2), "full",
          "cannot write checkpoint", "step-00000001", leave=_model_file_fits),
    Fault("checkpoint-read-only", (loop_module, "save_checkpoint"), _checkpoint_at(2), "read-only",
          "cannot write checkpoint", "step-00000001"),
    Fault("metrics-read-only", (MetricsLog, "log"), _log_at(2), "read-only", "cannot write the metrics log",
          "step-00000001"),
    Fault("final-model-full", (loop_module, "save_output"), lambda *args: True, "full",
          "cannot write the uptrained model", "step-00000002"),
]


def _inject(monkeypatch, fault: Fault, mnt: Path) -> None:
    owner, name = fault.target
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if fault.when(*args):
            if fault.fault == "full":
                fill(mnt, fault.leave(mnt) if fault.leave else 0)
            else:
                remount(mnt, "ro")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def _undo(fault: Fault, mnt: Path) -> None:
    if fault.fault == "full":
        (mnt / "filler").unlink()
    else:
        remount(mnt, "rw")


def _spy_resume(monkeypatch) -> list[str]:
    resumed = []
    original = loop_module.load_checkpoint

    def spy(accelerator, path):
        resumed.append(Path(path).name)
        return original(accelerator, path)

    monkeypatch.setattr(loop_module, "load_checkpoint", spy)
    return resumed


def _assert_nothing_half_written(out: Path) -> None:
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
def test_disk_fault_is_one_line_and_the_rerun_resumes(fault, recipe, tmpfs, monkeypatch):
    out = tmpfs / "run"
    recipe = recipe(train={"max_steps": 2}, output={"dir": str(out), "save_every": 1})
    with monkeypatch.context() as patched:
        _inject(patched, fault, tmpfs)
        line = one_error(invoke(recipe))
    problem = "the disk is full" if fault.fault == "full" else "the filesystem is read-only"
    assert fault.says in line and str(out) in line and problem in line, line
    _undo(fault, tmpfs)
    _assert_nothing_half_written(out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == fault.resumes_from

    # what SIGKILL during a save would leave: the rerun removes it
    (out / "checkpoints" / "step-00000002.tmp").mkdir()
    (out / ".model.tmp").mkdir()
    resumed = _spy_resume(monkeypatch)
    result = invoke(recipe)
    assert result.exit_code == 0, result.output
    assert resumed == [fault.resumes_from]
    _assert_nothing_half_written(out)
    assert (out / "model.safetensors").is_file()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_output_dir_on_a_read_only_disk(recipe, tmpfs):
    remount(tmpfs, "ro")
    line = one_error(invoke(recipe(output={"dir": str(tmpfs / "run")})))
    assert "cannot write the recipe" in line and str(tmpfs / "run") in line and "read-only" in line
    remount(tmpfs, "rw")
    assert list(tmpfs.iterdir()) == []
