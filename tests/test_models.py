import math

import pytest
import torch

from lieq_export.evaluate import perplexity
from lieq_export.models import ModelError, describe, load_model
from lieq_export.text import load_windows
from tests.conftest import tiny_model


@pytest.mark.parametrize("arch,qk_norm", [("llama", False), ("qwen3", True)])
def test_adapter_on_tiny_models(arch, qk_norm):
    m = tiny_model(arch, layers=3, hidden=64)
    lay = describe(m)
    assert lay.architecture == {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    assert lay.num_layers == 3 and lay.qk_norm == qk_norm and lay.tied
    names = [l.name for l in lay.layers[0].linears]
    assert names == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for spec in lay.linears():
        mod = m.get_submodule(spec.path)
        assert mod.weight.shape == (spec.out_features, spec.in_features)
    counted = lay.decoder_linear_params + lay.embed.params
    norms = sum(p.numel() for n, p in m.named_parameters() if "norm" in n)
    assert counted + norms == lay.total_params


def test_unsupported_architecture_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ModelError, match="GPT2LMHeadModel is not supported; lieq-export handles LlamaForCausalLM, Qwen3ForCausalLM"):
        describe(m)


def test_local_directory_loads(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    m = tiny_model("qwen3")
    m.save_pretrained(tmp_path)
    vocab = {chr(97 + i): i for i in range(26)} | {"<unk>": 26}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path)
    loaded, tokenizer = load_model(str(tmp_path))
    assert describe(loaded).architecture == "Qwen3ForCausalLM"
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded(x).logits, m(x).logits)
    assert tokenizer("abc")["input_ids"] == [0, 1, 2]


def test_bad_model_specs(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelError, match="GGUF file .* does not exist"):
        load_model(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelError, match="not found: give a built-in name"):
        load_model("no-such-model")


def test_smollm2_loads_with_expected_shape_and_finite_perplexity(smollm2):
    model, tok = smollm2
    lay = describe(model)
    assert lay.architecture == "LlamaForCausalLM"
    assert lay.num_layers == 30
    assert lay.total_params == 134_515_008
    assert lay.tied
    _, ev = load_windows(tok, "pydoc", 0, 2, seq_len=128)
    ppl = perplexity(model, ev, progress=False)
    assert math.isfinite(ppl) and 1 < ppl < 200
