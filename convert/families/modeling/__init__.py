"""GQA modeling code for families whose transformers modeling has no KV-head count: t5, bart, mbart, marian,
whisper, bloom, gpt2, gpt_neox, gptj, opt.

Each `gqa_<family>.py` imports only torch, transformers and the shared attention core `gqa_attention.py`, because
the converter copies both files into every output directory for `trust_remote_code=True` loading. Importing this package registers the classes with the Auto
classes, so the process then loads converted checkpoints without `trust_remote_code`; `convert_checkpoint` imports
it for these families. It is not imported by `gqa_toolkit.convert` itself: it pulls in transformers' modeling
stacks (about 4 s), which converting any other family does not need.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq

from .gqa_bart import (GQABartConfig, GQABartForConditionalGeneration, GQAMarianConfig, GQAMarianMTModel,
                       GQAMBartConfig, GQAMBartForConditionalGeneration, GQAWhisperConfig,
                       GQAWhisperForConditionalGeneration)
from .gqa_bloom import GQABloomConfig, GQABloomForCausalLM
from .gqa_gpt2 import GQAGPT2Config, GQAGPT2LMHeadModel
from .gqa_gpt_neox import GQAGPTNeoXConfig, GQAGPTNeoXForCausalLM
from .gqa_gptj import GQAGPTJConfig, GQAGPTJForCausalLM
from .gqa_opt import GQAOPTConfig, GQAOPTForCausalLM
from .gqa_t5 import GQAT5Config, GQAT5ForConditionalGeneration

REGISTERED = (
    (GQABartConfig, AutoModelForSeq2SeqLM, GQABartForConditionalGeneration),
    (GQAMBartConfig, AutoModelForSeq2SeqLM, GQAMBartForConditionalGeneration),
    (GQAMarianConfig, AutoModelForSeq2SeqLM, GQAMarianMTModel),
    (GQAWhisperConfig, AutoModelForSpeechSeq2Seq, GQAWhisperForConditionalGeneration),
    (GQABloomConfig, AutoModelForCausalLM, GQABloomForCausalLM),
    (GQAGPT2Config, AutoModelForCausalLM, GQAGPT2LMHeadModel),
    (GQAGPTNeoXConfig, AutoModelForCausalLM, GQAGPTNeoXForCausalLM),
    (GQAGPTJConfig, AutoModelForCausalLM, GQAGPTJForCausalLM),
    (GQAOPTConfig, AutoModelForCausalLM, GQAOPTForCausalLM),
    (GQAT5Config, AutoModelForSeq2SeqLM, GQAT5ForConditionalGeneration),
)


def register() -> None:
    for config_class, auto_class, model_class in REGISTERED:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        auto_class.register(config_class, model_class, exist_ok=True)


register()
