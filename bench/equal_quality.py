"""Speed at equal quality: cad-ray against the published algorithm, compared at the same correlation with a
high-sample reference rather than at the same number of trajectories.

    python bench/equal_quality.py --model digits --json /tmp/eq-digits.json
    python bench/equal_quality.py --model tiny-sd --json /tmp/eq-tiny.json
    python bench/equal_quality.py --plot docs/figures/equal-quality.png --inputs /tmp/eq-digits.json /tmp/eq-tiny.json

The published `get_score` draws a fresh trajectory from pure noise down to every timestep t and keeps one point
(x_t) of it: T trajectories per sample, ~T^2/2 guided UNet steps, T forward/backward passes. It is run here as
`attribution_speed.reference_scores` (one sample per call), through a view of the model that hands out a new
x_T at every call of `initial_noise` -- `reference_scores` itself reuses sample s's x_T for every t, which makes
it visit cad-ray's points exactly (its purpose there); the published code does not, and its T points per sample
are independent, so it needs fewer samples than cad-ray for the same quality.

cad-ray: `CAD(model, erase(steps=S, points_per_sample=p), "ff", batch=B)`; one guided trajectory per sample, p of
its S points kept. S = T by default; `--trajectory-steps` also tries coarser trajectories (S = T/2 visits every
other timestep of the T-step grid with half the guided steps), judged against the same T-step reference.

Quality: Pearson r between a method's score vector (every component of the scope) and a reference made by cad-ray
from `--reference` trajectories with every point kept, whose sample indices (and, for the published algorithm,
noise stream) are disjoint from those measured. Spearman rho and the Jaccard overlap of the top 1% (largest signed
scores, the components an ablation removes) are recorded too.

Seconds: wall time of the attribution call in this process (model load, concept build, and the reference are
not counted), the least over the repeats, for both methods alike. The published algorithm's time for n samples is
the sum of its first n one-sample calls (its samples are independent, so that is what an n-sample call costs).
Methods are interleaved in one task list so that other jobs on the machine slow both alike. One untimed warm-up
call of each cad-ray setting with one trajectory comes first.

Equal-quality speed-up: for each target r, the time each curve needs to reach it, linear interpolation of
log(seconds) in r between measured points; outside the measured range, from a fit of 1/r^2 = A + B/n (exact
for an unbiased estimator whose variance falls as 1/n, with A the reference's own ceiling) and a linear fit of
seconds in n; those are marked "extrapolated".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution_speed import reference_scores  # noqa: E402  (the published algorithm, one x_t per trajectory)

REFERENCE_IDS = 1_000_000  # the reference's sample indices start here; measured cad-ray runs use 0.. (repeat r: r * 4096 ..)


class FreshNoisePerTimestep:
    """The model, except that every call of `initial_noise` gives a new x_T (seeded by sample and call number):
    the published algorithm's fresh trajectory for each timestep."""

    def __init__(self, model, stream: str = "published"):
        self._model, self._stream, self._calls = model, stream, {}

    def __getattr__(self, name):
        return getattr(self._model, name)

    def initial_noise(self, n, seed, ids=None, scheduler=None):
        from cad_ray.seeds import derive_seed

        key = tuple(int(i) for i in (ids if ids is not None else range(n)))
        k = self._calls.get(key, 0)
        self._calls[key] = k + 1
        return self._model.initial_noise(n, derive_seed(seed, self._stream, k), ids, scheduler)


def load(which: str):
    from cad_ray.config import ConceptSpec
    from cad_ray.method.concepts import build_concept
    from cad_ray.models import load_model

    if which == "digits":
        model = load_model(None)
        return model, build_concept(ConceptSpec(name="seven"), model)
    if which in ("tiny-sd", "tiny-sd-wide"):  # wide: blocks twice as wide, four times the ff components
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny_sd import build_tiny_sd

        channels = (32, 64) if which == "tiny-sd-wide" else (16, 32)
        model = load_model(str(build_tiny_sd(Path(tempfile.mkdtemp(prefix="tiny-sd-")), channels=channels)))
    else:
        model = load_model(which)
    return model, build_concept(ConceptSpec(name="parachute", prompts=["an image of parachute"]), model)


def flat(scores: dict, names: list[str]) -> np.ndarray:
    return torch.cat([scores[n].flatten() for n in names]).double().numpy()


