"""sd_dir_problem: the torch-free availability check the API calls for diffusion methods."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.diffusion.checks import sd_dir_problem

pytest_plugins = ["tests.diffusion_fixtures"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sd_copy(tiny_sd_dir, tmp_path):
    return Path(shutil.copytree(tiny_sd_dir, tmp_path / "sd"))


def test_a_saved_tiny_model_is_usable(tiny_sd_dir):
    assert sd_dir_problem(str(tiny_sd_dir)) is None


def test_unset_and_missing_directories_are_named(tmp_path):
    assert "SD_MODEL_DIR is not set" in sd_dir_problem(None)
    assert "SD_MODEL_DIR is not set" in sd_dir_problem("")
    assert "is not a directory" in sd_dir_problem(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    "missing, reason",
    [
        ("model_index.json", "model_index.json is missing"),
        ("unet/config.json", "unet/config.json is missing"),
        ("unet/diffusion_pytorch_model.safetensors", "unet has no weights"),
        ("vae/diffusion_pytorch_model.safetensors", "vae has no weights"),
        ("text_encoder/model.safetensors", "text_encoder has no weights"),
        ("tokenizer", "tokenizer needs vocab.json and merges.txt"),
        ("scheduler/scheduler_config.json", "scheduler_config.json is missing"),
    ],
)
def test_each_missing_part_is_named(sd_copy, missing, reason):
    target = sd_copy / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert reason in sd_dir_problem(str(sd_copy))


def test_malformed_parts_are_named(sd_copy):
    (sd_copy / "vae" / "config.json").write_text("{not json")
    assert "vae/config.json is not valid JSON" in sd_dir_problem(str(sd_copy))


def test_fp16_variant_weights_are_enough(sd_copy):
    weights = sd_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    assert sd_dir_problem(str(sd_copy)) is None


def test_a_text_encoder_of_another_width_is_refused(sd_copy):
    config_path = sd_copy / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["hidden_size"] = 1024
    config_path.write_text(json.dumps(config))
    assert "does not match the text encoder's hidden_size (1024)" in sd_dir_problem(str(sd_copy))


def test_a_unet_without_cross_attention_is_refused(sd_copy):
    config_path = sd_copy / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["down_block_types"] = ["DownBlock2D"] * len(config["down_block_types"])
    config["up_block_types"] = ["UpBlock2D"] * len(config["up_block_types"])
    config["mid_block_type"] = "UNetMidBlock2D"
    config_path.write_text(json.dumps(config))
    assert "has no cross-attention block" in sd_dir_problem(str(sd_copy))
    del config["mid_block_type"]  # diffusers' default mid block is a cross-attention one
    config_path.write_text(json.dumps(config))
    assert sd_dir_problem(str(sd_copy)) is None


def test_a_v_prediction_model_is_refused(sd_copy):
    config_path = sd_copy / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "v_prediction"
    config_path.write_text(json.dumps(config))
    assert "'v_prediction'" in sd_dir_problem(str(sd_copy))


@pytest.mark.parametrize("module", ["service.app", "models.methods.registry", "models.weights"])
def test_the_api_side_never_imports_torch_or_diffusers(module):
    """The API image has no torch: the app, every method's spec and the weight checks import without it."""
    code = (f"import sys, {module}\n"
            "heavy = sorted({'torch', 'diffusers', 'transformers', 'peft'} & set(sys.modules))\n"
            "assert not heavy, f'imported {heavy}'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
