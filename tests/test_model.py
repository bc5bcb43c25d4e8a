import pytest
import torch
from torch import nn

from isic_utils.config.params import TrainConfig
from isic_utils.model import networks as M
from isic_utils.training.loop import build_optimizer, loss_fn

from .conftest import ROOT


def test_parameter_counts_match_the_report():
    net = M.build_model(encoder_weights=None, freeze_encoder=True)
    assert M.count_parameters(net.encoder)["total"] == 2_223_872
    assert M.count_parameters(net.decoder)["total"] == 13_272_065
    assert M.count_parameters(net)["trainable"] == 13_272_065
    assert M.count_parameters(net)["non_trainable"] == 2_223_872


def test_output_shapes():
    net = M.build_model(encoder_weights=None).eval()
    with torch.no_grad():
        assert net.encoder(torch.zeros(2, 3, 128, 128)).shape == (2, 1280, 4, 4)
        assert net(torch.zeros(2, 3, 128, 128)).shape == (2, 1, 128, 128)
    unet = M.build_model(encoder_weights=None, decoder="unet").eval()
    with torch.no_grad():
        assert unet(torch.zeros(2, 3, 128, 128)).shape == (2, 1, 128, 128)
        assert unet(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 256, 256)


def test_decoder_is_the_reports():
    decoder = M.ReportDecoder(dropout=0.3)
    convs = [m for m in decoder.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (1280, 512, (4, 4), (2, 2), (1, 1)),
        (512, 256, (4, 4), (2, 2), (1, 1)),
        (256, 128, (4, 4), (2, 2), (1, 1)),
        (128, 64, (4, 4), (2, 2), (1, 1)),
        (64, 32, (4, 4), (2, 2), (1, 1)),
    ]
    assert [m.p for m in decoder.modules() if isinstance(m, nn.Dropout)] == [0.3] * 5
    assert decoder.head.in_channels == 32 and decoder.head.out_channels == 1 and decoder.head.kernel_size == (1, 1)


def test_frozen_encoder_weights_and_batchnorm_statistics_do_not_move():
    torch.manual_seed(0)
    net = M.build_model(encoder_weights=None, freeze_encoder=True)
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    config = TrainConfig(freeze_encoder=True)
    optimizer = build_optimizer(net, config)
    net.train()
    assert not net.encoder.training and net.decoder.training
    x, y = torch.randn(4, 3, 64, 64), (torch.rand(4, 1, 64, 64) > 0.5).float()
    loss = loss_fn("bce")(net(x), y)
    loss.backward()
    optimizer.step()
    after = net.encoder.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{key} changed"  # weights, running_mean/var, num_batches_tracked
    assert any(p.grad is not None for p in net.decoder.parameters())


def test_finetuning_moves_the_encoder_and_uses_two_learning_rates():
    net = M.build_model(encoder_weights=None, freeze_encoder=False)
    optimizer = build_optimizer(net, TrainConfig(freeze_encoder=False, encoder_lr=1e-4, decoder_lr=1e-3))
    assert sorted(g["lr"] for g in optimizer.param_groups) == [1e-4, 1e-3]
    before = net.encoder[0][0].weight.clone()
    net.train()
    loss_fn("bce")(net(torch.randn(2, 3, 64, 64)), torch.ones(2, 1, 64, 64)).backward()
    optimizer.step()
    assert not torch.equal(before, net.encoder[0][0].weight)


def test_weights_from_a_state_dict_path(tmp_path):
    import torchvision

    source = torchvision.models.mobilenet_v2(weights=None)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    encoder = M.build_encoder("mobilenet_v2", str(path))
    assert torch.equal(encoder[0][0].weight, source.features[0][0].weight)


def test_weights_env_variable_replaces_imagenet(tmp_path, monkeypatch):
    import torchvision

    source = torchvision.models.mobilenet_v2(weights=None)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    monkeypatch.setenv(M.WEIGHTS_ENV, str(path))
    assert torch.equal(M.build_encoder("mobilenet_v2", "imagenet")[0][0].weight, source.features[0][0].weight)


