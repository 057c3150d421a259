"""The evaluation's search (no Ray): on the selection split, the setting (selection, ratio) of each searched
edit and target (`cad_ray.method.edits`: `searched`; the edits that follow one use its pick). `search_rounds`
judges the candidates round by round, `choose_settings` is the rule that picks."""

from __future__ import annotations

import pandas as pd

from cad_ray.config import EvaluationOptions
from cad_ray.method.edits import EDITS
from cad_ray.stages.panels import edit_rows, target_rows
from cad_ray.stages.summary import accuracies, brightness_kept, retained


def search_candidates(options: EvaluationOptions) -> list[tuple[str, str, str]]:
    """(edit, target, selection) of every searched edit the options make, or that an edit they make follows:
    cad-erase's selections are the search's, another searched edit's its own fixed one."""
    searched = [e for e in EDITS.values() if e.searched]
    return [(e.name, target, s) for target in options.targets for e in searched
            if e.name in options.edits or any(EDITS[f].follows == e.name for f in options.edits)
            for s in ([e.selection] if e.selection else options.search.selections)]


def choose_settings(judged: pd.DataFrame, candidates: list[tuple], options) -> dict:
    """The search's rule, on selection-split rows only: for each (edit, target, selection) the ratio at which
    its other rows were judged (`checked_index`: `margin` grid steps above the smallest clean ratio that starts a
    clean run; clean: own and unseen wordings <= target_max), kept there if it is still clean and everything
    else keeps >= others_min of its unedited accuracy and >= brightness_min of its brightness
    (`brightness_kept`). Per (edit, target): among the kept settings the lowest target accuracy (ties: the most
    kept, then the smaller ratio, then the earlier selection); if none is kept, the clean setting that keeps the
    most; if none is clean, the lowest target accuracy. Returns {(edit, target): (selection, ratio, passed)}."""
    search = options.search
    judged = judged[judged["split"] == "selection"]
    unedited = judged[judged["edit"] == "none"]
    verdicts, lit = {}, {}
    checked_ratios = {}  # the ratios whose other rows were judged too
    for (edit, target, selection), group in judged[judged["edit"] != "none"].groupby(["edit", "target", "selection"]):
        for ratio, rows in group.groupby("ratio"):
            verdicts[(edit, target, selection, ratio)] = accuracies(rows, target)
            if (~target_rows(rows, target)).any():
                checked_ratios.setdefault((edit, target, selection), set()).add(ratio)
                lit[(edit, target, selection, ratio)] = brightness_kept(rows, unedited, target)
    picks = {}
    for edit, target in dict.fromkeys((c[0], c[1]) for c in candidates):
        before = accuracies(unedited, target)
        options_here = []
        for order, selection in enumerate(c[2] for c in candidates if c[:2] == (edit, target)):
            for ratio in search.ratios:
                now = verdicts.get((edit, target, selection, ratio))
                if now is None:
                    continue
                clean = is_clean(now, search.target_max)
                checked = checked_ratios.get((edit, target, selection), set())
                kept = retained(now, before) if ratio in checked else float("nan")
                bright = lit.get((edit, target, selection, ratio), float("nan"))
                options_here.append({"selection": selection, "ratio": ratio, "order": order, "clean": clean,
                                     "kept": kept, "bright": not bright < search.brightness_min,
                                     "target": now["target"]})
        frame = pd.DataFrame(options_here)
        if frame.empty:
            continue
        passed = frame[frame["clean"] & (frame["kept"] >= search.others_min) & frame["bright"]]
        if len(passed):
            # at equal target accuracy the setting that keeps the most wins over the smaller ratio: a "kept"
            # near the 90% line on the selection split is the one that fails on the test split
            best = passed.sort_values(["target", "kept", "ratio", "order"], ascending=[True, False, True, True]).iloc[0]
        elif frame["clean"].any():
            best = frame[frame["clean"]].sort_values(["kept", "ratio", "order"], ascending=[False, True, True]).iloc[0]
        else:
            best = frame.sort_values(["target", "ratio", "order"]).iloc[0]
        picks[(edit, target)] = (best["selection"], float(best["ratio"]), bool(len(passed)))
    return picks


