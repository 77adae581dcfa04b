"""`gqa-eval`: perplexity, fidelity, speed and downstream tasks of a model directory, and the ablation runner.

    gqa-eval perplexity MODEL_DIR
    gqa-eval fidelity CONVERTED_DIR [--source SOURCE_DIR]
    gqa-eval wer CONVERTED_DIR --data AUDIO_DIR [--against source|text]
    gqa-eval speed CONVERTED_DIR [--source SOURCE_DIR]
    gqa-eval tasks MODEL_DIR --tasks python_next_line [--include-path MY_TASKS]
    gqa-eval ablation recipes/tiny-ablation.yaml
"""

from __future__ import annotations

import json

import click

from gqa_toolkit.command import HELP, Group
from gqa_toolkit.command import emit as emit_line
from gqa_toolkit.command import user_errors as one_line_errors

from .options import IntAtLeast, PositiveInts

PROG = "gqa-eval"
user_errors = one_line_errors(PROG, "rerun the same command to continue")
# what perplexity and speed take (fidelity wants a converted checkpoint, whose record names its source)
ANY_MODEL = "a model directory (config.json and its weights: a gqa-convert or gqa-uptrain output, or any checkpoint)"


def emit(text: str) -> None:
    emit_line(PROG, text)


def data_options(fn):
    for option in reversed([
        click.option("--data", "corpus", default="python-stdlib", show_default=True,
                     help="python-stdlib, a local file or folder, or a hub dataset"),
        click.option("--split", default="heldout", show_default=True),
        click.option("--text-column", default="text", show_default=True),
        click.option("--target-column", default=None,
                     help="encoder-decoders: score (text, target) pairs [default: span corruption of the text]"),
        click.option("--audio-column", default="audio", show_default=True,
                     help="speech: the column (or transcripts-file column) naming each clip's audio"),
        click.option("--language", default=None,
                     help="speech: the transcripts' language, for a multilingual whisper's language token (e.g. en)"),
        click.option("--block-size", type=IntAtLeast(2), default=256, show_default=True),
        click.option("--max-blocks", type=IntAtLeast(1), default=64, show_default=True),
        click.option("--batch-size", type=IntAtLeast(1), default=8, show_default=True),
    ]):
        fn = option(fn)
    return fn


def _eval_data(corpus, split, text_column, target_column, audio_column, language, block_size, max_blocks):
    from gqa_toolkit.uptrain.recipe import DataSection

    return DataSection(source=corpus, split=split, text_column=text_column, target_column=target_column,
                       audio_column=audio_column, language=language, block_size=block_size, eval_blocks=max_blocks)


def _model_dir(model_dir: str, role: str = "MODEL_DIR"):
    """MODEL_DIR (a folder or hub id) as the kernel's checked ModelDir."""
    from gqa_toolkit.model_dir import ModelDir

    from .errors import EvalError

    return ModelDir.open(model_dir, role, ANY_MODEL, EvalError)


def _checked_examples(model, data, with_task: bool = False):
    """The held-out examples of `model` (a ModelDir; and the task that made them), after every check that needs
    no weights (the kernel's one preflight)."""
    from gqa_toolkit.uptrain.corpora import CorpusSettings

    from .heldout import eval_task, heldout_set

    model.preflight(data.block_size, "--block-size")  # an audio encoder takes its window, whatever the block size
    config, tokenizer = model.config, model.tokenizer
    options = CorpusSettings(source="--data", split="--split", config="the dataset's config",  # named in messages
                             text_column="--text-column", target_column="--target-column", block_size="--block-size",
                             noise_density=None)
    task = eval_task(config, tokenizer, data, settings=options)
    examples = heldout_set(tokenizer, data, task, options)
    return (examples, task, tokenizer) if with_task else examples


def _load(model):
    from .placement import load_for_eval

    return load_for_eval(model)


@click.group(cls=Group, context_settings=HELP)
@click.option("--trust-remote-code", is_flag=True,
              help="Run the Python files of model folders. Never needed for the toolkit's own families.")
def main(trust_remote_code):
    """Measure what a GQA conversion cost."""
    from gqa_toolkit.families.loading import allow_remote_code

    allow_remote_code(trust_remote_code)


@main.command("perplexity")
@click.argument("model_dir")
@data_options
@user_errors
def perplexity_cmd(model_dir, corpus, split, text_column, target_column, audio_column, language, block_size,
                   max_blocks, batch_size):
    """Held-out loss and perplexity of MODEL_DIR (for whisper: of the transcripts of --data's audio)."""
    from .causality import check_causal
    from .perplexity import perplexity

    data = _eval_data(corpus, split, text_column, target_column, audio_column, language, block_size, max_blocks)
    path = _model_dir(model_dir)
    examples = _checked_examples(path, data)
    model = _load(path)
    check_causal(model, "MODEL_DIR")
    emit(json.dumps(perplexity(model, examples, batch_size, progress=True)))


