"""Parameters of each chapter: their types and defaults (the report's configuration), profiles, validation.

A chapter's parameters come from, lowest to highest precedence: the defaults here, ``params/<run>.yaml`` (the
training chapter's ``run``: task1, task2, task3; the other chapters' own file), the data profile
``params/profiles/<profile>.yaml`` (keys the chapter does not take are ignored, so one profile serves every
chapter), then what is set explicitly (``report --set``, papermill's ``-p``/``-f``, a line added to the notebook's
parameters cell). ``chapter_values`` is that resolution; the pipeline and a notebook opened by hand both call it, so
a chapter names only its profile and run and is the report's chapter wherever it runs. Everything is checked
before any work and every problem reported at once, with the valid keys.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from ..base.files import project_root
from ..data.augmentation import AUGMENTATIONS
from ..data.sources import EXTERNAL_LAYOUTS, RELEASES
from ..data.transforms import COLOR_CONSTANCY
from ..model.inference import TTA
from ..model.networks import DECODERS
from ..scoring.metrics import POSTPROCESSING

# key: (allowed types, default). Data keys are shared by every chapter.
DATA_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "profile": ((str,), "synthetic"),
    "data_source": ((str,), "synthetic"),  # synthetic | isic2016
    "data_dir": ((str,), ""),  # "" → $ISIC_DATA_DIR, else the profile's default folder under data/
    "download": ((bool,), False),
    "test_split": ((str,), "official"),  # official | holdout
    "holdout_fraction": ((float,), 0.2),
    "val_fraction": ((float,), 0.2),
    "image_size": ((int,), 128),
    "limit": ((int, type(None)), None),
    "synthetic_train": ((int,), 200),
    "synthetic_test": ((int,), 60),
    "output_dir": ((str,), "outputs/synthetic"),
}

CHAPTER_KEYS: dict[str, dict[str, tuple[tuple[type, ...], Any]]] = {
    "eda": {"n_samples": ((int,), 6)},
    "train": {
        "run": ((str,), "task1"),  # which params/<run>.yaml: task1, task2, task3
        "run_name": ((str,), "task1"),  # the run's folder under output_dir (default: the run)
        "freeze_encoder": ((bool,), True),
        "encoder_lr": ((float,), 1e-4),
        "decoder_lr": ((float,), 1e-3),
        "weight_decay": ((float,), 0.01),
        "lr_schedule": ((str,), "constant"),  # cosine: each epoch's rates fall from the set ones to near 0 at the last
        "weight_average": ((str,), "none"),  # ema: validation and best.pt use a running average of the weights
        "style_mixing": ((str,), "none"),  # mixstyle: training mixes the encoder's feature statistics across images
        "epochs": ((int,), 20),
        "batch_size": ((int,), 32),
        "dropout": ((float,), 0.2),
        "decoder": ((str,), "report"),
        "loss": ((str,), "bce"),
        "augment": ((list,), ["hflip", "vflip"]),
        "encoder_weights": ((str, type(None)), "imagenet"),
        "allow_random_encoder": ((bool,), False),  # true only in the synthetic and tiny profiles
        "seeds": ((list,), [0]),
        "precision": ((str,), "auto"),  # auto: bf16 where native, fp16 on an older GPU, else fp32
        "device": ((str,), "auto"),  # auto: the GPU when torch sees one, else the CPU
        "deterministic": ((bool,), False),  # deterministic GPU kernels: same seed, same history; slower
        "jobs": ((int,), 1),  # seeds trained side by side in worker processes (one thread each on a CPU)
        "monitor_test": ((bool,), True),
        "feature_cache": ((bool,), True),
        "resume": ((bool,), True),  # continue finished or interrupted seeds; false (or report --force) retrains
        "color_constancy": ((str,), "none"),  # shades_of_grey: every image the model sees, in training and after
        "tta": ((str,), "none"),  # flips: the final scores average the four flips' probabilities
        "postprocess": ((str,), "none"),  # largest_component: one lesion, holes filled, before scoring at full size
    },
    "external": {
        "runs": ((list,), ["task1", "task2"]),
        "external": ((list,), []),  # sets from another source: see EXTERNAL_KEYS and the profiles
        "n_samples": ((int,), 6),
        "adapt_runs": ((list,), ["task2", "task3"]),  # runs adapted to each external set (those trained)
        "adapt_k": ((list,), [5, 10, 25]),  # labelled cases to fine-tune on (capped at half the set: the pool)
        "adapt_seeds": ((list,), [0, 1, 2]),  # draws of the k cases (and fine-tune seeds)
        "adapt_steps": ((int,), 40),  # fine-tune steps per draw
    },
    "compare": {
        "runs": ((list,), ["task1", "task2"]),
        "external": ((list,), []),  # the external sets each run's exports are scored on (the profile's)
        "deploy_repeats": ((int,), 30),  # timed rounds per engine for the deployment costs (batch 1)
    },
}
# What one external set in a profile's ``external`` list may say (name is required).
EXTERNAL_KEYS = {
    "name": "the set's name in tables (e.g. PH2)",
    "dir": "its folder (relative to the project, or absolute)",
    "env": "an environment variable that, when set, names the folder instead (e.g. PH2_DIR)",
    "layout": f"a named layout: {', '.join(EXTERNAL_LAYOUTS)}",
    "images": "a glob for the images under the folder (overrides the layout's)",
    "masks": "the mask's path relative to each image's folder, with {stem} (overrides the layout's)",
    "source": "where users get the data (shown when the folder is missing)",
    "synthetic": "generate a synthetic other-clinic set of this many cases in PH2's layout (offline profiles)",
}

# What a run may train with: BCE with logits (the report's), plus soft Dice or the Lovász hinge per image (``loss_fn``).
# Here with the other training choices, not in a scoring module: a stored score is keyed by the scoring code's source.
LOSSES = ("bce", "bce+dice", "bce+lovasz")
LR_SCHEDULES = ("constant", "cosine")  # the trainer's ``learning_rate_factor`` reads each
WEIGHT_AVERAGES = ("none", "ema")  # the trainer's ``weight_average`` makes each
STYLE_MIXINGS = ("none", "mixstyle")  # ``training.style_mixing`` makes each
CHOICES = {
    "data_source": ("synthetic", *RELEASES),
    "test_split": ("official", "holdout"),
    "decoder": DECODERS,  # the registry itself: a decoder registered there is a valid choice
    "loss": LOSSES,
    "lr_schedule": LR_SCHEDULES,
    "weight_average": WEIGHT_AVERAGES,
    "style_mixing": STYLE_MIXINGS,
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
    "color_constancy": COLOR_CONSTANCY,
    "tta": TTA,
    "postprocess": POSTPROCESSING,
}
FRACTIONS = ("holdout_fraction", "val_fraction")
RATES = ("encoder_lr", "decoder_lr")


def _default(key: str):
    """The training chapter's default for ``key`` (a list as a tuple): the trainer's config takes its defaults here."""
    value = CHAPTER_KEYS["train"][key][1]
    return tuple(value) if isinstance(value, list) else value


# What a setting is to a run, tagged once; a key not tagged here defines what a run learns. Every identity reads this:
# the chapter's fingerprint (pipeline), a run's key shared by its seeds (experiments) and a checkpoint's fingerprint.
ROLES = {
    "resume": "route",  # how a result is reached, never what it is
    "jobs": "route",
    "output_dir": "place",  # where it is written
    "seeds": "seeds",  # which seeds of one configuration are trained
    "epochs": "length",  # a finished run may be continued to more epochs
    "precision": "execution",  # how the computation runs, on which device, what it monitors
    "device": "execution",
    "deterministic": "execution",
    "feature_cache": "execution",
    "monitor_test": "execution",
    "channels_last": "execution",  # the trainer's own (not parameters)
    "eval_batch_size": "execution",
    "tta": "scoring",  # how the selected weights are scored and applied, not how they are trained
    "postprocess": "scoring",
}


# Settings added after runs were trained without them, each with the value those runs had: left out of a run's
# identity (its checkpoint's fingerprint, its key) when they have it, so that earlier runs resume and merge as they are.
ADDED_SETTINGS = {"lr_schedule": "constant", "weight_average": "none", "style_mixing": "none"}


def with_role(*roles: str) -> set[str]:
    """The settings tagged with any of ``roles`` in ``ROLES``."""
    return {key for key, role in ROLES.items() if role in roles}


@dataclass
class TrainConfig:
    """Everything that decides a training run's result (its fingerprint guards resume). A field named like a
    training parameter has that parameter's default (``CHAPTER_KEYS``: one source for name, type and default) and
    is filled from it by ``from_params``; the trainer's own are one ``seed`` of ``seeds``, the memory format, the
    evaluation batch and the resolved ``device`` (``cpu``, ``cuda``, ``cuda:1``; ``devices.resolve_device``)."""

    freeze_encoder: bool = _default("freeze_encoder")
    encoder_lr: float = _default("encoder_lr")
    decoder_lr: float = _default("decoder_lr")
    weight_decay: float = _default("weight_decay")
    lr_schedule: str = _default("lr_schedule")
    weight_average: str = _default("weight_average")
    style_mixing: str = _default("style_mixing")
    epochs: int = _default("epochs")
    batch_size: int = _default("batch_size")
    seed: int = 0
    augment: Sequence[str] = _default("augment")
    loss: str = _default("loss")
    precision: str = _default("precision")
    channels_last: bool = True
    feature_cache: bool = _default("feature_cache")  # used only when the encoder is frozen and augmentation is flips
    monitor_test: bool = _default("monitor_test")  # score the test set every epoch (monitoring, never selection)
    eval_batch_size: int = 64
    device: str = "cpu"
    deterministic: bool = _default("deterministic")
    color_constancy: str = _default("color_constancy")  # applied to every image the model sees
    tta: str = _default("tta")  # "flips": the selected checkpoint's final scoring averages the four flips
    postprocess: str = _default("postprocess")  # recorded in best.pt for scoring at original size and predict

    @classmethod
    def from_params(cls, values: dict[str, Any], seed: int, device: str) -> TrainConfig:
        """The config of one seed of a resolved training chapter, on a resolved ``device``."""
        given = {f.name: values[f.name] for f in fields(cls) if f.name in values and f.name not in ("seed", "device")}
        return cls(**{**given, "augment": tuple(values["augment"])}, seed=seed, device=device)

    def fingerprint(self) -> dict:
        """What decides the weights one seed learns: every field but how it runs, how long and how it is scored."""
        keep = asdict(self)
        keep["augment"] = list(self.augment)
        for key in with_role("execution", "length", "scoring"):
            keep.pop(key, None)
        if keep["color_constancy"] == "none":  # checkpoints from before the option resume as they are
            keep.pop("color_constancy")
        for key, plain in ADDED_SETTINGS.items():
            if keep[key] == plain:
                keep.pop(key)
        if "lr_schedule" in keep:  # a schedule's length decides what each epoch learns: never continued to more epochs
            keep["schedule_epochs"] = self.epochs
        return keep


class ParameterError(ValueError):
    """One or more parameters are wrong; the message lists every problem and the valid keys."""


def schema(chapter: str) -> dict[str, tuple[tuple[type, ...], Any]]:
    if chapter not in CHAPTER_KEYS:
        raise ValueError(f"unknown chapter {chapter!r}; known: {sorted(CHAPTER_KEYS)}")
    return {**DATA_KEYS, **CHAPTER_KEYS[chapter]}


def defaults(chapter: str) -> dict[str, Any]:
    return {key: (list(value) if isinstance(value, list) else value) for key, (_, value) in schema(chapter).items()}


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParameterError(f"parameter file {path} not found.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParameterError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise ParameterError(f"{path} must hold a mapping of parameter names to values, not {type(values).__name__}.")
    return values


def profile_path(profile: str, root: Path | None = None) -> Path:
    root = root or project_root()
    return root / "params" / "profiles" / f"{profile}.yaml"


SELECTORS = ("profile", "run")  # what a notebook's parameters cell names; the rest follows from them
CHAPTER_FILES = {"eda": "eda", "external": "external", "compare": "compare"}  # params/<name>.yaml; train: the run


def run_file(chapter: str, run: str | None = None, root: Path | None = None) -> Path:
    """``params/<run>.yaml`` for the training chapter, ``params/<chapter>.yaml`` for the others."""
    root = root or project_root()
    if chapter != "train":
        return root / "params" / f"{CHAPTER_FILES[chapter]}.yaml"
    path = root / "params" / f"{run or defaults('train')['run']}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (root / "params").glob("*.yaml") if p.stem not in CHAPTER_FILES.values())
        raise ParameterError(f"unknown run {run!r} (no {path}){suggest([str(run)], known)}; known runs: {known}")
    return path


def chapter_values(
    chapter: str,
    profile: str | None = None,
    run: str | None = None,
    overrides: dict[str, Any] | None = None,
    root: Path | None = None,
) -> dict[str, Any]:
    """A chapter's parameters, as the report resolves them: defaults ← ``params/<run>.yaml`` ← the profile ←
    ``overrides``; ``run`` names the training chapter's run file (ignored by the others)."""
    root = root or project_root()
    profile = profile or defaults(chapter)["profile"]
    run = (run or defaults("train")["run"]) if chapter == "train" else None
    values = resolve(chapter, run_file(chapter, run, root), profile, overrides, root)
    if chapter == "train" and values["run"] != run:
        raise ParameterError(f"params/{run}.yaml says run: {values['run']!r}; a run file names its own run")
    return values


