"""Figures as PNG bytes (matplotlib, no display), so that stages can write them under any run root."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from cad_ray.digits import COLOUR_NAMES, DIGIT_WORDS
from cad_ray.method.edits import erasing, one_setting


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _power_of_ten(values) -> int:
    """The power of ten to show values in (their largest magnitude's, 0 when they are near 1 or all zero)."""
    largest = float(np.nanmax(np.abs(values))) if len(values) else 0.0
    return 0 if not np.isfinite(largest) or largest == 0 or 1e-2 <= largest < 1e3 else int(np.floor(np.log10(largest)))


def validation_scatter(table: pd.DataFrame) -> bytes:
    """Predicted against actual change of J (base frozen), one panel per (fraction, estimator), test split."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    test = table[table["split"] == "test"]
    fractions, estimators = sorted(test["fraction"].unique()), list(dict.fromkeys(test["estimator"]))
    fig, axes = plt.subplots(len(fractions), len(estimators), figsize=(3.4 * len(estimators), 3 * len(fractions)),
                             squeeze=False, layout="constrained")
    for i, fraction in enumerate(fractions):
        for j, estimator in enumerate(estimators):
            ax = axes[i][j]
            g = test[(test["fraction"] == fraction) & (test["estimator"] == estimator)]
            # values in a unit of their power of ten, named in the axis labels: short tick labels that never overlap
            power = _power_of_ten(np.concatenate([g["predicted"].to_numpy(), g["actual"].to_numpy()]))
            predicted, actual = g["predicted"] / 10.0 ** power, g["actual"] / 10.0 ** power
            ax.scatter(predicted, actual, s=6, alpha=0.6)
            low, high = min(predicted.min(), actual.min()), max(predicted.max(), actual.max())
            ax.plot([low, high], [low, high], color="grey", lw=0.8, ls="--")
            r = np.corrcoef(g["predicted"], g["actual"])[0, 1] if len(g) > 1 else float("nan")
            # "ablated fraction", not rho: rho reads as Spearman's (the tables' column is `fraction`)
            ax.set_title(f"{estimator}, ablated fraction {fraction:g}, Pearson r={r:.2f}", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.yaxis.set_major_locator(MaxNLocator(5))
            ax.tick_params(labelsize=7)
            unit = f" (x 1e{power})" if power else ""
            ax.set_xlabel(f"predicted dJ{unit}", fontsize=8)
            ax.set_ylabel(f"actual dJ, base frozen{unit}", fontsize=8)
    fig.suptitle(f"random ablations of {table['concept'].iloc[0]!r} ({table['objective'].iloc[0]} objective)")
    return _png(fig)


def overlap_heatmap(overlap: pd.DataFrame) -> bytes:
    """Jaccard index of the top-1% component sets of every pair of concepts."""
    plt = _pyplot()
    matrix = overlap.pivot(index="concept_a", columns="concept_b", values="jaccard")
    order = list(dict.fromkeys(overlap["concept_a"]))
    matrix = matrix.loc[order, order]
    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(order), 0.8 + 0.5 * len(order)))
    image = ax.imshow(matrix.to_numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(order)), order, rotation=60, fontsize=8)
    ax.set_yticks(range(len(order)), order, fontsize=8)
    for i in range(len(order)):
        for j in range(len(order)):
            ax.text(j, i, f"{matrix.iat[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if matrix.iat[i, j] < 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="Jaccard of top-1% sets")
    ax.set_title("overlap of the components CAD-Erase would zero", fontsize=9)
    return _png(fig)


def ratio_sweep(summary: pd.DataFrame, target: str) -> bytes:
    """Accuracy of the target and of the other labels against the edit ratio, one line per edit."""
    plt = _pyplot()
    rows = summary[(summary["target"] == target) & summary["edit"].isin(["cad-erase", "random", "cad-amplify",
                                                                          "finetune+cad-amplify"])]
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    edits = list(rows.groupby("edit").groups)
    ratios = sorted(float(r) for r in rows["ratio"].unique() if r > 0)
    for k, (edit, g) in enumerate(rows.groupby("edit")):
        g = g.sort_values("ratio")
        # one edit never hides another: its own marker and line style, and a small sideways nudge (log axis)
        style = SWEEP_STYLES[k % len(SWEEP_STYLES)]
        x = g["ratio"] * 1.06 ** (k - (len(edits) - 1) / 2)
        for ax, column in zip(axes, ("target_accuracy", "others_accuracy")):
            ax.plot(x, g[column], label=edit, markersize=7 - k, markerfacecolor="none" if k else None, **style)
    none = summary[summary["edit"] == "none"]
    unedited_target = summary[(summary["target"] == target) & summary["edit"].isin(list(rows["edit"]))]
    for ax, title, column in zip(axes, (f"{target!r} (target)", "other labels"),
                                 ("target_accuracy_unedited", "others_accuracy")):
        for guidance, g in none.groupby("guidance"):
            # the unedited model's level on this panel: its accuracy on the target's prompts, or on the others
            source = unedited_target[unedited_target["guidance"] == guidance] if column != "others_accuracy" else g
            if column in source and source[column].notna().any():
                ax.axhline(source[column].dropna().iloc[0], color="grey", lw=0.8, ls=":",
                           label=f"unedited, guidance {guidance:g}")
        ax.set_xscale("log")
        if len(ratios):  # ticks at the ratios measured, and room around them (one ratio alone included)
            ax.set_xlim(min(ratios) / 1.6, max(ratios) * 1.6)
            ax.xaxis.set_major_locator(FixedLocator(ratios))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.tick_params(axis="x", labelsize=7, rotation=45 if len(ratios) > 5 else 0)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("share of components zeroed")
        ax.set_ylabel("judged accuracy")
        ax.set_title(title, fontsize=9)
    axes[1].legend(fontsize=7, loc="lower left")
    return _png(fig)


SWEEP_STYLES = ({"marker": "o", "ls": "-"}, {"marker": "s", "ls": "--"}, {"marker": "^", "ls": "-."},
                {"marker": "D", "ls": ":"})

VERDICT_EDITS = tuple(erasing())  # the registry's erasing edits, random last


def erase_verdicts(summary: pd.DataFrame) -> bytes:
    """Per target, for each searched edit (picked setting), the edits that follow cad-erase's setting, the
    single-setting baselines (uce, finetune) and random: the target's accuracy on its own and on unseen wordings,
    the worst share of its accuracy anything else keeps, and how bright everything else stays (where the table
    measured it); the 20%, 90% and 80% lines of "clean"."""
    plt = _pyplot()
    rows = summary[summary["edit"].isin(VERDICT_EDITS) & (summary["picked"] | summary["edit"].map(one_setting))]
    known = list(DIGIT_WORDS + COLOUR_NAMES)  # the digits world in its own order, anything else after it
    targets = sorted(set(rows["target"]), key=lambda name: (known.index(name) if name in known else len(known), name))
    edits = [e for e in VERDICT_EDITS if e in set(rows["edit"])]
    panels = [("target_accuracy_own", "target, own wordings", 0.2),
              ("target_accuracy_unseen", "target, unseen wordings", 0.2),
              ("worst_other_retained", "worst other kept", 0.9)]
    if "brightness_kept" in rows and rows["brightness_kept"].notna().any():
        panels.append(("brightness_kept", "brightness of the others kept (worst colour)", 0.8))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.7 * len(targets)), 2.3 * len(panels) + 0.1),
                             sharex=True)
    width = 0.8 / max(len(edits), 1)
    for k, edit in enumerate(edits):
        g = rows[rows["edit"] == edit].set_index("target").reindex(targets)
        x = [i + (k - (len(edits) - 1) / 2) * width for i in range(len(targets))]
        for ax, (column, _, _) in zip(axes, panels):
            ax.bar(x, g[column].fillna(0), width=width, label=edit)
    for ax, (_, title, line) in zip(axes, panels):
        ax.axhline(line, color="grey", lw=0.8, ls=":")
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=9)
    axes[-1].set_xticks(range(len(targets)), targets, rotation=45, fontsize=8)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=min(len(edits), 4), fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.93 if len(edits) > 4 else 0.96))
    return _png(fig)


def layer_summary(layers: pd.DataFrame, objective: str | None = None) -> bytes:
    """Positive and negative score mass per tensor, one bar group per concept (its colour; the negative bar
    lighter), the tensors named in full as the tables name them."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    table = layers
    concepts = list(dict.fromkeys(table["concept"]))
    tensors = list(dict.fromkeys(table["tensor"]))
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(tensors) * max(1, len(concepts) / 2) + 1.5))
    height = 0.8 / max(1, len(concepts))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, concept in enumerate(concepts):
        g = table[table["concept"] == concept].set_index("tensor").reindex(tensors)
        y = np.arange(len(tensors)) + k * height
        colour = colours[k % len(colours)]
        ax.barh(y, g["sum_positive"], height, color=colour, label=f"{concept}: positive (induces)")
        ax.barh(y, g["sum_negative"], height, color=colour, alpha=0.4, hatch="//", edgecolor="white", lw=0,
                label=f"{concept}: negative (inhibits)")
    ax.set_yticks(np.arange(len(tensors)) + 0.4 - height / 2, tensors, fontsize=8)
    ax.invert_yaxis()  # the first tensor on top, as in the tables
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel("sum of the scores per tensor: positive (right), negative (left)")
    ax.xaxis.set_major_locator(MaxNLocator(7))
    if objective is None and "objective" in table:
        objective = ", ".join(dict.fromkeys(table["objective"]))
    names = ", ".join(repr(c) for c in concepts)
    ax.set_title(f"attribution scores per tensor of {names}" + (f" ({objective} objective)" if objective else ""),
                 fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    return _png(fig)
