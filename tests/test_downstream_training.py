"""U-Net, data loading and augmentation, losses, the training loop (seed, checkpoints), classifier, arms."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from models.downstream import train as train_module
from models.downstream.arms import combine_arms, exemplar_paste_arm, model_free_arm
from models.downstream.classify import (
    classification_accuracy,
    predict_classes,
    train_classifier,
)
from models.downstream.data import augment, image_channels, image_tensor, mask_tensor
from models.downstream.params import EvaluateParams
from models.downstream.train import (
    TrainingSet,
    focal_loss,
    predict,
    train_segmenter,
    weak_label_weights,
)
from models.downstream.unet import UNet

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.mark.parametrize("channels, size", [(1, 32), (3, 48)])
def test_unet_maps_each_pixel_to_a_logit(channels, size):
    model = UNet(in_channels=channels, width=8)
    assert model(torch.rand(2, channels, size, size)).shape == (2, 1, size, size)


def test_images_of_any_size_and_mode_become_square_tensors():
    gray = Image.fromarray(np.full((30, 50), 7, np.uint8))
    rgb = Image.fromarray(np.full((41, 23, 3), 9, np.uint8))
    assert image_channels([gray]) == 1 and image_channels([gray, rgb]) == 3
    assert image_tensor(gray, 32, 1).shape == (1, 32, 32) and image_tensor(gray, 32, 1).dtype == torch.uint8
    assert image_tensor(gray, 32, 3).shape == (3, 32, 32)
    assert image_tensor(rgb, 16, 1).shape == (1, 16, 16)
    mask = np.zeros((30, 50), np.uint8)
    mask[10:20, 10:30] = 255
    resized = mask_tensor(mask, 32)
    assert resized.dtype == torch.bool and resized.shape == (1, 32, 32) and 0 < resized.sum() < 32 * 32


def test_augmentation_moves_image_and_mask_together():
    masks = torch.zeros(6, 1, 32, 32)
    for i in range(6):
        masks[i, 0, 4 + i:12 + i, 8:20] = 1
    images = 0.3 + 0.4 * masks.repeat(1, 3, 1, 1)
    augmented, moved_masks = augment(images.clone(), masks.clone(), torch.Generator().manual_seed(0))
    assert not torch.equal(moved_masks, masks)  # something moved
    bright = augmented.mean(dim=1, keepdim=True) > augmented.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.equal(bright, moved_masks > 0.5)
    again, _ = augment(images.clone(), masks.clone(), torch.Generator().manual_seed(0))
    assert torch.equal(again, augmented)


def test_focal_loss():
    logits = torch.tensor([3.0, -3.0, 0.2])
    targets = torch.tensor([1.0, 1.0, 0.0])
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert torch.allclose(focal_loss(logits, targets, gamma=0), cross_entropy)
    focal = focal_loss(logits, targets)
    assert focal[0] < 0.01 * cross_entropy[0]  # confident and right: almost no loss
    assert focal[1] > 0.9 * cross_entropy[1]  # confident and wrong: almost the full loss


def test_weak_labels_ignore_confident_normal_pixels_inside_the_box():
    logits = torch.tensor([-5.0, 0.0, 5.0, -5.0]).view(1, 1, 1, 4).repeat(2, 1, 1, 1)
    masks = torch.tensor([1.0, 1.0, 1.0, 0.0]).view(1, 1, 1, 4).repeat(2, 1, 1, 1)
    weak = torch.tensor([True, False])
    weights = weak_label_weights(logits, masks, weak, tau=0.9)
    # Weak pair: P(normal) = 0.993 inside the box -> ignored; 0.5 and 0.007 -> kept; outside -> kept.
    assert weights[0].flatten().tolist() == [0.0, 1.0, 1.0, 1.0]
    assert weights[1].flatten().tolist() == [1.0, 1.0, 1.0, 1.0]  # an exact mask is never ignored
    assert weak_label_weights(logits, masks, weak, tau=1.0)[0].flatten().tolist() == [1.0, 1.0, 1.0, 1.0]


def square_data(count=12, size=32, seed=0) -> TrainingSet:
    generator = torch.Generator().manual_seed(seed)
    normals = (100 + 20 * torch.rand(count, 1, size, size, generator=generator)).to(torch.uint8)
    anomalous, masks = normals.clone(), torch.zeros(count, 1, size, size, dtype=torch.bool)
    for i in range(count):
        y, x = 3 + 2 * i % 20, 5 + 3 * i % 20
        anomalous[i, :, y:y + 8, x:x + 8] = 240
        masks[i, :, y:y + 8, x:x + 8] = True
    return TrainingSet(anomalous, masks, torch.zeros(count, dtype=torch.bool), normals)


def test_training_learns_bright_squares():
    data = square_data()
    params = EvaluateParams(train_steps=40, resolution=32, learning_rate=3e-3, unet_width=8)
    model = train_segmenter(data, params, device=CPU)
    maps = predict(model, data.anomalous, CPU)
    assert maps.shape == (12, 32, 32) and 0 <= maps.min() and maps.max() <= 1
    inside, outside = maps[data.masks[:, 0].numpy()].mean(), maps[~data.masks[:, 0].numpy()].mean()
    assert inside > outside + 0.3


def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "CHECKPOINT_EVERY", 2)
    data = square_data(count=4)
    params = EvaluateParams(train_steps=5, resolution=32, batch_size=4, unet_width=8)
    uninterrupted = train_segmenter(data, params, device=CPU)

    class Cancelled(Exception):
        pass

    def cancel_at_step_3(stage, done, total):
        if done == 3:
            raise Cancelled

    checkpoint = tmp_path / "arm.pt"
    with pytest.raises(Cancelled):
        train_segmenter(data, params, device=CPU, on_progress=cancel_at_step_3, checkpoint=checkpoint)
    assert torch.load(checkpoint, weights_only=True)["step"] == 2
    steps_run = []
    resumed = train_segmenter(data, params, device=CPU, checkpoint=checkpoint,
                              on_progress=lambda stage, done, total: steps_run.append(done))
    assert steps_run == [3, 4, 5]
    for a, b in zip(uninterrupted.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)

    other_params = params.model_copy(update={"seed": 1})
    steps_run.clear()
    train_segmenter(data, other_params, device=CPU, checkpoint=checkpoint,
                    on_progress=lambda stage, done, total: steps_run.append(done))
    assert steps_run == [1, 2, 3, 4, 5]  # a checkpoint of other params is not resumed


def test_classifier_tells_bright_from_dark_defects():
    data = square_data(count=16)
    images = data.anomalous.clone()
    images[8:][data.masks[8:].expand_as(images[8:])] = 10  # the second half: dark squares
    labels = torch.tensor([0] * 8 + [1] * 8)
    params = EvaluateParams(train_steps=40, resolution=32, learning_rate=3e-3, unet_width=8)
    model = train_classifier(images, labels, 2, params, device=CPU)
    result = classification_accuracy(predict_classes(model, images, CPU), labels, ["bright", "dark"])
    assert result["accuracy"] >= 0.9


def test_classification_accuracy_hand_case():
    result = classification_accuracy(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), ["a", "b", "c", "d"])
    assert result == {"accuracy": 0.75, "per_defect": {"a": 1.0, "b": 1.0, "c": 0.5}, "test_images": 4}


def test_exemplar_paste_copies_only_the_masked_defect_pixels():
    normals = torch.full((3, 1, 32, 32), 50, dtype=torch.uint8)
    exemplar, mask = torch.full((1, 1, 32, 32), 90, dtype=torch.uint8), torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[0, 0, 10:16, 10:12] = True  # an L shape: its bounding box holds unmasked pixels too
    mask[0, 0, 14:16, 12:18] = True
    exemplar[mask] = 200
    arm = exemplar_paste_arm("ex", normals, exemplar, mask, ["scratch"], count=5, seed=0)
    assert arm.images.shape == (5, 1, 32, 32) and arm.defects == ["scratch"] * 5
    for image, pasted in zip(arm.images, arm.masks):
        assert pasted.sum() == mask.sum()
        assert (image[pasted] == 200).all() and (image[~pasted] == 50).all()
    assert arm.mask_fidelity == {"leakage": 0.0, "fill": 1.0, "pairs": 5}
    combined = combine_arms("both", [arm, arm])
    assert len(combined.images) == 10 and combined.kind == "combined" and combined.mask_fidelity is None


@pytest.mark.parametrize("method", ["draem", "cutpaste"])
def test_model_free_arms(method):
    normals = (100 + 50 * torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))).to(torch.uint8)
    arm = model_free_arm(method, method, normals, count=6, seed=0)
    assert arm.images.shape == (6, 1, 32, 32) and arm.masks.shape == (6, 1, 32, 32)
    assert arm.masks.flatten(1).any(dim=1).all()
    assert arm.defects == [""] * 6 and arm.mask_fidelity["pairs"] == 6
