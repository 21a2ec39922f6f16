"""``torchvision://`` weights: names resolve through torchvision's registry, files come from
torch's hub cache (no download in tests: the file is put there first)."""

import os

import pytest
import torch

from kd_det.checkpoint import read_checkpoint, resolve_weights, torchvision_weights


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    return tmp_path


def test_model_name_gives_its_default_weights():
    from torchvision.models import ResNet18_Weights

    assert torchvision_weights("resnet18") is ResNet18_Weights.DEFAULT
    assert torchvision_weights("torchvision://resnet18") is ResNet18_Weights.DEFAULT
    assert (
        torchvision_weights("ResNet50_Weights.IMAGENET1K_V1").url.split("/")[-1]
        == "resnet50-0676ba61.pth"
    )


@pytest.mark.parametrize("name", ["resnet7", "ResNet18_Weights.NOPE"])
def test_unknown_names_are_refused_by_name(name):
    with pytest.raises(ValueError, match="torchvision has no"):
        torchvision_weights(name)


def test_scheme_reads_the_cached_file(hub_dir):
    url = torchvision_weights("resnet18").url
    folder = hub_dir / "checkpoints"
    folder.mkdir()
    local = folder / os.path.basename(url)
    torch.save({"fc.bias": torch.zeros(3)}, local)
    assert resolve_weights("torchvision://resnet18", "MODEL.WEIGHTS") == str(local)
    assert torch.equal(read_checkpoint(str(local))["fc.bias"], torch.zeros(3))


def test_failed_download_says_where_to_put_the_file(hub_dir, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as e:
        resolve_weights("torchvision://resnet18", "MODEL.WEIGHTS")
    assert "copy it to" in str(e.value)
    assert str(hub_dir / "checkpoints" / "resnet18-f37072fd.pth") in str(e.value)
    assert not any((hub_dir / "checkpoints").iterdir())
