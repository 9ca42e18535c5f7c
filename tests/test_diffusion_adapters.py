"""The shared adapter machinery: attaching to the shared UNet and restoring it, the training loop,
the gradient-keeping attention recorder, adapter configs."""

import shutil

import pytest
import torch
from diffusers.models.attention import GatedSelfAttentionDense
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from peft import LoraConfig

from models.diffusion.adapters import (
    check_base_model,
    model_fingerprint,
    read_adapter_config,
    restored_after,
    write_adapter_config,
)
from models.diffusion.attention import AttentionMapRecorder, attention_processors, select_layers
from models.diffusion.training import CHECKPOINT_FILE, train
from models.errors import InputError
from models.methods.interface import Checkpoints

pytest_plugins = ["tests.diffusion_fixtures"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def unet_output(sd, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, 8, 8), generator=generator)
    context = torch.randn((1, 77, sd.unet.config.cross_attention_dim), generator=generator)
    with torch.no_grad():
        return sd.unet(latents, torch.tensor([500]), encoder_hidden_states=context, **kwargs).sample


def structure(unet) -> tuple:
    return (tuple(name for name, _ in unet.named_modules()),
            tuple(type(p).__name__ for p in unet.attn_processors.values()),
            tuple(p.requires_grad for p in unet.parameters()), sorted(vars(unet)))


def attach_everything(unet) -> None:
    """LoRA through peft (B non-zero, so it changes the output), GLIGEN gated blocks, an IP-Adapter processor."""
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter)
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    block.fuser = GatedSelfAttentionDense(block.attn1.to_q.in_features, unet.config.cross_attention_dim, 2, 8)
    layer = select_layers(unet, kind="cross")[0]
    unet.set_attn_processor({**unet.attn_processors, layer.name: IPAdapterAttnProcessor2_0(
        hidden_size=16, cross_attention_dim=unet.config.cross_attention_dim, num_tokens=(4,))})


# The IP-Adapter processor is driven with a plain tensor here (its image tokens are the last ones).
@pytest.mark.filterwarnings("ignore:You have passed a tensor as `encoder_hidden_states`")
def test_the_unet_is_bit_identical_after_attaching_and_a_second_job_sees_no_trace(tiny_sd):
    before, shape = unet_output(tiny_sd), structure(tiny_sd.unet)
    with restored_after(tiny_sd.unet):
        attach_everything(tiny_sd.unet)
        assert not torch.equal(unet_output(tiny_sd), before)  # the attachments act
        assert structure(tiny_sd.unet) != shape
    assert torch.equal(unet_output(tiny_sd), before)
    assert structure(tiny_sd.unet) == shape
    assert not getattr(tiny_sd.unet, "_hf_peft_config_loaded", False)

    # A second job attaches its own adapter under the same name without a clash.
    with restored_after(tiny_sd.unet):
        tiny_sd.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
        assert torch.equal(unet_output(tiny_sd), before)  # peft's default init: B = 0
    assert structure(tiny_sd.unet) == shape


@pytest.mark.filterwarnings("ignore:You have passed a tensor as `encoder_hidden_states`")
def test_the_unet_is_restored_after_an_exception(tiny_sd):
    before, shape = unet_output(tiny_sd), structure(tiny_sd.unet)
    with pytest.raises(RuntimeError, match="job failed"), restored_after(tiny_sd.unet):
        attach_everything(tiny_sd.unet)
        tiny_sd.unet.requires_grad_(True)
        raise RuntimeError("job failed")
    assert torch.equal(unet_output(tiny_sd), before) and structure(tiny_sd.unet) == shape


def test_a_hook_made_before_the_block_can_still_be_removed_after_it():
    module = torch.nn.Linear(2, 2)
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    with restored_after(module):
        module.register_forward_hook(lambda *_: calls.append(2))
        module(torch.zeros(2))
    module(torch.zeros(2))
    assert calls == [1, 2, 1]  # the block's own hook is gone
    handle.remove()
    module(torch.zeros(2))
    assert calls == [1, 2, 1]


