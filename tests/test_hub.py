"""Hub ids in and out, offline: a hub-cache layout built here resolves in every stage (pinned by revision, recorded
in the conversion record), and --push-to-hub goes as far as huggingface_hub's API."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from huggingface_hub import HfApi

from gqa_toolkit.convert.cli import main as convert_main
from gqa_toolkit.uptrain.model import open_student

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(llama_dir, tmp_path, monkeypatch):
    """org/tiny in a hub cache (refs/main -> COMMIT), with the hub offline."""
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(llama_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / COMMIT


def test_a_hub_id_converts_from_the_cache_and_is_recorded(hub_cache, tmp_path):
    result = CliRunner().invoke(convert_main, ["org/tiny", "--groups", "2", "-o", str(tmp_path / "out"), "-q",
                                               "--revision", "main"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "config.json").read_text())["gqa_conversion"]
    assert record["source_repo"] == "org/tiny" and record["source_revision"] == COMMIT
    assert record["source"] == str(hub_cache.resolve())


def test_an_unknown_revision_is_one_line(hub_cache, tmp_path):
    result = CliRunner().invoke(convert_main, ["org/tiny", "--groups", "2", "-o", str(tmp_path / "out"), "-q",
                                               "--revision", "no-such-branch"])
    assert result.exit_code == 2
    assert "'org/tiny' at revision 'no-such-branch' is not a local directory" in result.output
    assert not (tmp_path / "out").exists()


def test_uptrain_and_eval_take_hub_ids(hub_cache):
    assert open_student("org/tiny").path == hub_cache.resolve()


def test_push_to_hub_uploads_the_finished_output(llama_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)) or "https://hub/c")
    out = tmp_path / "out"
    result = CliRunner().invoke(convert_main, [str(llama_dir), "--groups", "2", "-o", str(out), "-q",
                                               "--push-to-hub", "me/tiny-gqa2", "--private", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pushed"] == "https://hub/c"
    (create, repo, options), (upload, upload_options) = calls
    assert (create, repo, options["private"], options["exist_ok"]) == ("create", "me/tiny-gqa2", True, True)
    assert upload_options["folder_path"] == str(out) and upload_options["repo_id"] == "me/tiny-gqa2"
    assert (out / "model.safetensors").is_file()  # pushed after the output was complete


def test_a_failed_push_keeps_the_output_and_says_how_to_retry(llama_dir, tmp_path, monkeypatch):
    def refuse(self, repo_id, **kw):
        raise PermissionError("401 Unauthorized")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    out = tmp_path / "out"
    result = CliRunner().invoke(convert_main, [str(llama_dir), "--groups", "2", "-o", str(out), "-q",
                                               "--push-to-hub", "me/tiny-gqa2"])
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert "is complete, but pushing it to the hub as me/tiny-gqa2 failed (PermissionError: 401" in line
    assert f"hf upload me/tiny-gqa2 {out}" in line and (out / "model.safetensors").is_file()


def test_uptrain_runs_a_hub_id_in_model_path(uptrain_models, write_recipe, tmp_path, monkeypatch):
    from gqa_toolkit.uptrain import load_recipe, train

    repo = tmp_path / "hub" / "models--org--tinygqa"
    shutil.copytree(uptrain_models["gqa"], repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    recipe = load_recipe(write_recipe(model={"path": "org/tinygqa"}, train={"max_steps": 1},
                                      output={"dir": str(tmp_path / "run")}))
    assert recipe.resolved().model.path == "org/tinygqa"  # kept for the hub, not made a local path
    out = train(recipe)
    assert json.loads((out / "config.json").read_text())["gqa_uptraining"]["steps"] == 1
