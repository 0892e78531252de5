"""pcl_ext.models.build_encoder: shapes, stems, grayscale, parameter counts, determinism."""
import pytest
import torch

torchvision = pytest.importorskip("torchvision")  # the trainer's dependency, not the ops'
from pcl_ext.models import build_encoder  # noqa: E402

RESNET18_NO_FC = 11_689_512 - (512 * 1000 + 1000)      # torchvision's count minus its fc
MLP_HEAD = (512 * 512 + 512) + (512 * 128 + 128)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch,feature_dim", [("resnet18", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("small_images", [False, True])
def test_shapes(arch, feature_dim, small_images):
    torch.manual_seed(0)
    model = build_encoder(arch, dim=128, small_images=small_images).eval()
    x = torch.randn(2, 3, 16 if small_images else 32, 16 if small_images else 32)
    with torch.no_grad():
        out, feats = model(x), model.features(x)
        head = model.fc(feats)
    assert model.feature_dim == feature_dim
    assert out.shape == (2, 128) and feats.shape == (2, feature_dim)
    torch.testing.assert_close(out, head)
    # Not normalized by the module: the trainer applies F.normalize.
    assert not torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-3)


@pytest.mark.parametrize("small_images,layer4_side", [(False, 1), (True, 4)])
def test_small_stem_keeps_resolution(small_images, layer4_side):
    model = build_encoder(small_images=small_images).eval()
    seen = []
    model.layer4.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert seen[0][-2:] == (layer4_side, layer4_side)


@pytest.mark.parametrize("small_images", [False, True])
def test_grayscale(small_images):
    model = build_encoder(small_images=small_images, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 128)
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 3, 28, 28))


def test_parameter_count():
    def count(**kwargs):
        with torch.device("meta"):  # shapes only: no memory, no initialization cost
            return sum(p.numel() for p in build_encoder(**kwargs).parameters())

    assert count() == RESNET18_NO_FC + MLP_HEAD == 11_504_832
    assert count(small_images=True) == 11_504_832 - 3 * 64 * (49 - 9)
    assert count(in_channels=1) == 11_504_832 - 2 * 64 * 49
    assert count(mlp=False) == RESNET18_NO_FC + 512 * 128 + 128
    assert count(dim=64) == RESNET18_NO_FC + 512 * 513 + 512 * 64 + 64
    with torch.device("meta"):
        n50 = sum(p.numel() for p in torchvision.models.resnet50().parameters())
    assert count(arch="resnet50") == n50 - (2048 * 1000 + 1000) \
        + (2048 * 2048 + 2048) + (2048 * 128 + 128)


def test_state_dict_names_match_moco():
    with torch.device("meta"):
        keys = set(build_encoder().state_dict())
        resnet = {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc")}
    assert {"conv1.weight", "fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"} <= keys
    assert resnet <= keys


def test_determinism_under_seed():
    def build(seed):
        torch.manual_seed(seed)
        return build_encoder(small_images=True, in_channels=1).eval()

    a, b, c = build(0), build(0), build(1)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    assert not torch.equal(a.fc[0].weight, c.fc[0].weight)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_trains():
    model = build_encoder(small_images=True)
    model(torch.randn(4, 3, 16, 16)).square().sum().backward()
    assert model.conv1.weight.grad.abs().sum() > 0 and model.fc[0].weight.grad.abs().sum() > 0


def test_bad_arch():
    with pytest.raises(ValueError, match="arch"):
        build_encoder("vgg16")
