"""A self-contained HTML report of a run root (images embedded, no network): what was run, the per-layer
scores, the validation of the scores, and the edits judged by images."""

from __future__ import annotations

import base64
import html
import io

import numpy as np
import pandas as pd

from cad_ray.digits import DIGIT_WORDS
from cad_ray.digits.quality import image_grid
from cad_ray.method.edits import is_reference
from cad_ray.plots import erase_verdicts, layer_summary, ratio_sweep, validation_scatter
from cad_ray.stages.summary import target_kind, target_rows
from cad_ray.store import RunRoot, ScoreStore, atomic_local_file

TEMPLATE = "report.html.j2"  # in cad_ray/assets: the page's layout; this module computes what goes in it


def _img(png: bytes, alt: str, width: int | None = None) -> str:
    style = f' style="width:{width}px"' if width else ""
    return f'<img alt="{html.escape(alt)}"{style} src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(frame: pd.DataFrame) -> str:
    """A table in its own box that scrolls sideways when wider than the page (a reader at 1280 px sees every
    column)."""
    text = frame.to_html(index=False, float_format=lambda v: f"{v:.3g}", border=0, na_rep="")
    return f'<div class="table-box" style="overflow-x:auto;max-width:100%">{text}</div>'


# the edits table's columns a reader compares first; the rest are under "every column"
EDIT_COLUMNS = ("edit", "target", "selection", "ratio", "share", "guidance", "target_accuracy",
                "target_accuracy_unseen", "others_accuracy", "worst_other_retained", "clean", "best")


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def attribution_concepts(pairs: pd.DataFrame, evaluation: pd.DataFrame | None, validation: pd.DataFrame | None,
                         objective: str = "erase", most: int = 4) -> tuple[list[str], str]:
    """The concepts the attribution plot shows, and why: the evaluated targets, else the validated concepts, else
    the first `most` (all with scores under `objective`)."""
    scored = pairs[pairs["objective"] == objective]["concept"].tolist()
    for frame, column, why in ((evaluation, "target", "the evaluated targets"),
                               (validation, "concept", "the validated concepts")):
        if frame is not None and column in frame:
            chosen = [c for c in dict.fromkeys(frame[column]) if c in scored][:most]
            if chosen:
                return chosen, why
    return scored[:most], f"the first {most} concepts" if len(scored) > most else "every concept"


def pearson_sentence(summary: pd.DataFrame) -> str:
    """A sentence that says what each estimator's Pearson correlation (mean over concepts, at the largest ablated
    fraction) means for trusting its scores."""
    largest = summary["fraction"].max()
    mean = summary[summary["fraction"] == largest].groupby("estimator", sort=False)["pearson"].mean()
    words = []
    for estimator, r in mean.items():
        if not np.isfinite(r):
            continue
        if abs(r) < 0.3:
            meaning = "near zero: its predicted change of J does not follow the actual change, so its ranking of " \
                      "components is not supported at this fraction"
        elif r < 0:
            meaning = "negative: its predictions run against the actual change"
        elif r < 0.7:
            meaning = "moderate: it follows the actual change in part"
        else:
            meaning = "strong: its predictions follow the actual change"
        words.append(f"{estimator} r = {r:.2f} ({meaning})")
    ablations = int(summary["ablations"].min()) if "ablations" in summary else 0
    few = f" With {ablations} test ablations per fraction the intervals are wide (see per concept)." \
        if 0 < ablations < 30 else ""
    return (f"Pearson correlation of predicted and actual change at ablated fraction {largest:g}, mean over "
            f"concepts: " + "; ".join(words) + "." + few) if words else ""


def _grid_png(pngs: list[bytes], columns: int) -> bytes:
    from PIL import Image


    images = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB"), dtype=np.float64) / 255 for p in pngs])
    out = io.BytesIO()
    Image.fromarray(image_grid(images, columns=columns, cell=48)).save(out, format="PNG")
    return out.getvalue()


def _optional(run: RunRoot, store: ScoreStore, name: str) -> pd.DataFrame | None:
    return store.table(name) if run.exists(name) else None


