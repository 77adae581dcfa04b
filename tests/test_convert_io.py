"""Checkpoint formats and method properties: sharding, .bin input, dtypes, random seeds, GQA sources, metadata."""

import json

import torch
from conftest import load_model, logits, read_config, save_tiny_model
from families import BASE
from safetensors import safe_open

from gqa_toolkit.convert import convert_checkpoint


def _tensors(model_dir):
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_sharded_input_gives_sharded_output_with_index(tmp_path):
    src = save_tiny_model(tmp_path / "src", "llama", BASE, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").is_file()
    out = convert_checkpoint(src, tmp_path / "out", groups=2, progress=False)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert all(name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _tensors(out).values())
    largest_source = max(p.stat().st_size for p in src.glob("*.safetensors"))
    assert max(p.stat().st_size for p in out.glob("*.safetensors")) <= largest_source
    load_model(out)


def test_max_shard_size_option(llama_dir, tmp_path):
    out = convert_checkpoint(llama_dir, tmp_path / "out", groups=2, max_shard_size="50KB", progress=False)
    shards = list(out.glob("*.safetensors"))
    assert len(shards) >= 4
    torch.testing.assert_close(logits(load_model(out)),
                               logits(load_model(convert_checkpoint(llama_dir, tmp_path / "one", groups=2,
                                                                    progress=False))), rtol=0, atol=0)


def test_bin_input_converts_like_safetensors(llama_dir, tmp_path):
    src = tmp_path / "bin_src"
    src.mkdir()
    (src / "config.json").write_text((llama_dir / "config.json").read_text())
    torch.save(_tensors(llama_dir), src / "pytorch_model.bin")
    from_bin = convert_checkpoint(src, tmp_path / "a", groups=2, progress=False)
    from_safetensors = convert_checkpoint(llama_dir, tmp_path / "b", groups=2, progress=False)
    a, b = _tensors(from_bin), _tensors(from_safetensors)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_is_kept_and_can_be_changed(tmp_path):
    src = save_tiny_model(tmp_path / "src", "llama", BASE, dtype=torch.bfloat16)
    kept = convert_checkpoint(src, tmp_path / "kept", groups=2, progress=False)
    assert {t.dtype for t in _tensors(kept).values()} == {torch.bfloat16}
    # pooling ran in float32: the bf16 result is the rounded float32 mean, not a bf16 running sum
    k = _tensors(src)["model.layers.0.self_attn.k_proj.weight"].float().view(2, 2, 16, 64).mean(1)
    torch.testing.assert_close(_tensors(kept)["model.layers.0.self_attn.k_proj.weight"],
                               k.reshape(32, 64).to(torch.bfloat16), rtol=0, atol=0)

    halved = convert_checkpoint(src, tmp_path / "f16", groups=2, dtype="float16", progress=False)
    assert {t.dtype for t in _tensors(halved).values()} == {torch.float16}
    assert read_config(halved)["dtype"] == "float16"
    assert load_model(halved).dtype == torch.float16


def test_random_is_reproducible_by_seed_and_differs_across_seeds(llama_dir, tmp_path):
    a = _tensors(convert_checkpoint(llama_dir, tmp_path / "a", method="random", groups=2, seed=1, progress=False))
    b = _tensors(convert_checkpoint(llama_dir, tmp_path / "b", method="random", groups=2, seed=1, progress=False))
    c = _tensors(convert_checkpoint(llama_dir, tmp_path / "c", method="random", groups=2, seed=2, progress=False))
    source = _tensors(llama_dir)
    key = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
    assert abs(a[key].std().item() - read_config(llama_dir)["initializer_range"]) < 0.005
    assert not torch.equal(a[key], source[key].view(2, 2, 16, 64).mean(1).reshape(32, 64))
    # everything that is not K/V is untouched
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(a[q], source[q])


def test_gqa_source_converts_to_fewer_groups(tmp_path):
    src = save_tiny_model(tmp_path / "src", "llama", {**BASE, "num_attention_heads": 8, "num_key_value_heads": 4,
                                                      "head_dim": 8})
    out = convert_checkpoint(src, tmp_path / "out", groups=2, progress=False)
    assert read_config(out)["num_key_value_heads"] == 2
    assert read_config(out)["gqa_conversion"]["source_kv_heads"] == 4
    model = load_model(out)
    # source KV head j goes to group j // 2
    k_src = _tensors(src)["model.layers.0.self_attn.k_proj.weight"].view(4, 8, 64)
    k_out = model.model.layers[0].self_attn.k_proj.weight.view(2, 8, 64)
    torch.testing.assert_close(k_out, k_src.view(2, 2, 8, 64).mean(1))


def test_output_records_its_provenance_and_copies_other_files(llama_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in llama_dir.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    (src / "tokenizer.json").write_text('{"fake": true}')
    (src / "README.md").write_text("source card")
    out = convert_checkpoint(src, groups=1, method="first", seed=3, progress=False)
    assert out == tmp_path / "src-gqa1-first"
    record = read_config(out)["gqa_conversion"]
    assert record["method"] == "first" and record["groups"] == 1 and record["source"] == str(src.resolve())
    assert record["source_kv_heads"] == 4 and record["seed"] == 3 and record["toolkit_version"]
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    assert (out / "generation_config.json").is_file()
    card = (out / "README.md").read_text()
    assert "4 -> 1" in card and "`first`" in card


def test_default_output_names_the_options(llama_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in llama_dir.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    plain = convert_checkpoint(src, groups=2, progress=False)
    normed = convert_checkpoint(src, groups=2, preserve_norm=True, progress=False)
    assert plain.name == "src-gqa2-mean" and normed.name == "src-gqa2-mean-norm"
    assert read_config(normed)["gqa_conversion"]["preserve_norm"] is True