def test_the_recorder_can_keep_the_graph_for_a_loss(tiny_sd):
    layers = select_layers(tiny_sd.unet, kind="cross")
    kept, detached = AttentionMapRecorder(keep_graph=True), AttentionMapRecorder()
    context = torch.randn((1, 77, tiny_sd.unet.config.cross_attention_dim), requires_grad=True)
    for recorder in (kept, detached):
        with attention_processors(tiny_sd.unet, {layer.name: recorder for layer in layers}):
            tiny_sd.unet(torch.randn((1, 4, 8, 8)), torch.tensor([10]), encoder_hidden_states=context)
    assert len(kept.maps) == len(layers) and all(not m.requires_grad for m in detached.maps)
    sum(m[..., 1].sum() for m in kept.maps).backward()
    assert context.grad is not None and context.grad[0, 1].abs().sum() > 0


def regression(seed: int, steps: int, checkpoints=None, on_step=None) -> torch.nn.Linear:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    target = torch.tensor([[1.0, -2.0, 0.5]])

    def loss_at(_step, generator):
        x = torch.randn((8, 3), generator=generator)
        return ((model(x) - x @ target.T) ** 2).mean()

    train({"model": model}, torch.optim.Adam(model.parameters(), lr=0.05), loss_at, steps=steps, seed=seed,
          run={"test": "regression"}, device=torch.device("cpu"), mixed_precision=False, checkpoints=checkpoints,
          on_step=on_step)
    return model


def test_the_training_loop_resumes_exactly_and_refuses_another_runs_checkpoint(tmp_path):
    uninterrupted = regression(seed=1, steps=7)

    def crash_at_six(done, _total):
        if done == 6:
            raise KeyboardInterrupt

    checkpoints = Checkpoints(tmp_path, every=3)
    with pytest.raises(KeyboardInterrupt):
        regression(seed=1, steps=7, checkpoints=checkpoints, on_step=crash_at_six)
    assert (tmp_path / CHECKPOINT_FILE).is_file()
    steps_run = []
    resumed = regression(seed=1, steps=7, checkpoints=checkpoints, on_step=lambda done, _: steps_run.append(done))
    assert steps_run == [7]  # from the step-6 checkpoint
    assert torch.equal(resumed.weight, uninterrupted.weight) and torch.equal(resumed.bias, uninterrupted.bias)
    with pytest.raises(ValueError, match="different training run"):
        regression(seed=2, steps=7, checkpoints=checkpoints)


def test_the_training_loop_reports_each_terms_mean_over_the_last_steps():
    weight = torch.zeros(1, requires_grad=True)

    def loss_at(step, _generator):
        pull = (weight - 1).pow(2).sum()
        return {"total": pull + step, "pull": pull, "step": torch.tensor(float(step))}

    final = train({"weight": weight}, torch.optim.SGD([weight], lr=0.0), loss_at, steps=60, seed=0, run={},
                  device=torch.device("cpu"), mixed_precision=False)
    assert set(final) == {"total", "pull", "step"}
    assert final["step"] == pytest.approx(sum(range(10, 60)) / 50)  # the last REPORTED_STEPS = 50 steps
    assert final["pull"] == pytest.approx(1.0) and final["total"] == pytest.approx(1.0 + final["step"])


def test_adapter_configs_name_their_method_and_base_model(tmp_path, tiny_sd_dir):
    fingerprint = model_fingerprint(tiny_sd_dir)
    write_adapter_config(tmp_path, "cadiff", sd_model=fingerprint, tokens=["<a>"])
    assert read_adapter_config(tmp_path, "cadiff") == {"method": "cadiff", "sd_model": fingerprint, "tokens": ["<a>"]}
    with pytest.raises(InputError, match="made by method 'cadiff'"):
        read_adapter_config(tmp_path, "anogen")
    with pytest.raises(InputError, match="no adapter_config.json"):
        read_adapter_config(tmp_path / "empty", "cadiff")
    check_base_model({"sd_model": fingerprint}, "sd_model", tiny_sd_dir, "SD_MODEL_DIR")
    with pytest.raises(InputError, match="another SD_MODEL_DIR checkpoint"):
        check_base_model({"sd_model": "0" * 16}, "sd_model", tiny_sd_dir, "SD_MODEL_DIR")


def test_the_fingerprint_follows_the_weights(tmp_path, tiny_sd_dir):
    copy = shutil.copytree(tiny_sd_dir, tmp_path / "copy")
    assert model_fingerprint(copy) == model_fingerprint(tiny_sd_dir)  # the same files elsewhere
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[min(len(data), 1 << 20) - 1] ^= 0xFF  # a byte the fingerprint reads
    weights.write_bytes(bytes(data))
    assert model_fingerprint(copy) != model_fingerprint(tiny_sd_dir)