def test_missing_weights_file_names_the_fix(tmp_path):
    with pytest.raises(M.EncoderWeightsError, match="not found.*imagenet"):
        M.build_encoder("mobilenet_v2", str(tmp_path / "nope.pth"))


def test_wrong_state_dict_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(M.EncoderWeightsError, match="not a state_dict of torchvision's mobilenet_v2"):
        M.build_encoder("mobilenet_v2", str(path))


def test_imagenet_download_failure_names_the_fix(monkeypatch):
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models, "mobilenet_v2", lambda weights=None: offline() if weights else None)
    with pytest.raises(M.EncoderWeightsError, match="ISIC_ENCODER_WEIGHTS"):
        M.build_encoder("mobilenet_v2", "imagenet")


def test_torchvisions_download_lines_stay_out_of_a_chapter(monkeypatch, capsys):
    """torch.hub prints `Downloading: "…" to /root/.cache/…` on stdout and its bar on stderr: in a chapter they landed
    in the notebook and its HTML, with the author's home folder."""
    import sys

    import torchvision

    real = torchvision.models.mobilenet_v2

    def downloading(weights=None):
        sys.stdout.write('Downloading: "https://download.pytorch.org/models/m.pth" to /root/.cache/m.pth\n')
        sys.stderr.write("\r 40%|####      | 5.6M/13.6M\r100%|##########| 13.6M/13.6M\n")
        return real(weights=None)

    monkeypatch.setattr(torchvision.models, "mobilenet_v2", downloading)
    M.build_encoder("mobilenet_v2", "imagenet")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize("freeze", [True, False])
def test_the_report_trains_with_fused_adamw(freeze):
    """The fused AdamW kernel exists on CPU (torch._fused_adamw_); an earlier check looked for it in torch._C and never
    found it, so every run used the slower per-tensor loop."""
    model = M.build_model(encoder_weights=None, freeze_encoder=freeze)
    optimizer = build_optimizer(model, TrainConfig(freeze_encoder=freeze))
    assert optimizer.defaults["fused"] is True


def test_a_decoder_registered_in_the_registry_alone_trains_saves_loads_and_predicts(tiny_data, tmp_path, monkeypatch):
    """A new decoder touches one place: registered here (in the test only), the parameters accept it, training
    saves it, `load_trained` rebuilds it from what the checkpoint says, and `predict` writes its masks."""
    from isic_utils.config import params as P
    from isic_utils.model.inference import load_trained
    from isic_utils.predict import predict_folder
    from isic_utils.training.loop import fit

    class ToyDecoder(nn.Module):
        needs_skips = False

        def __init__(self, in_channels: int, dropout: float):
            super().__init__()
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Conv2d(in_channels, 1, 1))

        def forward(self, features):
            return nn.functional.interpolate(self.head(features), scale_factor=32.0, mode="bilinear")

    monkeypatch.setitem(M.DECODERS, "toy", lambda spec, dropout: ToyDecoder(spec.out_channels, dropout))
    assert P.resolve("train", overrides={"decoder": "toy"}, root=ROOT)["decoder"] == "toy"
    torch.manual_seed(0)
    model = M.build_model(encoder_weights=None, decoder="toy", dropout=0.3, freeze_encoder=False)
    config = TrainConfig(
        freeze_encoder=False,
        epochs=1,
        batch_size=8,
        eval_batch_size=8,
        precision="fp32",
        monitor_test=False,
        augment=(),
    )
    result = fit(model, tiny_data, config, tmp_path / "run", verbose=False)
    rebuilt, meta = load_trained(tmp_path / "run" / "best.pt")
    assert (meta["decoder"], meta["dropout"]) == ("toy", 0.3) and isinstance(rebuilt.decoder, ToyDecoder)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))
    images = tmp_path / "images"
    images.mkdir()
    for pair in tiny_data.test.sources[:2]:
        (images / pair.image.name).write_bytes(pair.image.read_bytes())
    written = predict_folder(tmp_path / "run" / "best.pt", images, tmp_path / "masks")
    assert len(written) == 2 and result.best_epoch == 1
