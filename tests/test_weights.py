"""Per-method weights: the torch-free checks of each weight setting, and a spec's reasons."""

import json

import pytest

from models.methods.params import StrictModel
from models.methods.spec import MethodSpec
from models.weights import WEIGHT_CHECKS, blip2_dir_problem, convnext_dir_problem
from service.settings import WEIGHT_SETTINGS, Settings


def test_every_weight_setting_has_a_check_and_is_a_setting():
    assert set(WEIGHT_CHECKS) == set(WEIGHT_SETTINGS)
    assert all(name.lower() in Settings.model_fields for name in WEIGHT_SETTINGS)


@pytest.fixture(scope="module")
def convnext_dir(tmp_path_factory):
    """A tiny ConvNeXt saved by transformers, as a user's ConvNeXt-Tiny directory would be."""
    from transformers import ConvNextConfig, ConvNextModel

    folder = tmp_path_factory.mktemp("convnext")
    ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])).save_pretrained(folder)
    return folder


def test_a_saved_convnext_is_usable_and_what_is_wrong_is_named(convnext_dir, tmp_path):
    assert convnext_dir_problem(str(convnext_dir)) is None
    assert "CONVNEXT_MODEL_DIR is not set" in convnext_dir_problem(None)
    assert "is not a directory" in convnext_dir_problem(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert "holds a 'vit' model, not 'convnext'" in convnext_dir_problem(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "convnext"}))
    assert "has no weights" in convnext_dir_problem(str(tmp_path))


def test_blip2_needs_weights_tokenizer_and_image_processor(tmp_path):
    assert "BLIP2_MODEL_DIR is not set" in blip2_dir_problem("")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    assert "has no weights" in blip2_dir_problem(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert "has no tokenizer" in blip2_dir_problem(str(tmp_path))
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    assert "has no image processor" in blip2_dir_problem(str(tmp_path))
    (tmp_path / "preprocessor_config.json").write_text("{}")
    assert blip2_dir_problem(str(tmp_path)) is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2",
                                                      "architectures": ["Blip2ForConditionalGeneration"]}))
    assert "holds a Blip2ForConditionalGeneration" in blip2_dir_problem(str(tmp_path))


def test_a_spec_names_every_missing_weight(convnext_dir):
    spec = MethodSpec(name="x", family="fine-tune", summary="", params=StrictModel, kinds=("generate",),
                      mask_sources=("exemplar",), default_mask_source="exemplar", implementation="",
                      weights=("SD_MODEL_DIR", "CONVNEXT_MODEL_DIR"))
    reason = spec.unavailable_reason({})
    assert "SD_MODEL_DIR is not set" in reason and "CONVNEXT_MODEL_DIR is not set" in reason
    reason = spec.unavailable_reason({"CONVNEXT_MODEL_DIR": str(convnext_dir)})
    assert "SD_MODEL_DIR is not set" in reason and "CONVNEXT" not in reason
