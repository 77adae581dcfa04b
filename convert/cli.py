"""`gqa-convert`: the command line over `convert_checkpoint`.

    gqa-convert --method mean --groups 8 path/to/model
"""

from __future__ import annotations

import json

import click

from gqa_toolkit.command import HELP, Command, print_warnings, user_errors
from .errors import ConversionError
from gqa_toolkit.corpus import NAME as BUILTIN
from .methods.registry import GROUPINGS, REFINE_PRECISIONS, all_method_names


@click.command(cls=Command, context_settings={**HELP, "show_default": True})
@click.argument("model_dir")
@click.option("--groups", "-g", type=int, default=None, help="KV heads (G) in the output; must divide the source's. "
                                                            "[required]")
@click.option("--kind-groups", default=None, metavar="KIND=G,...",
              help="Give attention kinds their own G, the others taking --groups: e.g. cross=1 for an "
                   "encoder-decoder's cross-attention (kinds: decoder, cross, encoder).")
@click.option("--method", "-m", default="mean", help=f"K/V initialiser: {', '.join(all_method_names())}. "
                                                      "aligned and fit also change Q and O (see docs/methods.md).")
@click.option("--grouping", default="contiguous", type=click.Choice(GROUPINGS),
              help="Which KV heads share a group: contiguous (repeat_kv order) or similarity (most alike heads; "
                   "query rows and output columns are permuted to match).")
@click.option("--preserve-norm", is_flag=True, help="Scale each pooled head to its group's mean head norm "
                                                    "(mean, first, random, aligned).")
@click.option("--calibration", default=None, help=f"Text whose activations weigh the errors: {BUILTIN}, a text "
                                                  "file or folder, or none; for whisper, a folder of wav/flac clips "
                                                  "(with a transcripts csv/jsonl, or transcribed by the source). "
                                                  f"[default: {BUILTIN} for fit, none otherwise]")
@click.option("--calibration-samples", type=int, default=256, help="Calibration sequences (audio: clips).")
@click.option("--calibration-length", type=int, default=128, help="Tokens per calibration sequence.")
@click.option("--calibration-mode", default="source", type=click.Choice(["source", "sequential"]),
              help="Calibrate each layer on the source's activations, or on the outputs of the already converted "
                   "layers before it (sequential).")
@click.option("--calibration-language", default=None,
              help="Audio calibration of a multilingual whisper: the clips' language (e.g. en), whose token opens "
                   "the decoder's prompt. [default: detected per clip by the source]")
@click.option("--refine-steps", type=int, default=0,
              help="After the method, train each converted attention unit's K/V and Q/O for this many steps so that "
                   "its output matches the source's on the calibration activations (0: off).")
@click.option("--refine-lr", type=float, default=0.01, help="Refinement's Adam step, relative to each tensor's RMS.")
@click.option("--refine-batch", type=int, default=8,
              help="Text calibration sequences per refinement step (the last batch is held out).")
@click.option("--refine-precision", default="auto", type=click.Choice(REFINE_PRECISIONS),
              help="Refinement's training steps under bf16 autocast (the attention core and the error that picks "
                   "the result stay float32) or in fp32; auto: bf16 where the device multiplies bf16 in hardware.")
@click.option("--device", default="auto", help="Where calibration runs the source, one block at a time: auto (the GPU "
                                               "when there is one), cpu, cuda or cuda:N.")
@click.option("--output", "-o", default=None,
              help="Output directory. [default: MODEL_DIR-gqa{G}-{method}, plus -similarity, -norm and "
                   "-attention-{kinds} when set]")
@click.option("--attention", default=None, help="Which attention to convert, for families with several kinds "
                                                "(t5, bart, mbart, marian, whisper): 'decoder' (self- and "
                                                "cross-attention, the paper's choice) or 'all' (the encoder's too). "
                                                "[default: the family's first]")
@click.option("--seed", type=int, default=0, help="Seed for the random method.")
@click.option("--dtype", default=None, help="Output dtype of floating tensors (float32, float16, bfloat16). "
                                            "[default: keep the source's]")
@click.option("--max-shard-size", default=None, help="Largest output shard in bytes or with a unit, e.g. 5GB. "
                                                     "[default: the source's largest weight file]")
