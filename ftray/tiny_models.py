"""Tiny random-weight models built from configs, with no downloads: for the tests and for the CPU bench's
vision-language rows (where no real VLM is reachable).

- `build_tiny_tokenizer`: byte-level BPE, vocab ~1000, trained on the bundled train files, ChatML template.
- `build_tiny_model(path)`: that tokenizer and a seeded random 2-layer Llama (hidden 64).
- `build_tiny_llava(path)` / `build_tiny_idefics3(path)`: a 2-layer vision tower (hidden 32, 32×32 images,
  8×8 patches) with the same Llama and tokenizer plus image tokens, saved with a processor whose chat
  template renders image parts, so `AutoProcessor` / `AutoModelForImageTextToText` load them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from ftray.data import bundled

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]


def _bundled_texts() -> list[str]:
    texts = ["system", "user", "assistant", "Classify the topic:", "Options:", "The answer is"]
    for name in ("arithmetic", "classification", "factual_edits", "factual_qa"):  # fixed: new sets must not change the tokenizer
        with open(bundled.path(name, "train"), encoding="utf-8") as f:
            for line in f:
                texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    return texts


def build_tiny_tokenizer(vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the bundled train files, with a ChatML chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_bundled_texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(path: Path) -> Path:
    """Save the tiny tokenizer and a seeded random 2-layer Llama (hidden 64, 4 heads, 2 kv heads) to `path`."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ChatML with image parts: {type: image} renders the processor's "<image>" placeholder.
VLM_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IMAGE_SIZE, PATCH = 32, 8


def _text_config(tokenizer) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)


def build_tiny_llava(path: Path) -> Path:
    """A seeded random LLaVA (2-layer CLIP tower → 2-layer MLP projector → 2-layer Llama) and its processor."""
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=_text_config(tok), image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=VLM_TEMPLATE).save_pretrained(path)
    return Path(path)


def build_tiny_idefics3(path: Path) -> Path:
    """A seeded random Idefics3 (2-layer SigLIP-style tower → pixel-shuffle connector → 2-layer Llama), no image splitting."""
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<fake_token_around_image>", "<global-img>"]})
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=IMAGE_SIZE, patch_size=PATCH)
    config = Idefics3Config(vision_config=vision, text_config=_text_config(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                            scale_factor=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(config).save_pretrained(path)
    images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                                       max_image_size={"longest_edge": IMAGE_SIZE})
    seq_len = (IMAGE_SIZE // PATCH) ** 2 // 2**2  # patches per image after the connector's 2×2 pixel shuffle
    Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=seq_len, chat_template=VLM_TEMPLATE).save_pretrained(path)
    return Path(path)
