"""`gqa-eval`: perplexity, fidelity, speed and downstream tasks of a model directory, and the ablation runner.

    gqa-eval perplexity MODEL_DIR
    gqa-eval fidelity CONVERTED_DIR [--source SOURCE_DIR]
    gqa-eval wer CONVERTED_DIR --data AUDIO_DIR [--against source|text]
    gqa-eval speed CONVERTED_DIR [--source SOURCE_DIR]
    gqa-eval ablation recipes/tiny-ablation.yaml
"""

from __future__ import annotations

import json

import click

from gqa_toolkit.convert.command import HELP, Group
from gqa_toolkit.convert.command import emit as emit_line
from gqa_toolkit.convert.command import user_errors as one_line_errors

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


def _checked_examples(model_dir: str, role: str, data, with_task: bool = False):
    """The model dir and its held-out examples (and the task that made them), after every check that needs no
    weights."""
    from gqa_toolkit.convert.families.geometry import check_context
    from gqa_toolkit.convert.families.spec import audio_input
    from gqa_toolkit.uptrain.corpora import CorpusSettings
    from gqa_toolkit.uptrain.model import check_model_dir, load_config, load_tokenizer

    from .errors import EvalError
    from .heldout import eval_task, heldout_set

    path = check_model_dir(model_dir, role=role, wanted=ANY_MODEL)
    config = load_config(path, role=role)
    if audio_input(config.model_type) is None:  # an audio encoder takes its window, whatever the block size
        check_context(config, data.block_size, "--block-size", EvalError)
    tokenizer = load_tokenizer(path)
    options = CorpusSettings(source="--data", split="--split", config="the dataset's config",  # named in messages
                             text_column="--text-column", target_column="--target-column", block_size="--block-size",
                             noise_density=None)
    task = eval_task(config, tokenizer, data, settings=options)
    examples = heldout_set(tokenizer, data, task, options)
    return (path, examples, task, tokenizer) if with_task else (path, examples)


def _load(model_dir, role: str = "MODEL_DIR"):
    from gqa_toolkit.uptrain.model import check_model_dir

    from .placement import load_for_eval

    return load_for_eval(check_model_dir(model_dir, role=role, wanted=ANY_MODEL))


@click.group(cls=Group, context_settings=HELP)
@click.option("--trust-remote-code", is_flag=True,
              help="Run the Python files of model folders. Never needed for the toolkit's own families.")
def main(trust_remote_code):
    """Measure what a GQA conversion cost."""
    from gqa_toolkit.convert.families.loading import allow_remote_code

    allow_remote_code(trust_remote_code)


@main.command("perplexity")
@click.argument("model_dir")
@data_options
@user_errors
def perplexity_cmd(model_dir, corpus, split, text_column, target_column, audio_column, language, block_size,
                   max_blocks, batch_size):
    """Held-out loss and perplexity of MODEL_DIR (for whisper: of the transcripts of --data's audio)."""
    from .perplexity import perplexity

    data = _eval_data(corpus, split, text_column, target_column, audio_column, language, block_size, max_blocks)
    path, examples = _checked_examples(model_dir, "MODEL_DIR", data)
    emit(json.dumps(perplexity(_load(path), examples, batch_size, progress=True)))