def is_clean(verdict: dict, target_max: float) -> bool:
    """The target is erased: its accuracy at most `target_max` on own and on unseen wordings (where asked)."""
    return all(not v > target_max for v in (verdict["own"], verdict["unseen"]) if v == v)


def checked_index(clean: list[bool], margin: int) -> int | None:
    """Where a candidate's other rows are judged, from its target's verdicts at every ratio of the grid: `margin`
    steps above the smallest clean ratio that starts `margin + 1` clean steps in a row (near the threshold a
    verdict depends on the seeds; the curve is not monotone, so one clean step can be a stray), else `margin`
    steps above the smallest clean one; None if none is clean."""
    runs = [k for k in range(len(clean)) if all(clean[k:k + margin + 1]) and k + margin < len(clean)]
    first = runs[0] if runs else next((k for k, c in enumerate(clean) if c), None)
    return None if first is None else min(first + margin, len(clean) - 1)


def search_rounds(options: EvaluationOptions, prompts: pd.DataFrame, judge) -> tuple[dict, int]:
    """The search, on the selection split only. First round: the unedited model, and every candidate (edit,
    target, selection) at every ratio of the grid, judging only the rows that ask for the target: not a
    bisection, because zeroing more does not always keep the target away (a larger ratio can draw the target
    again where a smaller one was clean: docs/editing.md). Then the other rows, at
    each candidate's `checked_index`, best first: a round checks, per (edit, target) still without a passing
    setting, the candidates tied at the lowest target accuracy there. The rule (`choose_settings`) picks the
    lowest target accuracy among the settings that pass, so a candidate behind one that passed cannot win and
    is not judged; the picks are those of checking every candidate. `judge(rows)` generates and judges rows
    (resuming from finished blocks). Returns (picks, images judged)."""
    search = options.search
    ratios = search.ratios
    selection_rows = prompts[prompts["split"] == "selection"]
    candidates = search_candidates(options)
    guidance = options.guidance
    asked = {t: selection_rows[target_rows(selection_rows, t)] for t in options.targets}
    rest = {t: selection_rows[~target_rows(selection_rows, t)] for t in options.targets}
    frames = [judge(pd.concat([edit_rows("none", "", "", 0.0, guidance, selection_rows)]
                              + [edit_rows(*c, ratio, guidance, asked[c[1]]) for c in candidates for ratio in ratios],
                              ignore_index=True))]
    probed = frames[0][frames[0]["edit"] != "none"]
    verdicts = {key: accuracies(rows, key[1]) for key, rows in probed.groupby(["edit", "target", "selection", "ratio"])}
    queues: dict = {}  # (edit, target) -> [(target accuracy where checked, ratio index, order, candidate)]
    for order, c in enumerate(candidates):
        checked = checked_index([is_clean(verdicts[(*c, r)], search.target_max) for r in ratios], search.margin)
        if checked is not None:
            accuracy = verdicts[(*c, ratios[checked])]["target"]
            queues.setdefault(c[:2], []).append((accuracy if accuracy == accuracy else 1.0, checked, order, c))
    for queue in queues.values():
        queue.sort(key=lambda item: item[:3])
    while any(queues.values()):
        tier = []
        for queue in queues.values():
            best = queue[0][0] if queue else None
            tier += [item for item in queue if item[0] == best]
            queue[:] = [item for item in queue if item[0] != best]
        frames.append(judge(pd.concat([edit_rows(*c, ratios[k], guidance, rest[c[1]]) for _, k, _, c in tier],
                                      ignore_index=True)))
        picks = choose_settings(pd.concat(frames, ignore_index=True), candidates, options)
        for key, queue in queues.items():
            if picks.get(key, (None, None, False))[2]:
                queue.clear()
    judged = pd.concat(frames, ignore_index=True)
    return choose_settings(judged, candidates, options), len(judged)

