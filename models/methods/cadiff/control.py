"""CADiff's self-adaptive spatial control (SSC): a ControlNet on the binary mask, fused into the
UNet's skip features by SAIM.

Plain ControlNet adds each residual y_c to the matching UNet feature y. SAIM (paper Eq. 9-10)
lets them interact:

    y_a = CrossAttn(RMSNorm(y), RMSNorm(y_c))        queries from the UNet's feature, keys/values the ControlNet's
    y_f = y + y_c + MLP([y_a ; y_c])

Eq. 10 concatenates before a projection; our reading concatenates y_a with y_c and projects with
a two-layer MLP whose last layer starts at zero, added to the plain ControlNet sum y + y_c. With
it and the ControlNet's zero convolutions the UNet's output at step 0 is exactly the frozen
model's, and the zero convolutions get a first-order gradient from step 0 through the y_c term
(were y_c reached only through the zero-initialised MLP, the ControlNet would get no gradient
until the MLP had moved, and then one scaled by it). Without SAIM (the "saim" ablation) y_f =
y + y_c, plain ControlNet.

Where the fusion happens: the UNet adds ControlNet residuals to its skip features after the down
blocks and to the mid block's output; the skip features are consumed by the up blocks. So SAIM
runs in forward pre-hooks of the up blocks (on the `res_hidden_states_tuple` they receive) and in
a forward hook of the mid block, and the ControlNet itself runs in a forward pre-hook of the UNet
on the UNet's own inputs. Every caller of the UNet (DDIM sampling, the training loss) then gets
the controlled UNet unchanged; the hooks live inside `adapters.restored_after(unet)`, so the
shared UNet is exactly as before once the block ends.

The mask enters at pixel size: the ControlNet's conditioning embedding has one stride-2 stage
per halving of the VAE (3 for SD's 8x, diffusers' default widths), so it lands at latent size
whatever the VAE's scale.
"""

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from safetensors.torch import load_file, save_file

from models.diffusion.adapters import restored_after

CONTROLNET_FOLDER = "controlnet"
SAIM_FILE = "saim.safetensors"
SAIM_HEAD_DIM = 64  # SD's attention head width; narrower features get one head
EMBEDDING_CHANNELS = (16, 32, 96, 256)  # diffusers' conditioning embedding: 3 halvings, for SD's 8x VAE


