"""Attribution speed: this project's one-trajectory algorithm against the published reference algorithm and
against the limit (generate the trajectories once + one batched forward/backward over all their points).

    python bench/attribution_speed.py [--model PATH] [--samples 4] [--steps 50] [--device cpu]
    python bench/attribution_speed.py --sd-shaped 32 --samples 2 --steps 10 --device cuda --skip-reference

--sd-shaped N builds a randomly initialised pipeline in memory whose UNet has Stable Diffusion 1.x's shape
(860M parameters, ff scope 148.7M components) at N x N latents (N = 64 is 512 px): timings at SD's scale
where no SD checkpoint is at hand. Its text encoder and VAE are small (neither is in the ff scope).

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
    from cad_ray.method.attribution import gradients_for
    from cad_ray.method.objectives import Points, point_values
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
    from cad_ray.method.attribution import gradients_for
    from cad_ray.method.objectives import Points, concept_trajectories, point_values

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


def sd_shaped_model(latent_size: int, device: str):
    """A random pipeline with SD 1.x's UNet (block widths 320-1280, 2 layers per block, 768-d cross-attention),
    initialised on `device`, so that a GPU does the random initialisation of its 860M weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from cad_ray.models.stable_diffusion import StableDiffusionModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=latent_size, cross_attention_dim=768, attention_head_dim=8)
    printable = [*range(ord("!"), ord("~") + 1)]  # byte-level vocabulary without merges: any ASCII prompt
    vocab = {t: i for i, t in enumerate([chr(b) for b in printable] + [chr(b) + "</w>" for b in printable]
                                        + ["<|startoftext|>", "<|endoftext|>"])}
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=768, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    vae = AutoencoderKL(latent_channels=4, block_out_channels=(8,), norm_num_groups=8)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionModel(unet, text_encoder, tokenizer, vae, scheduler, source=f"sd1-shaped-{latent_size}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default=None)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--sd-shaped", type=int, default=None, metavar="N",
                        help="a random SD 1.x-shaped UNet at N x N latents instead of --model")
    parser.add_argument("--chunk", type=int, default=None, help="points per forward/backward (default: --steps)")
    args = parser.parse_args()

    from cad_ray.method.attribution import CAD
    from cad_ray.method.concepts import build_concept
    from cad_ray.config import ConceptSpec
    from cad_ray.models import load_model
    from cad_ray.method.objectives import EraseObjective

    if args.sd_shaped:
        model = sd_shaped_model(args.sd_shaped, args.device or "cpu").to(args.device or "cpu")
    else:
        model = load_model(args.model, device=args.device)
    concept = build_concept(ConceptSpec(name="seven", prompts=None) if model.kind == "digits"
                            else ConceptSpec(name="parachute", prompts=["an image of parachute"]), model)
    objective = EraseObjective(steps=args.steps)
    cad = CAD(model, objective, "ff", chunk_size=args.chunk or args.steps)
    samples = list(range(args.samples))
    # the best of two runs of the same shapes, as for the limit: a first call with new tensor shapes pays for
    # kernel selection (oneDNN on CPUs), which a warm-up of another batch size does not cover
    ours_s = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        ours = cad.attribute(concept, samples)
        ours_s = min(ours_s, time.perf_counter() - start)
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
