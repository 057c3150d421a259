"""A self-contained HTML report of a run root (images embedded, no network): what was run, the per-layer
scores, the validation of the scores, and the edits judged by images."""

from __future__ import annotations

import base64
import html
import io

import numpy as np
import pandas as pd

from cad_ray.stages.evaluation import target_kind, target_rows
from cad_ray.store import RunRoot, ScoreStore

TEMPLATE = "report.html.j2"  # in cad_ray/assets: the page's layout; this module computes what goes in it


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
    import jinja2

    from cad_ray.plots import erase_verdicts, layer_summary, ratio_sweep

    run, store = RunRoot(root), ScoreStore(root)
    pairs = store.concepts()
    erase = pairs[pairs["objective"] == "erase"]["concept"].tolist()[:4]
    layers = store.layers(objective="erase")
    page = {"root": run.uri, "m": store.manifest, "pairs": len(pairs),
            "layers_img": _img(layer_summary(layers[layers["concept"].isin(erase)]), "per-layer scores"),
            "validation": None, "evaluation": None, "probes": None}

    summary = _optional(run, store, "validation_summary")
    if summary is not None:
        shares = _optional(run, store, "localization")
        mean = summary.groupby(["estimator", "fraction"])[["pearson", "spearman", "pearson_ablated_base"]].mean()
        page["validation"] = {
            "options": run.read_manifest("_validation.json")["options"], "concepts": summary["concept"].nunique(),
            "mean": _table(mean.reset_index()),
            "per_concept": _table(summary[["concept", "estimator", "fraction", "ablations", "pearson", "pearson_low",
                                           "pearson_high", "spearman", "pearson_ablated_base"]]),
            "scatters": [_img(run.read_bytes("plots", "validation", f"{c}.png"), f"scatter {c}")
                         for c in summary["concept"].unique() if run.exists("plots", "validation", f"{c}.png")],
            "localization": _table(shares) if shares is not None else None,
            "heatmap": _img(run.read_bytes("plots", "validation", "overlap.png"), "Jaccard heatmap", 600)
            if shares is not None else None}

    evaluation = _optional(run, store, "evaluation_summary")
    if evaluation is not None:
        images = store.table("evaluation")
        targets = [t for t in evaluation["target"].unique() if t]
        page["evaluation"] = {
            "images": len(images), "edits": sorted(evaluation["edit"].unique()), "targets": targets,
            "ratios": sorted(evaluation[~evaluation["edit"].isin(["none", "finetune"])]["ratio"].unique().tolist()),
            "table": _table(evaluation.drop(columns=["fd"]).round(4)),
            "verdicts": _img(erase_verdicts(evaluation), "erase verdicts per target")
            if "picked" in evaluation and evaluation["picked"].any() else None,
            "per_target": [{"name": t, "sweep": _img(ratio_sweep(evaluation, t), f"sweep {t}"),
                            "grids": _image_grids(images, evaluation, t)} for t in targets]}
    probes = _optional(run, store, "probe_summary")
    if probes is not None:
        images = store.table("probes")
        page["probes"] = {"tables": [{"name": t, "table": _table(probe_table(g)), "grids": _probe_grids(images, t)}
                                     for t, g in probes.groupby("target", sort=True)],
                          "verdicts": _table(store.table("probe_verdicts").round(3))
                          if run.exists("probe_verdicts") else None}
    environment = jinja2.Environment(loader=jinja2.PackageLoader("cad_ray", "assets"),
                                     autoescape=jinja2.select_autoescape(["html", "j2"]))
    return environment.get_template(TEMPLATE).render(**page)


def probe_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One target's probe summary as a reader compares it: a row per edit (the unedited model and the
    never-learned reference among them), a column per probe setting, the share of images that show the target."""
    columns = summary["probe"] + " " + summary["setting"]
    rows = summary["edit"] + summary["ratio"].map(lambda r: f" {r:g}" if r else "")
    table = summary.assign(column=columns, row=rows).pivot_table(index="row", columns="column", values="recovery")
    table.columns.name = None
    first = [r for r in ("none", "never-learned") if r in table.index]  # the ceiling and the level, then the edits
    table = table.loc[first + [r for r in table.index if r not in first]]
    return (table * 100).round(0).reset_index().rename(columns={"row": "edit (% of images that show the target)"})


def _probe_grids(images: pd.DataFrame, target: str, per_row: int = 8) -> list[dict]:
    """For the learned word and each completion setting: a row of images per edit setting (the first seeds),
    so that a verdict can be checked by eye; the caption names the rows in order."""
    rows = images[images["target"] == target]
    out = []
    for (probe, setting), group in rows[rows["setting"] != "untrained"].groupby(["probe", "setting"], sort=True):
        pngs, names = [], []
        order = sorted(group.groupby(["edit", "ratio"]).groups, key=lambda k: (k[0] not in ("none", "never-learned"),
                                                                               k[0] != "none", k))
        for edit, ratio in order:
            own = group[(group["edit"] == edit) & (group["ratio"] == ratio)]
            first = own.sort_values("seed").head(per_row)
            if len(first) == per_row:
                pngs += list(first["image_png"])
                names.append(edit + (f" {ratio:g}" if ratio else ""))
        if pngs:
            out.append({"img": _img(_grid_png(pngs, per_row), f"{probe} {setting} {target}"),
                        "caption": f"{probe} {setting}; rows, top to bottom: {', '.join(names)}"})
    return out


def _image_grids(images: pd.DataFrame, summary: pd.DataFrame, target: str, per_prompt: int = 6) -> list[dict]:
    """Before/after grids with the same seeds: the target's prompt and the other prompts, per edit."""
    out = []
    chosen = [("none", 0.0, g) for g in sorted(summary[summary["edit"] == "none"]["guidance"].unique())]
    best = summary[(summary["target"] == target) & summary["best"]]
    chosen += [(r.edit, r.ratio, r.guidance) for r in best.itertuples()]
    for edit, ratio, guidance in chosen:
        rows = images[(images["edit"] == edit) & (images["guidance"] == guidance)
                      & ((images["target"] == target) | (edit == "none")) & (np.isclose(images["ratio"], ratio))]
        if "draw" in rows:  # random's first draw: the same prompts and seeds as the unedited grid
            rows = rows[rows["draw"] == 0]
        if rows.empty:
            continue
        rows = rows.groupby("label", sort=False).head(per_prompt) if target_kind(target) != "colour" else \
            pd.concat([rows[rows["colour"] == target].head(per_prompt), rows[rows["colour"] != target].head(per_prompt)])
        asked = target_rows(rows, target) if "colour" in rows else rows["label"] == target
        ordered = pd.concat([rows[asked], rows[~asked]])
        caption = f"{edit}" + (f" ratio {ratio:g}" if edit != "none" else "") + f", guidance {guidance:g}"
        out.append({"img": _img(_grid_png(list(ordered['image_png']), per_prompt), caption, 300), "caption": caption})
    return out


def write_report(root: str, out: str | None = None) -> str:
    """Write the report to `out` (a local file) or to <root>/report.html; returns where it is."""
    text = build_report(root).encode()
    if out:
        from cad_ray.store import atomic_local_file

        with atomic_local_file(out) as tmp:
            with open(tmp, "wb") as f:
                f.write(text)
        return out
    run = RunRoot(root)
    run.write_bytes(text, "report.html")
    return run.uri_under("report.html")
