"""Encoders (a registry carrying their pretrained settings) and the decoders (a registry of builders).

- ``ENCODERS["mobilenet_v2"]``: torchvision's MobileNetV2 ``features`` (2,223,872 parameters; 1280×4×4 at 128×128),
  with ImageNet mean/std, the indices of its stride-2/4/8/16 outputs for skip connections, and its weights.
- ``ReportDecoder``: the student report's decoder, five ``ConvTranspose2d(k=4, s=2, p=1)``
  1280→512→256→128→64→32, each with ReLU and dropout, then ``Conv2d(32, 1, 1)`` (13,272,065 parameters).
- ``UNetDecoder``: a U-Net-style decoder using the encoder's intermediate features as skips, in the shape of
  segmentation_models_pytorch's ``Unet(encoder_name="mobilenet_v2")``.

Encoder weights: ``"imagenet"`` (torchvision's ``MobileNet_V2_Weights.IMAGENET1K_V1``, downloaded once into
torchvision's cache; when the environment variable ``ISIC_ENCODER_WEIGHTS`` names a file, that file is used
instead, for offline machines), a path to a ``state_dict`` of ``torchvision.models.mobilenet_v2`` (loaded with
``weights_only=True``), or ``None`` (random initialisation).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..base.files import shown_path, third_party_progress

WEIGHTS_ENV = "ISIC_ENCODER_WEIGHTS"


class EncoderWeightsError(RuntimeError):
    """Encoder weights could not be found, downloaded or loaded; the message names the fix."""


@dataclass(frozen=True)
class EncoderSpec:
    """An encoder the registry builds: torchvision's network ``torchvision_name`` (its ``features``), its ImageNet
    weights (the ``weights`` enum member), the input statistics they were trained with and where the skips are."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    out_channels: int
    skip_indices: tuple[int, ...]  # feature blocks whose outputs feed the U-Net skips (strides 2, 4, 8, 16)
    skip_channels: tuple[int, ...]
    torchvision_name: str
    weights: str  # "<WeightsEnum>.<member>" in torchvision.models

    def network(self, imagenet: bool):
        """torchvision's whole network, with its ImageNet weights or none (``features`` is the encoder)."""
        import torchvision

        enum, member = self.weights.split(".")
        weights = getattr(getattr(torchvision.models, enum), member) if imagenet else None
        return getattr(torchvision.models, self.torchvision_name)(weights=weights)

    def weights_url(self) -> str:
        import torchvision

        enum, member = self.weights.split(".")
        return getattr(getattr(torchvision.models, enum), member).url


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ENCODERS: dict[str, EncoderSpec] = {
    "mobilenet_v2": EncoderSpec(
        name="mobilenet_v2",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        out_channels=1280,
        skip_indices=(1, 3, 6, 13),
        skip_channels=(16, 24, 32, 96),
        torchvision_name="mobilenet_v2",
        weights="MobileNet_V2_Weights.IMAGENET1K_V1",  # top-1 71.88%
    ),
}


def resolve_weights(weights: str | None) -> str | None:
    """``"imagenet"`` becomes ``$ISIC_ENCODER_WEIGHTS`` when that is set; anything else is returned unchanged."""
    if weights == "imagenet" and os.environ.get(WEIGHTS_ENV):
        return os.environ[WEIGHTS_ENV]
    return weights


def weights_on_disk(weights: str | None) -> bool:
    """Whether the encoder weights ``weights`` name are on this machine without a download: a state_dict file, or
    torchvision's ImageNet file in torch's cache (``None``: a random encoder, nothing to find)."""
    import torch

    weights = resolve_weights(weights)
    if weights is None or weights == "none":
        return False
    if weights == "imagenet":
        url = ENCODERS["mobilenet_v2"].weights_url()
        return (Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]).is_file()
    return Path(weights).expanduser().is_file()


