from pathlib import Path

import pytest

from isic_utils import params as P

ROOT = Path(__file__).resolve().parents[1]


def test_every_run_file_and_profile_validates():
    for chapter, run_file in (("eda", "eda"), ("train", "task1"), ("train", "task2"), ("train", "task3"),
                              ("compare", "compare")):
        for profile in ("synthetic", "isic2016", "isic2016_holdout", "tiny"):
            values = P.resolve(chapter, ROOT / "params" / f"{run_file}.yaml", profile, root=ROOT)
            assert values["profile"] == profile


def test_task_files_hold_the_reports_design():
    task1 = P.resolve("train", ROOT / "params" / "task1.yaml", root=ROOT)
    task2 = P.resolve("train", ROOT / "params" / "task2.yaml", root=ROOT)
    assert task1["freeze_encoder"] and not task2["freeze_encoder"]
    assert task1["decoder"] == task2["decoder"] == "report"
    assert task1["decoder_lr"] == task2["decoder_lr"] == 1e-3 and task2["encoder_lr"] == 1e-4
    assert task1["epochs"] == task2["epochs"] == 20 and task1["loss"] == task2["loss"] == "bce"
    assert task1["image_size"] == 128 and task1["val_fraction"] == 0.2


def test_all_problems_reported_at_once_with_the_valid_keys(tmp_path):
    bad = {"epochs": 0, "image_size": 100, "val_fraction": 1.5, "batchsize": 8, "dropout": "high",
           "encoder_weights": str(tmp_path / "missing.pth")}
    with pytest.raises(P.ParameterError) as error:
        P.resolve("train", overrides=bad, root=ROOT)
    message = str(error.value)
    for expected in ("unknown key(s) ['batchsize']", "epochs must be >= 1", "image_size must be a positive multiple of 32",
                     "val_fraction must be in (0, 1)", "dropout must be float", "missing.pth not found",
                     "valid keys for train:", "batch_size"):
        assert expected in message, expected


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(P.ParameterError, match=r"unknown data profile 'isic2017'.*'synthetic'"):
        P.resolve("eda", profile="isic2017", root=ROOT)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(P.ParameterError, match="must hold a mapping"):
        P.resolve("eda", run_file=path, root=ROOT)


def test_int_accepted_where_float_expected():
    assert P.resolve("train", overrides={"decoder_lr": 1}, root=ROOT)["decoder_lr"] == 1.0


def test_from_notebook_flags_a_mistyped_injected_parameter():
    namespace = {**P.defaults("eda"), "n_sample": 3, "In": [], "_oh": {}}
    with pytest.raises(P.ParameterError, match="unknown parameter 'n_sample'"):
        P.from_notebook("eda", namespace)
    assert P.from_notebook("eda", P.defaults("eda"))["n_samples"] == 6