def build_report(root: str) -> str:
    import jinja2


    run, store = RunRoot(root), ScoreStore(root)
    pairs = store.concepts()
    summary = _optional(run, store, "validation_summary")
    evaluation = _optional(run, store, "evaluation_summary")
    shown, why = attribution_concepts(pairs, evaluation, summary)
    layers = store.layers(objective="erase")
    page = {"root": run.uri, "m": store.manifest, "pairs": len(pairs),
            "layers_img": _img(layer_summary(layers[layers["concept"].isin(shown)], "erase"), "per-layer scores")
            + _note(f"Shown: {', '.join(shown)} ({why}), erase objective. Every concept and objective: "
                    "ScoreStore(root).layers()."),
            "validation": None, "evaluation": None, "probes": None}

    if summary is not None:
        shares = _optional(run, store, "localization")
        mean = summary.groupby(["estimator", "fraction"])[["pearson", "spearman", "pearson_ablated_base"]].mean()
        page["validation"] = {
            "options": run.read_manifest("_validation.json")["options"], "concepts": summary["concept"].nunique(),
            "mean": _table(mean.reset_index()) + _note(pearson_sentence(summary)),
            "per_concept": _table(summary[["concept", "estimator", "fraction", "ablations", "pearson", "pearson_low",
                                           "pearson_high", "spearman", "pearson_ablated_base"]]),
            "scatters": _scatters(run, store, summary["concept"].unique()),
            "localization": _table(shares) if shares is not None else None,
            "heatmap": _img(run.read_bytes("plots", "validation", "overlap.png"), "Jaccard heatmap", 600)
            if shares is not None else None}

    if evaluation is not None:
        images = store.table("evaluation")
        evaluation = evaluation.assign(best=evaluation["best"] & ~evaluation["edit"].map(is_reference).astype(bool)) \
            if "best" in evaluation else evaluation
        targets = [t for t in evaluation["target"].unique() if t]
        page["evaluation"] = {
            "images": len(images), "edits": sorted(evaluation["edit"].unique()), "targets": targets,
            "ratios": sorted(evaluation[evaluation["ratio"] > 0]["ratio"].unique().tolist()),  # 0: no selection
            "table": _edits_table(evaluation),
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


def _scatters(run: RunRoot, store: ScoreStore, concepts) -> list[str]:
    """Each validated concept's scatter, drawn from the validation table (so that an older root's plot reads as
    today's), else the PNG the validation stage stored."""

    table = store.table("validation") if run.exists("validation") else None
    out = []
    for concept in concepts:
        own = table[table["concept"] == concept] if table is not None else None
        if own is not None and len(own):
            out.append(_img(validation_scatter(own), f"scatter {concept}"))
        elif run.exists("plots", "validation", f"{concept}.png"):
            out.append(_img(run.read_bytes("plots", "validation", f"{concept}.png"), f"scatter {concept}"))
    return out


def _edits_table(evaluation: pd.DataFrame) -> str:
    """The edits table a reader at 1280 px reads whole: the main columns, then every column in a box that
    scrolls sideways."""
    frame = evaluation.drop(columns=["fd"], errors="ignore").round(4)
    main = frame[[c for c in EDIT_COLUMNS if c in frame]]
    return (_table(main) + _note("best: the edit's best trade-off ratio (never the unedited model or random, which "
                                 "are references)")
            + f"<details><summary>every column ({len(frame.columns)})</summary>{_table(frame)}</details>")


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


def _labelled_grid_png(rows: list[tuple[str, list[bytes]]], columns: int, per_line_images: int = 6) -> bytes:
    """A grid of named groups of images, each (name, images) a row of `columns` cells with the name at its left (a
    shorter row padded with the grid's grey); groups of few images share a line (`per_line_images` cells at most),
    in order, left to right."""
    from PIL import Image, ImageDraw, ImageFont


    decoded = [[np.asarray(Image.open(io.BytesIO(p)).convert("RGB"), dtype=np.float64) / 255 for p in pngs[:columns]]
               for _, pngs in rows]
    blank = np.full(next(image.shape for row in decoded for image in row), 0.35)
    tiles = [Image.fromarray(image_grid(np.stack(row + [blank] * (columns - len(row))), columns=columns, cell=48))
             for row in decoded]
    font = ImageFont.load_default(size=13)
    measure = ImageDraw.Draw(tiles[0])
    name_width = 12 + max(int(measure.textlength(name, font=font)) for name, _ in rows)
    tile_width, tile_height = name_width + tiles[0].width, tiles[0].height
    per_line = max(1, per_line_images // columns)
    lines = -(-len(tiles) // per_line)
    out = Image.new("RGB", (tile_width * min(per_line, len(tiles)), tile_height * lines), "white")
    draw = ImageDraw.Draw(out)
    for k, ((name, _), tile) in enumerate(zip(rows, tiles)):
        left, top = (k % per_line) * tile_width, (k // per_line) * tile_height
        out.paste(tile, (left + name_width, top))
        draw.text((left + name_width - 4, top + tile_height / 2), name, fill="black", font=font, anchor="rm")
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue()


def _label_order(label: str) -> tuple:
    """The digits world's labels in their own order (zero to nine), any other label after them by name."""

    key = str(label).strip().lower()
    return (DIGIT_WORDS.index(key), "") if key in DIGIT_WORDS else (len(DIGIT_WORDS), str(label))


def _image_grids(images: pd.DataFrame, summary: pd.DataFrame, target: str, per_prompt: int = 6) -> list[dict]:
    """Before/after grids with the same seeds: a row per prompt label (the target's first, each row named), per
    edit: the unedited model, each edit's best ratio, and random at cad-erase's best ratio (the reference)."""
    out = []
    chosen = [("none", 0.0, g) for g in sorted(summary[summary["edit"] == "none"]["guidance"].unique())]
    best = summary[(summary["target"] == target) & summary["best"] & ~summary["edit"].map(is_reference).astype(bool)]
    chosen += [(r.edit, r.ratio, r.guidance) for r in best.itertuples()]
    chosen += [("random", r.ratio, r.guidance) for r in best[best["edit"] == "cad-erase"].itertuples()
               if ((summary["edit"] == "random") & (summary["target"] == target)
                   & np.isclose(summary["ratio"], r.ratio)).any()]
    for edit, ratio, guidance in chosen:
        rows = images[(images["edit"] == edit) & (images["guidance"] == guidance)
                      & ((images["target"] == target) | (edit == "none")) & (np.isclose(images["ratio"], ratio))]
        if "draw" in rows:  # random's first draw: the same prompts and seeds as the unedited grid
            rows = rows[rows["draw"] == 0]
        if rows.empty:
            continue
        if target_kind(target) == "colour":
            asked = target_rows(rows, target) if "colour" in rows else rows["colour"] == target
            named = [(target, rows[asked]), ("other colours", rows[~asked])]
        else:
            asked = target_rows(rows, target) if "colour" in rows else rows["label"] == target
            first = list(dict.fromkeys(rows[asked]["label"]))
            labels = first + sorted(set(rows["label"]) - set(first), key=_label_order)
            named = [(str(label), rows[rows["label"] == label]) for label in labels]
        named = [(name, list(group["image_png"].head(per_prompt))) for name, group in named if len(group)]
        columns = max(len(pngs) for _, pngs in named)
        caption = f"{edit}" + (f" ratio {ratio:g}" if ratio else "") + f", guidance {guidance:g}"
        out.append({"img": _img(_labelled_grid_png(named, columns), caption), "caption": caption})
    return out


def write_report(root: str, out: str | None = None) -> str:
    """Write the report to `out` (a local file) or to <root>/report.html; returns where it is."""
    text = build_report(root).encode()
    if out:

        with atomic_local_file(out) as tmp:
            with open(tmp, "wb") as f:
                f.write(text)
        return out
    run = RunRoot(root)
    run.write_bytes(text, "report.html")
    return run.uri_under("report.html")
