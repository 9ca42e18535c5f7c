"""CADiff's intensity-controllable attention re-weighting (IAR) at generation.

Each pair has an intensity w. On the conditional half of the guided batch, the anomaly token's
column of the cross-attention probabilities is multiplied by w for the queries inside the mask
only (masked focus attention, MFA), in every cross-attention layer (the mask max-pooled to the
layer's size), without renormalising the row (prompt-to-prompt's re-weighting). It starts only
once the token has found the mask (delayed focus scheduler, DFS): after each UNet call, the focus
alpha_t = n_t / n_mask is measured on the focus layers (`focus_layers`: SD's 16x16 ones, a quarter
of the latent side, or the cross-attention scale nearest it in another UNet), n_t being the mask
cells whose head- and layer-averaged attention to the token is above that map's mean; from the
step after the first one whose alpha_t exceeds the threshold, that pair is re-weighted
(the step's own attention has already been computed when alpha_t is known).

Exactness: outputs are SDPA's, the loader's own kernel, wherever nothing is re-weighted (the
measurement computes the probabilities beside them), so w = 1 or a threshold never reached gives
exactly the plain sampling, and w != 1 changes only the mask's rows of a re-weighted pair.
"""

import math

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from models.diffusion.attention import AttentionLayer, UNetAttention, select_layers
from models.errors import InputError

FOCUS_DOWNSAMPLE = 4  # SD's 16x16 layers at a 64x64 latent


def focus_layers(unet: UNet2DConditionModel) -> list[AttentionLayer]:
    """The cross-attention layers at the scale nearest FOCUS_DOWNSAMPLE (the finer of two as near),
    where IAR measures its focus and L_contrastive pools its features."""
    cross = select_layers(unet, kind="cross")
    if not cross:
        raise InputError("CADiff needs a UNet with cross-attention layers: its tokens act through them")
    nearest = min(cross, key=lambda layer: (abs(math.log2(layer.downsample / FOCUS_DOWNSAMPLE)),
                                            layer.downsample)).downsample
    return [layer for layer in cross if layer.downsample == nearest]


class FocusSchedule:
    """Per-pair state of IAR over one sampling run: intensities, masks, focus and whether it is on."""

    def __init__(self, token: int, intensities: torch.Tensor, masks: torch.Tensor, threshold: float, steps: int):
        self.token = token  # position of the anomaly token in the prompt
        self.steps = steps  # UNet calls in the run: none starts after the last
        self.intensities = intensities.float().to(masks.device)  # (B,)
        self.masks = masks.float()  # (B, 1, h, w) latent-size, {0, 1}
        self.threshold = threshold
        # Kept on the CPU: every layer reads them, and must not wait for the GPU to do so.
        self.active = torch.zeros(len(intensities), dtype=torch.bool)
        self._reweighted = intensities.cpu() != 1
        self.started_at: list[int | None] = [None] * len(intensities)  # first re-weighted step, per pair
        self._focus_maps: list[torch.Tensor] = []
        self._rows: dict[int, torch.Tensor] = {}
        self._step = 0

    @property
    def count(self) -> int:
        return len(self.intensities)

    @property
    def measuring(self) -> bool:
        """Some pair that will be re-weighted (w != 1) has not started yet."""
        return bool((~self.active & self._reweighted).any())

    def mask_rows(self, queries: int) -> torch.Tensor:
        """bool (B, queries): the mask at a square layer of `queries` cells."""
        if queries not in self._rows:
            side = int(round(queries**0.5))
            self._rows[queries] = F.adaptive_max_pool2d(self.masks, side).flatten(1) > 0
        return self._rows[queries]

    def reweighted_rows(self, queries: int) -> torch.Tensor:
        """bool (B, queries): the mask's cells of the pairs being re-weighted."""
        return self.mask_rows(queries) & self.active.to(self.masks.device)[:, None]

    def record(self, token_attention: torch.Tensor) -> None:
        """(B, queries) attention of the conditional half to the anomaly token at one focus layer."""
        self._focus_maps.append(token_attention.float())

    def end_step(self) -> None:
        """After a UNet call: measure alpha_t, and switch on the pairs whose focus exceeds the threshold."""
        self._step += 1
        if not self._focus_maps or self._step >= self.steps:
            self._focus_maps = []
            return
        attention = torch.stack(self._focus_maps).mean(0)  # (B, queries), the mean over the focus layers
        self._focus_maps = []
        inside = self.mask_rows(attention.shape[1])
        above = attention > attention.mean(dim=1, keepdim=True)
        alpha = ((above & inside).sum(1) / inside.sum(1).clamp(min=1)).cpu()  # one wait per step, while measuring
        starting = (alpha > self.threshold) & ~self.active & self._reweighted
        for index in starting.nonzero().flatten().tolist():
            self.started_at[index] = self._step  # the next UNet call is the first re-weighted one
        self.active |= starting


class IntensityReweighting(UNetAttention):
    """The cross-attention processor of IAR; `focus` layers also measure alpha_t for the schedule."""

    def __init__(self, schedule: FocusSchedule, focus: bool):
        self.schedule = schedule
        self.focus = focus

    def attend(self, attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = super().attend(attn, query, key, value)
        schedule = self.schedule
        measure = self.focus and schedule.measuring
        if not (measure or schedule.active.any()):
            return out
        cond = slice(query.shape[0] - schedule.count, None)  # the conditional half: [uncond, cond] under CFG
        probabilities = (query[cond] @ key[cond].transpose(-1, -2) * attn.scale).softmax(dim=-1)
        if measure:
            schedule.record(probabilities[..., schedule.token].mean(dim=1))
        if not schedule.active.any():
            return out
        rows = schedule.reweighted_rows(query.shape[2])  # (B, queries)
        weights = torch.ones_like(probabilities[:, :1, :, :])  # (B, 1, queries, keys)
        weights[..., schedule.token] = torch.where(rows, schedule.intensities[:, None], 1.0).to(weights.dtype)[:, None]
        reweighted = (probabilities * weights) @ value[cond]
        out = out.clone()
        out[cond] = torch.where(rows[:, None, :, None], reweighted, out[cond])
        return out
