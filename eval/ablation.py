"""`gqa-eval ablation`: the paper's checkpoint-conversion ablation as a loop over cells.

A cell is (method, groups, fraction). For each, the original checkpoint is converted (once per method and groups),
uptrained for fraction x original_steps (none for fraction 0), and measured: held-out loss and perplexity, and
fidelity to the original. Speed is measured once per KV-head count. Each finished cell is written to
`cells/<id>.json`, so a rerun skips it and a killed run continues; tables and plots are rendered from the stored
cells only (`report.py`).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from gqa_toolkit.convert import convert_checkpoint
from gqa_toolkit.errors import Interrupted
from gqa_toolkit.hub import push_folder
from gqa_toolkit.families.geometry import check_context, check_groups, model_geometry
from gqa_toolkit.families.spec import audio_input, spec_for
from gqa_toolkit.convert.methods.variants import parse_variant
from gqa_toolkit.uptrain import train, validate_recipe
from gqa_toolkit.uptrain.recipe import DataSection
from gqa_toolkit.uptrain.tasks import CausalLM

from .ablation_recipe import AblationRecipe
from .downstream import require_lm_eval, run_tasks, task_manager
from .errors import EvalError
from .fidelity import fidelity
from .heldout import eval_task, heldout_set
from .original import DONE_MARKER, Original, new_tokenizer, original_config, resolve_original
from .outputs import write_files
from .perplexity import perplexity
from .placement import load_for_eval
from .report import load_cells, render
from .results_dir import DESTINATION, check_apart_from_original, check_results_dir, claim_results_dir
from .speed import kv_cache_bytes_per_token, measure_speed
from .wer import greedy_transcripts, word_error_rate


def cell_id(method: str, groups: int, fraction: float) -> str:
    return f"{method}-g{groups}-f{fraction:g}"


class Ablation:
    def __init__(self, recipe: AblationRecipe, progress: bool = True):
        self.recipe, self.progress = recipe, progress
        self.root = Path(recipe.results_dir).expanduser().resolve()
        self.cells = self.root / "cells"
        self.models = self.root / "models"
        self.started = time.perf_counter()
        self.task_manager = None  # lm-eval's index of the recipe's tasks, made in the preflight

    # -- checks that run before any long work --------------------------------------------------------------------
    def check_results_dir(self) -> None:
        """A safe destination: apart from the original, and new, empty or this recipe's own; nothing is written."""
        check_apart_from_original(self.root, self.recipe.original.path)
        check_results_dir(self.root, self.recipe.to_yaml())

    def check_geometry(self, config) -> None:
        geometry = model_geometry(config)
        for groups in self.recipe.groups:  # the converter's own check, the family's allowed G included
            check_groups(groups, geometry, spec_for(config.model_type), "groups", "the original's")
        if audio_input(config.model_type) is None:  # an audio encoder takes its window: see speed_contexts
            check_context(config, self.recipe.data.block_size, "data.block_size", EvalError)
        check_context(config, max(speed_contexts(config, self.recipe.speed.contexts)), "speed.contexts", EvalError,
                      self.recipe.speed.decode_steps)

    def check_launcher(self) -> None:
        program = shlex.split(self.recipe.launcher)[0] if self.recipe.launcher else None
        if program is not None and shutil.which(program) is None:
            raise EvalError(f"launcher {self.recipe.launcher!r}: {program} is not an installed command; install it "
                            f"(pip install accelerate) or fix the launcher")

    def check_tasks(self) -> None:
        tasks = self.recipe.tasks
        if tasks.names:
            require_lm_eval("the recipe's tasks")
            self.task_manager = task_manager(list(tasks.names), list(tasks.include_path), role="tasks.include_path")

    def preflight(self):
        """Everything checkable before training, nothing written: geometry, context, the launcher and a non-empty
        held-out set (the uptrain keys are checked when the recipe loads). Returns the tokenizer a built original
        will use (None for a given original)."""
        self.check_launcher()
        self.check_tasks()
        build = self.recipe.original.build
        tokenizer = None
        if build is not None:
            self.check_geometry(original_config(build))
            tokenizer = new_tokenizer(self.recipe, build)
            self.heldout(None, tokenizer)
        else:
            original = resolve_original(self.recipe, self.root)
            self.check_geometry(original.dir.config)
            self.heldout(original.dir.config, original.dir.tokenizer)
        return tokenizer

    def eval_data(self) -> DataSection:
        """The recipe's data, read from its held-out source and split, every document of it."""
        d = self.recipe.data
        return d.model_copy(update={"source": d.eval_source or d.source, "split": d.eval_split or "heldout",
                                    "max_documents": None})

    def heldout(self, config, tokenizer) -> dict:
        """The held-out examples every cell is scored on, made by the uptraining task (config None: a built llama)."""
        data = self.eval_data()
        task = eval_task(config, tokenizer, data, self.recipe.objective) if config else None
        return heldout_set(tokenizer, data, task or CausalLM(data.block_size))

    def uptrain_recipe(self, model: Path, fraction: float, original_steps: int, out: Path, label: str = "uptrain"):
        train_keys = {"seed": self.recipe.seed, **self.recipe.uptrain.model_dump(mode="json", exclude_unset=True),
                      "fraction": fraction, "original_steps": original_steps}
        return validate_recipe({
            "model": {**self.recipe.model.model_dump(mode="json"), "path": str(model)},
            "data": self.recipe.data.model_dump(mode="json"),
            "train": train_keys,
            "objective": self.recipe.objective.model_dump(mode="json"),
            "output": {"dir": str(out), "keep_last": 1, "progress": self.progress, "trackers": [],
                       "progress_label": label,
                       "save_every": 10_000, "eval_every": 10_000},
        }, name="ablation uptrain")

    # -- the work ------------------------------------------------------------------------------------------------
    def model_dir(self, method: str, groups: int, fraction: float) -> Path:
        """Where a cell's model lives: the conversion (fraction 0), or its uptraining for `fraction`."""
        return self.models / f"{method}-g{groups}" / ("converted" if fraction == 0 else f"f{fraction:g}")

    def converted(self, original: Original, method: str, groups: int) -> Path:
        out = self.model_dir(method, groups, 0)
        if not (out / "config.json").is_file():
            convert_checkpoint(original.path, out, groups=groups, seed=self.recipe.seed, progress=self.progress,
                               force=True, **parse_variant(method))  # method may carry options: fit+similarity
        return out

    def uptrained(self, converted: Path, original: Original, method: str, groups: int, fraction: float) -> Path:
        out = self.model_dir(method, groups, fraction)
        recipe = self.uptrain_recipe(converted, fraction, original.original_steps, out,
                                     f"uptrain {cell_id(method, groups, fraction)}")
        if self.recipe.launcher:
            recipe_file = out.parent / f"f{fraction:g}.uptrain.yaml"
            write_files({recipe_file: recipe.to_yaml()}, DESTINATION)
            command = [*shlex.split(self.recipe.launcher), "-m", "gqa_toolkit.uptrain", str(recipe_file)]
            if subprocess.run(command).returncode != 0:
                raise EvalError(f"uptraining {out} failed under {self.recipe.launcher!r}; rerun to resume it")
        else:
            train(recipe)
        return out

    def measure(self, model_dir: Path, original_model, blocks, tokenizer, speech: tuple | None = None) -> dict:
        """Held-out loss, fidelity to the original, the recipe's tasks and, for speech (task, tokenizer, the
        original's transcripts), the WER of the model's greedy transcripts against the original's."""
        model = load_for_eval(model_dir)
        quality = perplexity(model, blocks, self.recipe.eval_batch_size)
        agreement = fidelity(model, original_model, blocks, self.recipe.eval_batch_size)
        wer = {}
        if speech is not None:
            task, tokenizer, reference = speech
            transcripts = greedy_transcripts(model, blocks, task, tokenizer, self.recipe.eval_batch_size)
            wer = {"wer": word_error_rate(reference, transcripts)}
        return {"heldout_loss": quality["loss"], "perplexity": quality["perplexity"], "kl": agreement["kl"],
                "top1_agreement": agreement["top1_agreement"], "eval_tokens": quality["tokens"], **wer,
                **self.task_scores(model, tokenizer)}

    def task_scores(self, model, tokenizer) -> dict:
        """{'tasks': {task: {metric: value}}} on the recipe's lm-eval tasks; nothing when it lists none."""
        tasks = self.recipe.tasks
        if not tasks.names:
            return {}
        return {"tasks": run_tasks(model, tokenizer, list(tasks.names), self.task_manager, tasks.limit,
                                   tasks.batch_size)}

    def say(self, line: str) -> None:
        if self.progress:
            print(f"[ablation {_duration(time.perf_counter() - self.started)}] {line}", file=sys.stderr, flush=True)

    def speed_cell(self, name: str, model_dir: Path, kv_heads: int) -> None:
        path = self.cells / f"speed-{name}.json"
        if path.is_file():
            return
        s = self.recipe.speed
        self.say(f"speed of {name}: contexts {list(s.contexts)} x batch sizes {list(s.batch_sizes)} x decode loops "
                 f"{list(s.decode)}, {s.repeats} rounds each")
        model = load_for_eval(model_dir)
        points = [asdict(measure_speed(model, c, b, s.decode_steps, s.repeats, loop))
                  for c in speed_contexts(model.config, s.contexts) for b in s.batch_sizes for loop in s.decode]
        _write_json(path, {"kind": "speed", "model": name, "kv_heads": kv_heads,
                           "kv_bytes_per_token": kv_cache_bytes_per_token(model), "points": points})

    def run(self) -> Path:
        self.check_results_dir()
        tokenizer = self.preflight()
        claim_results_dir(self.root, self.recipe.to_yaml())
        try:
            return self._run(tokenizer)
        except KeyboardInterrupt:
            stored = len(list(self.cells.glob("*.json")))
            raise Interrupted(f"{stored} finished cells are stored in {self.cells}; rerun the same command to go "
                              f"on from there") from None

    def rerun_speed(self) -> Path:
        """Measure the speed cells again, of the original and the converted models an earlier run made (say, on a
        quieter machine), and redraw the tables and plots; the quality cells stay as they are."""
        self.check_results_dir()
        built = self.recipe.original.build is None or (self.root / "original" / DONE_MARKER).is_file()
        if not (self.cells / "original.json").is_file() or not built:
            raise EvalError(f"{self.root} holds no finished original yet; run the ablation first (without --only)")
        original = resolve_original(self.recipe, self.root, self.progress)
        for old in self.cells.glob("speed-*.json"):
            old.unlink()
        self.say("speed only: measuring the original and each G again")
        self.speed_cell("original", original.path, model_geometry(original.dir.config).kv_heads)
        for groups in self.recipe.groups:
            self.speed_cell(f"g{groups}", self.converted(original, self.recipe.methods[0], groups), groups)
        return render(self.root)

    def _run(self, tokenizer) -> Path:
        if self.recipe.original.build is not None and not (self.root / "original" / DONE_MARKER).is_file():
            self.say(f"stage 1/4: pretraining the original ({self.recipe.original.build.steps} steps)")
        original = resolve_original(self.recipe, self.root, self.progress, tokenizer)
        tokenizer, config = original.dir.tokenizer, original.dir.config
        original.dir.preflight(self.recipe.data.block_size, "data.block_size")
        blocks = self.heldout(config, tokenizer)
        original_model = load_for_eval(original.dir)
        speech = None
        if audio_input(config.model_type) is not None:  # cells also report WER against the original's transcripts
            task = eval_task(config, tokenizer, self.eval_data(), self.recipe.objective)
            speech = (task, tokenizer, greedy_transcripts(original_model, blocks, task, tokenizer,
                                                          self.recipe.eval_batch_size))
        geometry = model_geometry(config)
        heads, kv_heads = geometry.heads, geometry.kv_heads

        self.say("stage 2/4: the original's held-out loss and speed")
        baseline = self.cells / "original.json"
        if not baseline.is_file():
            quality = perplexity(original_model, blocks, self.recipe.eval_batch_size)
            _write_json(baseline, {"kind": "original", "method": "original", "groups": kv_heads, "fraction": None,
                                   "heads": heads, "heldout_loss": quality["loss"], "perplexity": quality["perplexity"],
                                   "kl": 0.0, "top1_agreement": 1.0, "original_steps": original.original_steps,
                                   **self.task_scores(original_model, tokenizer)})
        self.speed_cell("original", original.path, kv_heads)

        cells = [(m, g, f) for m in self.recipe.methods for g in self.recipe.groups for f in self.recipe.fractions]
        todo = [c for c in cells if not (self.cells / f"{cell_id(*c)}.json").is_file()]
        self.say(f"stage 3/4: {len(cells)} cells (convert, uptrain, measure), {len(cells) - len(todo)} stored already")
        spent: list[float] = []
        for method in self.recipe.methods:
            for groups in self.recipe.groups:
                for fraction in self.recipe.fractions:
                    path = self.cells / f"{cell_id(method, groups, fraction)}.json"
                    if path.is_file():
                        continue
                    eta = f", about {_duration(sum(spent) / len(spent) * (len(todo) - len(spent)))} left" \
                        if spent else ""
                    self.say(f"cell {len(spent) + 1}/{len(todo)}: {path.stem}{eta}")
                    started = time.perf_counter()
                    converted = self.converted(original, method, groups)
                    model_dir = converted if fraction == 0 else self.uptrained(converted, original, method,
                                                                               groups, fraction)
                    row = {"kind": "cell", "method": method, "groups": groups, "fraction": fraction, "heads": heads,
                           "uptrain_steps": round(fraction * original.original_steps),
                           **self.measure(model_dir, original_model, blocks, tokenizer, speech),
                           "seconds": round(time.perf_counter() - started, 1)}
                    _write_json(path, row)
                    spent.append(row["seconds"])
                    self.say(f"{path.stem}: loss {row['heldout_loss']:.4f} kl {row['kl']:.4f} in "
                             f"{_duration(row['seconds'])}")
                self.speed_cell(f"g{groups}", self.converted(original, method, groups), groups)
        self.say("stage 4/4: tables and plots")
        table = render(self.root)
        if self.recipe.push_to_hub:
            self.push_best()
        return table

    def push_best(self) -> str:
        """Upload the model of the cell with the lowest held-out loss to the recipe's push_to_hub repository."""
        best = min(load_cells(self.root)[1], key=lambda c: c["heldout_loss"])
        folder = self.model_dir(best["method"], best["groups"], best["fraction"])
        name = cell_id(best["method"], best["groups"], best["fraction"])
        url = push_folder(folder, self.recipe.push_to_hub, self.recipe.private,
                          f"gqa-eval ablation: best cell {name} (held-out loss {best['heldout_loss']:.4f})", EvalError)
        self.say(f"pushed {name} to {url}")
        return url


def speed_contexts(config, contexts: tuple[int, ...]) -> tuple[int, ...]:
    """The contexts speed is measured at: the recipe's, or an audio encoder's whole window (whisper's)."""
    audio = audio_input(config.model_type)
    return (getattr(config, audio.positions_attr),) if audio is not None else contexts


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _write_json(path: Path, data: dict) -> None:
    write_files({path: json.dumps(data, indent=2) + "\n"}, DESTINATION)
