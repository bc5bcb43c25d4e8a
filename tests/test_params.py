from pathlib import Path

import pytest

from isic_utils.config import notebook as N
from isic_utils.config import params as P

from .conftest import TINY_EPOCHS

ROOT = Path(__file__).resolve().parents[1]


def test_every_run_file_and_profile_validates():
    for chapter, run_file in (
        ("eda", "eda"),
        ("train", "task1"),
        ("train", "task2"),
        ("train", "task3"),
        ("compare", "compare"),
    ):
        for profile in ("synthetic", "isic2016", "isic2016_holdout", "tiny"):
            values = P.resolve(chapter, ROOT / "params" / f"{run_file}.yaml", profile, root=ROOT)
            assert values["profile"] == profile


def test_the_real_profiles_train_enough_seeds_to_judge_a_claim():
    """A real report's claims stand against the spread over training seeds (metrics.MIN_SEEDS); the offline
    profiles, which only show that the pipeline runs, train one."""
    from isic_utils.scoring.metrics import MIN_SEEDS

    for profile, seeds in (("isic2016", MIN_SEEDS), ("isic2016_holdout", MIN_SEEDS), ("synthetic", 1), ("tiny", 1)):
        values = P.resolve("train", ROOT / "params" / "task3.yaml", profile, root=ROOT)
        assert len(values["seeds"]) == seeds, profile


def test_task_files_hold_the_reports_design():
    task1 = P.resolve("train", ROOT / "params" / "task1.yaml", root=ROOT)
    task2 = P.resolve("train", ROOT / "params" / "task2.yaml", root=ROOT)
    assert task1["freeze_encoder"] and not task2["freeze_encoder"]
    assert task1["decoder"] == task2["decoder"] == "report"
    assert task1["decoder_lr"] == task2["decoder_lr"] == 1e-3 and task2["encoder_lr"] == 1e-4
    assert task1["epochs"] == task2["epochs"] == 20 and task1["loss"] == task2["loss"] == "bce"
    assert task1["image_size"] == 128 and task1["val_fraction"] == 0.2


def test_all_problems_reported_at_once_with_the_valid_keys(tmp_path):
    bad = {
        "epochs": 0,
        "image_size": 100,
        "val_fraction": 1.5,
        "batchsize": 8,
        "dropout": "high",
        "encoder_weights": str(tmp_path / "missing.pth"),
    }
    with pytest.raises(P.ParameterError) as error:
        P.resolve("train", overrides=bad, root=ROOT)
    message = str(error.value)
    for expected in (
        "unknown key(s) ['batchsize']",
        "epochs must be >= 1",
        "image_size must be a positive multiple of 32",
        "val_fraction must be in (0, 1)",
        "dropout must be float",
        "missing.pth not found",
        "valid keys for train:",
        "batch_size",
    ):
        assert expected in message, expected


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(P.ParameterError, match=r"unknown data profile 'isic2019'.*'isic2018'.*'synthetic'"):
        P.resolve("eda", profile="isic2019", root=ROOT)


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
        N.from_notebook("eda", namespace)
    assert N.from_notebook("eda", P.defaults("eda"))["n_samples"] == 6


# ----------------------------------------------------------------------------- one resolution wherever a chapter runs


def _kernel(cells: list[str], **names) -> dict:
    """A notebook kernel's globals after the chapter's parameters cell and the cells papermill injected ran."""
    own = "# Parameters (papermill injects a cell after this one). Plain literals only.\nprofile = 'synthetic'\n"
    return {"In": ["", own, *cells], "profile": "synthetic", **names}


def test_a_chapter_names_its_profile_and_run_and_resolves_as_the_report_does():
    namespace = _kernel(["# Parameters\nprofile = 'tiny'\nrun = 'task2'\n"], profile="tiny", run="task2")
    assert N.from_notebook("train", namespace) == P.chapter_values("train", "tiny", "task2", root=ROOT)
    values = N.from_notebook("train", namespace)
    assert (values["epochs"], values["batch_size"], values["run_name"], values["freeze_encoder"]) == (
        TINY_EPOCHS,
        8,
        "task2",
        False,
    )
    # opened by hand, nothing changed: the synthetic profile's values, not the schema's (epochs 8, batch 8)
    synthetic = N.from_notebook("train", _kernel([]))
    assert (synthetic["epochs"], synthetic["batch_size"], synthetic["allow_random_encoder"]) == (8, 8, True)
    external = N.from_notebook("external", _kernel([]))
    assert [s["name"] for s in external["external"]] == ["other-clinic"]  # the profile's sets, as the report scores


