"""Random miniature model components for tests and examples, built offline: T5, CLIP and Qwen3
encoders with in-memory tokenizers (Qwen's byte-level BPE with its chat template), the 16-channel
VAE with an 8x downscale, a two-layer MMDiT, a flow-matching scheduler.
Public API for plugin authors (tuner's own Chroma and Flux miniatures are built from these)."""

from __future__ import annotations

# Words the miniature tokenizers know; any other word becomes <unk> (T5) or is spelled out (CLIP).
VOCABULARY = (
    "a an the of on in with and photo picture drawing image small big large tiny "
    "red green blue yellow orange purple white black gray pink brown cyan "
    "circle square triangle ring cross stripe stripes dot dots shape shapes "
    "background centered left right top bottom corner two three several bright dark "
    "cat dog tree house sky sun moon flower car person face blurry sharp detailed"
).split()

TEXT_WIDTH = 32  # d_model of the miniature T5 and CLIP: the transformers' joint/pooled dims


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word, -float(i + 1)) for i, word in enumerate(VOCABULARY)]
    return T5Tokenizer(vocab=pieces)


def t5_encoder(vocab_size: int, width: int = TEXT_WIDTH):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=width,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def clip_tokenizer():
    """A byte-pair CLIP tokenizer over single letters plus whole-word merges for VOCABULARY."""
    import string

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in VOCABULARY:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if (parts[0], parts[1]) not in merges:
                merges.append((parts[0], parts[1]))
            vocab.setdefault(merged, len(vocab))
            parts = [merged, *parts[2:]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def clip_encoder(vocab_size: int, with_projection: bool = False, width: int = TEXT_WIDTH):
    """A one-layer CLIP text encoder; ``with_projection`` gives ``CLIPTextModelWithProjection``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=width,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def mmdit(joint_attention_dim: int = TEXT_WIDTH, pooled_projection_dim: int = TEXT_WIDTH):
    """A two-layer MMDiT (diffusers' ``SD3Transformer2DModel``) over the VAE's 16 latent channels."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=32,
        pooled_projection_dim=pooled_projection_dim,
        out_channels=16,
        pos_embed_max_size=32,
    )


def scheduler():
    """The Flux/Chroma inference scheduler: resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


# Qwen's chat format (Qwen2.5 and Qwen3): what the Flux.2 klein and Qwen-Image pipelines feed their
# encoders; ``enable_thinking=False`` adds Qwen3's empty thinking block, as the real template does.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character per byte (what Qwen's BPE runs on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def qwen_tokenizer(extra_words: tuple[str, ...] | list[str] = ()):
    """A byte-level BPE tokenizer in Qwen's format (``Qwen2TokenizerFast``): every byte, merges
    learned (``tokenizers``' BPE trainer) on VOCABULARY and ``extra_words`` with and without a
    leading space, so each is one token either way, as in Qwen's real vocabulary; the chat special
    tokens and :data:`QWEN_CHAT_TEMPLATE`. Any text tokenizes."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    words = list(dict.fromkeys([*VOCABULARY, *extra_words]))
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=100_000, initial_alphabet=_byte_alphabet(), show_progress=False)
    learner.train_from_iterator([*words, *(" " + w for w in words)], trainer)
    learned = json.loads(learner.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tokenizer = Qwen2TokenizerFast(vocab=learned["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL[1:])})
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def qwen3_encoder(vocab_size: int, width: int = 16, layers: int = 27):
    """A narrow ``Qwen3ForCausalLM``; deep enough by default for the hidden states Flux.2 klein's
    pipeline stacks (layers 9, 18 and 27)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**narrow_decoder(vocab_size, width, layers, 512), tie_word_embeddings=True))


def narrow_decoder(vocab_size: int, width: int, layers: int, positions: int = 1024) -> dict:
    """The config of a narrow decoder-only text model (Qwen, Mistral): two heads sharing one key/value
    head of width 8, an MLP twice the width."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "max_position_embeddings": positions,
    }


# Mistral's chat format (Mistral Small 3.1's template, text parts only): what Flux.2 dev's pipeline
# feeds its encoder (a system message and the prompt)
MISTRAL_CHAT_TEMPLATE = (
    "<s>{% for message in messages %}{% set text = message['content'] if message['content'] is string "
    "else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]{% else %}{{ text }}</s>{% endif %}{% endfor %}"
)


def mistral_tokenizer():
    """The byte-level tokenizer of :func:`qwen_tokenizer` with Mistral's control tokens and
    :data:`MISTRAL_CHAT_TEMPLATE`: what Flux.2 dev's text-only encoding asks of its processor
    (``apply_chat_template``). The real model's ``PixtralProcessor`` wraps such a tokenizer with an
    image processor, which needs torchvision; text-only prompts never reach it."""
    tokenizer = qwen_tokenizer()
    control = ["<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    tokenizer.add_special_tokens({"additional_special_tokens": control})
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def mistral3_encoder(vocab_size: int, width: int = 16, layers: int = 30):
    """A narrow ``Mistral3ForConditionalGeneration`` (a one-layer Pixtral vision tower); deep enough
    by default for the hidden states Flux.2 dev's pipeline stacks (layers 10, 20 and 30)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text = MistralConfig(**narrow_decoder(vocab_size, width, layers))
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16
    )
    return Mistral3ForConditionalGeneration(
        Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=1)
    )
