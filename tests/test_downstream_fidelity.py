"""Mask fidelity, Inception Score and IC-LPIPS (with tiny TorchScript stand-ins for the real networks)."""

import numpy as np
import pytest
import torch
from torch import nn

from models.downstream.fidelity import (
    generation_metrics,
    inception_score,
    intra_cluster_distance,
    mask_fidelity,
)


def test_mask_fidelity_hand_case():
    normal = np.zeros((4, 4))
    generated = normal.copy()
    mask = np.zeros((4, 4), np.uint8)
    mask[0, :] = 255  # 4 mask pixels
    generated[0, 0] = generated[0, 1] = 0.5  # two of them changed visibly
    generated[0, 2] = 0.01  # one changed invisibly (below the 0.05 threshold)
    generated[3, 3] = 0.49  # one change outside the mask
    result = mask_fidelity([(generated, normal, mask)])
    assert result["leakage"] == pytest.approx(0.49 / 1.5)
    assert result["fill"] == pytest.approx(2 / 4)
    assert result["pairs"] == 1


def test_mask_fidelity_pools_pairs_and_takes_the_strongest_channel():
    normal = np.zeros((2, 2, 3))
    inside_only = normal.copy()
    inside_only[0, 0, 1] = 1.0
    mask = np.array([[1, 0], [0, 0]])
    unchanged = (normal, normal, mask)
    result = mask_fidelity([(inside_only, normal, mask), unchanged])
    assert result == {"leakage": 0.0, "fill": 0.5, "pairs": 2}
    assert mask_fidelity([]) is None


def test_inception_score_bounds():
    same = np.tile([0.7, 0.2, 0.1], (10, 1))
    assert inception_score(same) == pytest.approx(1.0)  # no diversity
    assert inception_score(np.eye(4)) == pytest.approx(4.0)  # confident and spread over 4 classes


def test_intra_cluster_distance_hand_case():
    centres = np.array([[0.0], [10.0]])
    generated = np.array([[0.0], [1.0], [2.0], [10.0], [12.0]])
    # Cluster 0: squared distances 1, 4, 1 -> mean 2; cluster 1: 4 -> mean 4.
    assert intra_cluster_distance(generated, centres) == pytest.approx(3.0)
    assert intra_cluster_distance(np.array([[0.0], [10.0]]), centres) is None  # singletons only


class FakeInception(nn.Module):
    """Stand-in with the call convention of inception-2015-12-05.pt: probabilities from brightness."""

    def forward(self, images: torch.Tensor, no_output_bias: bool = False) -> torch.Tensor:
        brightness = images.mean(dim=(1, 2, 3)) / 255
        return torch.softmax(torch.stack([brightness, 1 - brightness], dim=1) * 20, dim=1)


class FakeLpips(nn.Module):
    """Stand-in with the call convention of vgg16.pt: features whose squared distance is the distance."""

    def forward(self, images: torch.Tensor, resize_images: bool = True, return_lpips: bool = False) -> torch.Tensor:
        return images.mean(dim=(2, 3)) / 255


def test_generation_metrics_not_configured_says_why():
    images = torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    result = generation_metrics(images, images[:1])
    assert result["inception_score"] is None and "not configured" in result["inception_score_reason"]
    assert result["ic_lpips"] is None and "not configured" in result["ic_lpips_reason"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript is deprecated; the weights are in it
def test_generation_metrics_with_torchscript_weights(tmp_path):
    torch.jit.script(FakeInception()).save(str(tmp_path / "inception.pt"))
    torch.jit.script(FakeLpips()).save(str(tmp_path / "vgg16.pt"))
    levels = torch.tensor([0, 10, 20, 230, 240, 250], dtype=torch.uint8)
    generated = levels.view(6, 1, 1, 1).expand(6, 1, 40, 40).contiguous()  # grayscale, any size
    exemplars = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 16, 16).contiguous()
    result = generation_metrics(generated, exemplars, inception_weights=tmp_path / "inception.pt",
                                lpips_weights=tmp_path / "vgg16.pt", batch_size=4)
    assert result["inception_score"] == pytest.approx(2.0, abs=0.05)  # two confident, balanced classes
    features = levels.float().view(6, 1).expand(6, 3) / 255
    expected = intra_cluster_distance(features.numpy(), np.array([[0.0] * 3, [1.0] * 3]))
    assert result["ic_lpips"] == pytest.approx(expected, rel=1e-4)
    assert result["inception_score_reason"] is None and result["ic_lpips_reason"] is None