def test_papermill_text_values_are_read_as_yaml():
    """`papermill -p seeds '[0,1]' -p download true` passes text; the keys take a list and a boolean."""
    namespace = _kernel(
        ["# Parameters\nseeds = '[0, 1]'\ndownload = 'true'\nlimit = 'null'\nepochs = '3'\n"],
        seeds="[0, 1]",
        download="true",
        limit="null",
        epochs="3",
    )
    values = N.from_notebook("train", namespace)
    assert (values["seeds"], values["download"], values["limit"], values["epochs"]) == ([0, 1], True, None, 3)
    namespace = _kernel(["# Parameters\nseeds = 'zero'\n"], seeds="zero")
    with pytest.raises(P.ParameterError, match="seeds must be list"):
        N.from_notebook("train", namespace)


@pytest.mark.parametrize("profile, run", [("isic2016", "task2"), ("tiny", "task3"), ("synthetic", "task2")])
def test_papermill_f_runs_what_its_injected_cell_shows(profile, run):
    """`papermill -f params/profiles/synthetic.yaml -f params/task2.yaml` injects both files merged, the run's over the
    profile's (`epochs = 20` over the profile's 8). The chapter used to set the files' values aside as "that file's
    layer" and run the profile's 8 epochs while its injected cell said 20: now every value the cell shows is the one
    used."""
    import yaml

    injected = {
        **yaml.safe_load((ROOT / "params" / "profiles" / f"{profile}.yaml").read_text()),
        **yaml.safe_load((ROOT / "params" / f"{run}.yaml").read_text()),
    }
    cell = "# Parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in injected.items())
    values = N.from_notebook("train", _kernel([cell], **injected))
    shown = {k: v for k, v in injected.items() if k in values}
    assert shown and {k: values[k] for k in shown} == shown
    if profile == "synthetic":
        assert values["epochs"] == 20 != P.chapter_values("train", profile, run, root=ROOT)["epochs"]
    only_profile = yaml.safe_load((ROOT / "params" / "profiles" / f"{profile}.yaml").read_text())
    cell = "# Parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in only_profile.items())
    for chapter in ("eda", "external", "compare"):  # keys other chapters take (runs, external) are theirs
        assert N.from_notebook(chapter, _kernel([cell], **only_profile)) == P.chapter_values(
            chapter, profile, root=ROOT
        )


def test_a_value_set_by_hand_overrides_the_profile_and_a_typo_names_the_close_match():
    namespace = _kernel(["# Parameters\nprofile = 'tiny'\nepochs = 1\n"], profile="tiny", epochs=1)
    assert N.from_notebook("train", namespace)["epochs"] == 1
    with pytest.raises(P.ParameterError, match=r"unknown parameter 'epoch' \(did you mean 'epochs'\?\)"):
        N.from_notebook("train", _kernel(["# Parameters\nepoch = 1\n"], epoch=1))


def test_an_unknown_run_lists_the_known_ones_and_a_profile_file_names_itself(tmp_path):
    with pytest.raises(P.ParameterError, match=r"unknown run 'task4'.*\['task1', 'task2', 'task3'\]"):
        P.chapter_values("train", "tiny", "task4", root=ROOT)
    (tmp_path / "params" / "profiles").mkdir(parents=True)
    (tmp_path / "params" / "profiles" / "mine.yaml").write_text("profile: tiny\n")
    (tmp_path / "params" / "eda.yaml").write_text("n_samples: 6\n")
    with pytest.raises(P.ParameterError, match="a profile file names itself"):
        P.chapter_values("eda", "mine", root=tmp_path)


def test_every_profile_and_run_file_names_itself():
    for path in (ROOT / "params" / "profiles").glob("*.yaml"):
        assert P.read_yaml(path)["profile"] == path.stem, path
    for path in (ROOT / "params").glob("task*.yaml"):
        assert P.read_yaml(path)["run"] == path.stem, path


def test_a_parameters_cell_without_its_header_does_not_take_the_setup_cells_constants_for_parameters():
    # the user deleted the cell's comment lines: every plain variable counts, but not REPOSITORY (the setup cell's)
    values = N.from_notebook("train", {"profile": "tiny", "run": "task2", "REPOSITORY": "", "epochs": 1})
    assert values["run_name"] == "task2" and values["epochs"] == 1
