"""The package's shape: imports flow one way through named layers, the notebooks' parameters cells are the
chapters' defaults, applying a model loads no plotting, and docs/layout.md lists every module."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from isic_utils.config import notebook as N
from isic_utils.config import params as P

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "isic_utils"

# The layers, bottom to top, by folder: a module imports from the folders below its own and, in its own folder, only
# the modules listed before it. The command line (predict, __main__) sits on top, in the package's own folder.
LAYERS = {
    "base": ["files", "devices"],
    "data": ["sources", "pictures", "decoding", "transforms", "augmentation", "splits", "eda", "synthetic"],
    "model": ["networks", "inference"],
    "scoring": ["shape", "metrics", "confidence"],
    "config": ["params", "notebook"],
    "training": ["features", "checkpoints", "style_mixing", "loop", "experiments"],
    "evaluation": ["failures", "gallery", "trust", "external", "adaptation", "generalisation", "comparison"],
    "deploy": ["predictor", "export", "costs"],
    "report": ["plots", "tables", "pipeline", "handover"],
    "": ["predict", "__main__"],
}
ORDER = [f"{folder}.{name}".lstrip(".") for folder, names in LAYERS.items() for name in names]


def path_of(module: str) -> Path:
    return PACKAGE / f"{module.replace('.', '/')}.py"


def package_imports(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(the package's modules imported at module level, as ``folder.module``; [(line, module) imported inside a
    function])."""
    tree = ast.parse(path.read_text())
    folder = path.parent.relative_to(PACKAGE).parts
    top, nested = set(), []

    def resolved(base: list[str], name: str) -> str:
        dotted = ".".join([*base, name])
        return dotted if dotted in ORDER else ".".join(base)

    def names(node) -> list[str]:
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            base = list(folder[: len(folder) - (node.level - 1)]) + (node.module.split(".") if node.module else [])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("isic_utils"):
            base = node.module.split(".")[1:]
        else:
            return []
        return [resolved(base, alias.name) for alias in node.names]

    for node in tree.body:
        top.update(names(node))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested += [(inner.lineno, name) for inner in ast.walk(node) for name in names(inner)]
    return top, nested


def test_every_module_has_a_layer_and_a_docstring():
    modules = sorted(str(p.relative_to(PACKAGE).with_suffix("")).replace("/", ".") for p in PACKAGE.rglob("*.py"))
    assert sorted(ORDER + [f"{f}.__init__".lstrip(".") for f in LAYERS]) == modules
    for path in PACKAGE.rglob("*.py"):
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path} has no docstring saying what it holds"


def test_the_folders_are_the_layers():
    """Each folder is one layer: a module imports nothing from a folder above its own (no cycle, no import upwards)."""
    folders = list(LAYERS)
    for module in ORDER:
        mine = folders.index(module.rpartition(".")[0])
        for other in package_imports(path_of(module))[0]:
            theirs = folders.index(other.rpartition(".")[0])
            assert theirs <= mine, f"{module} imports {other}, from the {folders[theirs]!r} layer above its own"


@pytest.mark.parametrize("module", ORDER)
def test_imports_flow_one_way_without_function_level_dodges(module):
    top, nested = package_imports(path_of(module))
    below = set(ORDER[: ORDER.index(module)])
    assert top <= below, f"{module} imports {sorted(top - below)}, which are not below it in {LAYERS}"
    if module != "__main__":  # the entry point loads only the command asked for; every other import is at the top
        assert not nested, f"{module} imports {nested} inside functions"


PLOTTING = {"seaborn", "matplotlib", "papermill", "nbconvert"}


def third_party_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_applying_a_model_imports_no_plotting_module():
    """Read from the source: predict and every package module it reaches import none of the plotting or notebook
    libraries (the test below checks the same in a fresh process)."""
    reached, todo = set(), ["predict"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += package_imports(path_of(module))[0]
    assert not {m for m in reached if m.startswith(("report.", "evaluation."))}, sorted(reached)
    for module in reached:
        assert not third_party_imports(path_of(module)) & PLOTTING, module


@pytest.mark.slow
def test_applying_a_model_loads_no_plotting():
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, isic_utils.predict; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(PLOTTING)})))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert loaded.stdout.strip() == "[]"


CHAPTERS = {
    "01_eda.ipynb": "eda",
    "02_train.ipynb": "train",
    "04_compare.ipynb": "compare",
    "03_external.ipynb": "external",
}


