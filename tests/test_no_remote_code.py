"""No command runs Python from a model folder unless the user passes --trust-remote-code.

A converted T5 directory is booby-trapped: its modeling files write a marker file when imported. Every command
that loads it (convert again, calibration, uptrain, perplexity, fidelity, speed) leaves no marker, and the
uptrained output carries the toolkit's modeling files, not the folder's; with `--trust-remote-code` the marker
appears, so the trap is real.
"""

import os
import shutil
import subprocess
import sys

from click.testing import CliRunner

from gqa_toolkit.convert import convert_checkpoint
from gqa_toolkit.eval.cli import main as eval_main
from gqa_toolkit.uptrain.loop import train
from gqa_toolkit.uptrain.recipe import load_recipe

TRAPPED_FILES = ("gqa_t5.py", "gqa_attention.py")


def _trapped_copy(converted, tmp_path):
    trapped, marker = tmp_path / "trapped", tmp_path / "marker"
    shutil.copytree(converted, trapped)
    for name in TRAPPED_FILES:
        path = trapped / name
        path.write_text(path.read_text() + f"\nopen({str(marker)!r}, 'a').write({name!r})\n")
    return trapped, marker


def test_no_command_runs_a_folders_code(t5_models, write_t5_recipe, tmp_path):
    trapped, marker = _trapped_copy(t5_models["mqa"], tmp_path)
    data = ["--block-size", "32", "--max-blocks", "2"]
    for args in (["perplexity", str(trapped), *data], ["fidelity", str(trapped), *data],
                 ["speed", str(trapped), "--contexts", "16", "--batch-sizes", "1", "--decode-steps", "2"]):
        result = CliRunner().invoke(eval_main, args)
        assert result.exit_code == 0, result.output
    convert_checkpoint(trapped, tmp_path / "again", groups=1, progress=False)
    out = train(load_recipe(write_t5_recipe(model={"path": str(trapped)}, train={"max_steps": 1}), []))
    assert not marker.exists(), f"a command ran the folder's code: {marker.read_text()}"
    for name in TRAPPED_FILES:  # outputs carry the toolkit's files, not the trapped ones
        assert "marker" not in (out / name).read_text()
        assert "marker" not in (tmp_path / "again" / name).read_text()


def test_trust_remote_code_runs_it_and_says_so(t5_models, tmp_path):
    trapped, marker = _trapped_copy(t5_models["mqa"], tmp_path)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "gqa_toolkit.eval", "--trust-remote-code", "perplexity",
                           str(trapped), "--block-size", "32", "--max-blocks", "2"], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trust_remote_code is on" in done.stderr
    assert set(marker.read_text().split(".py")) >= {"gqa_t5", "gqa_attention"}
