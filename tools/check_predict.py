"""Round-trip check of ``predict`` on a folder in the official layout: write the masks with the CLI's code, read
them back, and compare them with the ground truth and with the evaluation's own original-size scoring.

    python tools/check_predict.py --checkpoint outputs/isic2016_holdout/task3/seed0/best.pt \\
        --root ../shared/data/isic2016-originals [--test-table outputs/isic2016_holdout/task3/tables/per_image_test_seed0.csv]

Prints one row per image (its size, whether the mask has exactly that size, its pixel values, Jaccard of the written
mask and Jaccard the evaluation computes in memory) and the largest disagreement. ``--test-table`` marks which ids
were in that run's test split (the others were seen in training, so their scores are optimistic).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from isic_utils.data.sources import find_pairs  # noqa: E402
from isic_utils.predict import round_trip  # noqa: E402
from isic_utils.scoring.metrics import scores  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a best.pt from a training run")
    parser.add_argument(
        "--root", required=True, help="folder with ISBI2016_ISIC_Part1_Training_Data/ and _GroundTruth/"
    )
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--output", help="where the masks go (default: a temporary folder)")
    parser.add_argument("--test-table", help="a per_image_test_seed*.csv: mark the ids that run held out")
    args = parser.parse_args()

    pairs = find_pairs(args.root, args.split)
    with tempfile.TemporaryDirectory() as scratch:
        result = round_trip(args.checkpoint, pairs, Path(args.output or scratch))
        rows = []
        for pair, size, path in zip(pairs, result["sizes"], result["masks"]):
            with Image.open(path) as mask:  # the ISIC name; missing → the check fails loudly
                rows.append(
                    {
                        "id": pair.id,
                        "size": f"{size[0]}x{size[1]}",
                        "size_ok": mask.size == tuple(size),
                        "values": sorted(np.unique(np.asarray(mask)).tolist()),
                    }
                )
    written, counts, expected = result["written"], result["counts"], result["expected"]
    table = pd.DataFrame(rows)
    table["JA_written_mask"] = scores(counts)["iou"].numpy()
    table["JA_evaluation"] = scores(expected)["iou"].numpy()
    if args.test_table:
        table["held_out"] = table["id"].isin(set(pd.read_csv(args.test_table)["id"]))
    print(table.to_string(index=False, float_format="%.4f"))
    print(
        f"\n{len(written)} masks written, one <id>_Segmentation.png per image; sizes exact: {table.size_ok.all()}; "
        f"binary 0/255: {all(set(v) <= {0, 255} for v in table['values'])}"
    )
    print(
        f"mean JA written masks {table.JA_written_mask.mean():.4f}, evaluation {table.JA_evaluation.mean():.4f}; "
        f"max |difference| {(table.JA_written_mask - table.JA_evaluation).abs().max():.2e}; "
        f"max pixel-count difference {int((counts - expected).abs().max())}"
    )
    if args.test_table:
        held = table[table.held_out]
        print(
            f"{len(held)} of {len(table)} ids were in that run's test split"
            + (f" (mean JA on them {held.JA_written_mask.mean():.4f})" if len(held) else "")
            + "; the rest were training/validation ids for it, so their scores are optimistic."
        )


if __name__ == "__main__":
    main()