def resolve(
    chapter: str,
    run_file: str | Path | None = None,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    root: Path | None = None,
) -> dict[str, Any]:
    """Merge defaults ← run file ← profile ← overrides for ``chapter`` and validate the result."""
    root = root or project_root()
    values = defaults(chapter)
    sources: list[tuple[str, dict]] = []
    if run_file is not None:
        given = read_yaml(run_file)
        if chapter == "train":  # a run's folder is named after the run unless its file says otherwise
            values["run_name"] = given.get("run", values["run"])
        sources.append((str(run_file), given))
    if profile is not None:
        path = profile_path(profile, root)
        if not path.is_file():
            known = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise ParameterError(f"unknown data profile {profile!r} (no {path}); known profiles: {known}")
        profile_values = read_yaml(path)
        if profile_values.get("profile", profile) != profile:
            raise ParameterError(
                f"{path} says profile: {profile_values['profile']!r}; a profile file names itself (profile: {profile})"
            )
        profile_values = {k: v for k, v in profile_values.items() if k in schema(chapter) or k not in ALL_KEYS}
        sources.append((str(path), {"profile": profile, **profile_values}))
    if overrides:
        sources.append(("overrides", overrides))
    problems = []
    for source, given in sources:
        unknown = sorted(set(given) - set(schema(chapter)))
        if unknown:
            problems.append(f"{source}: unknown key(s) {unknown}{suggest(unknown, schema(chapter))}")
        values.update({k: v for k, v in given.items() if k in schema(chapter)})
    problems += check(chapter, values, root)
    if problems:
        raise ParameterError(problems_message(chapter, problems))
    return values


