"""The semantic guided adapter (SGA): decoupled cross-attention in every cross-attention layer of the UNet.

    Z = Attn(Q, K, V) + gamma * Attn(Q, K', V'),   K' = C' W'_k,  V' = C' W'_v

diffusers' `IPAdapterAttnProcessor2_0` computes exactly this (its `scale` is gamma, its
`to_k_ip` / `to_v_ip` are W'_k / W'_v), so each layer gets one, with W'_k and W'_v initialised
from the layer's own W_k and W_v (IP-Adapter's initialisation: at the start C' is read like text).
They are all that is trained. Nothing starts at zero, so the loss's gradient reaches every W' from
the first step, and the branch carries about half of each layer's output from the start
(`branch_share`: 0.55 on the tiny test models), which lets AdamW's 1e-4 steps shape what it adds.

The conditioning travels through the UNet as one tensor, the text tokens followed by the C'
tokens, so that classifier-free guidance batching and the shared DDIM loop treat it like any
prompt; `SGAProcessor` splits it into the (text, [C']) pair diffusers' processor takes. Where the
Q-Former is narrower or wider than the UNet's cross-attention, a linear projection (trained too)
brings C' to the UNet's width first; with BLIP-2 and SD 1.5 (768 both) there is none.

The file, `sga.safetensors`, uses diffusers' IP-Adapter layout for the attention weights
(`ip_adapter.<2n+1>.to_k_ip.weight` for the n-th cross-attention layer, as `load_ip_adapter` numbers
them) and `image_proj.weight` / `image_proj.bias` for the projection when there is one.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from safetensors.torch import load_file, save_file

from models.diffusion.adapters import restored_after
from models.diffusion.attention import attention_processors, select_layers

WEIGHTS_FILE = "sga.safetensors"


class SGAProcessor(IPAdapterAttnProcessor2_0):
    """diffusers' IP-Adapter processor, given the conditioning as one tensor [text tokens | C' tokens]."""

    # While SemanticGuidedAdapter.branch_share measures: (||Attn(Q, K, V)||, ||gamma Attn(Q, K', V')||) per call.
    branch_norms: list[tuple[float, float]] | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        features = self.num_tokens[0]
        pair = (encoder_hidden_states[:, :-features], [encoder_hidden_states[:, -features:]])
        if self.branch_norms is None:
            return super().__call__(attn, hidden_states, pair, attention_mask, temb, **kwargs)
        return self._measured(attn, hidden_states, pair, attention_mask, temb, **kwargs)

    def _measured(self, attn, *args, **kwargs):
        """The layer's output, with the two branches' norms recorded where they add: at the output
        projection's input, once with gamma 0 (the text branch alone: diffusers skips the other) and
        once as it is."""
        summed = []
        hook = attn.to_out[0].register_forward_pre_hook(lambda _module, inputs: summed.append(inputs[0]))
        gamma = self.scale
        try:
            self.scale = [0.0]
            super().__call__(attn, *args, **kwargs)
            self.scale = gamma
            output = super().__call__(attn, *args, **kwargs)
        finally:
            self.scale = gamma
            hook.remove()
        text, both = summed
        self.branch_norms.append((float(text.float().norm()), float((both - text).float().norm())))
        return output


class SemanticGuidedAdapter(torch.nn.Module):
    """W'_k, W'_v of every cross-attention layer (one SGAProcessor each) and the optional width projection."""

    def __init__(self, layers: list[str], processors: list[SGAProcessor], projection: torch.nn.Linear | None):
        super().__init__()
        self.layers = layers  # attention-processor names, in the UNet's order
        self.processors = torch.nn.ModuleList(processors)
        self.projection = projection

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, feature_width: int, num_tokens: int, gamma: float = 1.0):
        """A fresh adapter for `unet`: each layer's W'_k, W'_v copies of its own W_k, W_v (float32)."""
        layers = [layer.name for layer in select_layers(unet, kind="cross")]
        processors = []
        for name in layers:
            attn = unet.get_submodule(name.removesuffix(".processor"))
            processor = SGAProcessor(attn.to_k.out_features, attn.to_k.in_features, num_tokens=(num_tokens,),
                                     scale=gamma)
            with torch.no_grad():
                processor.to_k_ip[0].weight.copy_(attn.to_k.weight)
                processor.to_v_ip[0].weight.copy_(attn.to_v.weight)
            processors.append(processor)
        cross_width = unet.config.cross_attention_dim
        projection = torch.nn.Linear(feature_width, cross_width) if feature_width != cross_width else None
        return cls(layers, processors, projection).to(unet.device, torch.float32)

    @property
    def num_tokens(self) -> int:
        return self.processors[0].num_tokens[0]

    @property
    def gamma(self) -> float:
        return self.processors[0].scale[0]

    @gamma.setter
    def gamma(self, value: float) -> None:
        for processor in self.processors:
            processor.scale = [value]

    def condition(self, text: torch.Tensor, features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The UNet's conditioning (B, text tokens + C' tokens, width) in `dtype`: text (B, 77, width)
        and C' (B, tokens, feature width), zeros for "no reference" (then K' = V' = 0 and SGA adds nothing)."""
        if features.shape[1] != self.num_tokens:
            raise ValueError(f"C' has {features.shape[1]} tokens, the adapter takes {self.num_tokens}")
        if self.projection is not None:
            features = self.projection(features.to(self.projection.weight.dtype))
        return torch.cat([text.to(dtype), features.to(dtype)], dim=1)

    @torch.no_grad()
    def branch_share(self, unet: UNet2DConditionModel, latents: torch.Tensor, t: torch.Tensor,
                     condition: torch.Tensor) -> float:
        """How much the decoupled branch contributes to the cross-attention output on one UNet batch
        (the adapter attached): ||gamma Attn(Q, K', V')|| / (||Attn(Q, K, V)|| + ||gamma Attn(Q, K', V')||)
        per layer, over the whole batch, averaged over the layers. 0 when SGA adds nothing."""
        for processor in self.processors:
            processor.branch_norms = []
        try:
            unet(latents, t, encoder_hidden_states=condition)
            shares = [adapter / (text + adapter) for processor in self.processors
                      for text, adapter in processor.branch_norms]
        finally:
            for processor in self.processors:
                processor.branch_norms = None
        return sum(shares) / len(shares)

    @contextmanager
    def attached(self, unet: UNet2DConditionModel) -> Iterator[None]:
        """The UNet with SGA in its cross-attention layers inside the block, exactly as before after it."""
        with restored_after(unet), attention_processors(unet, dict(zip(self.layers, self.processors))):
            yield

    def save(self, folder: Path) -> None:
        """`sga.safetensors` in diffusers' IP-Adapter layout (see the module's docstring)."""
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {key: parameter.detach().float().cpu().contiguous() for key, parameter in _file_keys(self)}
        save_file(tensors, folder / WEIGHTS_FILE)

    @classmethod
    def load(cls, folder: Path, unet: UNet2DConditionModel, feature_width: int, num_tokens: int, gamma: float):
        """The adapter saved in `folder`, for `unet`, in the UNet's dtype; ValueError if it does not fit."""
        adapter = cls.from_unet(unet, feature_width, num_tokens, gamma)
        tensors = load_file(folder / WEIGHTS_FILE)
        expected = {key for key, _ in _file_keys(adapter)}
        if set(tensors) != expected:
            raise ValueError(f"{WEIGHTS_FILE} holds {len(tensors)} tensors, this UNet's adapter {len(expected)}")
        with torch.no_grad():
            for key, parameter in _file_keys(adapter):
                if tensors[key].shape != parameter.shape:
                    raise ValueError(f"{WEIGHTS_FILE}: {key} is {tuple(tensors[key].shape)}, this UNet needs "
                                     f"{tuple(parameter.shape)}")
                parameter.copy_(tensors[key])
        return adapter.to(unet.dtype)


def _file_keys(adapter: SemanticGuidedAdapter) -> Iterator[tuple[str, torch.nn.Parameter]]:
    for number, processor in enumerate(adapter.processors):
        yield f"ip_adapter.{2 * number + 1}.to_k_ip.weight", processor.to_k_ip[0].weight
        yield f"ip_adapter.{2 * number + 1}.to_v_ip.weight", processor.to_v_ip[0].weight
    if adapter.projection is not None:
        yield "image_proj.weight", adapter.projection.weight
        yield "image_proj.bias", adapter.projection.bias
