"""A chapter's parameters read in its notebook: the names its parameters cells assign (the chapter's own cell and
what papermill injects), values as papermill passes them, and the same resolution the report uses
(``params.chapter_values``), so a chapter opened by hand, run with plain papermill or run by the report is one chapter.
"""

from __future__ import annotations

import ast
from typing import Any

import yaml

from .params import ALL_KEYS, SELECTORS, ParameterError, chapter_values, problems_message, project_root, schema, suggest

PARAMETERS_HEADER = "# Parameters"  # the first line of the chapter's parameters cell and of papermill's injected one
OWN_PARAMETERS_HEADER = "# Parameters (papermill injects"  # the first line of each chapter's own parameters cell


def parameter_cell_names(history: list[str]) -> set[str] | None:
    """Names assigned by the parameters cells among ``history`` (IPython's ``In``), or None when there are none.

    Counts the chapter's own parameters cell as last run and every papermill-injected cell run after it, so a
    typo there is caught, while the names the chapter defines later (``params``, ``out``, ``dataset`` ...) are
    not parameters, however often the cells run again.
    """
    cells = [source for source in history if isinstance(source, str) and source.startswith(PARAMETERS_HEADER)]
    own = [k for k, source in enumerate(cells) if source.startswith(OWN_PARAMETERS_HEADER)]
    cells = cells[own[-1] :] if own else cells
    if not cells:
        return None
    names: set[str] = set()
    for source in cells:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in tree.body:
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _literal_assignments(source: str) -> set[str] | None:
    """The names a cell assigns when it holds nothing but assignments of literal values to names (a parameters
    cell's form, papermill's "plain literals only"), else None."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            targets = [node.target]
        else:
            return None
        try:
            ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
        names.update(t.id for t in targets)
    return names or None


def headerless_parameter_names(history: list[str]) -> set[str] | None:
    """In a kernel whose parameters cell lost its header (the user cut it down to ``profile = 'tiny'``): the names
    assigned by the nearest cell run before the current one (``history[-1]``) that holds only literal assignments,
    looking no further back than the current cell's previous run (an earlier Run All's cells are not this one's);
    none when there is no such cell, and None for an empty history (nothing known of the cells)."""
    if not history:
        return None
    current = history[-1]
    for source in reversed(history[:-1]):
        if source == current:
            break
        names = _literal_assignments(source) if isinstance(source, str) else None
        if names:
            return names
    return set()


def from_notebook(chapter: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """The chapter's parameters in a notebook: ``chapter_values`` for the ``profile`` and ``run`` its parameters cells
    name, with every other name those cells assign (a line added by hand, papermill's ``-p``/``-f``) as an override.

    In a kernel, the parameters are the names the parameters cells assign (see ``parameter_cell_names``; a cell
    without its header: ``headerless_parameter_names``): a mistyped one is reported with the close match, and a
    second Run All, Restart & Run All or one cell run again all give the same result. Outside a kernel (a plain
    dict) every plain variable counts. Values as papermill's
    ``-p`` passes them (YAML text such as ``'[0, 1]'``, ``true``) are read as YAML where the key takes no string,
    and keys that only other chapters take are left to them. Every value a parameters cell assigns is used as it
    reads, so what the notebook shows is what runs: ``papermill -f a.yaml -f b.yaml`` merges the files (b over a)
    and the chapter takes that merge as its overrides.
    """
    history = namespace.get("In")
    given = parameter_cell_names(history) if isinstance(history, list) else None
    if given is None and isinstance(history, list):
        headerless = headerless_parameter_names(history)
        given = None if headerless is None else {name for name in headerless if name in namespace}
    if given is None:
        given = {
            name
            for name, value in namespace.items()
            if not (
                name.startswith("_")
                or name in ("In", "Out", "get_ipython", "exit", "quit", "open")
                or name.isupper()  # the setup cell's constants (REPOSITORY): never a parameter
                or callable(value)
                or type(value).__name__ == "module"
            )
        }
    keys = schema(chapter)
    unknown = sorted(name for name in given if name not in keys and name not in ALL_KEYS and name not in SELECTORS)
    if unknown:
        problems = [f"unknown parameter {name!r}{suggest([name], keys)}" for name in unknown]
        raise ParameterError(problems_message(chapter, problems))
    values = {name: _from_text(name, namespace[name], keys) for name in sorted(given) if name in keys}
    profile, run = values.pop("profile", None), values.pop("run", None)
    root = project_root()
    for name, layer in ((profile, "profile"), (run, "run")):
        if not isinstance(name, (str, type(None))):
            raise ParameterError(problems_message(chapter, [f"{layer} must be str, got {name!r}"]))
    return chapter_values(chapter, profile, run, values, root)


def _from_text(name: str, value: Any, keys: dict) -> Any:
    """``value`` read as YAML when it is text and ``name`` takes no text (papermill's ``-p seeds '[0,1]'``, ``-p
    download true``); otherwise as given, for the checks to judge."""
    types = keys[name][0]
    if not isinstance(value, str) or str in types:
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return parsed if isinstance(parsed, types) or (float in types and isinstance(parsed, int)) else value
