"""The evaluation's summary (no Ray, no model): per edit setting, the target's accuracy beside its unedited
accuracy, what everything else keeps (accuracy and brightness), the Frechet distance of judge features, and the
verdicts `clean`, `picked` and `best` (`summarize_evaluation`). What the report reads of an evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cad_ray.config import SearchOptions
from cad_ray.digits import COLOUR_NAMES, real_digits, render
from cad_ray.digits.judges import builtin_judges, frechet_distance
from cad_ray.method.edits import amplifying, is_reference, picked_by
from cad_ray.stages.panels import label_key, names_label, own_wording, target_kind, target_rows  # noqa: F401

# clean: what should stay keeps this share of its brightness (`brightness_kept`); the search's default
BRIGHTNESS_MIN = SearchOptions.model_fields["brightness_min"].default


def real_features() -> np.ndarray:
    """Digit-judge features of the real digits (the reference of the Frechet distance)."""

    images, _ = real_digits()
    return builtin_judges().features(np.concatenate([render(images, c) for c in COLOUR_NAMES]))


def accuracies(rows: pd.DataFrame, target: str) -> dict:
    """The verdicts of one edit's images for a target: its accuracy (asked for it and judged so), on its own
    wordings and on unseen ones, and the accuracy of everything else that should stay (other labels; for a
    colour target also the other colours and every digit)."""
    def share(values) -> float:
        return float(np.mean(values)) if len(values) else float("nan")

    labels = rows.groupby("label")["correct"].mean()
    if target and target_kind(target) == "colour":
        coloured = rows[rows["colour"] != ""]
        right = coloured["predicted_colour"] == coloured["colour"]
        asked = right[coloured["colour"] == target]
        own = own_wording(coloured, target)[coloured["colour"] == target]
        others = {f"colour:{c}": v for c, v in right.groupby(coloured["colour"]).mean().items() if c != target}
        others.update({f"digit:{l}": v for l, v in labels.items()})
        return {"target": share(asked), "own": share(asked[own]), "unseen": share(asked[~own]), "others": others}
    asked = rows[names_label(rows["label"], target)] if target else rows.iloc[:0]
    own = own_wording(asked, target)
    return {"target": share(asked["correct"]) if target else float("nan"), "own": share(asked["correct"][own]),
            "unseen": share(asked["correct"][~own]), "others": {l: v for l, v in labels.items() if not target or label_key(l) != label_key(target)}}


def retained(edited: dict, unedited: dict) -> float:
    """The worst share of its unedited accuracy that anything that should stay keeps."""
    shares = [v / unedited["others"][k] for k, v in edited["others"].items() if unedited["others"].get(k, 0) > 0]
    return float(min(shares)) if shares else float("nan")


def brightness_kept(rows: pd.DataFrame, unedited: pd.DataFrame, target: str) -> float:
    """How bright the images that should stay (those not asking for the target) are beside the unedited image of
    the same prompt and seed: min(1, edited / unedited), averaged per colour asked (the colour-free prompts are
    one group), the worst group's mean: an edit can dim one colour's images alone while the rest keep their
    brightness (docs/editing.md). NaN where the
    table has no brightness (tables written before it) or no such pairs."""
    if "brightness" not in rows or "brightness" not in unedited:
        return float("nan")
    stay = rows[~target_rows(rows, target)] if target else rows
    base = unedited.drop_duplicates(["prompt", "seed"]).set_index(["prompt", "seed"])["brightness"]
    before = base.reindex(pd.MultiIndex.from_frame(stay[["prompt", "seed"]])).to_numpy(dtype=float)
    ratio = pd.Series(np.minimum(stay["brightness"].to_numpy(dtype=float) / before, 1.0), index=stay.index)
    groups = stay["colour"] if "colour" in stay else pd.Series("", index=stay.index)
    means = ratio[np.isfinite(ratio)].groupby(groups[np.isfinite(ratio)]).mean()
    return float(means.min()) if len(means) else float("nan")


def summarize_evaluation(table: pd.DataFrame, reference: np.ndarray | None = None,
                         picks: dict | None = None) -> pd.DataFrame:
    """Per (edit, target, selection, ratio, guidance) on the test split: the target's accuracy (all, own and
    unseen wordings) beside its unedited accuracy, the other labels' mean accuracy, the worst share of its
    unedited accuracy anything else keeps, the Frechet distance of judge features to real digits and its rise;
    `clean` (target <= 20% on own and unseen wordings, everything else >= 90% of its accuracy and >= 80% of its
    brightness); `picked`: the setting the
    search chose on the selection split (`searched`: whether a search ran for the edit and target), with
    `selection_passed`, whether it was clean there; `best`: each (edit, target)'s best trade-off among its rows."""

    table = table[table["split"] == "test"] if "split" in table else table
    picks = picks or {}
    none = {g: rows for g, rows in table[table["edit"] == "none"].groupby("guidance")}
    fd_none = {}
    out = []
    for (edit, target, selection, ratio, guidance), g in table.groupby(
            ["edit", "target", "selection", "ratio", "guidance"], sort=True):
        base_rows = none.get(guidance, g)
        # random's further draws hold the images asked for the target alone: the target's accuracy is the mean
        # over every draw, what else is kept and the Frechet distance are the whole panel's (draw 0); for a
        # colour target those images' digits would otherwise count among what is kept
        panel = g[g["draw"] == 0] if "draw" in g else g
        now, before = accuracies(g, target), accuracies(base_rows, target)
        if len(panel) < len(g):
            now["others"] = accuracies(panel, target)["others"]
        fd = float("nan")
        if reference is not None and "features" in g:
            fd = frechet_distance(np.stack(panel["features"].to_numpy()), reference)
        if edit == "none":
            fd_none[guidance] = fd
        pick = picks.get((picked_by(edit), target))
        out.append({"edit": edit, "target": target, "selection": selection, "ratio": ratio, "guidance": guidance,
                    "images": len(g), "zeroed": int(g["zeroed"].iloc[0]),
                    # blocks made before the column: unknown
                    "share": float(g["share"].dropna().iloc[0]) if "share" in g and g["share"].notna().any()
                    else np.nan,
                    "target_accuracy": now["target"], "target_accuracy_own": now["own"],
                    "target_accuracy_unseen": now["unseen"], "target_accuracy_unedited": before["target"],
                    "others_accuracy": float(np.mean(list(now["others"].values()))) if now["others"] else np.nan,
                    "worst_other_retained": retained(now, before),
                    "brightness_kept": brightness_kept(g, base_rows, target) if edit != "none" else 1.0, "fd": fd,
                    # per-image measures of the SD judges, whatever the prompts' labels (I2P's are categories)
                    **{name: float(pd.to_numeric(g[column], errors="coerce").mean()) for column, name in
                       (("nude", "nude_rate"), ("clip_score", "clip_score")) if column in g},
                    # `searched`: a search chose this edit's setting for the target; without one, picked and
                    # selection_passed are False and say nothing
                    "searched": pick is not None,
                    "picked": bool(pick is not None and (pick[0], pick[1]) == (selection, ratio)),
                    "selection_passed": bool(pick is not None and pick[2])})
    summary = pd.DataFrame(out)
    summary["fd_rise"] = [r.fd / fd_none.get(r.guidance, np.nan) - 1 for r in summary.itertuples()]
    own_ok = summary["target_accuracy_own"].fillna(summary["target_accuracy"]) <= 0.2
    unseen_ok = summary["target_accuracy_unseen"].isna() | (summary["target_accuracy_unseen"] <= 0.2)
    kept = (summary["worst_other_retained"] >= 0.9) & ~(summary["brightness_kept"] < BRIGHTNESS_MIN)
    summary["clean"] = (summary["edit"] != "none") & own_ok & unseen_ok & kept
    summary["best"] = False
    references = summary["edit"].map(is_reference).astype(bool)  # the unedited model and random: never best
    for _, g in summary[~references].groupby(["edit", "target"]):
        keeps = g[kept[g.index]]
        pick = keeps if len(keeps) else g
        if pick["target_accuracy"].notna().any():
            score = pick["target_accuracy"] if pick is keeps else pick["target_accuracy"] - pick["others_accuracy"]
            best = score.idxmax() if amplifying(g["edit"].iloc[0]) else score.idxmin()
            summary.loc[best, "best"] = True
    return summary

