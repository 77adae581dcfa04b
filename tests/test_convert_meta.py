"""A 70B-shaped conversion planned and produced on the meta device: output shapes checked with no memory."""

import torch

from gqa_toolkit.families.geometry import Geometry
from gqa_toolkit.families.spec import spec_for
from gqa_toolkit.convert.io.tensors import SourceTensor
from gqa_toolkit.convert.methods.unit import UnitConversion
from gqa_toolkit.convert.plan.planner import plan_conversion
from gqa_toolkit.convert.run import run_conversion


class ShapeWriter:
    """Records what the conversion loop hands the writer: every tensor checked against its planned dtype and
    shape, on the meta device."""

    def __init__(self, planned):
        self.planned, self.written = {t.name: t for t in planned}, {}

    def copy_unchanged(self):
        self.written.update({n: None for n, t in self.planned.items() if t.copy_from is not None})

    def put(self, name, data):
        assert name not in self.written, name
        self.written[name] = (data.device.type, tuple(data.shape))


def converted_shapes(sources, read, spec, geometry, groups, how, **plan_options) -> dict:
    """Plan and run a conversion on the meta device; name -> planned shape, with every tensor handed over once."""
    plan = plan_conversion(sources, spec, geometry, groups, **plan_options)
    writer = ShapeWriter(plan.outputs)
    run_conversion(plan, read, writer, how)
    assert set(writer.written) == {t.name for t in plan.outputs}
    for t in plan.outputs:
        if writer.written[t.name] is not None:
            assert writer.written[t.name] == ("meta", t.shape), t.name
    return {t.name: t.shape for t in plan.outputs}


def _llama_65b_shapes(layers=80, d=8192, heads=64, ffn=22016, vocab=32000):
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (d, d),
                       p + "self_attn.v_proj.weight": (d, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "mlp.gate_proj.weight": (ffn, d), p + "mlp.up_proj.weight": (ffn, d),
                       p + "mlp.down_proj.weight": (d, ffn), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    return shapes


def test_70b_shaped_mha_to_gqa8_on_meta():
    shapes = _llama_65b_shapes()
    sources = {name: SourceTensor(torch.bfloat16, shape) for name, shape in shapes.items()}
    geometry = Geometry(num_layers=80, heads=64, kv_heads=64, head_dim=128, init_std=0.02)

    def read(name):
        return torch.empty(shapes[name], dtype=torch.bfloat16, device="meta")

    for method in ("mean", "first", "random"):
        out = converted_shapes(sources, read, spec_for("llama"), geometry, 8, UnitConversion(method))
        assert list(out) == list(shapes)
        for name, shape in out.items():
            expected = (8 * 128, 8192) if name.endswith(("k_proj.weight", "v_proj.weight")) else shapes[name]
            assert shape == expected, name
    params = sum(torch.Size(shape).numel() for shape in out.values())
    source_params = sum(torch.Size(s).numel() for s in shapes.values())
    assert source_params - params == 80 * 2 * (8192 * 8192) * 7 // 8  # 7/8 of every K/V projection is gone
