"""Tiny random-weight models of real architectures, built offline, for tests and benchmarks.

Every model shares one byte-level tokenizer (256 byte tokens plus ``<bos>``, ``<eos>``,
``<pad>``) that needs no training and no download, and has a small chat template.

Example:
    >>> model = tiny_model("llama")
    >>> model.cfg.n_layers, model.cfg.n_heads
    (3, 4)
"""

from __future__ import annotations

from typing import Literal

import torch
from transformer_lens.model_bridge import TransformerBridge

Architecture = Literal["llama", "gpt2", "gpt_neox", "qwen2"]
ARCHITECTURES: tuple[Architecture, ...] = ("llama", "gpt2", "gpt_neox", "qwen2")

_CHAT_TEMPLATE = (
    "{% for message in messages %}<bos>{{ message['role'] }}\n{{ message['content'] }}<eos>\n"
    "{% endfor %}{% if add_generation_prompt %}<bos>assistant\n{% endif %}"
)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is one token.

    It is saved once under the mechmem cache and loaded from there, because TransformerLens
    reloads tokenizers by their ``name_or_path``.

    Example:
        >>> tok = byte_tokenizer()
        >>> tok.decode(tok("hi").input_ids)
        'hi'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from mechmem.models import cache_dir

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    folder = cache_dir() / "tiny-byte-tokenizer"
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def _config(architecture: Architecture, vocab_size: int, special: dict[str, int]):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, **special)
    if architecture == "gpt2":
        return GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=512, **common)
    common.update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    if architecture == "llama":  # GQA: 2 key/value heads for 4 query heads, untied unembedding
        return LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if architecture == "qwen2":  # one key/value head, q/k/v biases, tied unembedding
        return Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True, **common)
    if architecture == "gpt_neox":  # parallel residual, rotary on half of each head
        return GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=True, **common)
    raise ValueError(f"Unknown tiny architecture {architecture!r}; choose from {ARCHITECTURES}.")


def tiny_hf_model(architecture: Architecture = "llama", *, seed: int = 0):
    """A random-weight HF causal LM of ``architecture`` and the byte tokenizer.

    Weights are drawn with std 0.2 (larger than the usual 0.02) so that the logits are far from
    uniform and greedy decoding is not dominated by ties.

    Example:
        >>> hf_model, tokenizer = tiny_hf_model("gpt2")
        >>> hf_model.config.n_layer
        3
    """
    from transformers import AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    special = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = _config(architecture, len(tokenizer), special)
    config.initializer_range = 0.2
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval(), tokenizer


def tiny_model(
    architecture: Architecture = "llama",
    *,
    seed: int = 0,
    device: str | None = "cpu",
    fast: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> TransformerBridge:
    """A tiny random-weight ``TransformerBridge`` of ``architecture`` (3 layers, d_model 64).

    ``fast`` is :func:`mechmem.load_model`'s switch (:mod:`mechmem.core.fastpath`); ``dtype`` the
    weights' (the fp32 weights cast, so a seed gives the same model in every dtype, rounded).

    Example:
        >>> tiny_model("gpt_neox").cfg.d_model
        64
    """
    from mechmem.models import bridge_from_hf

    hf_model, tokenizer = tiny_hf_model(architecture, seed=seed)
    return bridge_from_hf(hf_model.to(dtype), tokenizer, device=device, fast=fast)


# Published models' shapes (their configs' sizes; Llama 3.2's RoPE scaling is left out), for
# throughput measurements with random weights where real ones cannot travel (a GPU machine).
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        rope_theta=100000.0,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
}


def shaped_hf_model(
    shape: str = "smollm2-135m",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
):
    """A random-weight HF Llama of one of :data:`SHAPES` and the byte tokenizer. The same seed,
    dtype and device give the same weights; they are drawn on ``device`` (fast on a GPU).

    Its tokenizer is the byte tokenizer: ids above 258 decode to nothing.

    Example:
        >>> shaped_hf_model("llama-3.2-1b")[0].config.num_hidden_layers  # doctest: +SKIP
        16
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"shape: {shape!r} is not one of {sorted(SHAPES)}")
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    return model.eval(), tokenizer