ALL_KEYS = set(DATA_KEYS).union(*[set(keys) for keys in CHAPTER_KEYS.values()])


def suggest(unknown: list[str], valid) -> str:
    """`` (did you mean 'seeds'?)`` for the first of ``unknown`` that is close to a valid key, else ''."""
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.6)
        if close:
            return f" (did you mean {close[0]!r}?)"
    return ""


def key_types(key: str) -> tuple[type, ...]:
    """The types a parameter takes (the same in every chapter that has it); () for an unknown key."""
    for keys in (DATA_KEYS, *CHAPTER_KEYS.values()):
        if key in keys:
            return keys[key][0]
    return ()


def parse_override(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` as ``--set`` gives it, read literally: a text setting (a path, a name) keeps every character,
    ``null`` aside where the key takes none; numbers, booleans and lists are read as YAML. A value of which YAML
    would drop a part (a `` #`` comment) is refused, naming the key."""
    if "=" not in item:
        raise ParameterError(f"--set expects KEY=VALUE, got {item!r}")
    key, text = item.split("=", 1)
    types = key_types(key)
    if types and set(types) <= {str, type(None)}:
        return key, None if type(None) in types and text.strip() in ("null", "~", "") else text
    if _yaml_comment(text):
        raise ParameterError(
            f"--set {item}: YAML reads the part of {key}'s value from ' #' on as a comment and "
            "would drop it; remove the '#', or quote the text that holds it (\"a #1\")"
        )
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        reason = str(exc).splitlines()[0]
        raise ParameterError(
            f"--set {item}: the value of {key} is not valid YAML ({reason}). Write lists as in --set 'seeds=[0, 1, 2]'"
        ) from None
    if float in types and isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as text
        try:
            value = float(text)
        except ValueError:
            pass
    return key, value


def _yaml_comment(text: str) -> bool:
    """Whether YAML would read part of ``text`` as a comment: a ``#`` at its start or after a blank, outside quotes."""
    quote = None
    for k, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (k == 0 or text[k - 1].isspace()):
            return True
    return False


def check_overrides(overrides: dict[str, Any]) -> None:
    """Refuse overrides that no chapter knows (a typo would otherwise be dropped by every chapter's filter)."""
    unknown = sorted(set(overrides) - ALL_KEYS)
    if unknown:
        problems = [f"unknown key {name!r}{suggest([name], ALL_KEYS)}" for name in unknown]
        raise ParameterError(
            f"{len(problems)} problem(s) with the overrides (--set / SET=):\n"
            + "\n".join(f"  - {p}" for p in problems)
            + f"\nvalid keys: {', '.join(sorted(ALL_KEYS))}"
        )


def check(chapter: str, values: dict[str, Any], root: Path | None = None) -> list[str]:
    """Every problem with ``values`` for ``chapter`` (unknown keys, types, ranges, missing files)."""
    keys = schema(chapter)
    problems = [f"unknown key {key!r}" for key in sorted(set(values) - set(keys))]
    for key, (types, _) in keys.items():
        if key not in values:
            continue
        value = values[key]
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = values[key] = float(value)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append(f"{key} must be {names}, got {value!r} ({type(value).__name__})")
            continue
        if key in CHOICES and value not in CHOICES[key]:
            problems.append(f"{key} must be one of {list(CHOICES[key])}, got {value!r}")
    size = values.get("image_size")
    if isinstance(size, int) and not isinstance(size, bool) and (size < 32 or size % 32):
        problems.append(f"image_size must be a positive multiple of 32 (the encoder halves it five times), got {size}")
    for key in FRACTIONS:
        if isinstance(values.get(key), float) and not 0 < values[key] < 1:
            problems.append(f"{key} must be in (0, 1), got {values[key]}")
    for key in RATES:
        if isinstance(values.get(key), float) and not 0 < values[key] < math.inf:
            problems.append(f"{key} must be a finite number > 0, got {values[key]}")
    decay = values.get("weight_decay")
    if isinstance(decay, float) and not 0 <= decay < math.inf:
        problems.append(f"weight_decay must be a finite number >= 0, got {decay}")
    for key in (
        "epochs",
        "batch_size",
        "n_samples",
        "synthetic_train",
        "synthetic_test",
        "jobs",
        "adapt_steps",
        "deploy_repeats",
    ):
        if isinstance(values.get(key), int) and not isinstance(values[key], bool) and values[key] < 1:
            problems.append(f"{key} must be >= 1, got {values[key]}")
    limit, val_fraction = values.get("limit"), values.get("val_fraction")
    if isinstance(limit, int) and not isinstance(limit, bool):
        fraction = val_fraction if isinstance(val_fraction, float) and 0 < val_fraction < 1 else 0.2
        if limit < 2 or not 1 <= round(limit * fraction) < limit:
            problems.append(
                f"limit must leave at least one validation and one training image "
                f"(round(limit × val_fraction) ≥ 1), got limit {limit} with val_fraction {fraction}; "
                f"use at least {math.ceil(0.5 / fraction)} or null"
            )
    if isinstance(values.get("dropout"), float) and not 0 <= values["dropout"] < 1:
        problems.append(f"dropout must be in [0, 1), got {values['dropout']}")
    if chapter == "train":
        augment = values.get("augment")
        if isinstance(augment, list):
            bad = [a for a in augment if a not in AUGMENTATIONS]
            if bad:
                problems.append(f"augment has unknown entries {bad}; valid: {list(AUGMENTATIONS)}")
        seeds = values.get("seeds")
        if isinstance(seeds, list) and (
            not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        ):
            problems.append(f"seeds must be a non-empty list of integers, got {seeds!r}")
        elif isinstance(seeds, list) and len(set(seeds)) < len(seeds):
            problems.append(f"seeds must not repeat (each seed trains into its own folder), got {seeds}")
        weights = values.get("encoder_weights")
        if isinstance(weights, str) and weights not in ("imagenet", "none"):
            path = Path(weights).expanduser()
            path = path if path.is_absolute() else (root or project_root()) / path
            if not path.is_file():
                problems.append(
                    f"encoder_weights file {weights} not found (looked at {path}); give an existing "
                    "state_dict path, 'imagenet', or null"
                )
    if chapter in ("external", "compare"):
        problems += check_external(values.get("external"))
        problems += _integers(values, "adapt_k", 1, "labelled cases to fine-tune on (e.g. [5, 10, 25])")
        problems += _integers(values, "adapt_seeds", 0, "draws of the k cases (e.g. [0, 1, 2])")
        adapt_runs = values.get("adapt_runs")
        if isinstance(adapt_runs, list) and not all(isinstance(r, str) for r in adapt_runs):
            problems.append(f"adapt_runs must be a list of run names, got {adapt_runs!r}")
    data_dir = values.get("data_dir")
    if (
        isinstance(data_dir, str)
        and data_dir
        and absolute(data_dir, root).exists()
        and not absolute(data_dir, root).is_dir()
    ):
        problems.append(
            f"data_dir {data_dir} is a file, not a folder: give the folder holding the data (or \"\" "
            "for the profile's own)"
        )
    if chapter in ("compare", "external"):
        runs = values.get("runs")
        if isinstance(runs, list) and (len(runs) < 1 or not all(isinstance(r, str) for r in runs)):
            problems.append(f"runs must be a non-empty list of run names, got {runs!r}")
    return problems


def _integers(values: dict, key: str, least: int, meaning: str) -> list[str]:
    """The problem with ``values[key]`` when it is not a non-empty list of distinct integers >= ``least``."""
    given = values.get(key)
    if not isinstance(given, list):
        return []
    whole = all(isinstance(v, int) and not isinstance(v, bool) for v in given)
    if not given or not whole or any(v < least for v in given) or len(set(given)) < len(given):
        return [f"{key} must be a non-empty list of distinct integers >= {least}, {meaning}; got {given!r}"]
    return []


def check_external(sets) -> list[str]:
    """Problems with a profile's ``external`` list (each entry a mapping of EXTERNAL_KEYS, with a unique name)."""
    if not isinstance(sets, list):
        return []
    problems, names = [], set()
    for k, entry in enumerate(sets):
        where = f"external[{k}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} must be a mapping with keys {sorted(EXTERNAL_KEYS)}, got {entry!r}")
            continue
        unknown = sorted(set(entry) - set(EXTERNAL_KEYS))
        if unknown:
            problems.append(
                f"{where}: unknown key(s) {unknown}{suggest(unknown, EXTERNAL_KEYS)}; valid: {sorted(EXTERNAL_KEYS)}"
            )
        name = entry.get("name")
        if not isinstance(name, str) or not name or "/" in name:
            problems.append(f"{where}: name must be a non-empty string without '/', got {name!r}")
        elif name in names:
            problems.append(f"{where}: the name {name!r} is used twice")
        names.add(name)
        if "layout" in entry and entry["layout"] not in EXTERNAL_LAYOUTS:
            problems.append(f"{where}: layout must be one of {list(EXTERNAL_LAYOUTS)}, got {entry['layout']!r}")
        if "masks" in entry and (not isinstance(entry["masks"], str) or "{stem}" not in entry["masks"]):
            problems.append(
                f"{where}: masks must be a path with {{stem}} (e.g. '{{stem}}_Segmentation.png'), "
                f"got {entry['masks']!r}"
            )
        if "synthetic" in entry and (not isinstance(entry["synthetic"], int) or entry["synthetic"] < 2):
            problems.append(f"{where}: synthetic must be a number of cases >= 2, got {entry['synthetic']!r}")
        if "dir" not in entry and "env" not in entry and "synthetic" not in entry:
            problems.append(f"{where}: give dir, env or synthetic: where the set is")
    return problems


def problems_message(chapter: str, problems: list[str]) -> str:
    lines = [f"{len(problems)} problem(s) with the {chapter} parameters:"] + [f"  - {p}" for p in problems]
    lines.append(f"valid keys for {chapter}: {', '.join(sorted(schema(chapter)))}")
    return "\n".join(lines)


def absolute(path: str | Path, root: Path | None = None) -> Path:
    """``path`` made absolute against the project root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else (root or project_root()) / path
