"""A converted whisper's frozen encoder: `trainable: converted` trains only the attention the conversion changed
(the decoder's), and a training step that shares the encoder's states between student and teacher (and caches
them across steps) gives the loss and gradients of the plain step through the stock model forward."""

from __future__ import annotations

import pytest
import torch

from gqa_toolkit.convert import convert_checkpoint
from gqa_toolkit.uptrain.encoder_states import EncoderStates
from gqa_toolkit.uptrain.errors import UptrainError
from conftest import toolkit_dir
from conftest import toolkit_model as load_model
from gqa_toolkit.uptrain.model import load_teacher
from gqa_toolkit.uptrain.objective import objective
from gqa_toolkit.uptrain.tasks import IGNORE, shift_right
from gqa_toolkit.uptrain.tiny import build_tiny_whisper
from gqa_toolkit.uptrain.trainable import resolve_trainable, select_trainable


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """{'source': a tiny MHA whisper, 'g2': its conversion to 2 KV heads at the default scope}."""
    root = tmp_path_factory.mktemp("encoder_states")
    source = build_tiny_whisper(root / "source")
    return {"source": source, "g2": convert_checkpoint(source, root / "g2", groups=2, method="mean", progress=False)}


def _attention_params(model, stack: str) -> set[str]:
    """Parameters of the modules transformers calls attention (WhisperAttention) under `stack`."""
    return {f"{prefix}.{n}" for prefix, module in model.named_modules()
            if type(module).__name__.endswith("Attention") and prefix.startswith(stack)
            for n, _ in module.named_parameters()}


def test_converted_trains_the_decoders_self_and_cross_attention_only(whisper):
    model = load_model(whisper["g2"])
    assert resolve_trainable(model.config, "auto") == "converted"
    chosen = set(select_trainable(model, "converted"))
    assert chosen == _attention_params(model, "model.decoder")
    assert any(".encoder_attn." in n for n in chosen) and any(".self_attn." in n for n in chosen)
    assert not [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("model.encoder.")]

    source = load_model(whisper["source"])
    assert resolve_trainable(source.config, "auto") == "attention"  # no conversion record
    with pytest.raises(UptrainError, match="trainable: converted needs the conversion record"):
        select_trainable(source, "converted")


def _batch(model, rows: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    config = model.config
    g = torch.Generator().manual_seed(seed)
    frames = 2 * config.max_source_positions  # whisper's conv stride 2: two frames per encoder position
    labels = torch.randint(0, config.vocab_size, (rows, 6), generator=g)
    labels[1, 4:] = IGNORE
    return {"input_features": torch.randn(rows, config.num_mel_bins, frames, generator=g), "labels": labels,
            "decoder_input_ids": shift_right(labels, config.decoder_start_token_id, config.pad_token_id or 0)}


def _step(model, batch, teacher, teacher_batch=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _ = objective(model, batch, teacher, 0.5, 2.0, teacher_batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_shared_and_cached_encoder_states_give_the_plain_steps_loss_and_gradients(whisper):
    teacher = load_teacher(toolkit_dir(whisper["source"]), load_model(whisper["g2"]).config, torch.float32)
    plain_model, shared_model = load_model(whisper["g2"]).train(), load_model(whisper["g2"]).train()
    for model in (plain_model, shared_model):
        select_trainable(model, "auto")
    batch = _batch(plain_model)
    plain_loss, plain_grads = _step(plain_model, batch, teacher)

    states = EncoderStates.for_run(shared_model, teacher, budget_mib=64)
    assert states is not None and states.share_with_teacher
    for calls in (1, 2):  # the first computes the states, the second reads them from the cache
        student_batch, teacher_batch = states.inputs(batch)
        assert "input_features" not in student_batch and teacher_batch is student_batch
        loss, grads = _step(shared_model, student_batch, teacher, teacher_batch)
        torch.testing.assert_close(loss, plain_loss)
        assert grads.keys() == plain_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], plain_grads[name], msg=name)
    assert (states.misses, states.hits) == (4, 4)


def test_no_sharing_when_the_encoder_trains_and_no_teacher_sharing_when_its_encoder_differs(whisper):
    model = load_model(whisper["g2"])
    select_trainable(model, "attention")  # the encoder's self-attention trains too
    assert EncoderStates.for_run(model, None, 64) is None

    select_trainable(model, "converted")
    teacher = load_teacher(toolkit_dir(whisper["source"]), model.config, torch.float32)
    with torch.no_grad():
        teacher.model.encoder.conv1.weight.add_(0.01)
    states = EncoderStates.for_run(model, teacher, budget_mib=0)
    assert not states.share_with_teacher
    batch = _batch(model)
    student_batch, teacher_batch = states.inputs(batch)
    assert teacher_batch is batch and "encoder_outputs" in student_batch
    assert states.hits == states.misses == 0  # budget 0: nothing kept
