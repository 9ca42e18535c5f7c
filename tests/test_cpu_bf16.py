"""bf16 autocast on the CPU (models/precision.py): which precision a device gets, and the two
places that use it — the downstream trainer and scorer, and SD's UNet and VAE in CPU generation.
The rest of the suite runs fp32; here "bf16" is forced, so it runs on CPUs without native bf16 too."""

import numpy as np
import pytest
import torch

from models.diffusion.loading import load_sd
from models.downstream.params import EvaluateParams
from models.downstream.train import TrainingSet, predict, train_segmenter
from models.downstream.unet import GroupNorm, upsample
from models.methods.interface import (
    Checkpoints,
    Exemplar,
    FinetuneRequest,
    GenerateRequest,
    NormalImages,
    job_items,
    label_contract_violation,
)
from models.methods.params import MaskSpec
from models.methods.registry import METHODS, generate_all, implementation
from models.precision import autocast_dtype, cpu_has_native_bf16
from tests.diffusion_fixtures import box_mask, textured_image

pytest_plugins = ["tests.diffusion_fixtures"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


def test_precision_per_device_and_setting():
    assert autocast_dtype(CPU, "fp32") is None
    assert autocast_dtype(CPU, "bf16") == torch.bfloat16
    assert autocast_dtype(CPU, "auto") == (torch.bfloat16 if cpu_has_native_bf16() else None)
    for precision in ("auto", "fp32", "bf16"):  # CUDA keeps its fp16 path whatever the CPU setting
        assert autocast_dtype(torch.device("cuda"), precision) == torch.float16
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype(CPU, "fp8")


def conv_input_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    """Records the dtype each Conv2d computes in (autocast casts inside the op, so look at the
    weight-cast result: the output dtype)."""
    seen = set()
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv2d):
            layer.register_forward_hook(lambda _m, _i, output: seen.add(output.dtype))
    return seen


def test_downstream_training_and_scoring_under_bf16_keep_fp32_weights_and_learn():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(90, 140, (12, 1, 32, 32), dtype=np.uint8))
    masks = torch.zeros(12, 1, 32, 32, dtype=torch.bool)
    for i in range(12):
        y, x = rng.integers(2, 22, 2)
        images[i, :, y:y + 8, x:x + 8] = 240
        masks[i, :, y:y + 8, x:x + 8] = True
    data = TrainingSet(images, masks, torch.zeros(12, dtype=torch.bool), images[:0])
    params = EvaluateParams(train_steps=40, resolution=32, learning_rate=3e-3, unet_width=8)
    model = train_segmenter(data, params, device=CPU, precision="bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not bf16 weights
    seen = conv_input_dtypes(model)
    maps = predict(model, images, CPU, precision="bf16")
    assert seen == {torch.bfloat16} and maps.dtype == np.float32
    inside, outside = maps[masks[:, 0].numpy()].mean(), maps[~masks[:, 0].numpy()].mean()
    assert inside > outside + 0.3


def test_cpu_generation_under_bf16_keeps_the_exact_background(tiny_sd_dir, tmp_path):
    fp32, bf16 = load_sd(tiny_sd_dir, "cpu", "fp32"), load_sd(tiny_sd_dir, "cpu", "bf16")
    assert fp32.autocast_dtype is None and bf16.autocast_dtype == torch.bfloat16 and fp32 is not bf16
    assert bf16.dtype == torch.float32 and bf16.unet.dtype == torch.float32  # the weights stay fp32
    unet_dtypes, vae_dtypes = conv_input_dtypes(bf16.unet), conv_input_dtypes(bf16.vae)

    spec = METHODS["anogen"]
    params = spec.params.model_validate({"resolution": 64, "num_inference_steps": 3, "train_steps": 2,
                                         "batch_size": 1})
    reference = Exemplar("ref", textured_image(56, 72, "RGB", seed=1), box_mask(56, 72, (20, 16, 44, 40)), "p", "d")
    normals = [textured_image(60, 76, "RGB", seed=s) for s in (2, 3)]
    weight_dirs = {"SD_MODEL_DIR": str(tiny_sd_dir)}
    implementation(spec).finetune(FinetuneRequest(  # its textual-inversion embedding, trained in fp32
        params, [reference], NormalImages.in_memory(normals), seed=0, adapter_dir=tmp_path / "adapter",
        checkpoints=Checkpoints(tmp_path / "checkpoints"), weight_dirs=weight_dirs, device="cpu",
    ), lambda *_: None)
    request = GenerateRequest(
        params=params, masks=MaskSpec(source=spec.default_mask_source), exemplars=[reference], given_masks=[],
        normals=NormalImages.in_memory(normals), items=job_items(3, 0, 2, 1), adapter_dir=tmp_path / "adapter",
        weight_dirs=weight_dirs, device="cpu", precision="bf16",
    )
    pairs = generate_all(spec, request)
    assert unet_dtypes == {torch.bfloat16} and vae_dtypes == {torch.bfloat16}  # both ran under autocast
    assert [pair.index for pair in pairs] == [0, 1, 2]
    for pair in pairs:
        assert label_contract_violation(normals[request.items[pair.index].normal], pair) is None
        assert pair.mask_u8.any()


def test_group_norm_on_bf16_channels_last_input_normalises_as_plain_group_norm_and_keeps_the_layout():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32, 32).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ours, plain = GroupNorm(8, 16), torch.nn.GroupNorm(8, 16)
    with torch.no_grad():
        plain.weight.copy_(torch.rand(16))
        ours.load_state_dict(plain.state_dict())
    x_ours, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = ours(x_ours)
    expected = plain(x_plain)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    out.float().square().sum().backward()
    expected.float().square().sum().backward()
    torch.testing.assert_close(x_ours.grad.float(), x_plain.grad.float(), rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(ours.weight.grad, plain.weight.grad, rtol=2e-2, atol=1e-1)


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_upsample_hands_its_backward_a_gradient_in_the_input_layout_with_the_same_values(layout):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8).to(torch.bfloat16).contiguous(memory_format=layout)
    skip = torch.randn(2, 8, 16, 16).to(torch.bfloat16).contiguous(memory_format=layout)
    weights = torch.randn(2, 24, 16, 16).to(torch.bfloat16)
    x_ours, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = upsample(x_ours)
    received = []
    ours.grad_fn.register_prehook(lambda grad_outputs: received.append(grad_outputs[0]))
    plain = torch.nn.functional.interpolate(x_plain, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    (torch.cat([ours, skip], dim=1) * weights).sum().backward()
    (torch.cat([plain, skip], dim=1) * weights).sum().backward()
    assert received[0].is_contiguous(memory_format=layout)
    torch.testing.assert_close(x_ours.grad.float(), x_plain.grad.float(), rtol=1e-2, atol=1e-2)
