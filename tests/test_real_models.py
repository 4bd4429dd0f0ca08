"""Real architectures with random weights (nothing downloaded)."""
import pytest
import torch
from conftest import count, optimize_and_compare, randomize_batchnorm
from torch import nn


torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")


def test_resnet18_loses_every_batchnorm():
    model = randomize_batchnorm(torchvision.models.resnet18()).eval()
    gm, report = optimize_and_compare(model, (torch.randn(2, 3, 64, 64),))
    assert count(gm, nn.modules.batchnorm._BatchNorm) == 0
    assert len([r for r in report.applied if r.pass_name == "fold_batchnorm"]) == 20


def unit_prelu():
    return nn.PReLU(init=1.0)


@pytest.mark.parametrize("act_layer", [unit_prelu, nn.Identity], ids=["prelu1", "identity"])
def test_timm_vit_collapses_every_mlp(act_layer):
    model = timm.create_model("vit_tiny_patch16_224", act_layer=act_layer, img_size=64).eval()
    gm, report = optimize_and_compare(model, (torch.randn(2, 3, 64, 64),))
    collapsed = [r for r in report.applied if r.pass_name == "collapse"]
    assert len(collapsed) == len(model.blocks) == 12
    assert {w.rpartition(".")[0] for r in collapsed for w in r.where} == {f"blocks.{i}.mlp" for i in range(12)}
    assert report.params_after < 0.7 * report.params_before


def vgg_style_classifier():
    """VGG's head (Linear → act → Dropout → Linear → act → Dropout → Linear), activations linear."""
    features = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
    head = nn.Sequential(nn.Flatten(), nn.Linear(256, 1024), unit_prelu(), nn.Dropout(), nn.Linear(1024, 1024),
                         unit_prelu(), nn.Dropout(), nn.Linear(1024, 10))
    return randomize_batchnorm(nn.Sequential(features, head)).eval()


def test_vgg_style_classifier_head_collapses_to_one_linear():
    gm, report = optimize_and_compare(vgg_style_classifier(), (torch.randn(2, 3, 16, 16),))
    assert count(gm, nn.Linear) == 1 and count(gm, nn.BatchNorm2d) == 0
    assert report.params_after < 0.1 * report.params_before


@pytest.mark.slow
def test_torchvision_vgg11_bn_with_linear_activations():
    model = torchvision.models.vgg11_bn()
    model.classifier[1] = unit_prelu()
    model.classifier[4] = unit_prelu()
    model = randomize_batchnorm(model).eval()
    gm, report = optimize_and_compare(model, (torch.randn(1, 3, 64, 64),))
    assert count(gm, nn.Linear) == 1 and count(gm, nn.BatchNorm2d) == 0
