"""The Gated Self-Attention Module (GSM) and the LoRA beside it, attached to the shared UNet.

- GSM: one diffusers `GatedSelfAttentionDense` per `BasicTransformerBlock` of the UNet (down,
  mid and up), set as the block's `fuser` (applied to the grounded rows of a batch only, see
  GroundedRowsGatedSelfAttention): GLIGEN's layer, which concatenates the visual tokens
  with the grounding tokens, self-attends, and adds the visual part back scaled by tanh(gamma)
  (then a gated feed-forward), both gammas starting at 0. The block calls its fuser when the UNet
  is called with `cross_attention_kwargs={"gligen": ...}`, after the UNet's `position_net` (the
  SCM's fusion, scm.py) has turned those inputs into tokens: diffusers' own GLIGEN path, no
  re-written forward. Called without it, the blocks skip the fuser: the gated blocks are off.
- LoRA (peft, rank `lora_rank`, not in the paper): on to_q, to_k, to_v and to_out.0 of each
  transformer block's own self- and cross-attention (attn1, attn2), named so that the fusers'
  attention is never a target; injected before the fusers are set, too.

For training, `attached` puts both on the UNet as trainable layers. For sampling,
`attached_for_sampling` costs the steps less and computes the same: the LoRA is merged (each
projection replaced, for the block, by a Linear of weight W + (alpha / r) B A, a new tensor, the
shared W untouched), and the fusers' attention computes queries for the visual tokens only, the
only rows of its output GatedSelfAttentionDense keeps.

Both are attached inside `restored_after(unet, ...)`: on exit the shared UNet is as it was.
Files: `gsm.safetensors` (the fusers in block order, `<n>.<parameter>`), and LoRA in peft's
format under `lora/` (`adapter_model.safetensors` + peft's `adapter_config.json`).
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock, GatedSelfAttentionDense
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from models.diffusion.adapters import restored_after
from models.diffusion.attention import UNetAttention

GSM_FILE = "gsm.safetensors"
LORA_FOLDER = "lora"
LORA_FILE = "adapter_model.safetensors"  # peft's name
# The UNet's own attention projections; the fusers' are `...fuser.attn.to_q` and never match.
LORA_DOWN, LORA_UP = ".lora_A.weight", ".lora_B.weight"  # peft's state-dict keys, after the layer's name
LORA_TARGETS = r".*transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"


def transformer_blocks(unet: UNet2DConditionModel) -> list[str]:
    """The names of the UNet's BasicTransformerBlocks, in module order."""
    return [name for name, module in unet.named_modules() if isinstance(module, BasicTransformerBlock)]


def lora_config(rank: int) -> LoraConfig:
    """LoRA at `rank` with alpha = rank (scale 1); B starts at zero, so the UNet starts unchanged."""
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True)


class GroundedRowsGatedSelfAttention(GatedSelfAttentionDense):
    """diffusers' GLIGEN layer on the batch's last len(objs) rows only; the rows before pass untouched.
    With classifier-free guidance batched as [unconditional | conditional] in one UNet call, the
    gated blocks are thus off for the unconditional half, exactly, and cost it nothing."""

    def forward(self, x: torch.Tensor, objs: torch.Tensor) -> torch.Tensor:
        grounded = objs.shape[0]
        if grounded == x.shape[0]:
            return super().forward(x, objs)
        return torch.cat([x[:-grounded], super().forward(x[-grounded:], objs)])


