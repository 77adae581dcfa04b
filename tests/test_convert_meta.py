"""A 70B-shaped conversion planned and produced on the meta device: output shapes checked with no memory."""

import torch

from gqa_toolkit.convert.families.geometry import Geometry
from gqa_toolkit.convert.families.spec import spec_for
from gqa_toolkit.convert.io.tensors import SourceTensor
from gqa_toolkit.convert.methods.registry import get_method
from gqa_toolkit.convert.plan.checkpoint import plan_conversion
from gqa_toolkit.convert.plan.settings import ConversionSettings


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
        settings = ConversionSettings(method=get_method(method), groups=8)
        planned = plan_conversion(sources, read, spec_for("llama"), geometry, settings)
        assert [t.name for t in planned] == list(shapes)
        for t in planned:
            produced = t.produce()
            assert produced.device.type == "meta" and produced.dtype == torch.bfloat16
            assert tuple(produced.shape) == t.shape
            expected = (8 * 128, 8192) if t.name.endswith(("k_proj.weight", "v_proj.weight")) else shapes[t.name]
            assert t.shape == expected, t.name
    params = sum(torch.Size(t.shape).numel() for t in planned)
    source_params = sum(torch.Size(s).numel() for s in shapes.values())
    assert source_params - params == 80 * 2 * (8192 * 8192) * 7 // 8  # 7/8 of every K/V projection is gone
