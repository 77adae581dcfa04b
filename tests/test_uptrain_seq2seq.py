"""Uptraining T5, the paper's model: span corruption checked against T5's own definition, the loss against stock
transformers' T5 loss, and whole runs (span corruption and input -> target pairs) on a tiny T5 converted to MQA."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, T5ForConditionalGeneration

from gqa_toolkit.families.transformers_names import output_cache
from gqa_toolkit.eval.fidelity import fidelity
from gqa_toolkit.eval.heldout import HELDOUT, eval_task, heldout_set
from gqa_toolkit.eval.perplexity import perplexity
from gqa_toolkit.eval.speed import kv_cache_bytes_per_token, measure_speed
from gqa_toolkit.uptrain import load_recipe, train
from gqa_toolkit.uptrain.errors import UptrainError
from gqa_toolkit.uptrain.metrics import read_metrics
from conftest import toolkit_config as load_config, toolkit_model as load_model, toolkit_tokenizer as load_tokenizer
from gqa_toolkit.uptrain.objective import objective
from gqa_toolkit.uptrain.recipe import DataSection, ObjectiveSection
from gqa_toolkit.uptrain.span_corruption import corrupt, counts_for_input_length, span_counts
from gqa_toolkit.uptrain.tasks import IGNORE, Seq2SeqPairs, SpanCorruption, build_task, shift_right

SENTINELS = torch.arange(1000, 1100)


def test_lengths_match_t5s_published_pipeline():
    # T5's pretraining inputs of 512 tokens are cut from 568-token rows and give 114-token targets
    counts = counts_for_input_length(512, 0.15, 3.0)
    assert (counts.raw_length, counts.input_length, counts.target_length) == (568, 512, 114)


def _uncorrupt(inputs: list[int], targets: list[int]) -> list[int]:
    """T5's definition read backwards: each sentinel in the input stands for the tokens after it in the target."""
    hidden, current = {}, None
    for t in targets[:-1]:  # drop eos
        if t in SENTINELS:
            current = hidden.setdefault(t, [])
        else:
            current.append(t)
    return [tok for t in inputs[:-1] for tok in (hidden[t] if t in SENTINELS else [t])]


@pytest.mark.parametrize("raw, density, span", [(9, 0.25, 1.0), (568, 0.15, 3.0), (100, 0.3, 5.0)])
def test_corruption_hides_spans_that_the_targets_restore(raw, density, span):
    counts = span_counts(raw, density, span)
    ids = torch.randint(0, 900, (6, raw), generator=torch.Generator().manual_seed(raw))
    out = corrupt(ids, counts, SENTINELS, eos_id=1, generator=torch.Generator().manual_seed(0))
    assert out["input_ids"].shape == (6, counts.input_length) and out["labels"].shape == (6, counts.target_length)
    for row, inputs, targets in zip(ids.tolist(), out["input_ids"].tolist(), out["labels"].tolist()):
        assert _uncorrupt(inputs, targets) == row
        assert inputs[0] == row[0]  # a row starts with a kept span
        assert inputs[-1] == targets[-1] == 1
        used = [t for t in inputs if t in SENTINELS]
        assert used == SENTINELS[: counts.noise_spans].tolist()  # one sentinel per span, in order
        assert sum(t not in SENTINELS for t in targets[:-1]) == counts.noise_tokens


def test_corruption_is_a_function_of_the_seed():
    counts = span_counts(64, 0.15, 3.0)
    ids = torch.arange(64).repeat(4, 1)
    again = [corrupt(ids, counts, SENTINELS, 1, torch.Generator().manual_seed(s))["input_ids"] for s in (3, 3, 4)]
    assert torch.equal(again[0], again[1]) and not torch.equal(again[0], again[2])
    assert len({tuple(r) for r in again[0].tolist()}) > 1  # rows of one batch get different masks