class GatedBlocks(torch.nn.Module):
    """A GatedSelfAttentionDense per transformer block, each sized like its block's self-attention."""

    def __init__(self, unet: UNet2DConditionModel, token_width: int):
        super().__init__()
        self.blocks = transformer_blocks(unet)
        fusers = []
        for name in self.blocks:
            attn = unet.get_submodule(name).attn1
            fusers.append(GroundedRowsGatedSelfAttention(attn.to_q.in_features, token_width, attn.heads,
                                                  attn.inner_dim // attn.heads))
        self.fusers = torch.nn.ModuleList(fusers)

    def gammas(self) -> torch.Tensor:
        """(blocks, 2) the attention and feed-forward gates' gamma of each block."""
        return torch.stack([torch.stack([f.alpha_attn, f.alpha_dense]) for f in self.fusers]).detach()

    def save(self, folder: Path) -> None:
        save_file({key: value.contiguous() for key, value in self.fusers.state_dict().items()}, folder / GSM_FILE)

    def load(self, folder: Path) -> None:
        self.fusers.load_state_dict(load_file(folder / GSM_FILE))


@contextmanager
def attached(
    unet: UNet2DConditionModel,
    gated: GatedBlocks | None,
    position_net: torch.nn.Module | None,
    lora: LoraConfig | None,
    lora_state: dict[str, torch.Tensor] | None = None,
) -> Iterator[list[torch.Tensor]]:
    """Inside the block the UNet has the LoRA (fresh, or `lora_state`), the fusers and `position_net`;
    yields the LoRA parameters (float32: fp16 would lose the optimiser's small updates). None for
    `gated` (the `gsm` ablation) or `lora` (the `lora` ablation) leaves that part off."""
    with restored_after(unet):
        lora_parameters = []
        if lora is not None:
            inject_adapter_in_model(lora, unet)
            if lora_state is not None:
                set_peft_model_state_dict(unet, lora_state)
            for module in unet.modules():
                if isinstance(module, LoraLayer):
                    module.lora_A.float()
                    module.lora_B.float()
                    lora_parameters += [*module.lora_A.parameters(), *module.lora_B.parameters()]
        if gated is not None:
            for name, fuser in zip(gated.blocks, gated.fusers):
                unet.get_submodule(name).fuser = fuser
            unet.position_net = position_net
        yield lora_parameters


@contextmanager
def attached_for_sampling(
    unet: UNet2DConditionModel,
    gated: GatedBlocks | None,
    position_net: torch.nn.Module | None,
    lora: LoraConfig | None,
    lora_state: dict[str, torch.Tensor] | None,
    grounding_tokens: int,
) -> Iterator[None]:
    """What `attached` gives, for inference only (nothing trainable): the LoRA merged into its
    projections, and the fusers attending with visual queries only (`grounding_tokens`: how many
    tokens position_net makes). No `gated` or no `lora_state`: that part is left off."""
    with restored_after(unet, *([gated] if gated is not None else [])), torch.no_grad():
        if lora_state:
            scaling = lora.lora_alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)
            if lora.use_dora or lora.rank_pattern or lora.alpha_pattern:
                raise ValueError("only plain LoRA (one rank and alpha, no DoRA) is merged")
            for key, down in lora_state.items():
                if not key.endswith(LORA_DOWN):
                    continue
                name = key.removesuffix(LORA_DOWN)
                up = lora_state[name + LORA_UP]
                base = unet.get_submodule(name)
                merged = torch.nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
                delta = scaling * (up.to(base.weight.device).float() @ down.to(base.weight.device).float())
                merged.weight = torch.nn.Parameter((base.weight.float() + delta).to(base.weight.dtype),
                                                   requires_grad=False)
                merged.bias = base.bias
                parent, _, child = name.rpartition(".")
                setattr(unet.get_submodule(parent), child, merged)
        if gated is not None:
            for name, fuser in zip(gated.blocks, gated.fusers):
                fuser.attn.set_processor(VisualQueriesOnly(grounding_tokens))
                unet.get_submodule(name).fuser = fuser
            unet.position_net = position_net
        yield


class VisualQueriesOnly(UNetAttention):
    """A fuser's self-attention over [visual | grounding] tokens with queries from the visual tokens
    alone: the same rows GatedSelfAttentionDense keeps of the full attention, without computing the
    grounding tokens' rows it drops."""

    def __init__(self, grounding_tokens: int):
        self.grounding_tokens = grounding_tokens

    def project(self, attn, hidden_states, context):
        return super().project(attn, hidden_states[:, : -self.grounding_tokens], context)


def lora_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The attached LoRA's weights, as peft saves them."""
    return {key: value.detach().float().cpu().contiguous() for key, value in get_peft_model_state_dict(unet).items()}


def save_lora(folder: Path, config: LoraConfig, state: dict[str, torch.Tensor]) -> None:
    target = folder / LORA_FOLDER
    config.save_pretrained(target)
    save_file(state, target / LORA_FILE)


def load_lora(folder: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    target = folder / LORA_FOLDER
    return LoraConfig.from_pretrained(target), load_file(target / LORA_FILE)
