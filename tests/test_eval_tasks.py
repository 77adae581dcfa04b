"""`gqa-eval tasks` offline: small local tasks in lm-eval's own format (YAML next to a jsonl), run through the CLI on
a native llama and on gpt2 converted to GQA (the toolkit's own modeling, loaded with trust_remote_code=False), and
the scores checked against log-likelihoods computed here with the model's plain forward."""

import json
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import GPT2Config, GPT2LMHeadModel

from gqa_toolkit.convert import convert_checkpoint
from gqa_toolkit.eval.cli import main
from gqa_toolkit.eval.placement import load_for_eval
from conftest import toolkit_tokenizer as load_tokenizer

pytest.importorskip("lm_eval")

MULTIPLE_CHOICE = [
    {"context": "def add(a, b):\n    return", "choices": ["a + b", "a - b", "None", "b"], "label": 0},
    {"context": "for i in range(10):\n   ", "choices": ["print(i)", "pass", "break", "yield i"], "label": 0},
    {"context": "import", "choices": ["os", "sys", "json", "re"], "label": 1},
    {"context": "class Point:\n    def __init__(self, x, y):\n        self.x =", "choices": ["x", "y", "0", "self"],
     "label": 0},
    {"context": "if __name__ ==", "choices": ["'__main__':", "None:", "0:", "main:"], "label": 0},
    {"context": "with open(path) as f:\n    text =", "choices": ["f.read()", "path", "open()", "None"], "label": 0},
    {"context": "try:\n    x = int(s)\nexcept", "choices": ["ValueError:", "KeyError:", "finally:", "else:"],
     "label": 0},
    {"context": "return", "choices": ["self", "None", "True", "result"], "label": 2},
]
LOGLIKELIHOOD = [  # lm-eval puts no delimiter before a loglikelihood target: the data carries its space
    {"context": "def main():\n   ", "target": " pass"},
    {"context": "import", "target": " sys"},
    {"context": "x = [i for i in", "target": " range(3)]"},
    {"context": "while True:\n   ", "target": " break"},
    {"context": "raise", "target": " ValueError('bad')"},
]


def _task(folder, name, rows, **config):
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(folder / f"{name}.jsonl")}}, "test_split": "test",
            "doc_to_text": "{{context}}", "metadata": {"version": 1}, **config}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task))


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("my_tasks")
    _task(folder, "tiny_choice", MULTIPLE_CHOICE, output_type="multiple_choice", doc_to_choice="{{choices}}",
          doc_to_target="label", metric_list=[{"metric": "acc"}])
    _task(folder, "tiny_loglikelihood", LOGLIKELIHOOD, output_type="loglikelihood", doc_to_target="{{target}}",
          metric_list=[{"metric": "perplexity"}, {"metric": "acc"}])
    return folder


@pytest.fixture(scope="module")
def gpt2_gqa(uptrain_models, tmp_path_factory):
    """A tiny gpt2 with the uptrain fixtures' tokenizer, converted to G=2 (the toolkit's own modeling); its
    modeling files booby-trapped, so a run of the folder's code leaves a marker."""
    root = tmp_path_factory.mktemp("gpt2")
    tokenizer = load_tokenizer(uptrain_models["mha"])
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=len(tokenizer), n_positions=256,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(root / "mha")
    tokenizer.save_pretrained(root / "mha")
    out = convert_checkpoint(root / "mha", root / "gqa", groups=2, progress=False)
    for code in out.glob("*.py"):
        code.write_text(code.read_text() + f"\nopen({str(root / 'marker')!r}, 'a').write('ran')\n")
    return out, root / "marker"


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and whether greedy decoding gives it, tokenised as lm-eval does (the whole
    text, split after the context's tokens; a context's trailing spaces belong to the continuation)."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), -1)  # (T-1, V)
    targets = torch.tensor(whole[start:])
    picked = logprobs[start - 1:].gather(-1, targets[:, None])
    return picked.sum().item(), bool((logprobs[start - 1:].argmax(-1) == targets).all())


def _expected(model_dir, limit):
    model, tokenizer = load_for_eval(model_dir), load_tokenizer(model_dir)
    choice = [[_loglikelihood(model, tokenizer, d["context"], " " + c)[0] for c in d["choices"]]
              for d in MULTIPLE_CHOICE[:limit]]
    correct = [max(range(len(s)), key=s.__getitem__) == d["label"] for s, d in zip(choice, MULTIPLE_CHOICE)]
    scored = [_loglikelihood(model, tokenizer, d["context"], d["target"]) for d in LOGLIKELIHOOD[:limit]]
    mean_ll = sum(ll for ll, _ in scored) / len(scored)
    return {"tiny_choice": sum(correct) / len(correct),
            "tiny_loglikelihood": (torch.tensor(-mean_ll).exp().item(), sum(g for _, g in scored) / len(scored))}


def _run_json(*args):
    result = CliRunner().invoke(main, ["tasks", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.stdout[result.stdout.index("{"):])


@pytest.mark.slow
@pytest.mark.parametrize("kind,limit", [("llama", None), ("gpt2-gqa", 4)])
def test_local_tasks_score_what_the_model_computes(kind, limit, uptrain_models, gpt2_gqa, task_folder):
    model_dir = uptrain_models["gqa"] if kind == "llama" else gpt2_gqa[0]
    limit_args = ["--limit", limit] if limit else []
    scores = _run_json(model_dir, "--tasks", "tiny_choice,tiny_loglikelihood", "--include-path", task_folder,
                       *limit_args)
    expected = _expected(model_dir, limit)
    assert scores["tiny_choice"]["acc"] == pytest.approx(expected["tiny_choice"], abs=1e-9)
    perplexity, greedy = expected["tiny_loglikelihood"]
    assert scores["tiny_loglikelihood"]["perplexity"] == pytest.approx(perplexity, rel=1e-4)
    assert scores["tiny_loglikelihood"]["acc"] == pytest.approx(greedy, abs=1e-9)
    if kind == "gpt2-gqa":
        assert not gpt2_gqa[1].exists(), "lm-eval ran the model folder's code"


@pytest.mark.slow
def test_shipped_task_runs_with_no_download(uptrain_models):
    scores = _run_json(uptrain_models["gqa"], "--tasks", "python_next_line", "--limit", "8")
    assert scores["python_next_line"]["acc"] in {i / 8 for i in range(9)}


@pytest.mark.parametrize("args,needle", [
    pytest.param(["--tasks", "no_such_task"], "unknown task 'no_such_task'", marks=pytest.mark.slow),  # indexes
    # lm-eval's own tasks
    (["--tasks", "tiny_choice", "--include-path", "/no/such/folder"], "--include-path /no/such/folder is not a"),
])
def test_bad_task_arguments_are_one_line(args, needle, uptrain_models):
    result = CliRunner().invoke(main, ["tasks", str(uptrain_models["gqa"]), *args])
    assert result.exit_code != 0 and needle in result.output, result.output
    assert "Traceback" not in result.output


def test_missing_lm_eval_is_said_before_the_model_is_looked_up(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    result = CliRunner().invoke(main, ["tasks", "someone/not-cached-model", "--tasks", "hellaswag"])
    assert result.exit_code != 0
    assert "needs lm-eval-harness, which is not installed; pip install 'gqa-toolkit[tasks]'" in result.output
    assert "config.json" not in result.output
