"""Figures as PNG bytes (matplotlib, no display), so that stages can write them under any run root."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd


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


def validation_scatter(table: pd.DataFrame) -> bytes:
    """Predicted against actual change of J (base frozen), one panel per (fraction, estimator), test split."""
    plt = _pyplot()
    test = table[table["split"] == "test"]
    fractions, estimators = sorted(test["fraction"].unique()), list(dict.fromkeys(test["estimator"]))
    fig, axes = plt.subplots(len(fractions), len(estimators), figsize=(3.2 * len(estimators), 3 * len(fractions)),
                             squeeze=False)
    for i, fraction in enumerate(fractions):
        for j, estimator in enumerate(estimators):
            ax = axes[i][j]
            g = test[(test["fraction"] == fraction) & (test["estimator"] == estimator)]
            ax.scatter(g["predicted"], g["actual"], s=6, alpha=0.6)
            low = min(g["predicted"].min(), g["actual"].min())
            high = max(g["predicted"].max(), g["actual"].max())
            ax.plot([low, high], [low, high], color="grey", lw=0.8, ls="--")
            r = np.corrcoef(g["predicted"], g["actual"])[0, 1] if len(g) > 1 else float("nan")
            ax.set_title(f"{estimator}, rho={fraction:g}, r={r:.2f}", fontsize=9)
            ax.tick_params(labelsize=7)
            if i == len(fractions) - 1:
                ax.set_xlabel("predicted dJ", fontsize=8)
            if j == 0:
                ax.set_ylabel("actual dJ (base frozen)", fontsize=8)
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
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for edit, g in rows.groupby("edit"):
        g = g.sort_values("ratio")
        axes[0].plot(g["ratio"], g["target_accuracy"], marker="o", label=edit)
        axes[1].plot(g["ratio"], g["others_accuracy"], marker="o", label=edit)
    none = summary[summary["edit"] == "none"]
    for ax, title in zip(axes, (f"{target!r} (target)", "other labels")):
        for guidance, g in none.groupby("guidance"):
            column = "others_accuracy"
            ax.axhline(g[column].iloc[0], color="grey", lw=0.8, ls=":", label=f"unedited, guidance {guidance:g}")
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("share of components zeroed")
        ax.set_ylabel("judged accuracy")
        ax.set_title(title, fontsize=9)
    axes[1].legend(fontsize=7, loc="lower left")
    return _png(fig)


VERDICT_EDITS = ("cad-erase", "cad-erase-published", "gradient", "magnitude", "conceptprune", "uce", "finetune",
                 "random")


def erase_verdicts(summary: pd.DataFrame) -> bytes:
    """Per target, for each searched edit (picked setting), the edits that follow cad-erase's setting, the
    single-setting baselines (uce, finetune) and random: the target's accuracy on its own and on unseen wordings,
    the worst share of its accuracy anything else keeps, and how bright everything else stays (where the table
    measured it); the 20%, 90% and 80% lines of "clean"."""
    plt = _pyplot()
    single = ("random", "uce", "finetune")
    rows = summary[summary["edit"].isin(VERDICT_EDITS) & (summary["picked"] | summary["edit"].isin(single))]
    from cad_ray.digits import COLOUR_NAMES, DIGIT_WORDS

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


def layer_summary(layers: pd.DataFrame) -> bytes:
    """Positive and negative score mass per tensor, one bar group per concept."""
    plt = _pyplot()
    short = layers["tensor"].str.replace("transformer_blocks.", "tb.").str.replace("attentions.", "attn.")
    table = layers.assign(tensor=short)
    concepts = list(dict.fromkeys(table["concept"]))
    tensors = list(dict.fromkeys(table["tensor"]))
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(tensors) + 1.5))
    height = 0.8 / max(1, len(concepts))
    for k, concept in enumerate(concepts):
        g = table[table["concept"] == concept].set_index("tensor").reindex(tensors)
        y = np.arange(len(tensors)) + k * height
        ax.barh(y, g["sum_positive"], height, label=f"{concept} +")
        ax.barh(y, g["sum_negative"], height, alpha=0.5)
    ax.set_yticks(np.arange(len(tensors)) + 0.4 - height / 2, tensors, fontsize=6)
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel("sum of positive (right) and negative (left) scores")
    ax.legend(fontsize=6, ncol=4)
    return _png(fig)
