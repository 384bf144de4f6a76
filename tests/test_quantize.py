import pytest
import torch

from lieq_export.evaluate import compare, perplexity
from lieq_export.models import describe
from lieq_export.plan import BitPlan
from lieq_export.quantize import CheckpointError, fake_quantize, load_checkpoint, quantize_model, save_checkpoint
from tests.conftest import tiny_model


def _tokenizer(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fake_quant_applies_plan_and_leaves_original(arch):
    m = tiny_model(arch, layers=4)
    lay = describe(m)
    plan = BitPlan((2, 3, 4, 8), 32, embed_bits=8, lm_head_bits=4)
    qw = quantize_model(m, plan, progress=False)
    assert set(qw) == {s.path for s in lay.linears()} | {"model.embed_tokens", "lm_head"}
    assert qw["model.layers.0.self_attn.q_proj"].bits == 2
    assert qw["model.layers.3.mlp.down_proj"].group_size == lay.layers[3].linears[-1].in_features  # 8-bit: per channel
    before = m.model.layers[0].self_attn.q_proj.weight.clone()
    ref = fake_quantize(m, qw)
    assert torch.equal(m.model.layers[0].self_attn.q_proj.weight, before)
    torch.testing.assert_close(ref.model.layers[0].self_attn.q_proj.weight, qw["model.layers.0.self_attn.q_proj"].dequantize())
    # tied weights got different widths, so the reference must keep them apart
    torch.testing.assert_close(ref.lm_head.weight, qw["lm_head"].dequantize())
    torch.testing.assert_close(ref.model.embed_tokens.weight, qw["model.embed_tokens"].dequantize())


def test_more_bits_closer_to_float():
    m = tiny_model("llama", layers=3)
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    kls = []
    for bits in (2, 4, 8):
        ref = fake_quantize(m, quantize_model(m, BitPlan.uniform(describe(m), bits, 32), progress=False))
        res = compare(ref, m, windows, progress=False)
        kls.append(res["kl"])
        # per-window mean NLLs: equal-length windows, so their mean is log PPL
        assert len(res["window_nll"]) == 2
        assert sum(res["window_nll"]) / 2 == pytest.approx(torch.tensor(res["ppl"]).log().item(), rel=1e-6)
        assert res["window_nll"][0] != pytest.approx(res["window_nll"][1])
    assert kls[0] > kls[1] > kls[2] >= 0
    assert perplexity(m, windows, progress=False) > 1


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
    m = tiny_model("qwen3", layers=3)
    plan = BitPlan((2, 4, 8), 32, embed_bits=4, lm_head_bits=8)
    qw = quantize_model(m, plan, progress=False)
    save_checkpoint(tmp_path / "ckpt", m, _tokenizer(tmp_path), plan, qw)
    ref, tok, plan2, qw2 = load_checkpoint(tmp_path / "ckpt")
    assert plan2 == plan
    assert set(qw2) == set(qw) and all(qw[k].equal(qw2[k]) for k in qw)
    expect = fake_quantize(m, qw)
    for (name, a), (_, b) in zip(sorted(expect.state_dict().items()), sorted(ref.state_dict().items())):
        assert torch.equal(a, b), name
    x = torch.tensor([[3, 5, 7, 9]])
    assert torch.equal(ref(x).logits, expect(x).logits)
    assert not list((tmp_path).glob(".ckpt*"))  # no temporary folder left behind


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is not a lieq-export checkpoint"):
        load_checkpoint(tmp_path)