def test_loss_equals_stock_t5_loss(t5_models):
    """The loop's loss on a span-corruption batch is what stock transformers' T5 computes from the labels."""
    model = T5ForConditionalGeneration.from_pretrained(t5_models["mha"]).eval()
    tokenizer = load_tokenizer(t5_models["mha"])
    task = build_task(ObjectiveSection(), DataSection(block_size=32), model.config, tokenizer)
    assert isinstance(task, SpanCorruption)
    rows = torch.randint(3, 400, (3, task.row_length), generator=torch.Generator().manual_seed(0))
    batch = task.examples({"input_ids": rows}, seed=0)
    with torch.no_grad():
        ours, _ = objective(model, batch)
        stock = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert ours.item() == pytest.approx(stock.item(), rel=1e-6)


def test_pairs_are_truncated_padded_and_shifted():
    task = Seq2SeqPairs(row_length=5, target_length=4, target_column="y", eos_id=2, pad_id=0, decoder_start_id=0)

    class Tok:
        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [[int(c) + 10 for c in t] for t in texts]}

    rows = task._tokenize({"x": ["123456", "1"], "y": ["1", "12345"]}, Tok(), "x")
    assert rows["input_ids"] == [[11, 12, 13, 14, 2], [11, 2, 0, 0, 0]]
    assert rows["attention_mask"] == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert rows["labels"] == [[11, 2, IGNORE, IGNORE], [11, 12, 13, 2]]
    assert shift_right(torch.tensor(rows["labels"]), 0).tolist() == [[0, 11, 2, 0], [0, 11, 12, 13]]


@pytest.mark.slow
def test_t5_uptrains_to_mqa_with_span_corruption(write_t5_recipe, t5_models, tmp_path):
    recipe = write_t5_recipe(train={"max_steps": 12}, objective={"distill_weight": 0.5},
                             output={"eval_every": 6})
    out = train(load_recipe(recipe))
    held = [m["heldout_loss"] for m in read_metrics(out) if "heldout_loss" in m]
    assert len(held) == 3 and held[-1] < held[0] - 0.3
    assert all("kd" in m for m in read_metrics(out) if "loss" in m)
    record = json.loads((out / "config.json").read_text())
    assert record["gqa_uptraining"]["objective"] == "span_corruption+distill"
    assert record["gqa_conversion"]["groups"] == 1

    # the uptrained checkpoint loads through the Auto class and decodes with a one-head KV cache
    model = AutoModelForSeq2SeqLM.from_pretrained(out, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("def main():\n    return <extra_id_0>", return_tensors="pt").input_ids
    with torch.no_grad():
        step = model(input_ids=ids, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    cache = output_cache(step)
    assert cache.self_attention_cache.layers[0].keys.shape[1] == 1
    assert cache.cross_attention_cache.layers[0].keys.shape[1] == 1
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] <= 6

    # heldout loss in the log is what gqa-eval measures on the same examples (to bf16 autocast's rounding on a GPU)
    tok = load_tokenizer(out)
    data = HELDOUT.model_copy(update=dict(block_size=48, eval_blocks=8, cache_dir=str(t5_models["cache"]), max_documents=40))
    examples = heldout_set(tok, data, eval_task(load_config(out), tok, data))
    assert perplexity(load_model(out), examples)["loss"] == pytest.approx(held[-1], rel=1e-3)


@pytest.mark.slow
def test_t5_uptrains_on_input_target_pairs(write_t5_recipe, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"question": f"{a} + {b} =", "answer": str(a + b)}) for a in range(20) for b in range(10)]
    pairs.write_text("\n".join(lines) + "\n")
    recipe = write_t5_recipe(data={"source": str(pairs), "text_column": "question", "target_column": "answer",
                                   "block_size": 16, "target_length": 6, "eval_blocks": 16, "max_documents": None},
                             train={"max_steps": 12, "lr": 1e-2})
    out = train(load_recipe(recipe))
    held = [m["heldout_loss"] for m in read_metrics(out) if "heldout_loss" in m]
    assert held[-1] < held[0] - 0.5
    assert json.loads((out / "config.json").read_text())["gqa_uptraining"]["objective"] == "seq2seq"


