"""Two finished runs of one task, seed for seed: does B beat A beyond the seed spread? On validation, on the ISIC test
set and on each external set of the profile, whole and in its choosing and reporting halves (``external.halves``),
each run scored with its own options, as chapter 3 scores it. Prints a Markdown table.

    python tools/compare_runs.py --data isic2016_holdout OUTPUT_DIR_A OUTPUT_DIR_B [--run task3]

Each OUTPUT_DIR holds the run's folder (``<OUTPUT_DIR>/task3/run.json``, ``seed<k>/best.pt``): e.g. a report's
``outputs/<profile>`` and a copy of an earlier run of the same task.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from isic_utils.config import params as P  # noqa: E402
from isic_utils.evaluation.external import TEST_NAME, external_sets, load_external, score_split  # noqa: E402
from isic_utils.evaluation.generalisation import study_splits  # noqa: E402
from isic_utils.scoring import metrics  # noqa: E402
from isic_utils.training.experiments import load_run, prepare_data  # noqa: E402


def per_seed_scores(output_dir: str, run_name: str, profile: dict) -> dict[str, dict[int, float]]:
    """{split label: {seed: mean per-image JA}} for one run, with its own test-time options: the ISIC test set, then
    validation and each external set whole and in the halves the options study reads (``study_splits``)."""
    run = load_run(output_dir, run_name)
    params = run.info["params"]
    data = prepare_data({**params, "output_dir": output_dir}, progress=False)
    splits = {"validation": data.val}
    cache = P.absolute(profile["output_dir"]).parent / "cache"
    known = {*data.train.ids, *data.val.ids, *data.test.ids}  # as chapter 3: a set's images the run saw are left out
    for external in (s for s in external_sets(profile) if s.found):
        split, _ = load_external(external, int(params["image_size"]), cache, known=known)
        if split is not None:
            splits[external.name] = split
    scored = {(run_name, name): score_split(run, split, name) for name, split in splits.items()}
    scores = {TEST_NAME: {int(s): float(t["iou"].mean()) for s, t in run.per_image.items()}}
    scores.update({name: result.per_seed_ja(*result.own) for (_, name), result in scored.items()})
    for label, (name, ids) in study_splits(scored).items():
        if ids is not None:
            result = scored[(run_name, name)]
            scores[label] = result.per_seed_ja(*result.own, ids)
    return scores


def compare(a_dir: str, b_dir: str, run_name: str, profile: dict) -> pd.DataFrame:
    """One row per split: each run's mean JA over the seeds both have, and B − A seed for seed with its spread."""
    a, b = (per_seed_scores(d, run_name, profile) for d in (a_dir, b_dir))
    rows = []
    for label in a:
        seeds = sorted(set(a[label]) & set(b[label]))
        spread = metrics.seed_spread([b[label][s] - a[label][s] for s in seeds])
        rows.append(
            {
                "split": label,
                "seeds": len(seeds),
                "JA A": sum(a[label][s] for s in seeds) / len(seeds),
                "JA B": sum(b[label][s] for s in seeds) / len(seeds),
                "B − A": spread["mean"],
                "std over seeds": spread["std"],
                "against the seed spread": spread["verdict"],
            }
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the profile whose data and external sets score both runs")
    parser.add_argument("--run", default="task3")
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args(argv)
    table = compare(args.a, args.b, args.run, P.resolve("external", None, args.data, {}))
    print(table.to_markdown(index=False, floatfmt=".3f"))
    return table


if __name__ == "__main__":
    main()
