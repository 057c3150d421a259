"""A self-contained HTML report of a run root (images embedded, no network): what was run, the per-layer
scores, the validation of the scores, and the edits judged by images."""

from __future__ import annotations

import base64
import html
import io
import json

import numpy as np
import pandas as pd

from cad_ray.store import RunRoot, ScoreStore

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#eee}img{max-width:100%;image-rendering:pixelated}.grid{display:inline-block;margin:4px;text-align:center;
font-size:11px;vertical-align:top}.note{color:#555;font-size:13px}h2{border-bottom:1px solid #ccc}"""


def _img(png: bytes, alt: str, width: int | None = None) -> str:
    style = f' style="width:{width}px"' if width else ""
    return f'<img alt="{html.escape(alt)}"{style} src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.3g}", border=0, na_rep="")


def _grid_png(pngs: list[bytes], columns: int) -> bytes:
    from PIL import Image

    from cad_ray.digits.quality import image_grid

    images = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB"), dtype=np.float64) / 255 for p in pngs])
    out = io.BytesIO()
    Image.fromarray(image_grid(images, columns=columns, cell=48)).save(out, format="PNG")
    return out.getvalue()


def _optional(run: RunRoot, store: ScoreStore, name: str) -> pd.DataFrame | None:
    return store.table(name) if run.exists(name) else None


def build_report(root: str) -> str:
    run, store = RunRoot(root), ScoreStore(root)
    manifest = store.manifest
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>cad-ray report</title><style>{STYLE}</style>"
             "</head><body>", "<h1>cad-ray report</h1>",
             f"<p class='note'>root <code>{html.escape(run.uri)}</code> · model {html.escape(str(manifest['model']))} "
             f"· fingerprint {manifest['fingerprint']} · config {manifest['config_hash']} · code "
             f"{manifest['code_version']} · attribution completed {manifest.get('completed', '?')}</p>"]
    pairs = store.concepts()
    config = manifest["config"]
    parts.append(f"<h2>Attribution</h2><p>{len(pairs)} concept/objective pairs, scope <code>{config['scope']}</code>,"
                 f" {config['samples']} samples each.</p>")
    from cad_ray.plots import layer_summary, ratio_sweep

    erase = pairs[pairs["objective"] == "erase"]["concept"].tolist()[:4]
    layers = store.layers(objective="erase")
    parts.append(_img(layer_summary(layers[layers["concept"].isin(erase)]), "per-layer scores"))

    summary = _optional(run, store, "validation_summary")
    parts.append("<h2>Validation by random ablation</h2>")
    if summary is None:
        parts.append("<p class='note'>not run: <code>cad-ray validate --root ROOT</code></p>")
    else:
        options = json.loads(run.read_bytes("_validation.json"))["options"]
        parts.append(f"<p>{options['ablations']} random subsets per fraction {options['fractions']} for "
                     f"{summary['concept'].nunique()} concept(s), "
                     f"{'held-out' if options['held_out'] else 'in-sample'} evaluation points; statistics on the "
                     f"test split ({1 - options['coar_train_fraction']:.0%} of the subsets). Actual change: J with "
                     "the base term frozen.</p>")
        mean = summary.groupby(["estimator", "fraction"])[["pearson", "spearman", "pearson_ablated_base"]].mean()
        parts.append("<h3>Estimators (mean over concepts)</h3>" + _table(mean.reset_index()))
        parts.append("<details><summary>per concept, with 95% bootstrap intervals</summary>" + _table(
            summary[["concept", "estimator", "fraction", "ablations", "pearson", "pearson_low", "pearson_high",
                     "spearman", "pearson_ablated_base"]]) + "</details>")
        for concept in summary["concept"].unique():
            if run.exists("plots", "validation", f"{concept}.png"):
                parts.append(_img(run.read_bytes("plots", "validation", f"{concept}.png"), f"scatter {concept}"))
        shares = _optional(run, store, "localization")
        if shares is not None:
            parts.append("<h3>Localization</h3>" + _table(shares))
            parts.append(_img(run.read_bytes("plots", "validation", "overlap.png"), "Jaccard heatmap", 600))

    evaluation = _optional(run, store, "evaluation_summary")
    parts.append("<h2>Edits judged by images</h2>")
    if evaluation is None:
        parts.append("<p class='note'>not run: <code>cad-ray evaluate --root ROOT</code></p>")
    else:
        images = store.table("evaluation")
        edits = sorted(evaluation["edit"].unique())
        parts.append(f"<p>{len(images)} images judged: edits {', '.join(edits)}; targets "
                     f"{', '.join(t for t in evaluation['target'].unique() if t)}; ratios "
                     f"{sorted(evaluation[~evaluation['edit'].isin(['none', 'finetune'])]['ratio'].unique().tolist())}"
                     " (finetune moves every scoped weight). "
                     "<b>best</b> marks each edit's best trade-off ratio.</p>")
        parts.append(_table(evaluation.drop(columns=["fd"]).round(4)))
        for target in [t for t in evaluation["target"].unique() if t]:
            parts.append(f"<h3>{html.escape(target)}</h3>" + _img(ratio_sweep(evaluation, target), f"sweep {target}"))
            parts.append(_image_grids(images, evaluation, target))
    parts.append("</body></html>")
    return "\n".join(parts)


def _image_grids(images: pd.DataFrame, summary: pd.DataFrame, target: str, per_prompt: int = 6) -> str:
    """Before/after grids with the same seeds: the target's prompt and the other prompts, per edit."""
    out = []
    chosen = [("none", 0.0, g) for g in sorted(summary[summary["edit"] == "none"]["guidance"].unique())]
    best = summary[(summary["target"] == target) & summary["best"]]
    chosen += [(r.edit, r.ratio, r.guidance) for r in best.itertuples()]
    for edit, ratio, guidance in chosen:
        rows = images[(images["edit"] == edit) & (images["guidance"] == guidance)
                      & ((images["target"] == target) | (edit == "none")) & (np.isclose(images["ratio"], ratio))]
        if rows.empty:
            continue
        rows = rows.groupby("label", sort=False).head(per_prompt)
        ordered = pd.concat([rows[rows["label"] == target], rows[rows["label"] != target]])
        caption = f"{edit}" + (f" ratio {ratio:g}" if edit != "none" else "") + f", guidance {guidance:g}"
        out.append(f"<div class='grid'>{_img(_grid_png(list(ordered['image_png']), per_prompt), caption, 300)}<br>"
                   f"{html.escape(caption)}: first row {html.escape(target)}</div>")
    return "".join(out)


def write_report(root: str, out: str | None = None) -> str:
    """Write the report to `out` (a local file) or to <root>/report.html; returns where it is."""
    text = build_report(root).encode()
    if out:
        from pathlib import Path

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(text)
        return out
    run = RunRoot(root)
    run.write_bytes(text, "report.html")
    return run.uri_under("report.html")
