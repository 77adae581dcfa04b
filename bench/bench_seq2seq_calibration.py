"""Calibration modes on a trained tiny T5: `fit` and `aligned` calibrated from the source's activations or
sequentially (each block on what the converted blocks before it compute), against mean-pooling, before any
uptraining.

    .venv/bin/python bench/bench_seq2seq_calibration.py [--work runs/bench-seq2seq-calibration] [--steps 1200]

Builds a T5 (t5-v1.1's choices: hidden 128, 8 heads of 16, 4 encoder and 4 decoder layers) with the tiny
tokenizer, pretrains it with span corruption through gqa-uptrain (recipes/tiny-t5-uptrain.yaml, fraction 1 of
--steps), converts its decoder's self- and cross-attention (the default scope) and every attention (--attention
all) to G = H/4 and MQA, and prints KL(source || converted) per target token and top-1 agreement on 32 held-out span-corruption
examples. The pretrained model is kept in --work, so a rerun only converts and measures.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
import transformers

from gqa_toolkit.convert import convert_checkpoint
from gqa_toolkit.eval.fidelity import fidelity
from gqa_toolkit.eval.heldout import HELDOUT, eval_task, heldout_set
from gqa_toolkit.eval.perplexity import perplexity
from gqa_toolkit.uptrain import load_recipe, train
from gqa_toolkit.eval.placement import load_for_eval
from gqa_toolkit.errors import ToolkitError
from gqa_toolkit.model_dir import ModelDir
from gqa_toolkit.uptrain.tiny import build_tiny_mha

SHAPE = dict(d_model=128, d_ff=344, d_kv=16, num_heads=8, num_layers=4, num_decoder_layers=4)
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-t5-uptrain.yaml"
# (method, calibration mode); None: the method reads the weights only
CELLS = [("mean", None), ("aligned", "source"), ("aligned", "sequential"), ("fit", "source"), ("fit", "sequential")]


def pretrained(work: Path, steps: int) -> Path:
    out = work / "original"
    if (out / "config.json").is_file():
        return out
    build_tiny_mha(work / "init", family="t5", **SHAPE)
    recipe = load_recipe(RECIPE, [f"model.path={work / 'init'}", f"output.dir={out}", "train.fraction=1.0",
                                  f"train.original_steps={steps}", f"output.save_every={steps}",
                                  f"output.eval_every={steps}"])
    t0 = time.perf_counter()
    train(recipe)
    print(f"pretrained {steps} steps in {time.perf_counter() - t0:.0f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("runs/bench-seq2seq-calibration"))
    parser.add_argument("--steps", type=int, default=1200)
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    src = pretrained(args.work, args.steps)
    original = ModelDir(Path(src), "source", ToolkitError)
    tokenizer, config = original.tokenizer, original.config
    data = HELDOUT.model_copy(update=dict(block_size=128, eval_blocks=32, cache_dir=str(args.work / "data")))
    examples = heldout_set(tokenizer, data, eval_task(config, tokenizer, data))
    source = load_for_eval(original)
    heads = config.num_heads
    print(f"held-out loss of the source: {perplexity(source, examples)['loss']:.4f}")
    print("| --attention | G | method | calibration | KL | top-1 | convert s |\n|---|---|---|---|---|---|---|")
    for scope, groups in itertools.product(("decoder", "all"), (heads // 4, 1)):
        for method, mode in CELLS:
            out = args.work / f"{method}-{mode}-g{groups}-{scope}"
            t0 = time.perf_counter()
            convert_checkpoint(src, out, method=method, groups=groups, attention=scope, force=True,
                               progress=False, **({} if mode is None else {"calibration": "python-stdlib",
                                                                            "calibration_mode": mode}))
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                result = fidelity(load_for_eval(out), source, examples)
            print(f"| {scope} | {groups} | {method} | {mode or 'none'} | {result['kl']:.4f} | {result['top1_agreement']:.3f} "
                  f"| {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
