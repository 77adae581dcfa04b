"""Units of the uptrain stage: budget and schedule, objective, corpus split, tokenizer, packing, cache, batch order."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa_toolkit import corpus
from gqa_toolkit.uptrain import data, tasks
from gqa_toolkit.uptrain.budget import lr_at, plan_budget
from gqa_toolkit.uptrain.errors import UptrainError
from gqa_toolkit.uptrain.objective import distill_loss, lm_loss, objective
from gqa_toolkit.uptrain.recipe import DataSection, TrainSection
from gqa_toolkit.uptrain.tasks import CausalLM
from gqa_toolkit.uptrain.tokenizer import train_tokenizer


def test_budget_from_fraction_tokens_and_steps():
    assert plan_budget(TrainSection(original_steps=1000, fraction=0.05), 128, 1).steps == 50
    b = plan_budget(TrainSection(max_tokens=10_000, batch_size=8, micro_batch_size=2), 128, 2)
    assert b.steps == 10 and b.tokens_per_step == 1024  # ceil(10000 / 1024)
    global_batch = {"input_ids": torch.arange(8)[:, None]}  # (batch_size, 1)
    assert len(data.process_micro_batches(global_batch, 2, 0, b.micro_batch_size)) == 2  # micro-steps per process
    assert plan_budget(TrainSection(max_steps=7, warmup_fraction=0.3), 16, 1).warmup_steps == 2
    with pytest.raises(UptrainError, match="not a multiple"):
        plan_budget(TrainSection(max_steps=7, batch_size=6, micro_batch_size=4), 16, 1)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays_within_the_budget(schedule):
    cfg = TrainSection(max_steps=100, lr=1.0, min_lr_ratio=0.1, warmup_fraction=0.1, schedule=schedule)
    budget = plan_budget(cfg, 16, 1)
    lrs = [lr_at(s, cfg, budget) for s in range(budget.steps)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert max(lrs) == pytest.approx(1.0)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # never rises after warm-up
    assert lrs[-1] == pytest.approx(1.0 if schedule == "constant" else 0.1, abs=0.02)


def test_distillation_is_zero_when_student_equals_teacher(uptrain_models):
    model = AutoModelForCausalLM.from_pretrained(uptrain_models["gqa"]).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids).logits
    assert distill_loss(logits, logits, ids, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
    loss, parts = objective(model, {"input_ids": ids}, teacher=model, weight=0.3, temperature=2.0)
    assert parts["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(0.7 * lm_loss(logits, ids).item(), rel=1e-5)
    teacher = AutoModelForCausalLM.from_pretrained(uptrain_models["mha"]).eval()
    assert objective(model, {"input_ids": ids}, teacher=teacher, weight=0.3)[1]["kd"].item() > 1e-4


def test_stdlib_split_is_deterministic_and_disjoint():
    train, held = corpus.stdlib_files("train"), corpus.stdlib_files("heldout")
    assert train and held and not set(train) & set(held)
    assert 0.01 < len(held) / (len(train) + len(held)) < 0.1
    assert corpus.stdlib_files("heldout") == held
    assert all("site-packages" not in p.parts for p in train)


def test_tokenizer_round_trips_with_special_tokens(tmp_path):
    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300)
    assert None not in (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id)
    text = "print('héllo ✓')"  # bytes never seen in training still encode
    assert tok.decode(tok(text)["input_ids"]) == text
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == tok(text)["input_ids"]


@pytest.fixture
def text_dir(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, rec in enumerate(corpus.iter_texts("heldout", limit=6)):
        (folder / f"doc{i}.jsonl").write_text(json.dumps({"body": rec["text"], "n": i}) + "\n")
    return folder


def test_packing_joins_documents_with_eos_and_caches(text_dir, uptrain_models, tmp_path, monkeypatch):
    tok = AutoTokenizer.from_pretrained(uptrain_models["gqa"])
    cfg = DataSection(source=str(text_dir), text_column="body", block_size=32, eval_blocks=4,
                      cache_dir=str(tmp_path / "cache"))
    blocks = data.load_blocks(cfg, tok, CausalLM(32))
    held = blocks.heldout["input_ids"]
    assert held.shape == (4, 32)
    rows = torch.tensor(blocks.train["input_ids"])  # (N, 32)
    expected = [t for rec in (json.loads(p.read_text()) for p in sorted(text_dir.glob("*.jsonl")))
                for t in (*tok(rec["body"], add_special_tokens=False)["input_ids"], tok.eos_token_id)]
    assert torch.cat([held, rows]).flatten().tolist() == expected[: (len(rows) + 4) * 32]

    calls, pack = [], tasks.pack
    monkeypatch.setattr(tasks, "pack", lambda *a, **k: calls.append(1) or pack(*a, **k))
    again = data.load_blocks(cfg, tok, CausalLM(32))  # served from the cache: no tokenizing
    assert not calls and torch.equal(again.heldout["input_ids"], held)
    assert len(again.train) == len(blocks.train)
    data.load_blocks(cfg.model_copy(update={"block_size": 16}), tok, CausalLM(16))  # a new length misses the cache
    assert calls


def test_global_batches_are_deterministic_and_resumable():
    ds = datasets.Dataset.from_dict({"input_ids": [[i] * 4 for i in range(10)]})
    first = data.global_batches(ds, batch_size=3, seed=1)
    run = [next(first) for _ in range(7)]  # 3 batches per epoch: crosses two epoch boundaries
    resumed = data.global_batches(ds, batch_size=3, seed=1, start_step=4)
    assert all(torch.equal(next(resumed)["input_ids"], run[s]["input_ids"]) for s in range(4, 7))
    ids = [batch["input_ids"] for batch in run]
    epoch = torch.cat(ids[:3])[:, 0].tolist()
    assert len(set(epoch)) == 9  # one epoch never repeats a block
    assert not torch.equal(torch.cat(ids[:3]), torch.cat(ids[3:6]))  # each epoch reshuffles


def test_streaming_batches_follow_the_same_rules(text_dir, uptrain_models, tmp_path):
    tok = AutoTokenizer.from_pretrained(uptrain_models["gqa"])
    cfg = DataSection(source=str(text_dir), text_column="body", block_size=32, eval_blocks=2, streaming=True,
                      shuffle_buffer=8)
    blocks = data.load_blocks(cfg, tok, CausalLM(32))
    assert isinstance(blocks.train, datasets.IterableDataset) and blocks.heldout["input_ids"].shape == (2, 32)
    run = data.global_batches(blocks.train, batch_size=4, seed=0)
    batches = [next(run)["input_ids"] for _ in range(5)]
    resumed = data.global_batches(blocks.train, batch_size=4, seed=0, start_step=3)
    assert torch.equal(next(resumed)["input_ids"], batches[3]) and torch.equal(next(resumed)["input_ids"], batches[4])
    assert batches[0].shape == (4, 32)


def test_micro_batches_of_all_processes_cover_the_global_batch_once():
    batch = {"input_ids": torch.arange(12).view(12, 1), "labels": torch.arange(12).view(12, 1) + 100}
    one = data.process_micro_batches(batch, num_processes=1, rank=0, micro=3)
    two = [data.process_micro_batches(batch, num_processes=2, rank=r, micro=3) for r in range(2)]
    assert len(one) == 4 and len(two[0]) == 2
    assert sorted(torch.cat([m["input_ids"] for m in [*two[0], *two[1]]]).flatten().tolist()) == list(range(12))
    assert torch.equal(torch.cat([m["input_ids"] for m in one]), batch["input_ids"])
    assert all(torch.equal(m["labels"], m["input_ids"] + 100) for m in [*one, *two[0], *two[1]])  # rows stay paired