def quality(v: np.ndarray, ref: np.ndarray, ref_top: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    top = np.argpartition(-v, len(ref_top))[:len(ref_top)]
    inter = len(np.intersect1d(top, ref_top))
    return {"r": float(np.corrcoef(v, ref)[0, 1]), "spearman": float(spearmanr(v, ref).statistic),
            "top1_jaccard": inter / (2 * len(ref_top) - inter)}


def fit(points: list[tuple[float, float, float]]):
    """(n, seconds, r) -> (A, B, t0, c) for 1/r^2 = A + B/n and seconds = t0 + c n."""
    n, s, r = map(np.array, zip(*points))
    B, A = np.polyfit(1 / n, 1 / r ** 2, 1)
    c, t0 = np.polyfit(n, s, 1)
    return float(A), float(B), float(t0), float(c)


def seconds_to_reach(points: list[tuple[float, float, float]], target: float) -> tuple[float | None, bool]:
    """(seconds, extrapolated) for a curve of (n, seconds, r) sorted by n."""
    for i, (n, s, r) in enumerate(points):
        if r >= target and i > 0:
            (_, s0, r0) = points[i - 1]
            if r0 >= target:
                continue
            f = (target - r0) / (r - r0)
            return math.exp(math.log(s0) + f * (math.log(s) - math.log(s0))), False
    if points[0][2] >= target:  # reached at the first point: its time, an upper bound
        return points[0][1], "at most: its first point already reaches r"
    A, B, t0, c = fit(points)
    if 1 / target ** 2 <= A or B <= 0:
        return None, True  # beyond the ceiling the fit sees
    n = B / (1 / target ** 2 - A)
    return t0 + c * n, True


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(args) -> dict:
    from cad_ray.method.attribution import CAD
    from cad_ray.method.objectives import make_objective

    torch.set_num_threads(args.threads)
    model, concept = load(args.model)
    steps = args.steps
    names = None

    def cad(points_per_sample, batch, trajectory_steps=steps, fuse=False):
        p = None if points_per_sample >= trajectory_steps else points_per_sample
        return CAD(model, make_objective("erase", steps=trajectory_steps, points_per_sample=p, fused=fuse), "ff",
                   chunk_size=args.chunk, batch=batch)

    # the high-sample reference (not timed as part of any curve)
    ref_cad = cad(steps, max(args.batches))
    names = [n for n, _ in ref_cad.parameters]
    ref_ids = list(range(REFERENCE_IDS, REFERENCE_IDS + args.reference))
    cache = Path(args.reference_cache) if args.reference_cache else None
    if cache and cache.exists():
        saved = np.load(cache)
        ref, ref_s = saved["scores"], float(saved["seconds"])
    else:
        reference, ref_s = timed(lambda: ref_cad.attribute(concept, ref_ids))
        ref = flat(reference.scores, names)
        if cache:
            np.savez(cache, scores=ref, seconds=ref_s)
    ref_top = np.argpartition(-ref, max(1, len(ref) // 100))[:max(1, len(ref) // 100)]
    print(f"reference: {args.reference} trajectories in {ref_s:.1f} s", flush=True)
    head = {"model": model.source, "concept": concept.name, "steps": steps, "scope": "ff", "components": len(ref),
            "threads": torch.get_num_threads(), "reference_trajectories": args.reference, "reference_seconds": ref_s,
            "chunk": args.chunk}
    print(json.dumps(head), flush=True)

    published_model = FreshNoisePerTimestep(model)
    objective = make_objective("erase", steps=steps)
    configs = [(p, b, s, f) for s in (args.trajectory_steps or [steps]) for p in args.points for b in args.batches
               for f in args.fuse if p < s or p == max(args.points)]
    cads = {(p, b, s, f): cad(p, b, s, bool(f)) for p, b, s, f in configs}

    # warm-up, not timed: one call of each cad-ray setting with one trajectory (which also makes the published
    # algorithm's shapes: guided steps on 2 rows, one point per backward)
    for c in cads.values():
        c.attribute(concept, [REFERENCE_IDS * 2])
    print("warm", flush=True)

    records = []
    for rep in range(args.repeats):
        # tasks: the published algorithm one sample at a time; cad-ray one (p, batch, n) call at a time
        pub = [("published", rep * 4096 + i) for i in range(max(args.published))]
        ours = [("cad-ray", (p, b, s, f, n)) for n in args.cadray for p, b, s, f in configs]
        order = sorted([(i / len(pub), t) for i, t in enumerate(pub)] + [((i + 0.5) / len(ours), t)
                                                                          for i, t in enumerate(ours)],
                       key=lambda x: x[0])
        running, pub_seconds, done = None, 0.0, 0
        for _, (kind, what) in order:
            if kind == "published":
                scores, s = timed(lambda: reference_scores(published_model, objective, concept, [what], args.seed,
                                                           ref_cad.parameters))
                v = flat(scores, names)
                running = v if running is None else running + v
                pub_seconds += s
                done += 1
                if done in args.published:
                    rec = {"method": "published", "repeat": rep, "n": done, "seconds": pub_seconds,
                           **quality(running / done, ref, ref_top)}
                    records.append(rec)
                    print(json.dumps(rec), flush=True)
            else:
                p, b, ts, f, n = what
                out, s = timed(lambda: cads[(p, b, ts, f)].attribute(concept,
                                                                     list(range(rep * 4096, rep * 4096 + n))))
                rec = {"method": "cad-ray", "points": min(p, ts), "batch": b, "trajectory_steps": ts, "repeat": rep,
                       "fused": bool(f), "n": n, "seconds": s,
                       **quality(flat(out.scores, names), ref, ref_top)}
                records.append(rec)
                print(json.dumps(rec), flush=True)
    return {**head, "records": records, "summary": summarise(records, args.targets, steps)}


def setting(rec: dict) -> tuple:
    """(method, points, batch, trajectory steps, fused) of a record; records made before `--trajectory-steps` have
    no steps, and those made before `--fuse` had separate passes."""
    if rec["method"] == "published":
        return ("published", None, None, None, None)
    return ("cad-ray", rec["points"], rec["batch"], rec.get("trajectory_steps"), rec.get("fused", False))


def label(key: tuple, steps: int) -> str:
    if key[0] == "published":
        return "published"
    return (f"cad-ray p={key[1]} batch={key[2]}" + (f" S={key[3]}" if key[3] not in (None, steps) else "")
            + (" fused" if key[4] else ""))


def curves(records) -> dict:
    """(method, points, batch, trajectory steps, fused) -> [(n, least seconds, mean r)] over repeats (least: the repeat
    least slowed by other jobs, as attribution_speed.py takes the best of two runs; the same rule for both)."""
    groups: dict = {}
    for rec in records:
        key = setting(rec)
        groups.setdefault(key, {}).setdefault(rec["n"], []).append(rec)
    return {k: [(n, float(np.min([r["seconds"] for r in rs])), float(np.mean([r["r"] for r in rs])))
                for n, rs in sorted(v.items())] for k, v in groups.items()}


def summarise(records, extra_targets, steps: int = 50) -> dict:
    cs = curves(records)
    pub = cs[("published", None, None, None, None)]
    targets = sorted({r for _, _, r in pub} | set(extra_targets))
    out = {"curves": {label(k, steps): v for k, v in cs.items()}, "fits": {}, "targets": []}
    for k, v in cs.items():
        A, B, t0, c = fit(v)
        out["fits"][label(k, steps)] = {
            "A": A, "B": B, "ceiling_r": A ** -0.5 if A > 0 else None, "t0": t0, "seconds_per_sample": c}
    for target in targets:
        if target <= pub[0][2]:  # the least work measured (one sample, T trajectories, unless --published skips it)
            tp, xp = pub[0][1], f"at most: its first point ({pub[0][0]} samples) already reaches r"
        else:
            tp, xp = seconds_to_reach(pub, target - 1e-12)
        best = None
        for k, v in cs.items():
            if k[0] != "cad-ray":
                continue
            tc, xc = seconds_to_reach(v, target - 1e-12)
            if tc is not None and (best is None or tc < best[1]):
                best = (k, tc, xc)
        row = {"r": target, "published_seconds": tp, "published_extrapolated": xp}
        if best:
            row.update(cadray_points=best[0][1], cadray_batch=best[0][2], cadray_trajectory_steps=best[0][3] or steps,
                       cadray_fused=best[0][4], cadray_seconds=best[1],
                       cadray_extrapolated=best[2], speedup=tp / best[1] if tp else None)
        out["targets"].append(row)
    return out


def plot(inputs: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(Path(p).read_text()) for p in inputs]
    fig, axes = plt.subplots(1, len(results), figsize=(6.4 * len(results), 4.8), squeeze=False)
    for ax, res in zip(axes[0], results):
        cs: dict = {}
        for rec in res["records"]:
            key = "published (fresh trajectory per t)" if rec["method"] == "published" else \
                f"cad-ray, {rec['points']} points/trajectory" + ("" if len({r.get('batch') for r in res['records']
                                                                            if r['method'] == 'cad-ray'}) == 1
                                                              else f", batch {rec['batch']}") \
                + (f", {rec['trajectory_steps']}-step trajectory" if rec.get("trajectory_steps") not in
                   (None, res["steps"]) else "") + (", fused" if rec.get("fused") else "")
            cs.setdefault(key, {}).setdefault(rec["n"], []).append(rec)
        for key, byn in cs.items():
            ns = sorted(byn)
            s = [np.min([r["seconds"] for r in byn[n]]) for n in ns]
            r = np.array([[x["r"] for x in byn[n]] for n in ns], dtype=object)
            mean = [np.mean(x) for x in r]
            lo = [mean[i] - min(x) for i, x in enumerate(r)]
            hi = [max(x) - mean[i] for i, x in enumerate(r)]
            style = dict(color="black", marker="s", lw=2) if key.startswith("published") else dict(marker="o")
            ax.errorbar(s, mean, yerr=[lo, hi], label=key, capsize=2, **style)
            for n, x, y in zip(ns, s, mean):
                ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(3, -9), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("seconds (attribution call, in-process; least of the repeats)")
        ax.set_ylabel(f"Pearson r with {res['reference_trajectories']}-trajectory reference")
        name = "tiny SD (tests/tiny_sd.py)" if "tiny-sd" in res["model"] else res["model"]
        if "components" in res:  # the wide tiny SD has 4x the ff components of the plain one
            name += f", {res['components']:,} ff components\n"
        ax.set_title(f"{name} ({res['repeats'] if 'repeats' in res else len({r['repeat'] for r in res['records']})} "
                     f"repeat(s)), concept {res['concept']}, T = {res['steps']}, scope ff", fontsize=9)
        ax.set_ylim(max(0.0, min(r["r"] for r in res["records"]) - 0.05), 1.0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits", help="digits, tiny-sd, tiny-sd-wide (4x its ff components), "
                        "or a model folder")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--reference", type=int, default=256, help="trajectories of the reference")
    parser.add_argument("--published", type=ints, default=[1, 2, 4, 8], help="sample counts of the published curve")
    parser.add_argument("--cadray", type=ints, default=[1, 2, 4, 8, 16, 32, 64], help="trajectory counts")
    parser.add_argument("--points", type=ints, default=[50, 10, 5, 2], help="points per trajectory (>= T: all)")
    parser.add_argument("--batches", type=ints, default=[16], help="cad-ray batch (trajectories sampled together)")
    parser.add_argument("--trajectory-steps", type=ints, default=None,
                        help="cad-ray's sampler steps S (default: --steps); quality is always against the T-step "
                             "reference")
    parser.add_argument("--chunk", type=int, default=256, help="points per forward/backward pass")
    parser.add_argument("--fuse", type=ints, default=[0],
                        help="1: the points' forward pass inside the sampler's (erase objective's fused=True), 0: "
                             "separate passes (the default); 0,1 measures both")
    parser.add_argument("--repeats", type=int, default=2, help="independent repeats (disjoint samples)")
    parser.add_argument("--targets", type=lambda t: [float(x) for x in t.split(",")], default=[0.95, 0.98])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="draw the curves of --inputs (JSON files) to this PNG")
    parser.add_argument("--inputs", nargs="*", default=[])
    parser.add_argument("--resummarise", action="store_true", help="recompute the summary of --inputs")
    parser.add_argument("--reference-cache", default=None, help="an .npz holding the reference's scores (made if absent)")
    parser.add_argument("--from-log", default=None, help="rebuild --json from the records a (cut short) run printed")
    args = parser.parse_args()
    if args.from_log:
        lines = Path(args.from_log).read_text().splitlines()
        records = [json.loads(x) for x in lines if x.startswith('{"method"')]
        head = json.loads(next(x for x in lines if x.startswith('{"model"')))
        result = {**head, "records": records, "summary": summarise(records, args.targets, head["steps"])}
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(json.dumps(result["summary"]["targets"], indent=1))
        return
    if args.plot or args.resummarise:
        if args.resummarise:
            for p in args.inputs:
                res = json.loads(Path(p).read_text())
                res["summary"] = summarise(res["records"], args.targets, res["steps"])
                Path(p).write_text(json.dumps(res, indent=1))
                print(json.dumps(res["summary"]["targets"], indent=1))
        if args.plot:
            plot(args.inputs, args.plot)
        return
    result = run(args)
    print(json.dumps(result["summary"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
