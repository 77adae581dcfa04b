"""The documents of the shipped `python_next_line` task, built from the held-out files of the python-stdlib corpus,
the same on every machine with the same Python."""

from __future__ import annotations

import random

from gqa_toolkit.convert import corpus

EXAMPLES = 200
CONTEXT_LINES = 6
EVERY = 25  # one example per this many lines of a file, so the examples spread over many files


def _candidate(line: str) -> bool:
    """A line worth predicting: code, not blank, a comment or a lone bracket."""
    text = line.strip()
    return len(text) >= 12 and not text.startswith("#")


def documents(examples: int = EXAMPLES, seed: int = 0) -> list[dict]:
    """[{'context': 6 lines, 'choices': 4 lines, 'label': index of the true next line}]."""
    rng = random.Random(seed)
    files = [record["text"].splitlines() for record in corpus.iter_texts("heldout")]
    spots = [(f, i) for f, lines in enumerate(files) for i in range(CONTEXT_LINES, len(lines), EVERY)
             if _candidate(lines[i])]
    rng.shuffle(spots)
    docs = []
    for f, i in spots[:examples]:
        lines = files[f]
        truth = lines[i].rstrip()
        others = set()
        while len(others) < 3:  # lines of other files, none equal to the truth
            g, j = spots[rng.randrange(len(spots))]
            if g != f and files[g][j].rstrip() != truth:
                others.add(files[g][j].rstrip())
        choices = sorted(others)
        label = rng.randrange(4)
        choices.insert(label, truth)
        docs.append({"context": "\n".join(lines[i - CONTEXT_LINES:i]), "choices": choices, "label": label})
    return docs


def dataset(**_metadata):
    """lm-eval's custom_dataset hook: the documents as its test split."""
    import datasets

    return {"test": datasets.Dataset.from_list(documents())}