@click.option("--no-native", is_flag=True, help="Keep the toolkit's modeling code even where a stock family holds "
                                                "the output exactly (gpt2 at G=1 is written as gpt_bigcode).")
@click.option("--revision", default=None, help="For a hub id: the branch, tag or commit to convert. [default: main]")
@click.option("--force", is_flag=True, help="Replace the output directory if it is an earlier output of "
                                            "gqa-convert (any other non-empty folder is refused).")
@click.option("--push-to-hub", "push_to", metavar="REPO", default=None,
              help="After converting, upload the output to the hub repository REPO (created if new).")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repository private.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the output dir, KV heads and KV-cache bytes per token "
                                                      "before and after, and the bytes written, as one JSON object.")
@click.option("--dry-run", is_flag=True, help="Write nothing: print the tensors and bytes to copy and compute, the "
                                              "calibration and its peak memory, and refuse if they will not fit.")
@click.option("--refresh-modeling", is_flag=True, help="Convert nothing: rewrite the modeling files of MODEL_DIR, an "
                                                       "earlier output of a family the toolkit models itself "
                                                       "(t5, bart, whisper, gpt2, ...), with this version's.")
@user_errors("gqa-convert", "nothing was written",
             out_of_memory="nothing was written; lower --calibration-samples or --calibration-length, or use "
                           "--device cuda (gqa-convert --dry-run estimates the peak)")
def main(model_dir, groups, kind_groups, method, grouping, preserve_norm, calibration, calibration_samples, calibration_length,
         calibration_mode, calibration_language, refine_steps, refine_lr, refine_batch, refine_precision, device, output, attention, seed, dtype, max_shard_size, no_native, revision, force, push_to,
         private,
         quiet, as_json, dry_run, refresh_modeling):
    """Convert the Hugging Face checkpoint MODEL_DIR (a local directory, or a hub id when online) to
    grouped-query attention with G key/value heads."""
    from .api import convert, describe_conversion
    from .api import refresh_modeling as refresh
    from .options import ConversionOptions

    print_warnings("gqa-convert", "gqa_toolkit.convert")

    if refresh_modeling:
        try:
            rewritten = refresh(model_dir)
        except IsADirectoryError as exc:  # a modeling file's place holds a folder: nothing was replaced
            raise ConversionError(f"{exc.filename} is a folder where the modeling file goes; move it away and "
                                  f"rerun --refresh-modeling") from None
        for path in rewritten:
            click.echo(f"rewrote {path}")
        return
    if groups is None:
        raise ConversionError("--groups is required: the number of KV heads in the output, e.g. --groups 8")
    options = ConversionOptions(method=method, groups=groups, kind_groups=kind_groups, seed=seed, dtype=dtype,
                                max_shard_size=max_shard_size, attention=attention, force=force, grouping=grouping,
                                preserve_norm=preserve_norm,
                                calibration=calibration, calibration_samples=calibration_samples,
                                calibration_length=calibration_length, device=device,
                                calibration_mode=calibration_mode, calibration_language=calibration_language,
                                refine_steps=refine_steps, refine_lr=refine_lr,
                                refine_batch=refine_batch, refine_precision=refine_precision,
                                revision=revision, native=not no_native)
    if push_to is not None:
        from gqa_toolkit.hub import check_repo_id

        check_repo_id(push_to, "--push-to-hub", ConversionError)
    if dry_run:
        lines = describe_conversion(model_dir, output, options)
        click.echo(json.dumps({"dry_run": lines}) if as_json else "\n".join(lines))
        return
    if private and push_to is None:
        raise ConversionError("--private applies to --push-to-hub REPO; add it, or drop --private")
    result = convert(model_dir, output, options, progress=not quiet)
    pushed = None
    if push_to is not None:
        from gqa_toolkit.hub import push_folder

        pushed = push_folder(result.output, push_to, private, f"gqa-convert --method {method} --groups {groups}",
                             ConversionError)
    report = {**result.as_json(), **({"pushed": pushed} if pushed else {})}
    lines = [str(result.output), *([f"pushed: {pushed}"] if pushed else [])]
    click.echo(json.dumps(report) if as_json else "\n".join(lines))


if __name__ == "__main__":
    main()