@main.command("fidelity")
@click.argument("model_dir")
@click.option("--source", "source_dir", default=None, help="MHA checkpoint [default: the one recorded by gqa-convert]")
@data_options
@user_errors
def fidelity_cmd(model_dir, source_dir, corpus, split, text_column, target_column, audio_column, language,
                 block_size, max_blocks, batch_size):
    """KL(source || MODEL_DIR) per token and top-1 agreement on held-out text."""
    from gqa_toolkit.uptrain.model import check_model_dir, load_config

    from .fidelity import fidelity
    from .sources import check_comparable
    from .sources import source_dir as checked_source

    converted = check_model_dir(model_dir, role="MODEL_DIR")
    config = load_config(converted, role="MODEL_DIR")  # a readable config.json, before its record is read
    source = checked_source(converted, source_dir)
    check_comparable(config, load_config(source, role="--source"), source)
    data = _eval_data(corpus, split, text_column, target_column, audio_column, language, block_size, max_blocks)
    path, examples = _checked_examples(model_dir, "MODEL_DIR", data)
    emit(json.dumps(fidelity(_load(path), _load(source), examples, batch_size, progress=True)))


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
    from gqa_toolkit.convert.families.spec import audio_input
    from gqa_toolkit.uptrain.model import check_model_dir, load_config

    from .errors import EvalError
    from .sources import check_comparable
    from .sources import source_dir as checked_source
    from .wer import greedy_transcripts, reference_transcripts, word_error_rate

    path = check_model_dir(model_dir, role="MODEL_DIR", wanted=ANY_MODEL)
    config = load_config(path, role="MODEL_DIR")
    if audio_input(config.model_type) is None:
        raise EvalError(f"wer transcribes audio, and this {config.model_type} model takes text; score it with "
                        "gqa-eval perplexity or fidelity")
    source = checked_source(path, source_dir, required=against == "source") if against != "text" else None
    if source is not None:
        check_comparable(config, load_config(source, role="--source"), source)
    data = _eval_data(corpus, split, text_column, target_column, audio_column, language, block_size, max_blocks)
    path, examples, task, tokenizer = _checked_examples(model_dir, "MODEL_DIR", data, with_task=True)
    hypotheses = greedy_transcripts(_load(path), examples, task, tokenizer, batch_size, progress=True)
    if source is None:
        references = reference_transcripts(examples, task, tokenizer)
    else:
        references = greedy_transcripts(_load(source, "--source"), examples, task, tokenizer, batch_size,
                                        progress=True)
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
@user_errors
def speed_cmd(model_dir, source_dir, contexts, batch_sizes, decode_steps, repeats, as_json):
    """KV-cache bytes per token, prefill and decode tokens/s, side by side with the source (and their ratios)."""
    from dataclasses import asdict

    from .speed import kv_cache_bytes_per_token, measure_speed

    rows = []
    models, contexts = _speed_models(model_dir, source_dir, contexts, decode_steps)
    for name, path in models.items():
        model = _load(path, name)
        kv = kv_cache_bytes_per_token(model)
        for c in contexts:
            for b in batch_sizes:
                point = asdict(measure_speed(model, c, b, decode_steps, repeats))
                rows.append({"model": name, "kv_bytes_per_token": kv, **point})
    source = {(r["context"], r["batch_size"]): r for r in rows if r["model"] == "source"}
    for r in rows:  # decode speed-up over the source at the same point (1.0 for the source itself)
        base = source.get((r["context"], r["batch_size"]))
        r["decode_vs_source"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"] if base else None
    if as_json:
        emit(json.dumps(rows, indent=2))
        return
    header = (f"{'model':>10} {'KV B/token':>11} {'context':>8} {'batch':>6} {'prefill tok/s':>14} "
              f"{'decode tok/s':>13} {'vs source':>10}")
    emit("\n".join([header, *(f"{r['model']:>10} {r['kv_bytes_per_token']:>11.0f} {r['context']:>8} "
                                f"{r['batch_size']:>6} {r['prefill_tokens_per_s']:>14.0f} "
                                f"{r['decode_tokens_per_s']:>13.0f} {_ratio(r['decode_vs_source']):>10}"
                                for r in rows)]))


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _speed_models(model_dir: str, source_dir: str | None, contexts, decode_steps: int) -> tuple[dict, tuple]:
    """{'converted' (or 'model', when MODEL_DIR records no conversion): dir, 'source': dir (given or recorded, if
    any)} and the contexts (None: the default), each model checked to hold the longest context plus the decode
    steps, before any weights load."""
    from gqa_toolkit.uptrain.model import CONVERSION_KEY, check_model_dir, load_config

    from .sources import source_dir as checked_source
    from .speed import speed_contexts

    converted = check_model_dir(model_dir, role="MODEL_DIR", wanted=ANY_MODEL)
    config = load_config(converted, role="MODEL_DIR")  # a readable config.json, before its record is read
    models = {"converted" if hasattr(config, CONVERSION_KEY) else "model": (converted, config)}
    source = checked_source(converted, source_dir, required=False)
    if source is not None:
        models["source"] = (source, load_config(source, role="--source"))
    contexts = speed_contexts([config for _, config in models.values()], contexts, decode_steps)
    return {name: path for name, (path, _) in models.items()}, contexts


@main.command("tasks")
@click.argument("model_dir")
@click.option("--tasks", "task_names", required=True, help="comma-separated lm-eval-harness task names")
@click.option("--batch-size", type=IntAtLeast(1), default=8, show_default=True)
@click.option("--limit", type=IntAtLeast(1), default=None, help="examples per task")
@user_errors
def tasks_cmd(model_dir, task_names, batch_size, limit):
    """Downstream tasks through lm-eval-harness (pip install 'gqa-toolkit[tasks]')."""
    from .downstream import run_tasks

    emit(json.dumps(run_tasks(model_dir, task_names.split(","), batch_size, limit), indent=2))


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