class SAIM(torch.nn.Module):
    """Spatial-aware interaction module for one residual of `channels` channels."""

    def __init__(self, channels: int):
        super().__init__()
        heads = max(1, channels // SAIM_HEAD_DIM)
        self.norm_feature = torch.nn.RMSNorm(channels, eps=1e-6)
        self.norm_control = torch.nn.RMSNorm(channels, eps=1e-6)
        self.attention = Attention(query_dim=channels, cross_attention_dim=channels, heads=heads,
                                   dim_head=channels // heads)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(2 * channels, channels), torch.nn.GELU(), torch.nn.Linear(channels, channels)
        )
        torch.nn.init.zeros_(self.mlp[-1].weight)
        torch.nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, feature: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        """y_f for a UNet feature y and a ControlNet residual y_c, both (B, C, h, w)."""
        batch, channels, height, width = feature.shape
        control = control.to(feature.dtype)
        y = feature.flatten(2).transpose(1, 2)  # (B, hw, C) tokens
        y_c = control.flatten(2).transpose(1, 2)
        y_a = self.attention(self.norm_feature(y), encoder_hidden_states=self.norm_control(y_c))
        interaction = self.mlp(torch.cat([y_a, y_c], dim=-1))
        return feature + control + interaction.transpose(1, 2).reshape(batch, channels, height, width)


class SpatialControl(torch.nn.Module):
    """The ControlNet on the mask and one SAIM per ControlNet residual (the down residuals, then the mid's)."""

    def __init__(self, controlnet: ControlNetModel):
        super().__init__()
        self.controlnet = controlnet
        channels = [conv.out_channels for conv in controlnet.controlnet_down_blocks]
        channels.append(controlnet.controlnet_mid_block.out_channels)
        self.saim = torch.nn.ModuleList(SAIM(c) for c in channels)
        self.condition: torch.Tensor | None = None  # (B, 1, H, W) masks in {0, 1}, set by the caller
        # While a list: every fusion appends ||y_f - y|| / ||y|| (the fine-tune's diagnostics).
        self.contributions: list[torch.Tensor] | None = None
        self._use_saim = True
        self._residuals: list[torch.Tensor] = []
        self._embedded: tuple[torch.Tensor, torch.Tensor] | None = None  # (condition, its embedding)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, vae_scale_factor: int) -> "SpatialControl":
        """A ControlNet initialised from the UNet (one conditioning channel: the mask, at pixel size,
        `vae_scale_factor` times the latent's side), fp32 for training."""
        halvings = int(math.log2(vae_scale_factor))
        embedding = (*EMBEDDING_CHANNELS[:halvings], EMBEDDING_CHANNELS[-1])
        controlnet = ControlNetModel.from_unet(unet, conditioning_channels=1,
                                               conditioning_embedding_out_channels=embedding)
        return cls(controlnet.to(unet.device)).to(unet.device)  # fp32, as built

    def save(self, folder: Path) -> None:
        """`controlnet/` (loadable with `ControlNetModel.from_pretrained`) and `saim.safetensors`."""
        self.controlnet.save_pretrained(folder / CONTROLNET_FOLDER)
        save_file({k: v.contiguous() for k, v in self.saim.state_dict().items()}, folder / SAIM_FILE)

    @classmethod
    def load(cls, folder: Path, device: torch.device, dtype: torch.dtype) -> "SpatialControl":
        controlnet = ControlNetModel.from_pretrained(folder / CONTROLNET_FOLDER, torch_dtype=dtype,
                                                     local_files_only=True)
        control = cls(controlnet.to(device))
        control.saim.load_state_dict(load_file(folder / SAIM_FILE))
        control.saim.to(device, dtype)
        return control.eval().requires_grad_(False)

    @contextmanager
    def attached(self, unet: UNet2DConditionModel, *, sampling: bool = False, saim: bool = True) -> Iterator[None]:
        """Inside the block, every call of `unet` is controlled by `self.condition` (set a new tensor
        to change it).

        saim: False adds the residuals as plain ControlNet does (the "saim" ablation).
        sampling: the ControlNet's conditioning embedding depends on the mask alone, not on the step,
        so a sampling run computes it once per condition and hands it to the ControlNet through an
        identity in the embedding's place (a third of the ControlNet's cost at 256 px).
        """
        forward_parameters = inspect.signature(unet.forward)
        self._use_saim = saim
        with restored_after(unet, self.controlnet):
            embedding = None
            if sampling:
                embedding = self.controlnet.controlnet_cond_embedding
                self.controlnet.controlnet_cond_embedding = torch.nn.Identity()
            unet.register_forward_pre_hook(
                lambda _unet, args, kwargs: self._run_controlnet(forward_parameters.bind(*args, **kwargs).arguments,
                                                                 embedding),
                with_kwargs=True,
            )
            skips = len(self.saim) - 1
            for block in unet.up_blocks:  # each consumes the last len(resnets) skip features left
                first = skips - len(block.resnets)
                block.register_forward_pre_hook(self._fuse_skips(first), with_kwargs=True)
                skips = first
            unet.mid_block.register_forward_hook(self._fuse_mid)
            try:
                yield
            finally:
                self._residuals, self._embedded = [], None

    def _run_controlnet(self, inputs: dict, embedding: torch.nn.Module | None) -> None:
        """The ControlNet on the UNet's inputs; `embedding`: while sampling, the conditioning embedding."""
        sample = inputs["sample"]
        if self.condition is None:
            raise RuntimeError("set SpatialControl.condition (the masks) before calling the controlled UNet")
        dtype = self.controlnet.dtype
        condition = self.condition.to(sample.device, dtype)
        if embedding is not None:  # sampling: the embedding once per condition
            if self._embedded is None or self._embedded[0] is not self.condition:
                self._embedded = (self.condition, embedding(condition))
            condition = self._embedded[1]
        condition = condition.repeat(sample.shape[0] // condition.shape[0], 1, 1, 1)  # CFG: both halves
        down, mid = self.controlnet(
            sample.to(dtype), inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"].to(dtype),
            controlnet_cond=condition, return_dict=False,
        )
        self._residuals = [*down, mid]

    def _fuse(self, index: int, feature: torch.Tensor) -> torch.Tensor:
        """y_f of the UNet feature that ControlNet residual `index` goes to."""
        control = self._residuals[index]
        fused = self.saim[index](feature, control) if self._use_saim else feature + control.to(feature.dtype)
        if self.contributions is not None:
            self.contributions.append(((fused - feature).float().norm() / feature.float().norm()).detach())
        return fused

    def _fuse_mid(self, _block, _args, output: torch.Tensor) -> torch.Tensor:
        return self._fuse(len(self.saim) - 1, output)

    def _fuse_skips(self, first: int):
        def hook(_block, args, kwargs):
            skips = kwargs["res_hidden_states_tuple"]
            fused = tuple(self._fuse(first + i, skip) for i, skip in enumerate(skips))
            return args, {**kwargs, "res_hidden_states_tuple": fused}

        return hook
