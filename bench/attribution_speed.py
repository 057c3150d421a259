"""Attribution speed: this project's one-trajectory algorithm against the published reference algorithm and
against the limit (generate the trajectories once + one batched forward/backward over all their points).

    python bench/attribution_speed.py [--model PATH] [--samples 4] [--steps 50] [--device cpu]

The reference re-samples from pure noise down to every timestep t and runs one forward/backward at x_t:
about T^2/2 guided UNet steps per sample. With the same starting noise and the same per-image step noise it
visits exactly the points that one kept trajectory visits, so both must give the same scores; the script
checks that too.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def reference_scores(model, objective, concept, samples, seed, parameters):
    """The published algorithm: for each timestep, a fresh trajectory from x_T down to t, then one backward."""
    from cad_ray.attribution import gradients_for
    from cad_ray.objectives import Points, point_values
    from cad_ray.seeds import derive_seed

    sums = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in parameters}
    steps = objective.steps or model.default_steps
    guidance = objective.guidance if objective.guidance is not None else model.default_guidance
    for s in samples:
        prompt, base = concept.prompt(s)
        cond, base_cond = model.encode([prompt]), model.encode([base])
        uncond = model.encode([""])
        for k in range(steps):
            scheduler = model.new_scheduler(steps)
            stream = derive_seed(seed, concept.name, "trajectory")
            x = model.initial_noise(1, stream, ids=[s])
            # the same per-image step noise as TextToImageModel.sample, so the re-sampled x_t are the same
            step_noise = {"generator": [torch.Generator().manual_seed(derive_seed(stream, s, "steps"))]}
            with torch.no_grad():
                for t in scheduler.timesteps[:k]:  # re-sample from pure noise down to step k
                    x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
                    eps_u, eps_c = model.predict_noise(x_in, t, torch.cat([uncond, cond])).chunk(2)
                    x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x, return_dict=False, **step_noise)[0]
                t = scheduler.timesteps[k].reshape(1).to(model.device)
                target = model.predict_noise(x, t, base_cond)
            with gradients_for([p for _, p in parameters]):
                value = point_values(model, Points(x, t, cond, target, torch.zeros(1), 1.0)).double().sum() / steps
                value.backward()
                for n, p in parameters:
                    sums[n] += p.grad.double().cpu()
    return {n: p.detach().double().cpu() * sums[n] / len(samples) for n, p in parameters}


def limit_seconds(model, objective, concept, samples, seed, parameters) -> float:
    """Generate the same trajectories, then one batched forward/backward over all kept points."""
    from cad_ray.attribution import gradients_for
    from cad_ray.objectives import Points, concept_trajectories, point_values

    start = time.perf_counter()
    prompts = [concept.prompt(s)[0] for s in samples]
    traj = concept_trajectories(model, concept, prompts, samples, seed, objective.guidance, objective.steps)
    steps = len(traj.timesteps)
    x = traj.latents[:-1].reshape(-1, *traj.latents.shape[2:])
    t = traj.timesteps.repeat_interleave(len(samples)).to(model.device)
    with torch.no_grad():
        cond = model.encode(prompts).repeat(steps, 1, 1)
        target = model.predict_noise(x, t, model.encode([""] * len(samples)).repeat(steps, 1, 1))
    with gradients_for([p for _, p in parameters]):
        point_values(model, Points(x, t, cond, target, torch.zeros(len(t)), 1.0)).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default=None)
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()

    from cad_ray.attribution import CAD
    from cad_ray.concepts import build_concept
    from cad_ray.config import ConceptSpec
    from cad_ray.models import load_model
    from cad_ray.objectives import EraseObjective

    model = load_model(args.model, device=args.device)
    concept = build_concept(ConceptSpec(name="seven", prompts=None) if model.kind == "digits"
                            else ConceptSpec(name="parachute", prompts=["an image of parachute"]), model)
    objective = EraseObjective(steps=args.steps)
    cad = CAD(model, objective, "ff", chunk_size=args.steps)
    samples = list(range(args.samples))
    cad.attribute(concept, samples[:1])  # warm-up
    start = time.perf_counter()
    ours = cad.attribute(concept, samples)
    ours_s = time.perf_counter() - start
    limit_s = min(limit_seconds(model, objective, concept, samples, 0, cad.parameters) for _ in range(2))
    result = {"model": model.source, "device": str(model.device), "threads": torch.get_num_threads(),
              "samples": args.samples, "steps": args.steps, "components": sum(p.numel() for _, p in cad.parameters),
              "ours_seconds": round(ours_s, 3), "limit_seconds": round(limit_s, 3),
              "ours_over_limit": round(ours_s / limit_s, 3)}
    if not args.skip_reference:
        start = time.perf_counter()
        reference = reference_scores(model, objective, concept, samples, 0, cad.parameters)
        ref_s = time.perf_counter() - start
        scale = max(float(v.abs().max()) for v in reference.values())
        diff = max(float((ours.scores[n] - reference[n]).abs().max()) for n in reference)
        result.update(reference_seconds=round(ref_s, 3), speedup_vs_reference=round(ref_s / ours_s, 2),
                      max_score_difference_relative=diff / scale)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
