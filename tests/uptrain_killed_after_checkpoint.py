"""gqa-uptrain that SIGKILLs each of its processes right after the checkpoint of step STEP is written, as a lost
machine would; rerunning the recipe resumes from that checkpoint (tests/test_uptrain_fsdp.py).

    accelerate launch ... tests/uptrain_killed_after_checkpoint.py RECIPE STEP
"""

from __future__ import annotations

import os
import signal
import sys

from gqa_toolkit.uptrain import load_recipe, loop


def main(recipe: str, step: int) -> None:
    save = loop.save_checkpoint

    def save_then_die(accelerator, out, state, keep_last):
        saved = save(accelerator, out, state, keep_last)
        if state["step"] == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return saved

    loop.save_checkpoint = save_then_die
    loop.train(load_recipe(recipe))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
