"""The ablation runner end to end through the CLI on a micro recipe, its skip-on-rerun, and its refusals."""

import json
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gqa_toolkit.eval.cli import main

MICRO = {
    "original": {"build": {"vocab_size": 384, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                           "intermediate_size": 128, "max_position_embeddings": 128, "tokenizer_documents": 40,
                           "steps": 30, "batch_size": 8, "micro_batch_size": 8}},
    "methods": ["mean", "random"],
    "groups": [1],
    "fractions": [0, 0.2],
    "data": {"block_size": 64, "max_documents": 150, "eval_blocks": 8},
    "uptrain": {"batch_size": 8, "micro_batch_size": 8, "lr": 1e-3},
    "eval_batch_size": 8,
    "speed": {"contexts": [16], "batch_sizes": [1], "decode_steps": 2, "repeats": 1},
}


TASKS = {"names": ["python_next_line"], "limit": 8}  # the shipped local task, on 8 examples


def write_recipe(tmp_path, results_dir, **changes) -> str:
    recipe = {**MICRO, "results_dir": str(results_dir), **changes}
    recipe["data"] = {**recipe["data"], "cache_dir": str(tmp_path / "cache")}
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def run(*args):
    return CliRunner().invoke(main, ["ablation", *map(str, args), "-q"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablation")
    recipe = write_recipe(tmp, tmp / "results", tasks=TASKS)
    result = run(recipe)
    assert result.exit_code == 0, result.output + str(result.exception)
    return tmp, recipe, tmp / "results", result.stdout


@pytest.mark.slow
def test_micro_ablation_writes_tables_and_plots(finished):
    _, _, results, stdout = finished
    for name in ("results.csv", "results.json", "results.md", "speed.csv", "fig4_methods.png", "fig5_fractions.png",
                 "fig6_speed.png"):
        assert (results / name).stat().st_size > 0, name
    data = json.loads((results / "results.json").read_text())
    cells = {(c["method"], c["groups"], c["fraction"]): c for c in data["cells"]}
    assert set(cells) == {(m, 1, f) for m in ("mean", "random") for f in (0, 0.2)}
    assert cells[("mean", 1, 0.2)]["uptrain_steps"] == 6  # 0.2 x 30 original steps
    # uptraining a random initialisation recovers a lot of what it lost
    assert cells[("random", 1, 0.2)]["heldout_loss"] < cells[("random", 1, 0)]["heldout_loss"]
    # before uptraining, mean-pooling keeps more of the original's function than a random initialisation
    assert cells[("mean", 1, 0)]["kl"] < cells[("random", 1, 0)]["kl"]
    # results.md is valid markdown: every row of each table has as many cells as its header
    for table in (results / "results.md").read_text().split("\n\n"):
        rows = [line for line in table.splitlines() if line.startswith("|")]
        assert len({line.count("|") for line in rows}) <= 1, table
    assert data["original"]["kl"] == 0 and data["original"]["groups"] == 4
    kv = {s["kv_heads"]: s["kv_bytes_per_token"] for s in data["speed"]}
    assert kv[4] / kv[1] == 4
    # both decode loops measured, each with its ratio to the MHA original in the same loop
    assert sorted((s["model"], s["decode"]) for s in data["speed"]) == [
        (m, loop) for m in ("g1", "original") for loop in ("dynamic", "static")]
    assert all(s["decode_vs_original"] == 1.0 for s in data["speed"] if s["model"] == "original")
    assert all(s["device"].startswith("cpu") and s["attention"] == "sdpa" for s in data["speed"])
    assert "| mean | 1 | 0.2 | 6 |" in stdout
    assert (results / "models" / "mean-g1" / "f0.2" / "model.safetensors").is_file()
    # each cell and the original carry the task's score, and the table and csv show it beside loss and KL
    for row in [data["original"], *data["cells"]]:
        assert row["python_next_line acc"] in {i / 8 for i in range(9)}, row
    assert "| python_next_line acc |" in stdout.splitlines()[0]
    assert "python_next_line acc" in (results / "results.csv").read_text().splitlines()[0]


@pytest.mark.slow
def test_stored_task_scores_are_what_gqa_eval_tasks_gives_for_the_cells_model(finished):
    _, _, results, _ = finished
    cell = json.loads((results / "cells" / "random-g1-f0.2.json").read_text())
    result = CliRunner().invoke(main, ["tasks", str(results / "models" / "random-g1" / "f0.2"), "--tasks",
                                       "python_next_line", "--limit", "8", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{"):]) == cell["tasks"]


@pytest.mark.slow
def test_rerun_does_no_new_work(finished):
    _, recipe, results, _ = finished
    stamps = {p.name: p.stat().st_mtime_ns for p in (results / "cells").glob("*.json")}
    weights = {p: p.stat().st_mtime_ns for p in (results / "models").rglob("*.safetensors")}
    started = time.perf_counter()
    result = run(recipe)
    assert result.exit_code == 0, result.output
    assert {p.name: p.stat().st_mtime_ns for p in (results / "cells").glob("*.json")} == stamps
    assert {p: p.stat().st_mtime_ns for p in (results / "models").rglob("*.safetensors")} == weights
    assert time.perf_counter() - started < 60


@pytest.mark.slow
def test_results_dir_of_a_different_recipe_is_refused(finished, tmp_path):
    _, _, results, _ = finished
    result = run(write_recipe(tmp_path, results, seed=7))
    assert result.exit_code == 2 and "holds results of a different recipe" in result.stderr


@pytest.mark.parametrize("changes, needle", [
    ({"methods": ["mean", "median"]}, "unknown method 'median'; choose from first, mean, random"),
    ({"groups": [3]}, "groups 3 does not divide the original's 4 KV heads"),
    ({"data": {**MICRO["data"], "block_size": 512}}, "longer than the model's context of 128"),
    ({"fractions": [0, 1.5], "methods": ["best"]}, "2 problems"),
    ({"uptrain": {"learning_rate": 1}}, "train.learning_rate: unknown key"),
    ({"tasks": {"names": ["mine"], "include_path": ["/no/such/tasks"]}}, "tasks.include_path /no/such/tasks is not a"),
    ({"tasks": {"names": ["python_next_line"], "limit": 0}}, "tasks.limit"),
    ({"speed": {**MICRO["speed"], "decode": ["fast"]}}, "decode loop 'fast' is unknown; choose from dynamic, static"),
])
def test_bad_recipes_fail_before_any_work(tmp_path, changes, needle):
    results = tmp_path / "results"
    started = time.perf_counter()
    result = run(write_recipe(tmp_path, results, **changes))
    assert result.exit_code == 2, result.output
    assert needle in result.stderr, result.stderr
    assert not results.exists() and time.perf_counter() - started < 60


def test_empty_heldout_set_fails_before_any_work(tmp_path):
    (tmp_path / "tiny.txt").write_text("x = 1\n")
    results = tmp_path / "results"
    data = {**MICRO["data"], "eval_source": str(tmp_path / "tiny.txt"), "eval_split": "train"}
    result = run(write_recipe(tmp_path, results, data=data))
    assert result.exit_code == 2 and "gives no block of 64 tokens" in result.stderr, result.stderr
    assert not results.exists()


@pytest.mark.slow
def test_t5_ablation_runs_the_papers_setup_in_miniature(t5_models, tmp_path):
    """The paper's model family: a given T5 original, decoder attention converted, span-corruption uptraining with
    Adafactor, each cell scored on span-corruption examples and measured with both KV caches."""
    recipe = write_recipe(
        tmp_path, tmp_path / "t5-results",
        original={"path": str(t5_models["mha"]), "original_steps": 100},
        methods=["mean", "random"], groups=[1, 4], fractions=[0, 0.05],
        data={"block_size": 48, "max_documents": 60, "eval_blocks": 8},
        uptrain={"batch_size": 8, "micro_batch_size": 8, "lr": 3e-3, "optimizer": "adafactor"},
        objective={"task": "span_corruption"},
    )
    result = run(recipe)
    assert result.exit_code == 0, result.output + str(result.exception)
    cells = {(c["method"], c["groups"], c["fraction"]): c
             for c in json.loads((tmp_path / "t5-results" / "results.json").read_text())["cells"]}
    assert cells[("mean", 4, 0)]["kl"] == pytest.approx(0.0, abs=1e-9)  # G = H keeps the function
    assert cells[("mean", 1, 0)]["kl"] > 1e-4 and cells[("mean", 1, 0.05)]["uptrain_steps"] == 5
    speed = {s["model"]: s for s in json.loads((tmp_path / "t5-results" / "results.json").read_text())["speed"]}
    assert speed["original"]["kv_bytes_per_token"] == 4 * speed["g1"]["kv_bytes_per_token"]


@pytest.mark.slow
def test_only_speed_measures_the_speed_cells_again_and_leaves_quality_alone(finished):
    _, recipe, results, _ = finished
    quality = {p.name: p.read_text() for p in (results / "cells").glob("*.json") if not p.name.startswith("speed-")}
    speed = {p.name: p.read_text() for p in (results / "cells").glob("speed-*.json")}
    result = CliRunner().invoke(main, ["ablation", recipe, "--only", "speed", "--json", "-q"])
    assert result.exit_code == 0, result.output
    again = {p.name: p.read_text() for p in (results / "cells").glob("speed-*.json")}
    assert set(again) == set(speed) and again != speed  # measured again: timings never repeat to the digit
    assert {p.name: p.read_text() for p in (results / "cells").glob("*.json")
            if not p.name.startswith("speed-")} == quality
    summary = json.loads(result.stdout)
    assert len(summary["cells"]) == 4 and {s["model"] for s in summary["speed"]} == {"original", "g1"}


@pytest.mark.slow
def test_the_best_cell_is_what_push_to_hub_uploads(finished, monkeypatch):
    from huggingface_hub import HfApi

    from gqa_toolkit.eval.ablation import Ablation
    from gqa_toolkit.eval.ablation_recipe import load_ablation_recipe

    _, recipe, results, _ = finished
    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: uploads.append(kw) or "https://hub/c")
    Ablation(load_ablation_recipe(recipe, ["push_to_hub=me/best"]), progress=False).push_best()
    cells = json.loads((results / "results.json").read_text())["cells"]
    best = min(cells, key=lambda c: c["heldout_loss"])
    (upload,) = uploads
    assert upload["repo_id"] == "me/best"
    assert upload["folder_path"].endswith(f"{best['method']}-g{best['groups']}/f{best['fraction']:g}") or \
        (best["fraction"] == 0 and upload["folder_path"].endswith("converted"))
    assert (Path(upload["folder_path"]) / "config.json").is_file()
