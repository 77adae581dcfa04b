"""Every command's --help answers without importing torch or transformers (the work imports them when it starts)."""

import subprocess
import sys

import pytest

COMMANDS = {"gqa-convert": "gqa_toolkit.convert.cli", "gqa-uptrain": "gqa_toolkit.uptrain.cli",
            "gqa-eval": "gqa_toolkit.eval.cli"}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_imports_neither_torch_nor_transformers(command):
    script = (f"import sys; from {COMMANDS[command]} import main\n"
              f"main(['--help'], prog_name={command!r}, standalone_mode=False)\n"
              "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'accelerate'})\n"
              "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"Usage: {command}" in done.stdout