def build_encoder(name: str = "mobilenet_v2", weights: str | None = "imagenet") -> nn.Sequential:
    """The encoder ``name`` with ``weights`` ("imagenet", a state_dict path, or None); see the module docstring."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    spec = ENCODERS[name]
    weights = resolve_weights(weights)
    if weights is None or weights == "none":
        return spec.network(imagenet=False).features
    if weights == "imagenet":
        try:
            with third_party_progress():  # torch.hub's "Downloading: …" line and bar: the terminal, not the notebook
                net = spec.network(imagenet=True)
        except Exception as exc:  # URLError, socket errors, a corrupt cached file
            raise EncoderWeightsError(
                f"could not download the ImageNet weights for {name} ({type(exc).__name__}: {exc}). "
                f"Fix: connect to the internet once (torchvision caches them), or pass a state_dict path as "
                f"encoder_weights, or set {WEIGHTS_ENV}=/path/to/mobilenet_v2_imagenet.pth."
            ) from exc
        return net.features
    path = Path(weights).expanduser()
    if not path.is_file():
        raise EncoderWeightsError(
            f"encoder weights file {path} not found. Fix: pass the path of a torchvision {name} state_dict, "
            f"'imagenet' to download the official weights, or null for random initialisation."
        )
    net = spec.network(imagenet=False)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        net.load_state_dict(state, strict=True)
    except Exception as exc:
        raise EncoderWeightsError(
            f"{path} is not a state_dict of torchvision's {name} ({exc}). Fix: pass a file saved with "
            f"torch.save(torchvision.models.{spec.torchvision_name}(...).state_dict(), path)."
        ) from exc
    return net.features


class ReportDecoder(nn.Module):
    """The report's decoder: five ConvTranspose2d(k=4, s=2, p=1) + ReLU + Dropout, then a 1×1 conv to one logit."""

    needs_skips = False

    def __init__(self, in_channels: int = 1280, channels=(512, 256, 128, 64, 32), dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            layers += [
                nn.ConvTranspose2d(previous, width, kernel_size=4, stride=2, padding=1),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
            ]
            previous = width
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Conv2d(previous, 1, kernel_size=1)

    def forward(self, features):
        deepest = features[-1] if isinstance(features, (list, tuple)) else features
        return self.head(self.blocks(deepest))


class ConvBlock(nn.Sequential):
    """conv3×3 → BatchNorm → ReLU, twice."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNetDecoder(nn.Module):
    """U-Net decoder: at each of five ×2 upsamplings, concatenate the encoder's feature at that stride.

    Channels (256, 128, 64, 32, 16) and skips from strides 16, 8, 4, 2 as in smp's Unet for mobilenet_v2.
    """

    needs_skips = True

    def __init__(
        self, in_channels: int, skip_channels=(16, 24, 32, 96), channels=(256, 128, 64, 32, 16), dropout: float = 0.0
    ):
        super().__init__()
        skips = list(reversed(skip_channels)) + [0]  # deepest skip first; the last block has none
        blocks, previous = [], in_channels
        for width, skip in zip(channels, skips):
            blocks.append(ConvBlock(previous + skip, width))
            previous = width
        self.blocks = nn.ModuleList(blocks)
        self.dropout = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(previous, 1, kernel_size=3, padding=1)

    def forward(self, features):
        *skips, x = features
        skips = list(reversed(skips))
        for k, block in enumerate(self.blocks):
            x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
            if k < len(skips):
                x = torch.cat([x, skips[k]], dim=1)
            x = block(x)
        return self.head(self.dropout(x))


def report_decoder(spec: EncoderSpec, dropout: float) -> nn.Module:
    return ReportDecoder(spec.out_channels, dropout=dropout)


def unet_decoder(spec: EncoderSpec, dropout: float) -> nn.Module:
    return UNetDecoder(spec.out_channels, spec.skip_channels, dropout=dropout)


# The decoder registry: name → builder(encoder spec, dropout). ``build_model`` builds from it and records the name and
# arguments in the model (``built_with``), checkpoints store them, and ``inference.load_trained`` rebuilds from them:
# a decoder added here trains, saves, loads and predicts with no other change (a decoder that needs the encoder's
# skips says so with ``needs_skips = True``). The parameters' ``decoder`` choices are this registry's names.
DECODERS: dict[str, Callable[[EncoderSpec, float], nn.Module]] = {"report": report_decoder, "unet": unet_decoder}


class SegmentationModel(nn.Module):
    """Encoder + decoder → one logit per pixel (``N×1×H×W`` for ``N×3×H×W`` inputs, H and W multiples of 32).

    With ``freeze_encoder=True`` the encoder's parameters do not train **and** its BatchNorm layers stay in
    eval mode when ``model.train()`` is called, so their running statistics never move.
    """

    def __init__(self, encoder: nn.Sequential, decoder: nn.Module, spec: EncoderSpec, freeze_encoder: bool = False):
        super().__init__()
        self.encoder, self.decoder, self.spec = encoder, decoder, spec
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            for parameter in self.encoder.parameters():
                parameter.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def encode(self, x: torch.Tensor):
        """The deepest feature map, or the list [skips..., deepest] when the decoder needs skips."""
        if not getattr(self.decoder, "needs_skips", False):
            return self.encoder(x)
        outputs = []
        for index, block in enumerate(self.encoder):
            x = block(x)
            if index in self.spec.skip_indices:
                outputs.append(x)
        return [*outputs, x]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze_encoder:
            with torch.no_grad():
                features = self.encode(x)
        else:
            features = self.encode(x)
        return self.decoder(features)


def build_model(
    encoder: str = "mobilenet_v2",
    encoder_weights: str | None = "imagenet",
    decoder: str = "report",
    dropout: float = 0.2,
    freeze_encoder: bool = False,
) -> SegmentationModel:
    """Build encoder + decoder; see ``build_encoder`` for ``encoder_weights``.

    The model's ``encoder_weights`` attribute records where the encoder's starting weights came from
    (``source``) and their ``sha256``, so checkpoints and ``run.json`` can say so and a resume can check it.
    """
    spec = ENCODERS[encoder]
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; known: {sorted(DECODERS)}")
    head = DECODERS[decoder](spec, float(dropout))
    features = build_encoder(encoder, encoder_weights)
    model = SegmentationModel(features, head, spec, freeze_encoder)
    model.built_with = {"encoder": encoder, "decoder": decoder, "dropout": float(dropout)}  # what rebuilds it
    model.encoder_weights = {
        "source": weights_source(encoder_weights),
        "sha256": state_sha256(features),
        "fallback": False,
    }
    return model


def weights_source(weights: str | None) -> str:
    """A sentence naming where ``weights`` (as given to ``build_encoder``) are loaded from."""
    resolved = resolve_weights(weights)
    if resolved is None or resolved == "none":
        return "random initialisation"
    if resolved == "imagenet":
        return "ImageNet weights (torchvision IMAGENET1K_V1)"
    return (
        f"ImageNet weights from {shown_path(resolved, WEIGHTS_ENV)}"
        if weights == "imagenet"
        else f"weights from {shown_path(resolved)}"
    )


def state_sha256(module: nn.Module) -> str:
    """SHA-256 over ``module``'s state_dict (names, shapes and values, in order): the identity of its weights."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def count_parameters(module: nn.Module) -> dict[str, int]:
    """Total, trainable and non-trainable parameter counts of ``module``."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable}