@main.command("fidelity")
@click.argument("model_dir")
@click.option("--source", "source_dir", default=None, help="MHA checkpoint [default: the one recorded by gqa-convert]")
@data_options
@user_errors
def fidelity_cmd(model_dir, source_dir, corpus, split, text_column, target_column, audio_column, language,
                 block_size, max_blocks, batch_size):
    """KL(source || MODEL_DIR) per token and top-1 agreement on held-out text."""
    from .fidelity import fidelity
    from .sources import check_comparable, unrecorded_source
    from .sources import source_dir as checked_source

    converted = _model_dir(model_dir)
    config = converted.config  # a readable config.json, before its record is read
    source = checked_source(converted, source_dir)
    check_comparable(config, source)
    if source_dir and (warning := unrecorded_source(converted, source)):
        click.echo(f"{PROG}: warning: {warning}", err=True)
    data = _eval_data(corpus, split, text_column, target_column, audio_column, language, block_size, max_blocks)
    examples = _checked_examples(converted, data)
    emit(json.dumps(fidelity(_load(converted), _load(source), examples, batch_size, progress=True)))


@main.command("wer")
@click.argument("model_dir")
@click.option("--source", "source_dir", default=None,
              help="MHA checkpoint whose transcripts are the reference [default: the one recorded by gqa-convert]")
@click.option("--against", type=click.Choice(["source", "text"]), default=None,
              help="compare with the source's greedy transcripts or with the reference transcripts in --data "
                   "[default: source when MODEL_DIR records one or --source is given, else text]")
@data_options
@user_errors
def wer_cmd(model_dir, source_dir, against, corpus, split, text_column, target_column, audio_column, language,
            block_size, max_blocks, batch_size):
    """Word error rate of MODEL_DIR's greedy transcripts of --data's audio (speech models such as whisper)."""
    from .errors import EvalError
    from .sources import check_comparable
    from .sources import source_dir as checked_source
    from .wer import greedy_transcripts, reference_transcripts, word_error_rate

    path = _model_dir(model_dir)
    config = path.config
    if not path.takes_audio:
        raise EvalError(f"wer transcribes audio, and this {config.model_type} model takes text; score it with "
                        "gqa-eval perplexity or fidelity")
    source = checked_source(path, source_dir, required=against == "source") if against != "text" else None
    if source is not None:
        check_comparable(config, source)
    data = _eval_data(corpus, split, text_column, target_column, audio_column, language, block_size, max_blocks)
    examples, task, tokenizer = _checked_examples(path, data, with_task=True)
    hypotheses = greedy_transcripts(_load(path), examples, task, tokenizer, batch_size, progress=True)
    if source is None:
        references = reference_transcripts(examples, task, tokenizer)
    else:
        references = greedy_transcripts(_load(source), examples, task, tokenizer, batch_size, progress=True)
    emit(json.dumps({"wer": word_error_rate(references, hypotheses), "against": "text" if source is None else
                     "source", "clips": len(hypotheses)}))


@main.command("speed")
@click.argument("model_dir")
@click.option("--source", "source_dir", default=None, help="compare with this checkpoint [default: the recorded "
                                                           "source, when there is one]")
@click.option("--contexts", type=PositiveInts("128,512"), default=None,
              help="Context lengths (encoder positions for an encoder-decoder)  [default: 128,512, those within "
                   "the model's context; an audio encoder's whole window]")
@click.option("--batch-sizes", type=PositiveInts("1,8"), default="1,8", show_default=True)
@click.option("--decode-steps", type=IntAtLeast(1), default=16, show_default=True)
@click.option("--repeats", type=IntAtLeast(1), default=3, show_default=True,
              help="Timed rounds per point, after a warm-up; the fastest counts.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as a JSON list.")
@click.option("--compile", "compile_step", is_flag=True,
              help="Also decode with the static cache and a step compiled by torch.compile (needs a C++ compiler "
                   "on CPU; the first round, not timed, compiles).")
