"""Every prediction in view: one self-contained HTML page of thumbnails (ground truth outlined in green, each run's
prediction in magenta), each with its JA, the run's confidence and the lesion's size, sortable in the browser.

Thumbnails are small JPEGs embedded as data URIs, so the page opens alone (sent by mail, unpacked from a bundle) and
stays light: about 3 KB an image and run.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from ..base.files import write_text
from ..scoring.metrics import THRESHOLD_JACCARD

GALLERY = "gallery.html"  # a chapter's gallery, in the chapter's folder
THUMBNAIL = 96  # pixels a side
GROUND_TRUTH, PREDICTION = (40, 220, 60), (235, 40, 235)


def _outline(mask: torch.Tensor) -> torch.Tensor:
    """The boundary pixels of a binary ``H×W`` mask (the mask minus its 3×3 erosion)."""
    m = mask.float()[None, None]
    eroded = 1 - F.max_pool2d(1 - m, 3, stride=1, padding=1)
    return (m - eroded)[0, 0] > 0


def thumbnail(image: torch.Tensor, truth: torch.Tensor | None, predicted: torch.Tensor, size: int = THUMBNAIL) -> str:
    """A ``data:image/jpeg`` URI: the uint8 ``3×S×S`` image with the ground truth (if any) and the predicted mask
    (``1×S×S`` / ``S×S``, {0, 1}) outlined, resized to ``size``."""
    picture = image.permute(1, 2, 0).numpy().copy()
    for mask, colour in ((truth, GROUND_TRUTH), (predicted, PREDICTION)):
        if mask is not None:
            picture[_outline(mask.reshape(mask.shape[-2:]) > 0).numpy()] = colour
    buffer = io.BytesIO()
    Image.fromarray(picture).resize((size, size), Image.Resampling.BILINEAR).save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
.bar{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ddd;z-index:1}
.grid{display:flex;flex-wrap:wrap;gap:8px;margin-top:1em}
.card{border:1px solid #ccc;border-radius:4px;padding:4px;font-size:11px;line-height:1.3}
.card.failed{border-color:#c00;background:#fff3f3}
.runs{display:flex;gap:3px}.runs figure{margin:0;text-align:center}
img{display:block;width:%dpx;height:%dpx}
.flag,span.failed{color:#c00;font-weight:bold}
"""

_SCRIPT = """
function sortBy(key, descending){
  const grid=document.getElementById('grid');
  const cards=[...grid.children];
  cards.sort((a,b)=>{const x=parseFloat(a.dataset[key]),y=parseFloat(b.dataset[key]);
    return descending ? y-x : x-y;});
  cards.forEach(c=>grid.appendChild(c));
}
"""


def write_gallery(
    path: str | Path,
    title: str,
    intro: str,
    images: torch.Tensor,
    masks: torch.Tensor | None,
    ids: list[str],
    runs: dict[str, dict],
) -> Path:
    """Write the gallery page ``path``: a card per image (in ``ids`` order), a thumbnail per run.

    ``runs``: name → ``{"masks": N×1×S×S predicted {0,1} (or probabilities, thresholded at 0.5), "table": per-image
    table with id, iou and (optionally) confidence, lesion_area, "flag_below": the run's threshold or None}``.
    ``masks`` (the ground truth at the same size) may be None for images without one (then no JA either).
    Sorting keys are the first run's, and the mean over runs.
    """
    names = list(runs)
    tables = {name: run["table"].set_index("id").reindex(ids) for name, run in runs.items()}
    cards = []
    for k, image_id in enumerate(ids):
        figures, keys, lines = [], {}, []
        for name in names:
            predicted = runs[name]["masks"][k] > 0.5
            figures.append(
                f'<figure><img alt="{html.escape(image_id)} {html.escape(name)}" '
                f'src="{thumbnail(images[k], None if masks is None else masks[k], predicted)}">'
                f"{html.escape(name) if len(names) > 1 else ''}</figure>"
            )
            row = tables[name].loc[image_id]
            parts = []
            if "iou" in row and pd.notna(row["iou"]):
                below = row["iou"] < THRESHOLD_JACCARD
                parts.append(f"<span class='{'failed' if below else ''}'>JA {row['iou']:.2f}</span>")
            if "confidence" in row and pd.notna(row["confidence"]):
                flag = runs[name].get("flag_below")
                doubtful = flag is not None and row["confidence"] < flag
                parts.append(
                    f"<span class='{'flag' if doubtful else ''}'>conf {row['confidence']:.2f}"
                    f"{' ⚑' if doubtful else ''}</span>"
                )
            lines.append((f"{html.escape(name)}: " if len(names) > 1 else "") + " · ".join(parts))
        first = tables[names[0]].loc[image_id]
        for key, column in (("ja", "iou"), ("confidence", "confidence"), ("lesion", "lesion_area")):
            values = [tables[n].loc[image_id].get(column) for n in names]
            values = [float(v) for v in values if v is not None and pd.notna(v)]
            keys[key] = f"{np.mean(values):.4f}" if values else "0"
        failed = keys["ja"] != "0" and float(keys["ja"]) < THRESHOLD_JACCARD  # the mean over runs
        size = f"lesion {100 * float(first['lesion_area']):.0f}% · " if pd.notna(first.get("lesion_area")) else ""
        data = " ".join(f'data-{key}="{value}"' for key, value in keys.items())
        cards.append(
            f'<div class="card{" failed" if failed else ""}" {data}><div class="runs">{"".join(figures)}'
            f'</div><b>{html.escape(image_id)}</b><br>{size}{"<br>".join(lines)}</div>'
        )
    buttons = " ".join(
        f'<button onclick="sortBy(\'{key}\',{str(desc).lower()})">{label}</button>'
        for key, desc, label in (
            ("ja", False, "JA ↑ (worst first)"),
            ("ja", True, "JA ↓"),
            ("confidence", False, "confidence ↑"),
            ("confidence", True, "confidence ↓"),
            ("lesion", False, "lesion size ↑"),
            ("lesion", True, "lesion size ↓"),
        )
    )
    page = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE % (THUMBNAIL, THUMBNAIL)}</style><script>{_SCRIPT}</script></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{intro}</p>"
        f"<div class='bar'>Sort by: {buttons} — {len(ids)} images; green: ground truth, magenta: prediction; "
        f"red: JA below {THRESHOLD_JACCARD} (a card: the mean over runs); ⚑: confidence under the run's threshold (check by hand)</div>"
        f"<div class='grid' id='grid'>{''.join(cards)}</div></body></html>"
    )
    return write_text(Path(path), page)
