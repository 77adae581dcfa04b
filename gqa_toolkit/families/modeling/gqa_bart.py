"""The BART family (bart, mbart, marian, and whisper, whose attention is BART's) with grouped-query attention: G
key/value heads shared by H query heads; the KV cache holds G heads.

Written by gqa-toolkit into every converted BART, mBART, Marian or Whisper directory, beside `gqa_attention.py` (the
shared core), and loaded from there with `AutoModelForSeq2SeqLM.from_pretrained(dir, trust_remote_code=True)`
(`AutoModelForSpeechSeq2Seq` for whisper). Imports torch and transformers only. `num_key_value_heads` (whisper:
`decoder_num_key_value_heads`) counts the decoder's self-attention K/V heads, `cross_num_key_value_heads` its
cross-attention's (None: the decoder's count, as outputs written before it existed have), both held by the KV cache;
`encoder_num_key_value_heads` the encoder's (None: MHA). `k_proj` and `v_proj` are `[G*hd, d]`
(head-major); query head h uses KV head h // (H/G).
"""

from __future__ import annotations

from torch import nn
from transformers import BartConfig, MarianConfig, MBartConfig, WhisperConfig
from transformers.models.bart.modeling_bart import BartAttention, BartForConditionalGeneration
from transformers.models.marian.modeling_marian import MarianAttention, MarianMTModel
from transformers.models.mbart.modeling_mbart import MBartAttention, MBartForConditionalGeneration
from transformers.models.whisper.modeling_whisper import WhisperAttention, WhisperForConditionalGeneration

from .gqa_attention import GroupedAttention, GroupedModel


class _EncoderKVHeads:
    encoder_num_key_value_heads: int | None = None  # encoder self-attention; None: MHA
    cross_num_key_value_heads: int | None = None  # decoder cross-attention; None: as the decoder's self-attention


class _KVHeads(_EncoderKVHeads):
    num_key_value_heads: int | None = None  # decoder self-attention (and cross-attention, unless set); None: MHA


class GQABartConfig(_KVHeads, BartConfig):
    model_type = "gqa_bart"


class GQAMBartConfig(_KVHeads, MBartConfig):
    model_type = "gqa_mbart"


class GQAMarianConfig(_KVHeads, MarianConfig):
    model_type = "gqa_marian"


class GQAWhisperConfig(_EncoderKVHeads, WhisperConfig):
    model_type = "gqa_whisper"
    # WhisperConfig maps `num_key_value_heads` to the encoder's query heads, so the decoder's count has its own name
    decoder_num_key_value_heads: int | None = None  # decoder self-attention (and cross, unless set); None: MHA


class _Grouped:
    """The family's attention with G K/V heads; put before GroupedAttention and the stock attention class."""

    key_bias = True  # whisper's k_proj has none, while its q, v and out projections do
    scale_queries_first = False  # whisper scales the projected queries, then attends with scaling 1, as stock does

    def __init__(self, embed_dim, num_heads, dropout=0.0, is_decoder=False, bias=True, is_causal=False, config=None,
                 layer_idx=None, num_key_value_heads=None):
        super().__init__(embed_dim, num_heads, dropout=dropout, is_decoder=is_decoder, bias=bias, is_causal=is_causal,
                         config=config, layer_idx=layer_idx)
        kv_dim = self.group_heads(num_heads, num_key_value_heads, self.head_dim)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias and self.key_bias)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias)

    def attend(self, hidden_states, key_value_states=None, cache=None, attention_mask=None, output_attentions=False,
               **kwargs):  # output_attentions (whisper's): the weights are returned either way
        query, scaling = self.q_proj(hidden_states), self.scaling
        if self.scale_queries_first:
            query, scaling = query * scaling, 1.0
        query = self.split_heads(query)  # (B, H, T, hd)
        states = hidden_states if key_value_states is None else key_value_states
        key, value = self.cached_kv(cache, lambda: (self.split_heads(self.k_proj(states)),
                                                    self.split_heads(self.v_proj(states))),
                                    cross=key_value_states is not None)  # (B, G, S, hd)
        out, weights = self.grouped_attention(query, key, value, attention_mask, scaling=scaling,
                                              dropout=self.dropout, **kwargs)
        return self.out_proj(out), weights


class GQABartAttention(_Grouped, GroupedAttention, BartAttention):
    pass


class GQAMBartAttention(_Grouped, GroupedAttention, MBartAttention):
    pass


class GQAMarianAttention(_Grouped, GroupedAttention, MarianAttention):
    pass


class GQAWhisperAttention(_Grouped, GroupedAttention, WhisperAttention):
    key_bias, scale_queries_first = False, True


class _GroupedModel(GroupedModel):
    """Every attention of the encoder-decoder with its own G: the encoder's, the decoder's and the cross-attention's
    (the decoder's G unless the conversion gave it its own)."""

    decoder_kv_heads_attr = "num_key_value_heads"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        decoder = (cls.decoder_kv_heads_attr,)
        cls.gqa_swaps = (("model.encoder.layers", "self_attn", ("encoder_num_key_value_heads",)),
                         ("model.decoder.layers", "self_attn", decoder),
                         ("model.decoder.layers", "encoder_attn", ("cross_num_key_value_heads", *decoder)))

    def grouped(self, attn, num_key_value_heads, layer_idx):
        return self.gqa_attention(attn.embed_dim, attn.num_heads, dropout=attn.dropout, is_decoder=attn.is_decoder,
                                  bias=attn.q_proj.bias is not None, is_causal=attn.is_causal, config=self.config,
                                  layer_idx=attn.layer_idx, num_key_value_heads=num_key_value_heads)


class GQABartForConditionalGeneration(_GroupedModel, BartForConditionalGeneration):
    config_class, gqa_attention = GQABartConfig, GQABartAttention


class GQAMBartForConditionalGeneration(_GroupedModel, MBartForConditionalGeneration):
    config_class, gqa_attention = GQAMBartConfig, GQAMBartAttention


class GQAMarianMTModel(_GroupedModel, MarianMTModel):
    config_class, gqa_attention = GQAMarianConfig, GQAMarianAttention


class GQAWhisperForConditionalGeneration(_GroupedModel, WhisperForConditionalGeneration):
    config_class, gqa_attention = GQAWhisperConfig, GQAWhisperAttention
    decoder_kv_heads_attr = "decoder_num_key_value_heads"


# save_pretrained copies this file (and the core it imports) next to the weights and writes auto_map, so saved
# checkpoints (after uptraining, say) load with trust_remote_code=True just as converted ones do.
for _config, _model, _auto in ((GQABartConfig, GQABartForConditionalGeneration, "AutoModelForSeq2SeqLM"),
                               (GQAMBartConfig, GQAMBartForConditionalGeneration, "AutoModelForSeq2SeqLM"),
                               (GQAMarianConfig, GQAMarianMTModel, "AutoModelForSeq2SeqLM"),
                               (GQAWhisperConfig, GQAWhisperForConditionalGeneration, "AutoModelForSpeechSeq2Seq")):
    _config.register_for_auto_class()
    _model.register_for_auto_class(_auto)