@user_errors
def speed_cmd(model_dir, source_dir, contexts, batch_sizes, decode_steps, repeats, as_json, compile_step):
    """KV-cache bytes per token, prefill and decode tokens/s, side by side with the source (and their ratios), in
    the eager loop with a growing cache (dynamic) and with a preallocated static cache (static, and with
    --compile static+compile); each row names its device and attention kernel."""
    from dataclasses import asdict

    from .speed import kv_cache_bytes_per_token, measure_speed

    rows = []
    models, contexts = _speed_models(model_dir, source_dir, contexts, decode_steps)
    loops = ("dynamic", "static", *(("static+compile",) if compile_step else ()))
    for name, path in models.items():
        model = _load(path)
        kv = kv_cache_bytes_per_token(model)
        for c in contexts:
            for b in batch_sizes:
                for loop in loops:
                    point = asdict(measure_speed(model, c, b, decode_steps, repeats, loop))
                    rows.append({"model": name, "kv_bytes_per_token": kv, **point})
    source = {(r["context"], r["batch_size"], r["decode"]): r for r in rows if r["model"] == "source"}
    for r in rows:  # decode speed-up over the source at the same point and loop (1.0 for the source itself)
        base = source.get((r["context"], r["batch_size"], r["decode"]))
        r["decode_vs_source"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"] if base else None
    if as_json:
        emit(json.dumps(rows, indent=2))
        return
    header = (f"{'model':>10} {'KV B/token':>11} {'context':>8} {'batch':>6} {'decode loop':>15} "
              f"{'prefill tok/s':>14} {'decode tok/s':>13} {'vs source':>10}")
    emit("\n".join([header, *(f"{r['model']:>10} {r['kv_bytes_per_token']:>11.0f} {r['context']:>8} "
                                f"{r['batch_size']:>6} {r['decode']:>15} {r['prefill_tokens_per_s']:>14.0f} "
                                f"{r['decode_tokens_per_s']:>13.0f} {_ratio(r['decode_vs_source']):>10}"
                                for r in rows),
                     f"measured on {rows[0]['device']}, attention kernel {rows[0]['attention']}"]))


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _speed_models(model_dir: str, source_dir: str | None, contexts, decode_steps: int) -> tuple[dict, tuple]:
    """{'converted' (or 'model', when MODEL_DIR records no conversion): dir, 'source': dir (given or recorded, if
    any)} and the contexts (None: the default), each model checked to hold the longest context plus the decode
    steps, before any weights load."""
    from .sources import source_dir as checked_source
    from .speed import speed_contexts

    converted = _model_dir(model_dir)
    converted.config  # a readable config.json, before its record is read
    models = {"converted" if converted.conversion is not None else "model": converted}
    source = checked_source(converted, source_dir, required=False)
    if source is not None:
        models["source"] = source
    contexts = speed_contexts([model.config for model in models.values()], contexts, decode_steps)
    return models, contexts


@main.command("tasks")
@click.argument("model_dir")
@click.option("--tasks", "task_names", required=True,
              help="comma-separated lm-eval task names: lm-eval's own, the shipped python_next_line (no download), "
                   "or ones in --include-path")
@click.option("--include-path", "include_paths", multiple=True,
              help="a folder of your own lm-eval task YAML files (repeatable)")
@click.option("--limit", type=IntAtLeast(1), default=None, help="examples per task [default: all]")
@click.option("--batch-size", type=IntAtLeast(1), default=8, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print {task: {metric: value}} as JSON.")
@user_errors
def tasks_cmd(model_dir, task_names, include_paths, limit, batch_size, as_json):
    """Downstream tasks of MODEL_DIR (a folder or hub id) through lm-eval-harness (pip install
    'gqa-toolkit[tasks]')."""
    from gqa_toolkit.model_dir import is_hub_id

    from .downstream import require_lm_eval, run_tasks, task_manager

    require_lm_eval()  # before the model: a missing extra is the one thing to fix
    # a local folder is checked at once; a hub id is fetched only once every task name is known to exist
    path = None if is_hub_id(model_dir) else _model_dir(model_dir)
    manager = task_manager(names := [n.strip() for n in task_names.split(",") if n.strip()], list(include_paths))
    path = path or _model_dir(model_dir)
    path.preflight(text_only=True)
    scores = run_tasks(_load(path), path.tokenizer, names, manager, limit, batch_size)
    if as_json:
        emit(json.dumps(scores, indent=2))
        return
    width = max(map(len, scores), default=4)
    emit("\n".join([f"{'task':<{width}} {'metric':<12} {'value':>8}",
                     *(f"{task:<{width}} {metric:<12} {value:>8.4f}" for task, metrics in scores.items()
                       for metric, value in metrics.items())]))


@main.command("ablation")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--only", type=click.Choice(["speed"]), default=None,
              help="speed: measure the speed cells again (of the models an earlier run made) and redraw.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json (original, cells, speed) instead of the "
                                                      "table.")
@user_errors
def ablation_cmd(recipe, overrides, quiet, only, as_json):
    """Run the conversion ablation in RECIPE (methods x groups x fractions) and print its table.

    OVERRIDES are dotted key=value pairs, e.g. results_dir=runs/x fractions=[0,0.1]."""
    from .ablation import Ablation
    from .ablation_recipe import load_ablation_recipe

    ablation = Ablation(load_ablation_recipe(recipe, list(overrides)), progress=not quiet)
    table = ablation.rerun_speed() if only == "speed" else ablation.run()
    emit((table.parent / "results.json").read_text() if as_json else table.read_text())
    click.echo(f"results, csv and plots in {table.parent}", err=True)


if __name__ == "__main__":
    main()
