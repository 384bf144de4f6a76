"""ExecuTorch .pte export on tiny trained Llama / Qwen3 models with a mixed {2,3,4,8}-bit plan.

One export per architecture (module-scoped), shared by the checks: logits at every
position vs the PyTorch reference, identical greedy continuation, the C++ TextLLMRunner,
and the file size vs the manifest's prediction.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from conftest import tiny_config
from lieq_export.plan import BitPlan
from lieq_export.quant import quantize_rtn
from lieq_export.quantize import fake_quantize, quantize_model

pte = pytest.importorskip("lieq_export.backends.pte")

TEXT = (
    "the quick brown fox jumps over the lazy dog. "
    "a small model learns to repeat simple sentences. "
    "lieq export writes an executorch program for the phone. "
)
SEQ = 16


def make_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def trained_model(arch: str, tokenizer):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, layers=len(PLANS[arch].layer_bits), hidden=128, vocab=320)
    cfg.tie_word_embeddings = arch == "llama"  # one tied, one untied
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return fit_text(model, tokenizer, steps=60, lr=3e-3)


def fit_text(model, tokenizer, steps: int, lr: float, generator=None):
    """A few AdamW steps on TEXT, so tiny models have decisive logits (no near-ties)."""
    ids = torch.tensor(tokenizer(TEXT * 3)["input_ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 33, (8,), generator=generator)
        batch = torch.stack([ids[s:s + 33] for s in starts])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


PLANS = {
    # Llama: every width 2, 3, 4, 8; tied, 4-bit g32 embeddings, 8-bit lm_head.
    # Qwen3 (q/k norms, untied, 8-bit embeddings, 4-bit lm_head): two layers keep the
    # lowering time down (it grows with the number of XNNPACK partitions).
    "llama": BitPlan((2, 3, 4, 8), group_size=32, symmetric=True, embed_bits=4, lm_head_bits=8),
    "qwen3": BitPlan((3, 8), group_size=32, symmetric=True, embed_bits=8, lm_head_bits=4),
}


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def exported(request, tmp_path_factory):
    arch = request.param
    tmp = tmp_path_factory.mktemp(f"pte_{arch}")
    tokenizer = make_tokenizer(tmp)
    model = trained_model(arch, tokenizer)
    plan = PLANS[arch]
    qweights = quantize_model(model, plan, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = pte.export_pte(model, tokenizer, qweights, plan, tmp / "bundle", max_seq_len=64)
    ref = pte.runtime_reference(model, qweights, fake_quantize(model, qweights))
    ids = tokenizer("the quick brown fox jumps over")["input_ids"]
    return dict(arch=arch, bundle=tmp / "bundle", manifest=manifest, model=model, ref=ref, tokenizer=tokenizer,
                qweights=qweights, plan=plan, warnings=[str(w.message) for w in caught], prompt=ids)


def _ref_greedy(ref, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_logits_match_reference_every_position(exported):
    tok = exported["tokenizer"]
    ids = tok(TEXT)["input_ids"][:SEQ]
    assert len(ids) == SEQ
    with torch.no_grad():
        want = exported["ref"](torch.tensor([ids])).logits[0]
    m = pte.PteModel(exported["bundle"])
    got = m.logits_per_position(ids)  # decode path, one token at a time
    rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert rel.max() < 2e-2, rel
    m.reset()
    last = m.step(ids)  # prefill path, whole sequence at once
    assert (last - want[-1]).norm() / want[-1].norm() < 2e-2


def test_greedy_continuation_identical(exported):
    m = pte.PteModel(exported["bundle"])
    got = m.generate(exported["prompt"], SEQ)
    assert got == _ref_greedy(exported["ref"], exported["prompt"], SEQ)


def test_text_llm_runner_generates(exported):
    tok = exported["tokenizer"]
    prompt = "the quick brown fox jumps over"
    text = pte.runner_generate(exported["bundle"], prompt, max_new_tokens=8, temperature=0.0)
    assert text.strip()
    m = pte.PteModel(exported["bundle"])
    want = tok.decode(m.generate(tok(prompt)["input_ids"], 8))
    assert text.strip().startswith(want.strip()[:10])


def test_size_matches_manifest_prediction(exported):
    man = exported["manifest"]
    size = os.path.getsize(exported["bundle"] / "model.pte")
    assert man["pte_bytes"] == size
    assert abs(size - man["predicted_pte_bytes"]) / size < 0.15, (size, man["predicted_pte_bytes"])


def test_bundle_contents(exported):
    b = exported["bundle"]
    assert sorted(p.name for p in b.iterdir()) == ["manifest.json", "model.pte", "plan.json", "tokenizer.json"]
    man = json.loads((b / "manifest.json").read_text())
    assert BitPlan.from_json((b / "plan.json").read_text()) == exported["plan"]
    assert man["vocab_size"] == 320 and man["bos_id"] == 1 and 2 in man["eos_ids"]
    assert man["max_seq_len"] == 64
    assert [l["grid_bits"] for l in man["layers"]] == [[b] for b in exported["plan"].layer_bits]
    assert all(l["storage_bits"] == ([8] if l["grid_bits"] == [8] else [4]) for l in man["layers"])
    assert man["tied_embeddings"] == (exported["arch"] == "llama")
    assert {"torch", "executorch", "lieq-export"} <= set(man["versions"])
    assert any("4 bits per weight on disk" in w for w in exported["warnings"])
    assert any("4 bits per weight on disk" in w for w in man["warnings"])
    from pytorch_tokenizers import get_tokenizer

    t = get_tokenizer(str(b / "tokenizer.json"))
    assert t.encode("the quick", bos=0, eos=0) == exported["tokenizer"]("the quick")["input_ids"]


def test_generate_text_greedy_and_top_p(exported):
    tok = exported["tokenizer"]
    prompt = "the quick brown fox jumps over"
    greedy = pte.generate_text(exported["bundle"], prompt, max_new_tokens=8)
    m = pte.PteModel(exported["bundle"])
    assert greedy == tok.decode([t for t in m.generate(tok(prompt)["input_ids"], 8, eos_ids=[2]) if t != 2])
    a = pte.generate_text(exported["bundle"], prompt, max_new_tokens=8, top_p=0.9, seed=3)
    b = pte.generate_text(exported["bundle"], prompt, max_new_tokens=8, top_p=0.9, seed=3)
    assert a == b


@pytest.mark.slow
def test_cli_export_and_generate(tmp_path, capsys):
    from lieq_export.cli import main
    from lieq_export.quantize import save_checkpoint

    tokenizer = make_tokenizer(tmp_path)
    model = trained_model("llama", tokenizer)
    plan = PLANS["llama"]
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, plan, quantize_model(model, plan, progress=False))
    assert main(["export", str(tmp_path / "ckpt"), "--target", "pte", "--out", str(tmp_path / "b"),
                 "--max-seq-len", "64"]) == 0
    err = capsys.readouterr().err
    assert "4 bits per weight on disk" in err
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert man["tied_embeddings"] is True
    assert main(["generate", str(tmp_path / "b"), "--prompt", "the quick brown", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", str(tmp_path / "b"), "--prompt", "the quick brown", "--max-new-tokens", "6",
                 "--runner"]) == 0
    assert capsys.readouterr().out.strip()


# ---- fast checks (no lowering) -------------------------------------------------------


def _lin(out_f=64, in_f=64, seed=0):
    torch.manual_seed(seed)
    return torch.randn(out_f, in_f)


def test_asymmetric_4bit_asks_for_symmetric():
    qw = quantize_rtn(_lin(), 4, 32, symmetric=False)
    with pytest.raises(pte.PteExportError, match="re-plan with --symmetric"):
        pte.linear_storage_plan("x", qw, [])


def test_low_bit_codes_fit_int4_exactly():
    for bits in (2, 3):
        qw = quantize_rtn(_lin(), bits, 32, symmetric=False)
        st, codes, scales, target = pte.linear_storage_plan("x", qw, [])
        assert target == torch.int4 and st.storage_bits == 4 and st.grid_bits == bits
        w = codes.float() * scales.repeat_interleave(32, dim=1)
        assert torch.equal(w, qw.dequantize())


def test_group_not_multiple_of_32_falls_back_per_channel():
    notes = []
    qw = quantize_rtn(_lin(), 4, 16, symmetric=True)
    st, codes, scales, _ = pte.linear_storage_plan("x", qw, notes)
    assert st.group_size == 64 and scales.shape == (64, 1) and notes and "per output channel" in notes[0]


def test_unwritable_output_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):
        pytest.skip("running as a user that ignores permissions")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama", layers=1), dtype=torch.float32)
    with pytest.raises(OSError, match="not writable|cannot create"):
        pte.export_pte(model, None, {}, None, ro / "bundle")


@pytest.mark.slow
def test_smollm2_uniform4_pte_within_the_references_own_rounding_noise(smollm2, tmp_path):
    """Full 135M model: per-position logits can't meet 2e-2 against any reference that is not
    bit-identical, because int8 dynamic activation rounding cascades through 30 layers: the
    PyTorch reference itself moves by up to 0.28 (median 0.034, top-1 0.887) when its input
    embeddings get 1e-7 relative noise. So the .pte is held to that floor: its deviation from
    the reference must look like one more such perturbation, not like a wrong weight
    (measured: max 0.19, median 0.034, top-1 0.891), its first positions must match to float
    precision, and its perplexity must agree. The 3-layer test checks exactness at 2e-2."""
    import math

    from lieq_export.models import describe
    from lieq_export.plan import default_group_size
    from lieq_export.text import load_text, token_windows

    model, tok = smollm2
    layout = describe(model)
    plan = BitPlan((4,) * layout.num_layers, default_group_size(layout), symmetric=True, embed_bits=4, lm_head_bits=4)
    qweights = quantize_model(model, plan, progress=False)
    man = pte.export_pte(model, tok, qweights, plan, tmp_path / "b", max_seq_len=160)
    assert abs(man["pte_bytes"] - man["predicted_pte_bytes"]) / man["pte_bytes"] < 0.15
    ref = pte.runtime_reference(model, qweights, fake_quantize(model, qweights))
    m = pte.PteModel(tmp_path / "b")
    gen = torch.Generator().manual_seed(0)
    rel_pte, rel_floor, top1_pte, top1_floor, nll_ref, nll_pte, n = [], [], 0, 0, 0.0, 0.0, 0
    with torch.no_grad():
        for w in token_windows(tok, load_text(), 128)[:2]:
            want = ref(w[None]).logits[0]
            emb = ref.model.embed_tokens(w[None])
            noisy = ref(inputs_embeds=emb * (1 + 1e-7 * torch.randn(emb.shape, generator=gen))).logits[0]
            got = m.logits_per_position(w.tolist())
            rel_pte.append((got - want).norm(dim=-1) / want.norm(dim=-1))
            rel_floor.append((noisy - want).norm(dim=-1) / want.norm(dim=-1))
            top1_pte += (got.argmax(-1) == want.argmax(-1)).sum().item()
            top1_floor += (noisy.argmax(-1) == want.argmax(-1)).sum().item()
            nll_ref += torch.nn.functional.cross_entropy(want[:-1], w[1:], reduction="sum").item()
            nll_pte += torch.nn.functional.cross_entropy(got[:-1], w[1:], reduction="sum").item()
            n += len(w)
    rel_pte, rel_floor = torch.cat(rel_pte), torch.cat(rel_floor)
    # the first position of each window attends to itself only: no rounding flip has had a
    # chance to cascade, and it matches to float precision (measured: ~1e-6)
    assert rel_pte.view(2, -1)[:, 0].max() < 1e-3, rel_pte.view(2, -1)[:, :4]
    assert rel_pte.median() < 2 * rel_floor.median() + 1e-2, (rel_pte.median(), rel_floor.median())
    assert top1_pte >= top1_floor - 0.05 * n, (top1_pte, top1_floor, n)
    assert abs(math.exp(nll_pte / n) / math.exp(nll_ref / n) - 1) < 0.05


# ---- the real model ----------------------------------------------------------------------


def _first_layers(model, n: int):
    """SmolLM2 cut to its first n decoder layers: real weights, activations and outliers,
    but too shallow for int8 activation rounding to cascade (see the full-model test)."""
    import copy

    m = copy.deepcopy(model)
    m.model.layers = m.model.layers[:n]
    m.config.num_hidden_layers = n
    if getattr(m.config, "layer_types", None):
        m.config.layer_types = m.config.layer_types[:n]
    return m


def test_smollm2_first_layers_match_reference_every_position(smollm2, tmp_path):
    from lieq_export.text import load_text, token_windows

    model, tok = smollm2
    model = _first_layers(model, 3)
    plan = BitPlan((2, 4, 8), 64, symmetric=True, embed_bits=4, lm_head_bits=4)
    qweights = quantize_model(model, plan, progress=False)
    pte.export_pte(model, tok, qweights, plan, tmp_path / "b", max_seq_len=32)
    ref = pte.runtime_reference(model, qweights, fake_quantize(model, qweights))
    ids = token_windows(tok, load_text(), SEQ)[0]
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    got = pte.PteModel(tmp_path / "b").logits_per_position(ids.tolist())
    rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert rel.max() < 2e-2, rel
