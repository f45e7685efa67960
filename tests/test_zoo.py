"""Model zoo encoders through their real loading paths, offline: architectures built
without weights, and state dicts written where the loaders look for them."""

from __future__ import annotations

import json
import pathlib
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import robustbench_architecture
from safetensors.torch import save_file
from torch import nn

from robust_transfer import load_encoder
from robust_transfer.core.errors import CheckpointError, InputError, MissingFileError
from robust_transfer.models import resolve_encoder
from robust_transfer.models.weights import read_weights
from robust_transfer.models.zoo import IMAGENET_MEAN, IMAGENET_STD


def _normalised(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


class _Payload:
    """Unpickling this creates ``marker``: code a weights file must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_torchvision_random_weights_penultimate_is_the_classifier_input() -> None:
    encoder = load_encoder("torchvision:resnet18")
    x = torch.rand(2, 3, 224, 224)
    features = encoder(x)
    assert features.shape == (2, 512)
    assert encoder.input_size == (3, 224, 224)
    model = encoder.model
    with torch.no_grad():
        # Independent: the torchvision model's own logits from normalised inputs.
        logits = model(_normalised(x, IMAGENET_MEAN, IMAGENET_STD))
        torch.testing.assert_close(model.fc(features), logits, rtol=1e-4, atol=1e-4)
    assert load_encoder("torchvision:resnet18", layer="layer3")(x).shape == (2, 256)


def test_torchvision_weights_are_read_where_torch_hub_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(MissingFileError, match=r"put them at .*resnet18-f37072fd.pth"):
        load_encoder("torchvision:resnet18:IMAGENET1K_V1")
    torch.manual_seed(3)
    reference = torchvision.models.resnet18()
    target = tmp_path / "hub" / "checkpoints" / Path(weights.url).name
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), target)
    encoder = load_encoder("torchvision:resnet18:IMAGENET1K_V1")
    torch.testing.assert_close(encoder.model.conv1.weight, reference.conv1.weight)
    assert tuple(encoder.mean.flatten().tolist()) == pytest.approx(weights.transforms().mean)
    with pytest.raises(InputError, match="no weights 'IMAGENET9K'"):
        load_encoder("torchvision:resnet18:IMAGENET9K")


def test_resize_and_clear_errors_for_other_sizes_layers_and_names() -> None:
    encoder = load_encoder("torchvision:resnet18", resize=True)
    assert encoder(torch.rand(2, 1, 28, 28)).shape == (2, 512)
    with pytest.raises(InputError, match=r"takes 3x224x224 images, got 1x28x28.*resize=True"):
        load_encoder("torchvision:resnet18")(torch.rand(2, 1, 28, 28))
    with pytest.raises(InputError, match=r"no layer 'layer9'.*layer4"):
        load_encoder("torchvision:resnet18", layer="layer9")
    with pytest.raises(InputError, match=r"no model 'resnet181'.*resnet18"):
        load_encoder("torchvision:resnet181")
    # A name near nothing gets no empty list of close names.
    with pytest.raises(InputError, match=r"^torchvision has no model 'qqqq'$"):
        load_encoder("torchvision:qqqq")
    with pytest.raises(InputError, match=r"no layer ''$"):
        load_encoder("torchvision:resnet18", layer="")
    with pytest.raises(InputError, match="expected 'robustbench:NAME:DATASET:THREAT'"):
        load_encoder("robustbench:Standard")


def test_timm_features_and_own_checkpoint(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(1)
    classifier = timm.create_model("resnet18", num_classes=7).eval()
    path = tmp_path / "mine.safetensors"
    save_file(classifier.state_dict(), path)
    encoder = load_encoder("timm:resnet18", path)
    torch.testing.assert_close(encoder.model.conv1.weight, classifier.conv1.weight)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        logits = classifier(_normalised(x, IMAGENET_MEAN, IMAGENET_STD))
        torch.testing.assert_close(classifier.fc(encoder(x)), logits, rtol=1e-4, atol=1e-4)
    save_file({"conv1.weight": classifier.conv1.weight.contiguous()}, tmp_path / "part.safetensors")
    with pytest.raises(CheckpointError, match="weights missing"):
        load_encoder("timm:resnet18", tmp_path / "part.safetensors")


def test_missing_zoo_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(InputError, match=r"robust-transfer\[zoo\]"):
        load_encoder("timm:resnet18")


_TINY_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 24},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 24, "heads": 2, "layers": 1},
}


def test_open_clip_image_tower_and_robust_weights_from_a_file(tmp_path: Path) -> None:
    import open_clip

    (tmp_path / "tiny-test-vit.json").write_text(json.dumps(_TINY_CLIP))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(2)
    reference = open_clip.create_model("tiny-test-vit")
    path = tmp_path / "fare.pt"
    torch.save(reference.state_dict(), path)  # a whole CLIP model: the tower is 'visual.'
    encoder = load_encoder("open_clip:tiny-test-vit", path)
    x = torch.rand(3, 3, 32, 32)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), reference.encode_image(_normalised(x, mean, std)))
    assert encoder(x).shape == (3, 24)


def _robustbench_file(model_dir: Path, name: str) -> tuple[nn.Module, Path]:
    model = robustbench_architecture(name, "cifar10", "Linf")
    path = model_dir / "cifar10" / "Linf" / f"{name}.pt"
    path.parent.mkdir(parents=True)
    return model, path


def test_robustbench_reads_model_dir_and_refuses_code_in_pickles(tmp_path: Path) -> None:
    name = "Sehwag2021Proxy_R18"
    spec = f"robustbench:{name}:cifar10:Linf"
    model_dir = tmp_path / "models"
    reference, path = _robustbench_file(model_dir, name)
    marker = tmp_path / "pwned"
    torch.save({"state_dict": reference.state_dict(), "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_encoder(spec, model_dir=model_dir)
    assert not marker.exists()
    torch.save({"state_dict": reference.state_dict()}, path)
    loaded = resolve_encoder(spec, model_dir=model_dir)
    encoder = loaded.module
    assert loaded.info["zoo"] == "robustbench"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        # RobustBench models take [0, 1] inputs; the last linear layer maps the features
        # to the logits.
        linear = [m for m in reference.modules() if isinstance(m, nn.Linear)][-1]
        torch.testing.assert_close(linear(encoder(x)), reference.eval()(x), rtol=1e-4, atol=1e-4)


def test_robustbench_missing_weights_say_where_to_put_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from robust_transfer.models.zoo import _robustbench

    robustbench_utils = _robustbench()

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(robustbench_utils, "download_gdrive_new", offline)
    with pytest.raises(MissingFileError, match=r"put them at .*cifar10/Linf/Standard.pt"):
        load_encoder("robustbench:Standard:cifar10:Linf", model_dir=tmp_path)
    with pytest.raises(InputError, match=r"no cifar10/Linf model 'Standart'.*Standard"):
        load_encoder("robustbench:Standart:cifar10:Linf", model_dir=tmp_path)


def test_weights_files_never_run_code_unless_trusted(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "payload": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="trust_checkpoint=True"):
        read_weights(path)
    assert not marker.exists()
    read_weights(path, trust_checkpoint=True)
    assert marker.exists()
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="corrupted"):
        read_weights(tmp_path / "bad.pt")
    with pytest.raises(MissingFileError):
        read_weights(tmp_path / "absent.safetensors")


def test_cli_takes_zoo_encoders_with_layer_and_resize(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from robust_transfer import cli

    out = tmp_path / "v.json"
    common = ["--data", "task:digits8x8-5-9", "--n", "3", "--eps", "0.1", "--steps", "1"]
    args = ["vulnerability", "--encoder", "torchvision:resnet18", *common]
    assert cli.main([*args, "--layer", "layer1", "--resize", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["max_shift"] > 0
    capsys.readouterr()
    assert cli.main(args) == 2
    assert "--resize" in capsys.readouterr().err


def test_config_passes_weights_layer_and_resize(tmp_path: Path) -> None:
    from robust_transfer.core.errors import ConfigError
    from robust_transfer.study.config import parse_config

    weights = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(1)}, weights)

    def config(encoder: dict[str, object]) -> dict[str, object]:
        return {
            "encoders": {"zoo": encoder},
            "adaptations": {"lp": {"protocol": "linear-probe"}},
            "tasks": [{"name": "mnist-5-9", "threats": {"L2": [0.5]}}],
        }

    table = {"spec": "torchvision:resnet18", "weights": "w.safetensors", "layer": "layer4"}
    spec = parse_config(config(table | {"resize": True}), base=tmp_path).encoders["zoo"]
    assert spec.source == "torchvision:resnet18"
    assert spec.options == {"checkpoint": str(weights), "layer": "layer4", "resize": True}
    with pytest.raises(ConfigError, match="weights file not found"):
        parse_config(config(table | {"weights": "absent.pt"}), base=tmp_path)
    with pytest.raises(ConfigError, match="resize"):
        parse_config(config(table | {"resize": "yes"}), base=tmp_path)
