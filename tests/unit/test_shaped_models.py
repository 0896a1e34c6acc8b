"""Random-weight models of published shapes (for throughput where real weights cannot travel)."""

from __future__ import annotations

import pytest
import torch

from mechmem.tiny import SHAPES, shaped_hf_model


def test_an_unknown_shape_is_refused_by_name():
    with pytest.raises(ValueError, match="llama-3.2-1b"):
        shaped_hf_model("llama-70b")


def test_a_shape_in_bfloat16_is_that_shape_and_a_seed_gives_the_same_weights():
    model, tokenizer = shaped_hf_model("smollm2-135m", dtype=torch.bfloat16)
    config = model.config
    expected = SHAPES["smollm2-135m"]
    assert config.num_hidden_layers == expected["num_hidden_layers"] == 30
    assert config.hidden_size == expected["hidden_size"] and config.head_dim == 64
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    again, _ = shaped_hf_model("smollm2-135m", dtype=torch.bfloat16)
    other, _ = shaped_hf_model("smollm2-135m", seed=1, dtype=torch.bfloat16)
    weight = "model.layers.7.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(model.state_dict()[weight], other.state_dict()[weight])
    assert model.config.pad_token_id == tokenizer.pad_token_id
