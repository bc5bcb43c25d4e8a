"""The package's shape: imports flow one way through named layers, the notebooks' parameters cells are the
chapters' defaults, applying a model loads no plotting, and docs/layout.md lists every module."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from isic_utils import notebook as N
from isic_utils import params as P

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "isic_utils"

# Bottom to top: a module may import only modules listed before it.
LAYERS = [
    "files",
    "sources",
    "decoding",
    "transforms",
    "data",
    "eda",
    "synthetic",
    "metrics",
    "confidence",
    "gallery",
    "model",
    "params",
    "notebook",
    "devices",
    "inference",
    "features",
    "checkpoints",
    "training",
    "experiments",
    "failures",
    "trust",
    "external",
    "adaptation",
    "generalisation",
    "comparison",
    "plots",
    "report",
    "pipeline",
    "handover",
    "predict",
    "__main__",
]


def package_imports(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(modules of the package imported at module level, [(line, module) imported inside a function])."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []

    def names(node) -> list[str]:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            return [node.module] if node.module else [alias.name for alias in node.names]
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("isic_utils"):
            return [(node.module.split(".") + [a.name for a in node.names])[1]]
        return []

    for node in tree.body:
        top.update(names(node))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested += [(inner.lineno, name) for inner in ast.walk(node) for name in names(inner)]
    return top, nested


def test_every_module_has_a_layer_and_a_docstring():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert sorted(LAYERS) == modules
    for path in PACKAGE.glob("*.py"):
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no docstring saying what it holds"


@pytest.mark.parametrize("module", LAYERS)
def test_imports_flow_one_way_without_function_level_dodges(module):
    top, nested = package_imports(PACKAGE / f"{module}.py")
    below = set(LAYERS[: LAYERS.index(module)])
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
            todo += package_imports(PACKAGE / f"{module}.py")[0]
    assert not reached & {"plots", "report", "pipeline", "comparison"}, sorted(reached)
    for module in reached:
        assert not third_party_imports(PACKAGE / f"{module}.py") & PLOTTING, module


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
    from isic_utils.pipeline import NOTEBOOKS, steps_for

    steps = steps_for(P.read_yaml(ROOT / "params" / "profiles" / "isic2016.yaml"))
    numbers = [int(NOTEBOOKS[step.chapter][:2]) for step in steps]
    assert numbers == sorted(numbers) and set(numbers) == {1, 2, 3, 4}, [s.name for s in steps]
    assert sorted(NOTEBOOKS.values()) == sorted(CHAPTERS)


def test_a_settings_default_is_one_in_the_schema_the_trainer_and_the_notebook():
    """One source for each setting: the trainer's config takes its defaults from the schema and is filled from a
    chapter's values by name; the notebook's cell holds no setting (only the profile and run, checked above)."""
    from dataclasses import fields

    from isic_utils.experiments import train_config

    schema = P.CHAPTER_KEYS["train"]
    shared = [f for f in fields(P.TrainConfig) if f.name not in P.TRAINER_ONLY]
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
    for module in LAYERS:
        assert f"`{module}`" in layout, module


def test_every_notebook_is_valid_and_every_cell_has_its_id():
    """nbformat 4.5 cells carry an id: a cell added without one makes every run warn (and future nbformat refuse)."""
    import nbformat

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        raw = json.loads(path.read_text())
        assert all("id" in cell for cell in raw["cells"]), f"{path.name}: a cell without an id (write it with nbformat)"
        nbformat.validate(nbformat.reads(path.read_text(), as_version=4))
