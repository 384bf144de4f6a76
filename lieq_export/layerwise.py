"""Walk a decoder one layer at a time, so memory holds one layer's activations.

The inputs of layer 0 (and the keyword arguments every layer receives: rotary
embeddings, causal mask) are captured from one real forward call; each later layer's
inputs are produced by running the layer before it.
"""

from __future__ import annotations

import torch


class _Stop(Exception):
    pass


@torch.inference_mode()
def first_layer_inputs(model, windows: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(hidden states entering layer 0 [n, T, H], the kwargs each layer is called with)."""
    captured = {}

    def hook(_module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    layer0 = model.model.layers[0]
    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=windows, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["hidden"], captured["kwargs"]


@torch.inference_mode()
def walk_layers(model, windows: torch.Tensor, batch_size: int = 4):
    """Yield (index, layer, batches) per decoder layer; batches: [(hidden [b, T, H], kwargs)].

    `hidden` is the layer's input. The caller may change the layer's weights before
    asking for the next one: the next layer's inputs are computed with the layer as it
    stands when the generator resumes.
    """
    batches = [first_layer_inputs(model, windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]
    for i, layer in enumerate(model.model.layers):
        yield i, layer, batches
        batches = [(layer(h, **kw), kw) for h, kw in batches]


@torch.inference_mode()
def projection_inputs(layer, batches, paths: dict[str, str]) -> dict[str, torch.Tensor]:
    """Inputs [tokens, in] of the named submodules of `layer` ({name: module path}) on `batches`."""
    got: dict[str, list] = {n: [] for n in paths}
    handles = [
        layer.get_submodule(path).register_forward_pre_hook(
            lambda _m, a, n=n: got[n].append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for n, path in paths.items()
    ]
    try:
        for h, kw in batches:
            layer(h, **kw)
    finally:
        for hd in handles:
            hd.remove()
    return {n: torch.cat(v) for n, v in got.items()}


class IdentityLayer(torch.nn.Module):
    """Stands in for a decoder layer: passes the residual stream through unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states
