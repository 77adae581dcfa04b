"""Word error rate of a speech model's greedy transcripts: against another model's transcripts of the same audio
(the source's: how much of its behaviour a conversion kept) or against the reference text.

WER = (substitutions + deletions + insertions) / reference words, summed over the clips, on normalised text
(lower case, punctuation dropped but for apostrophes inside words, whitespace collapsed).
"""

from __future__ import annotations

import re

import torch
from transformers.modeling_outputs import BaseModelOutput

from gqa_toolkit.families.transformers_names import cache_argument, output_cache
from gqa_toolkit.uptrain.speech import SpeechTranscripts
from gqa_toolkit.uptrain.tasks import IGNORE

from .perplexity import batches


def normalise(text: str) -> list[str]:
    """The words of `text`, compared case- and punctuation-blind."""
    text = re.sub(r"[^\w\s']|(?<!\w)'|'(?!\w)", " ", text.lower())
    return text.split()


def edit_distance(reference: list[str], hypothesis: list[str]) -> int:
    """Word-level Levenshtein distance: the fewest substitutions, deletions and insertions."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        current = [i]
        for j, hyp in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Errors over reference words, summed over the pairs (an empty reference counts its hypothesis' words)."""
    errors = words = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        ref_words, hyp_words = normalise(ref), normalise(hyp)
        errors += edit_distance(ref_words, hyp_words)
        words += len(ref_words)
    return errors / max(words, 1)


@torch.no_grad()
def greedy_transcripts(model, examples: dict[str, torch.Tensor], task: SpeechTranscripts, tokenizer,
                       batch_size: int = 8, progress: bool = False) -> list[str]:
    """Each clip's transcript, decoded greedily after the decoder's prompt (start token and task.prompt) until
    eos or the task's target length; the audio is encoded once per batch and the decoder reads its KV cache."""
    model.eval()
    prompt_length = 1 + len(task.prompt)
    cache_key = cache_argument(model)
    texts = []
    for batch in batches(examples, batch_size, model.device, progress, "transcribing"):
        encoded = BaseModelOutput(last_hidden_state=model.get_encoder()(batch["input_features"]).last_hidden_state)
        ids = batch["decoder_input_ids"][:, :prompt_length]  # (B, P): start token and prompt
        step_ids, cache, done = ids, None, torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        new = []
        for _ in range(task.target_length - len(task.prompt)):
            out = model(encoder_outputs=encoded, decoder_input_ids=step_ids, use_cache=True, **{cache_key: cache})
            cache = output_cache(out)
            token = out.logits[:, -1].argmax(-1)  # (B,)
            token = token.masked_fill(done, task.eos_id)
            new.append(token)
            done |= token == task.eos_id
            if bool(done.all()):
                break
            step_ids = token[:, None]  # (B, 1)
        for row in torch.stack(new, dim=1).tolist():  # (B, steps)
            row = row[: row.index(task.eos_id)] if task.eos_id in row else row
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def reference_transcripts(examples: dict[str, torch.Tensor], task: SpeechTranscripts, tokenizer) -> list[str]:
    """The transcripts the examples were made from (their labels, without the prompt, eos and padding)."""
    texts = []
    for row in examples["labels"].tolist():
        row = [t for t in row[len(task.prompt):] if t != IGNORE]
        texts.append(tokenizer.decode(row[: row.index(task.eos_id)] if task.eos_id in row else row,
                                      skip_special_tokens=True))
    return texts