@pytest.mark.parametrize("name, chapter", CHAPTERS.items())
def test_each_notebook_parameters_cell_names_only_the_profile_and_run(name, chapter):
    """The parameters cell names what selects the report's chapter (the profile; the training chapter's run), at the
    schema's defaults, and nothing else: every other value comes from the same files the report reads, so a cell
    cannot drift from the profile (it held 25 literals that differed from the synthetic profile's)."""
    notebook = json.loads((ROOT / "notebooks" / name).read_text())
    tagged = [c for c in notebook["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{name}: exactly one cell tagged 'parameters'"
    assert notebook["cells"][0]["cell_type"] == "markdown" and notebook["cells"][1] is tagged[0], (
        f"{name}: a title, then the parameters cell"
    )
    source = "".join(tagged[0]["source"])
    assert source.startswith(N.OWN_PARAMETERS_HEADER)
    values = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(source).body}
    selectors = [key for key in P.SELECTORS if key in P.schema(chapter)]
    assert values == {key: P.defaults(chapter)[key] for key in selectors}
    assert all(not c.get("outputs") for c in notebook["cells"] if c["cell_type"] == "code"), f"{name}: strip outputs"


def test_chapter_files_are_numbered_in_the_order_the_report_runs_them():
    from isic_utils.report.pipeline import NOTEBOOKS, steps_for

    steps = steps_for(P.read_yaml(ROOT / "params" / "profiles" / "isic2016.yaml"))
    numbers = [int(NOTEBOOKS[step.chapter][:2]) for step in steps]
    assert numbers == sorted(numbers) and set(numbers) == {1, 2, 3, 4}, [s.name for s in steps]
    assert sorted(NOTEBOOKS.values()) == sorted(CHAPTERS)


def test_a_settings_default_is_one_in_the_schema_the_trainer_and_the_notebook():
    """One source for each setting: the trainer's config takes its defaults from the schema and is filled from a
    chapter's values by name; the notebook's cell holds no setting (only the profile and run, checked above)."""
    from dataclasses import fields

    from isic_utils.training.experiments import train_config

    schema = P.CHAPTER_KEYS["train"]
    own = {
        "seed",
        "device",
        "channels_last",
        "eval_batch_size",
    }  # the trainer's: one seed of seeds, the resolved device
    shared = [f for f in fields(P.TrainConfig) if f.name not in own]
    assert shared and all(f.name in schema for f in shared), [f.name for f in shared if f.name not in schema]
    for field in shared:
        default = schema[field.name][1]
        assert field.default == (tuple(default) if isinstance(default, list) else default), field.name
    values = P.chapter_values("train", "tiny", "task3", root=ROOT)  # task 3 sets many away from the defaults
    config = train_config(values, seed=5)
    for field in shared:
        expected = tuple(values[field.name]) if isinstance(values[field.name], list) else values[field.name]
        assert getattr(config, field.name) == expected, field.name
    assert config.seed == 5 and config.device == "cpu"
    for source in (ROOT / "notebooks").glob("0*.ipynb"):
        cell = "".join(json.loads(source.read_text())["cells"][1]["source"])
        assigned = {node.targets[0].id for node in ast.parse(cell).body}
        assert assigned <= set(P.SELECTORS), (source.name, assigned)


def test_every_chapter_has_the_same_setup_cell():
    """One setup cell (the package from the checkout or, in Colab, from Drive) in every chapter, right after the
    parameters: a fix made in one chapter and not the others is a chapter that fails in a fresh kernel."""
    cells = {
        name: "".join(json.loads((ROOT / "notebooks" / name).read_text())["cells"][2]["source"])
        for name in [*CHAPTERS, "run_in_colab.ipynb"]
    }
    assert len(set(cells.values())) == 1, "the chapters' setup cells differ"
    assert next(iter(cells.values())).startswith("# Setup: makes `isic_utils` importable")


def test_the_layout_page_names_every_module():
    layout = (ROOT / "docs" / "layout.md").read_text()
    for module in ORDER:
        assert f"`{module.replace('.', '/')}.py`" in layout, module
    for folder in LAYERS:
        assert not folder or f"`{folder}/`" in layout, folder


def test_every_notebook_is_valid_and_every_cell_has_its_id():
    """nbformat 4.5 cells carry an id: a cell added without one makes every run warn (and future nbformat refuse)."""
    import nbformat

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        raw = json.loads(path.read_text())
        assert all("id" in cell for cell in raw["cells"]), f"{path.name}: a cell without an id (write it with nbformat)"
        nbformat.validate(nbformat.reads(path.read_text(), as_version=4))


def test_a_settings_role_is_tagged_once_and_every_identity_reads_it():
    """Which settings do not define a run is said once (``params.ROLES``): the checkpoint's fingerprint leaves out
    exactly the settings of how it runs, how long and how it is scored, and no module lists them again."""
    # a plain value of a setting added later is left out (older checkpoints resume as they are); a schedule's length is in
    config = P.TrainConfig(
        color_constancy="shades_of_grey", lr_schedule="cosine", weight_average="ema", style_mixing="mixstyle"
    )
    fingerprint = config.fingerprint()
    assert fingerprint.pop("schedule_epochs") == config.epochs
    assert set(fingerprint) == set(vars(config)) - P.with_role("execution", "length", "scoring")
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert '("resume", "jobs")' not in text and '"seeds", "resume", "output_dir"' not in text, path


def test_every_file_of_the_package_is_tracked_not_ignored():
    """A clean checkout (CI's, a user's clone) has every module and every folder's __init__.py: none is ignored (an
    unanchored ``data/`` in .gitignore once hid isic_utils/data/__init__.py)."""
    files = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")]
    ignored = subprocess.run(["git", "check-ignore", *files], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert not ignored, ignored
