"""Attention-processor plumbing: find the UNet's attention layers and swap processors on some of them.

The loader gives every layer PyTorch's SDPA processor (flash / memory-efficient kernels). A
method that must read or change attention installs its own small callable processor, and only
on the layers it needs (chosen by name, self/cross, resolution), inside `with
attention_processors(...)`, which restores the previous processors on exit, also on errors:
the UNet is shared by every job of the worker process.

A processor is any callable with diffusers' signature
`(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs) -> hidden_states`.
`UNetAttention` below splits SD's UNet attention into `project` (Q, K, V) and `attend` steps, so a
method overrides just the step it changes (e.g. grafting K/V between batch entries, or reading
the attention probabilities as `AttentionMapRecorder` does).
"""

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

Processor = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AttentionLayer:
    """One attention layer of the UNet, as `attn_processors` names it."""

    name: str  # e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    kind: Literal["self", "cross"]
    downsample: int  # how much smaller its feature map is than the latent: 1, 2, 4 or 8

    def resolution(self, latent_size: int) -> int:
        """Side of this layer's feature map for a square latent of `latent_size` (64 at 512 px)."""
        return latent_size // self.downsample


def attention_layers(unet: UNet2DConditionModel) -> list[AttentionLayer]:
    """Every attention layer of the UNet, with its kind and scale."""
    levels = len(unet.config.block_out_channels)
    layers = []
    for name in unet.attn_processors:
        block, _, rest = name.partition(".")
        if block == "mid_block":
            level = levels - 1
        else:
            index = int(rest.split(".")[0])
            # Every down block but the last halves the resolution; up blocks mirror them.
            level = index if block == "down_blocks" else levels - 1 - index
        kind = "cross" if ".attn2." in name else "self"
        layers.append(AttentionLayer(name=name, kind=kind, downsample=2**level))
    return layers


def select_layers(
    unet: UNet2DConditionModel,
    *,
    kind: Literal["self", "cross"] | None = None,
    resolutions: set[int] | None = None,
    latent_size: int | None = None,
    name_contains: str | None = None,
) -> list[AttentionLayer]:
    """The attention layers matching every given filter.

    `resolutions` are feature-map sides at `latent_size` (default: the UNet's sample_size), e.g.
    {16} for SD's 16x16 layers at 512 px.
    """
    latent_size = latent_size or unet.config.sample_size
    return [
        layer
        for layer in attention_layers(unet)
        if (kind is None or layer.kind == kind)
        and (resolutions is None or layer.resolution(latent_size) in resolutions)
        and (name_contains is None or name_contains in layer.name)
    ]


@contextmanager
def attention_processors(unet: UNet2DConditionModel, processors: Mapping[str, Processor]) -> Iterator[None]:
    """Use `processors` (layer name -> processor) inside the block; other layers keep theirs."""
    saved = unet.attn_processors
    unknown = set(processors) - set(saved)
    if unknown:
        raise KeyError(f"no such attention layers: {sorted(unknown)}")
    unet.set_attn_processor({name: processors.get(name, current) for name, current in saved.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


class UNetAttention:
    """SD UNet transformer-block attention with SDPA, split into steps a subclass can override.

    Valid for the UNet's transformer blocks (no group norm, residual or rescaling there, and no
    attention mask), which is where methods install processors; the VAE keeps diffusers' own.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError("UNetAttention does not take attention masks; SD 1.5's UNet passes none")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = self.project(attn, hidden_states, context)
        out = self.attend(attn, query, key, value)
        batch, heads, tokens, head_dim = out.shape
        out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out))  # output projection, then dropout

    def project(
        self, attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query from the hidden states, key and value from the context, each (B, heads, tokens, head_dim)."""
        return tuple(
            _split_heads(projection(source), attn.heads)
            for projection, source in ((attn.to_q, hidden_states), (attn.to_k, context), (attn.to_v, context))
        )

    def attend(self, attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(query, key, value, scale=attn.scale)


class AttentionMapRecorder(UNetAttention):
    """Computes attention explicitly and keeps the head-averaged probabilities of every call.

    `maps` gets one (B, query tokens, key tokens) tensor per call; install it only at the
    resolutions a method reads, since explicit attention is slower and larger than SDPA. With
    `keep_graph` the maps stay in the autograd graph, for a loss on them (CADiff's localisation
    loss); otherwise they are detached, so recording costs no memory for gradients.
    """

    def __init__(self, keep_graph: bool = False) -> None:
        self.maps: list[torch.Tensor] = []
        self.keep_graph = keep_graph

    def attend(self, attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        probabilities = (query @ key.transpose(-1, -2) * attn.scale).softmax(dim=-1)
        maps = probabilities.mean(dim=1)
        self.maps.append(maps if self.keep_graph else maps.detach())
        return probabilities @ value


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)
