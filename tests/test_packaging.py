"""The repository builds a wheel whose gqa_toolkit namespace imports and converts without the source tree."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_imports_and_runs_outside_the_repo(llama_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src)
    for folder in ("gqa_toolkit", "convert", "uptrain", "eval", "recipes"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                    str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("gqa_toolkit-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
        names = zf.namelist()
    assert not any(n.startswith(("convert/", "eval/", "uptrain/")) for n in names), "a generic top-level package"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "gqa-convert = gqa_toolkit.convert.cli:main" in (site / entry_points).read_text()

    script = ("import sys, gqa_toolkit.convert as c; from gqa_toolkit.convert.cli import main; "
              f"assert c.__file__.startswith({str(site)!r}), c.__file__; "
              "sys.argv = ['gqa-convert', sys.argv[1], '--groups', '2', '-o', sys.argv[2], '-q']; main()")
    done = subprocess.run([sys.executable, "-c", script, str(llama_dir), str(tmp_path / "out")], cwd=tmp_path,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()

    # specs that extend others read their parents from the installed package
    specs = ("from gqa_toolkit.families.spec import spec_for; "
             "print(spec_for('mbart').blocks[0].q, spec_for('whisper').modeling.auto_class)")
    done = subprocess.run([sys.executable, "-c", specs], cwd=tmp_path, env={"PYTHONPATH": str(site)},
                          capture_output=True, text=True)
    assert done.stdout.split() == ["('decoder.layers.{layer}.self_attn.q_proj',)", "AutoModelForSpeechSeq2Seq"], \
        done.stderr

    # the shipped recipes: listed, and the tiny one validated by name, from the installed package alone
    run = ("import sys; from gqa_toolkit.uptrain.cli import main; sys.argv = ['gqa-uptrain', *sys.argv[1:]]; "
           "main()")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    listed = subprocess.run([sys.executable, "-c", run, "--list"], cwd=tmp_path, env=env, capture_output=True,
                            text=True)
    assert listed.returncode == 0, listed.stderr
    assert {line.split()[0] for line in listed.stdout.splitlines()} == {p.name for p in (REPO / "recipes").glob("*.yaml")}
    resolved = subprocess.run([sys.executable, "-c", run, "tiny-uptrain.yaml", "--print-recipe"], cwd=tmp_path,
                              env=env, capture_output=True, text=True)
    assert resolved.returncode == 0, resolved.stderr
    assert f"dir: {tmp_path / 'runs'}" in resolved.stdout  # the recipe's relative paths, from where it runs
    assert any(n.startswith("gqa_toolkit/recipes/accelerate/") for n in names)
    # the shipped lm-eval task: its YAML and the module that builds its documents
    assert {"gqa_toolkit/eval/lm_tasks/python_next_line.yaml", "gqa_toolkit/eval/lm_tasks/python_next_line.py"} <= \
        set(names)