def test_t5_metrics_against_exact_facts(t5_models, tmp_path):
    from gqa_toolkit.convert import convert_checkpoint

    tok = load_tokenizer(t5_models["mha"])
    data = HELDOUT.model_copy(update=dict(block_size=32, eval_blocks=4, cache_dir=str(t5_models["cache"]), max_documents=20))
    examples = heldout_set(tok, data, eval_task(load_config(t5_models["mha"]), tok, data))
    source = load_model(t5_models["mha"])
    same = convert_checkpoint(t5_models["mha"], tmp_path / "g4", method="mean", groups=4, progress=False)
    result = fidelity(load_model(same), source, examples)
    assert result["kl"] == pytest.approx(0.0, abs=1e-9) and result["top1_agreement"] == 1.0
    assert result["tokens"] == examples["labels"].numel()
    mqa = load_model(t5_models["mqa"])
    assert fidelity(mqa, source, examples)["kl"] > 1e-4
    # decoder self- and cross-attention caches both shrink by H/G = 4
    assert kv_cache_bytes_per_token(source) / kv_cache_bytes_per_token(mqa) == 4
    point = measure_speed(mqa, context=16, batch_size=2, decode_steps=3, repeats=1)
    assert point.prefill_tokens_per_s > 0 and point.decode_tokens_per_s > 0
    with torch.no_grad():
        stock = source(input_ids=examples["input_ids"], labels=examples["labels"]).loss.item()
    assert perplexity(source, examples, batch_size=3)["loss"] == pytest.approx(stock, rel=1e-5)


@pytest.mark.parametrize("sections, needle", [
    ({"objective": {"task": "causal_lm"}}, "needs a decoder-only model"),
    ({"objective": {"task": "seq2seq"}}, "set data.target_column"),
    ({"data": {"target_column": "answer"}, "objective": {"task": "span_corruption"}}, "use objective.task seq2seq"),
    ({"data": {"block_size": 2}}, "cannot hold a kept token"),
])
def test_t5_recipe_mistakes(write_t5_recipe, sections, needle):
    with pytest.raises(UptrainError, match=needle):
        train(load_recipe(write_t5_recipe(**sections)))


def test_span_corruption_needs_an_encoder_decoder_and_sentinels(write_recipe, t5_models, uptrain_models, tmp_path):
    with pytest.raises(UptrainError, match="needs an encoder-decoder model"):
        train(load_recipe(write_recipe(objective={"task": "span_corruption"})))
    config = load_config(t5_models["mha"])
    no_sentinels = load_tokenizer(uptrain_models["mha"])  # a llama tokenizer: no <extra_id_N>
    with pytest.raises(UptrainError, match="tokenizer has 0 sentinel tokens .*; use a T5 tokenizer or score "
                                           r"\(input, target\) pairs with data.target_column$"):
        build_task(ObjectiveSection(), DataSection(block_size=64), config, no_sentinels)


def test_gqa_eval_names_its_own_options_when_span_corruption_cannot_run(t5_models, uptrain_models, tmp_path):
    """A BART-like tokenizer has no sentinels: gqa-eval names --target-column, not the recipe's keys."""
    import shutil

    from click.testing import CliRunner

    from gqa_toolkit.eval.cli import main

    model = tmp_path / "t5-llama-tokenizer"
    shutil.copytree(t5_models["mha"], model)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
        if (uptrain_models["mha"] / name).exists():
            shutil.copy(uptrain_models["mha"] / name, model / name)
    result = CliRunner().invoke(main, ["perplexity", str(model), "--block-size", "64"])
    assert result.exit_code == 2, result.output
    assert "score (input, target) pairs with --target-column" in result.stderr and "data." not in result.stderr
