"""Write notebooks/*.ipynb from the cell lists below (the notebooks are committed; rerun this after editing).

    python tools/build_notebooks.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from isic_utils.params import defaults  # noqa: E402

COLAB = '''# Colab / a fresh kernel: install the package from the checkout when it is missing (does nothing otherwise).
import importlib.util, pathlib
if importlib.util.find_spec("isic_utils") is None:
    _here = pathlib.Path.cwd()
    _checkouts = [p for p in [_here, *_here.parents, *pathlib.Path("/content").glob("*")] if (p / "isic_utils").is_dir()]
    if not _checkouts:
        raise ModuleNotFoundError("isic_utils is not installed. Clone this project (in Colab: !git clone <its URL>), "
                                  "then run `pip install -e <the clone>` or rerun this cell.")
    %pip install -q -e {_checkouts[0]}
    importlib.invalidate_caches()'''


def parameters_cell(chapter: str, overrides: dict | None = None) -> nbformat.NotebookNode:
    values = {**defaults(chapter), **(overrides or {})}
    lines = ["# Parameters (papermill injects a cell after this one). Plain literals only."]
    lines += [f"{key} = {value!r}" for key, value in values.items()]
    cell = new_code_cell("\n".join(lines))
    cell.metadata["tags"] = ["parameters"]
    return cell


def setup_cell(chapter: str, name_expr: str) -> str:
    return f'''import pandas as pd
from IPython.display import Markdown, display

from isic_utils import data, plots, report, study
from isic_utils.params import from_notebook

params = from_notebook("{chapter}", globals())
out = study.chapter_dir(params, {name_expr})
pd.set_option("display.max_colwidth", None)
display(Markdown(study.describe_data(params)))'''


EDA = [
    new_markdown_cell("# Chapter 1 — The data\n\nWhat does ISIC 2016 Part 1 hold, and is it fit to train on? "
                      "This chapter counts the images per split, shows samples with their masks (Figure 1), the "
                      "distribution of original image sizes (Figure 2), the pixel mean and standard deviation, the "
                      "augmentations (Figure 3), and checks that every image meets its own mask."),
    parameters_cell("eda"),
    new_code_cell(COLAB),
    new_code_cell(setup_cell("eda", '"eda"')),
    new_markdown_cell("## Splits\n\nThe training ids are split 80/20 into train and validation (seeded); the test "
                      "set is kept apart and only scored, never used to choose anything."),
    new_code_cell("dataset = study.prepare_data(params)\n"
                  "report.save_table(report.counts_table(dataset), out, 'counts')"),
    new_markdown_cell("## Figure 1 — sample images and their masks"),
    new_code_cell("n = params['n_samples']\n"
                  "fig = plots.sample_grid(dataset.train.images[:n], dataset.train.masks[:n], dataset.train.ids[:n])\n"
                  "plots.save_figure(fig, out, 'fig1_samples');"),
    new_markdown_cell("## Figure 2 — original image sizes\n\nImages are resized to `image_size`² for the model "
                      "(aspect ratio not kept, as in the report); masks with nearest-neighbour so they stay binary."),
    new_code_cell("sizes = data.original_sizes(dataset.train.sources + dataset.val.sources + dataset.test.sources)\n"
                  "plots.save_figure(plots.size_distribution(sizes), out, 'fig2_sizes')\n"
                  "report.save_table(report.size_summary(sizes), out, 'sizes')"),
    new_markdown_cell("## Pixel mean and standard deviation\n\nOver the training images at model resolution, in "
                      "[0, 1] units, beside the ImageNet statistics the encoder's weights expect (and which the "
                      "model uses to normalise)."),
    new_code_cell("report.save_table(report.pixel_stats_table(data.pixel_stats(dataset.train.images)), out, 'pixel_stats')"),
    new_markdown_cell("## Figure 3 — augmentations\n\nEach augmentation the training can apply, alone, drawn by the "
                      "training code itself (`data.apply_augmentation`): flips and 90° rotations move image and mask "
                      "together, colour jitter changes the image only. Tasks 1 and 2 use the flips; task 3 all four."),
    new_code_cell("fig = plots.augmentation_examples(dataset.train.images[:3], dataset.train.masks[:3])\n"
                  "plots.save_figure(fig, out, 'fig3_augmentations');"),
    new_markdown_cell("## Does each image meet its own mask?\n\nPairing is by id (a missing or extra file is an "
                      "error at load time), sizes must match (checked at decode), and here: no empty or full masks, "
                      "and the lesion is darker than the skin around it."),
    new_code_cell("alignment = report.alignment_summary({'train': dataset.train, 'validation': dataset.val, "
                  "'test': dataset.test})\nreport.save_table(alignment, out, 'alignment')"),
]

TRAIN = [
    new_markdown_cell("# Chapter 2 — Training a run\n\nOne notebook, run once per task through its parameters: "
                      "**task 1** freezes the ImageNet MobileNetV2 encoder (feature extraction), **task 2** fine-tunes "
                      "it at `encoder_lr`, **task 3** swaps the report's decoder for a U-Net. Each epoch records "
                      "train / validation / test loss, IoU, Dice and pixel accuracy; the checkpoint is chosen on "
                      "**validation** IoU and the whole test set is scored once with it."),
    parameters_cell("train"),
    new_code_cell(COLAB),
    new_code_cell(setup_cell("train", "params['run_name']")),
    new_code_cell("dataset = study.prepare_data(params)\nrun = study.train_run(params, dataset)\n"
                  "display(Markdown(f'Encoder: {run.weights_note}. Test set: {dataset.test_source}.'))"),
    new_markdown_cell("## Per-epoch table (the report's Tables 1 / 5)\n\n`mean/img` is the mean of per-image "
                      "scores (how the ISIC challenge ranked), `pooled` pools every pixel. Test columns are "
                      "**monitoring only**: nothing is chosen with them."),
    new_code_cell("run.tables['epochs']"),
    new_markdown_cell("## Summary (Tables 2 / 6)\n\n`over epochs` repeats the report's min / max / mean over "
                      "epochs; `selected` is the validation-chosen checkpoint scored once — quote these."),
    new_code_cell("run.tables['summary']"),
    new_markdown_cell("## Seeds\n\nOne row per seed: the chosen epoch and the test scores at 128 px and at each "
                      "image's original size (challenge-style)."),
    new_code_cell("run.seeds_table"),
    new_markdown_cell("## Parameters (Tables 3, 4 / 7, 8)"),
    new_code_cell("report.write_decoder_parameters(run.model.decoder, run.run_dir / 'decoder_parameters.txt')\n"
                  "run.tables['parameters']"),
    new_markdown_cell("## Figures 4–8 / 9–13 — loss, IoU, Dice, pixel accuracy per epoch, and predictions"),
    new_code_cell("figures = study.run_figures(run)"),
]

COMPARE = [
    new_markdown_cell("# Chapter 3 — Feature extraction vs fine-tuning (and a U-Net)\n\nWhich run segments the "
                      "test set best, by how much, and is the difference larger than seed noise? This chapter reads "
                      "the training runs' saved outputs; it never retrains."),
    parameters_cell("compare"),
    new_code_cell(COLAB),
    new_code_cell(setup_cell("compare", '"compare"')),
    new_code_cell("saved_runs = {name: study.load_run(params['output_dir'], name) for name in params['runs']}"),
    new_markdown_cell("## Table 9 — test scores per run (validation-selected checkpoints, mean ± std over seeds)"),
    new_code_cell("report.save_table(study.comparison_table(saved_runs), out, 'comparison')"),
    new_markdown_cell("## Paired tests\n\nWilcoxon signed-rank test on per-image Jaccard (original size, averaged "
                      "over seeds), for every pair of runs."),
    new_code_cell("tests = report.save_table(study.wilcoxon_table(saved_runs), out, 'wilcoxon')\ntests"),
    new_markdown_cell("## The student report vs this reproduction"),
    new_code_cell("ours = {name: study.headline(run) for name, run in saved_runs.items()}\n"
                  "report.save_table(report.report_vs_reproduction(ours), out, 'report_vs_reproduction')"),
    new_code_cell("report.save_table(report.method_differences_table(), out, 'method_differences')"),
    new_markdown_cell("## Curves side by side"),
    new_code_cell("histories = {name: run.epochs for name, run in saved_runs.items()}\n"
                  "plots.save_figure(plots.compare_curves(histories, 'val IoU (mean/img)', 'validation IoU (mean/img)'), out, 'val_iou')\n"
                  "plots.save_figure(plots.compare_curves(histories, 'val loss', 'validation loss'), out, 'val_loss');"),
    new_markdown_cell("## The same test images, predicted by each run"),
    new_code_cell("fig = study.compare_predictions_figure(params, saved_runs)\nplots.save_figure(fig, out, 'predictions');"),
    new_code_cell("plots.save_figure(plots.per_image_distribution({n: r.per_image[int(r.seeds['seed'].iloc[0])] "
                  "for n, r in saved_runs.items()}), out, 'per_image_iou');"),
    new_markdown_cell("## Reading"),
    new_code_cell("display(Markdown(study.written_reading(saved_runs, tests)))"),
]


def write(name: str, cells: list) -> None:
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    nbformat.write(notebook, ROOT / "notebooks" / name)


if __name__ == "__main__":
    write("01_eda.ipynb", EDA)
    write("02_train.ipynb", TRAIN)
    write("03_compare.ipynb", COMPARE)
    print("wrote notebooks/01_eda.ipynb, 02_train.ipynb, 03_compare.ipynb")
