"""The uptraining loop, top to bottom: check inputs, data, model, resume, train steps, save.

Runs unchanged as one process (`gqa-uptrain RECIPE`) and under `accelerate launch` (DDP or FSDP): each process
takes its slice of the same global batch, so the loss curve does not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from gqa_toolkit.errors import Interrupted
from gqa_toolkit.families.loading import allow_remote_code
from gqa_toolkit.families.transformers_names import enable_activation_checkpointing
from gqa_toolkit.hub import push_folder
from gqa_toolkit.model_dir import ModelDir

from .budget import lr_at, plan_budget
from .checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import global_batches, load_blocks, process_micro_batches
from .encoder_states import EncoderStates
from .errors import UptrainError
from .finite import check_weights_finite
from .metrics import MetricsLog
from .model import load_teacher, open_student, teacher_dir
from .objective import heldout_loss, objective
from .output import save_output
from .recipe import Recipe
from .run_dir import claim_run_dir, clear_partial_saves, write_recipe
from .sharding import broadcast_from_main, check_optimizer, for_this_launch, launched_with_fsdp
from .tasks import build_task
from .trackers import resolve_trackers
from .trainable import make_optimizer, select_trainable


def mixed_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no"}.get(precision, precision)


def on_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate_heldout(model, heldout: dict[str, torch.Tensor], micro_batch: int, device) -> float:
    """Every process evaluates all the held-out examples (FSDP needs equal calls); training resumes after."""
    loss, _ = heldout_loss(model, heldout, micro_batch, device)
    model.train()
    return loss


def folders_read(recipe: Recipe, student: ModelDir, teacher: ModelDir | None) -> dict[str, Path]:
    """The folders and files a run reads (role -> path), which its output.dir must stay clear of."""
    found = {"model.path": student.path}
    if teacher is not None:
        found["the distillation teacher"] = teacher.path
    for key in ("source", "eval_source"):
        name = getattr(recipe.data, key)
        if name is not None and Path(name).is_absolute() and Path(name).exists():  # resolved(): local paths only
            found[f"data.{key}"] = Path(name)
    return found


@contextlib.contextmanager
def _interrupts_say_what_is_kept(out: Path, state: dict, total_steps: int, log: MetricsLog):
    """Ctrl-C or SIGTERM while training: an Interrupted error that says which checkpoint a rerun resumes from."""
    try:
        yield
    except KeyboardInterrupt:
        log.close()
        kept = latest_checkpoint(out)
        resume = (f"the checkpoint {kept} is kept: rerun the same command to resume from it" if kept is not None
                  else "no checkpoint was saved yet: rerun the same command to start again")
        raise Interrupted(f"stopped at step {state['step']} of {total_steps}; {resume}") from None


def train(recipe: Recipe, *, stop_after: int | None = None) -> Path | None:
    """Uptrain as `recipe` says and return the output dir. `stop_after=N` stops after step N without writing the
    final model, as a killed run would (tests use it); rerunning the same recipe resumes."""
    recipe = recipe.resolved()
    cfg, data, obj = recipe.train, recipe.data, recipe.objective
    if not recipe.output.progress:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()

    allow_remote_code(recipe.model.trust_remote_code)

    # 1. Everything that can fail on user input is checked before anything is written.
    student = open_student(recipe.model.path)
    config = student.config
    row_length = student.preflight(data.block_size, "data.block_size")
    teacher_source = teacher_dir(student, obj.teacher) if obj.distill_weight > 0 else None
    # One process may run several recipes (the ablation runner does), each with its own precision: forget the
    # previous run's accelerator settings but keep the process group (PartialState).
    AcceleratorState._reset_state(reset_partial_state=False)
    trackers = resolve_trackers(recipe.output.trackers)
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg.precision), log_with=trackers or None,
                              project_dir=str(Path(recipe.output.dir) / "trackers"))
    accelerator = for_this_launch(accelerator)  # FSDP asked for on CPU processes: the toolkit shards (sharding.py)
    check_optimizer(accelerator, cfg.optimizer)
    budget = plan_budget(cfg, row_length, accelerator.num_processes)
    out = claim_run_dir(recipe, folders_read(recipe, student, teacher_source))
    if trackers:
        accelerator.init_trackers("gqa-uptrain")
    tokenizer = student.tokenizer
    task = build_task(obj, data, config, tokenizer)

    # 2. Data: tokenized and cached rows (the main process makes them; the others read its cache).
    blocks = load_blocks(data, tokenizer, task, accelerator.main_process_first)

    # 3. Model, teacher, optimizer.
    set_seed(cfg.seed)
    model = student.model()
    select_trainable(model, recipe.model.trainable)
    if recipe.model.gradient_checkpointing:
        enable_activation_checkpointing(model, use_reentrant=False)
    optimizer = make_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    teacher = None
    if teacher_source is not None:
        dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
        teacher = broadcast_from_main(load_teacher(teacher_source, config, dtype).to(accelerator.device))
    # a frozen encoder runs once per example, under no_grad, for the student and the teacher alike
    encoder_states = EncoderStates.for_run(accelerator.unwrap_model(model), teacher, cfg.encoder_cache_mib,
                                           sharded=launched_with_fsdp(), autocast=accelerator.autocast)

    # 4. Resume from the last checkpoint of this same run, if any.
    if accelerator.is_main_process:
        clear_partial_saves(out)  # what a save cut short by a full disk or SIGKILL left
        write_recipe(out, recipe)
    accelerator.wait_for_everyone()
    state = {"step": 0, "tokens": 0, "loss": None, "heldout_loss": None}
    last = latest_checkpoint(out)
    if last is not None:
        state = load_checkpoint(accelerator, last)
        if accelerator.is_main_process and recipe.output.progress:
            done = "the run had finished; writing its final model again" if state["step"] >= budget.steps else \
                f"resuming from step {state['step']} of {budget.steps} ({last})"
            print(done, file=sys.stderr)
    log = MetricsLog(out, is_main=accelerator.is_main_process, start_step=state["step"], total_steps=budget.steps,
                     progress=recipe.output.progress, label=recipe.output.progress_label,
                     trackers=accelerator.log if trackers else None)
    if state["step"] == 0 and blocks.heldout:
        state["heldout_loss"] = evaluate_heldout(model, blocks.heldout, budget.micro_batch_size, accelerator.device)
        log.log(0, {"heldout_loss": state["heldout_loss"]})

    # 5. Train.
    with _interrupts_say_what_is_kept(out, state, budget.steps, log):
        batches = global_batches(blocks.train, budget.batch_size, cfg.seed, state["step"], data.shuffle_buffer)
        model.train()
        window_start, window_steps = time.perf_counter(), 0
        while state["step"] < budget.steps:
            step = state["step"]  # 0-based index of the step being taken
            lr = lr_at(step, cfg, budget)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # the whole global batch's examples are made on every process, so they do not depend on the process count
            examples = task.examples(next(batches), seed=cfg.seed * 1_000_003 + step)
            micro = process_micro_batches(examples, accelerator.num_processes, accelerator.process_index,
                                          budget.micro_batch_size)
            sums = torch.zeros(3, device=accelerator.device)  # loss, ce, kd summed over micro-steps
            for m, batch in enumerate(micro):
                batch = on_device(batch, accelerator.device)
                batch, teacher_batch = encoder_states.inputs(batch) if encoder_states else (batch, batch)
                # gradients are all-reduced once per optimizer step, on the last micro-step
                with accelerator.no_sync(model) if m < len(micro) - 1 else contextlib.nullcontext():
                    with accelerator.autocast():  # the teacher too: a bf16 teacher is handed float32 features
                        loss, parts = objective(model, batch, teacher, obj.distill_weight, obj.temperature,
                                                teacher_batch)
                    accelerator.backward(loss / len(micro))
                sums += torch.stack([loss.detach(), parts["ce"], parts.get("kd", torch.zeros_like(parts["ce"]))])
            # every parameter goes in (frozen ones have no grad): under FSDP, accelerate clips only a whole model's list
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm else None
            loss_value, ce, kd = (accelerator.reduce(sums, reduction="mean") / len(micro)).tolist()
            if not math.isfinite(loss_value):
                last = latest_checkpoint(out)
                raise UptrainError(f"loss is {loss_value} at step {step + 1}; stopped. Last good checkpoint: "
                                   f"{last if last else 'none'}. Lower train.lr or raise train.warmup_fraction and "
                                   "use a new output.dir")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.update(step=step + 1, tokens=state["tokens"] + budget.tokens_per_step, loss=loss_value)
            window_steps += 1

            done = state["step"] == budget.steps
            evaluate = bool(blocks.heldout) and (state["step"] % recipe.output.eval_every == 0 or done)
            if state["step"] % recipe.output.log_every == 0 or done or evaluate:
                now = time.perf_counter()
                tps = window_steps * budget.tokens_per_step / (now - window_start)
                record = {"loss": loss_value, "ce": ce, "lr": lr, "tokens": state["tokens"], "tokens_per_s": tps}
                if teacher is not None:
                    record["kd"] = kd
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                eval_seconds = 0.0
                if evaluate:
                    state["heldout_loss"] = evaluate_heldout(model, blocks.heldout, budget.micro_batch_size,
                                                             accelerator.device)
                    record["heldout_loss"] = state["heldout_loss"]
                    eval_seconds = time.perf_counter() - now
                log.log(state["step"], record)
                log.progress(window_steps, loss_value, lr, tps)
                # the next window counts this logging (and any checkpoint save) but not the held-out evaluation
                window_start, window_steps = now + eval_seconds, 0
            if state["step"] % recipe.output.save_every == 0 or done:
                check_weights_finite(model, accelerator, state["step"], latest_checkpoint(out))
                save_checkpoint(accelerator, out, state, recipe.output.keep_last)
            if stop_after is not None and state["step"] >= stop_after and not done:
                log.close()
                return None
    log.close()
    if trackers:
        accelerator.end_training()

    # 6. Save the uptrained model.
    final = save_output(accelerator, model, tokenizer, recipe, state, student, task.name)
    if recipe.output.push_to_hub and accelerator.is_main_process:
        url = push_folder(final, recipe.output.push_to_hub, recipe.output.private,
                          f"gqa-uptrain: {state['step']} steps", UptrainError)
        print(f"pushed: {url}", file=sys.stderr)
    return final
