"""Samplers and prediction types: cad-ray samples as diffusers' own StableDiffusionPipeline does, and the
objectives evaluate the UNet on the scheduler's scaled inputs against targets of the model's prediction type."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cad_ray.errors import CadRayError
from cad_ray.method.objectives import AmplifyObjective, Concept, EraseObjective
from cad_ray.models import load_model
from cad_ray.seeds import derive_seed

PROMPTS = ["a photo of a parachute", "a church"]
STEPS, GUIDANCE, SEED = 5, 7.5, 4

# (scheduler class, options over SD 1.x's DDIM config): SD 1.x samplers, Euler with the "leading" spacing of
# SDXL's config (its first sigma is not the training schedule's largest), and SD 2.x's v-prediction DDIM
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-leading": ("EulerDiscreteScheduler", {"timestep_spacing": "leading"}),
    "dpm-solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "v-ddim": ("DDIMScheduler", {"prediction_type": "v_prediction"}),
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """One saved-and-loaded tiny pipeline per scheduler (same weights), built lazily."""
    from tiny_sd import build_tiny_sd

    built = {}

    def model(name: str):
        if name not in built:
            scheduler_class, options = SCHEDULERS[name]
            folder = build_tiny_sd(tmp_path_factory.mktemp(name), scheduler_class=scheduler_class, **options)
            built[name] = load_model(folder)
        return built[name]

    return model


class RecordingUNet(torch.nn.Module):
    """The model's UNet, recording the (input, timestep) of every call."""

    def __init__(self, unet):
        super().__init__()
        self.inner, self.calls = unet, []

    @property
    def config(self):
        return self.inner.config

    def forward(self, x, t, **kwargs):
        self.calls.append((x.detach().clone(), torch.as_tensor(t).detach().clone()))
        return self.inner(x, t, **kwargs)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_sample_matches_diffusers_stable_diffusion_pipeline(tiny_models, name):
    from diffusers import StableDiffusionPipeline

    model = tiny_models(name)
    scheduler_class, options = SCHEDULERS[name]
    assert type(model.scheduler).__name__ == scheduler_class
    assert all(model.scheduler.config[key] == value for key, value in options.items())
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=type(model.scheduler).from_config(model.scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # the pipeline multiplies given latents by its (set) scheduler's init_noise_sigma itself: hand it cad-ray's
    # starting noise before that scaling
    unit_noise = model.initial_noise(len(PROMPTS), SEED, scheduler=SimpleNamespace(init_noise_sigma=1.0))
    # a stochastic sampler (DDPM) draws its step noise from the generators it is given: the pipeline gets
    # cad-ray's own per-image step generators, so both draw the same noise at every step
    generators = [torch.Generator().manual_seed(derive_seed(SEED, k, "steps")) for k in range(len(PROMPTS))]
    final_latents = {}

    def keep_latents(pipeline, step, t, tensors):  # the pipeline's state after each step; the last is final
        final_latents["latents"] = tensors["latents"].clone()
        return tensors

    with torch.no_grad():
        images = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=unit_noise.clone(),
                      generator=generators, output_type="np", callback_on_step_end=keep_latents,
                      callback_on_step_end_tensor_inputs=["latents"]).images
    traj = model.sample(PROMPTS, seed=SEED, guidance=GUIDANCE, steps=STEPS)

    scale = float(traj.latents.abs().max())
    torch.testing.assert_close(traj.latents[-1], final_latents["latents"], rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(traj.images, images, rtol=0, atol=1e-5)
    assert np.abs(traj.images - traj.images[::-1]).max() > 1e-4  # two prompts, two different images


def test_euler_sampling_starts_at_the_set_schedulers_sigma_and_feeds_the_unet_scaled_inputs(tiny_models):
    model = tiny_models("euler-leading")
    scheduler = model.new_scheduler(STEPS)
    recorder = RecordingUNet(model.unet)
    model.unet = recorder
    try:
        traj = model.sample(PROMPTS, seed=SEED, guidance=GUIDANCE, steps=STEPS)
    finally:
        model.unet = recorder.inner
    unit_noise = model.initial_noise(len(PROMPTS), SEED, scheduler=SimpleNamespace(init_noise_sigma=1.0))
    # "leading" spacing: the first sigma is not the training schedule's largest one, so the starting noise
    # must be scaled by the scheduler set to the sampling steps
    assert float(scheduler.init_noise_sigma) < 0.9 * float(model.scheduler.init_noise_sigma)
    torch.testing.assert_close(traj.latents[0], unit_noise * scheduler.init_noise_sigma)
    assert len(recorder.calls) == STEPS
    for k, (x_in, t) in enumerate(recorder.calls):
        sigma = scheduler.sigmas[k]
        torch.testing.assert_close(x_in, torch.cat([traj.latents[k], traj.latents[k]]) / (sigma ** 2 + 1) ** 0.5)
        torch.testing.assert_close(traj.model_inputs[k], x_in[:len(PROMPTS)])
        assert torch.all(t == traj.timesteps[k])


def test_erase_points_on_an_euler_model_are_the_scaled_inputs_the_unet_gets(tiny_models):
    model = tiny_models("euler")
    scheduler = model.new_scheduler(STEPS)
    concept = Concept("parachute", ("a photo of a parachute",))
    recorder = RecordingUNet(model.unet)
    model.unet = recorder
    try:
        points = EraseObjective(guidance=GUIDANCE, steps=STEPS, points_per_sample=3).points(model, concept, [0, 1],
                                                                                            seed=SEED)
        target_calls = recorder.calls[STEPS:]  # after the sampling steps (both trajectories in one batch)
        recorder.calls = []
        with torch.no_grad():
            recomputed = model.predict_noise(points.x, points.t, points.base_cond)
    finally:
        model.unet = recorder.inner
    traj = model.sample(list(concept.prompts) * 2, seed=derive_seed(SEED, concept.name, "trajectory"),
                        guidance=GUIDANCE, steps=STEPS, ids=[0, 1])
    assert len(points) == 6
    sigmas = []
    for k in range(len(points)):
        step = int((scheduler.timesteps == points.t[k].cpu()).nonzero())
        row = int(points.sample[k])
        sigmas.append(float(scheduler.sigmas[step]))
        torch.testing.assert_close(points.x[k], traj.latents[step, row] / (sigmas[-1] ** 2 + 1) ** 0.5)
    assert max(sigmas) > 1  # the scaling is far from a no-op at some of these points
    # the base prompt is the negative prompt: its target is the unguided output the sampler computed on exactly
    # those inputs (no second pass), and every later evaluation of the points is on them too
    assert not target_calls
    torch.testing.assert_close(points.target, recomputed, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(recorder.calls[0][0], points.x)


def test_erase_target_for_another_base_prompt_is_computed_on_the_points(tiny_models):
    """A base prompt other than the negative prompt: the target is one more pass, on the points' inputs."""
    model = tiny_models("ddim")
    concept = Concept("parachute", ("a photo of a parachute",), base_prompts=("a photo",))
    recorder = RecordingUNet(model.unet)
    model.unet = recorder
    try:
        points = EraseObjective(guidance=GUIDANCE, steps=STEPS, points_per_sample=3).points(model, concept, [0, 1],
                                                                                            seed=SEED)
        target_calls = recorder.calls[STEPS:]
    finally:
        model.unet = recorder.inner
    torch.testing.assert_close(torch.cat([x for x, _ in target_calls]), points.x)
    with torch.no_grad():
        torch.testing.assert_close(points.target, model.predict_noise(points.x, points.t, points.base_cond))


def _amplify_on_one_image(model, seed=2):
    image = torch.linspace(-1, 1, 4 * 8 * 8).reshape(1, 4, 8, 8)
    concept = Concept("ramp", ("a ramp",), images=image)
    points = AmplifyObjective(points_per_sample=5).points(model, concept, [0, 1], seed=seed)
    alphas = model.scheduler.alphas_cumprod[points.t.cpu()].view(-1, 1, 1, 1)
    x0 = image.expand(len(points), -1, -1, -1)
    noise = (points.x - alphas.sqrt() * x0) / (1 - alphas).sqrt()  # the noise that was added
    return points, x0, noise, alphas


def test_amplify_target_follows_the_prediction_type(tiny_models):
    from diffusers import DDIMScheduler, DDPMScheduler

    model = tiny_models("v-ddim")
    points, x0, noise, alphas = _amplify_on_one_image(model)
    v = alphas.sqrt() * noise - (1 - alphas).sqrt() * x0
    torch.testing.assert_close(points.target, v)
    torch.testing.assert_close(points.target, DDPMScheduler.from_config(model.scheduler.config).get_velocity(
        x0, noise, points.t.cpu()))
    # the point the v-model reads back its x0 from: x0 = sqrt(a) x_t - sqrt(1 - a) v
    torch.testing.assert_close(alphas.sqrt() * points.x - (1 - alphas).sqrt() * points.target, x0)

    original = model.scheduler
    try:
        model.scheduler = DDIMScheduler.from_config(original.config, prediction_type="sample")
        points, x0, noise, _ = _amplify_on_one_image(model)
        torch.testing.assert_close(points.target, x0)
        model.scheduler = DDIMScheduler.from_config(original.config, prediction_type="epsilon")
        eps_points, _, noise, _ = _amplify_on_one_image(model)
        torch.testing.assert_close(eps_points.target, noise)
        torch.testing.assert_close(eps_points.x, points.x)  # the same noised inputs whatever the prediction type
        assert (eps_points.target - points.target).abs().max() > 0.1
    finally:
        model.scheduler = original


def test_amplify_inputs_on_an_euler_model_are_its_scaled_sigma_space_points(tiny_models):
    """The DDPM x_t the amplify objective feeds the UNet is Euler's scale_model_input(x0 + sigma_t noise): the
    same input, so amplify points need no further scaling whatever the sampler."""
    model = tiny_models("euler")
    points, x0, noise, _ = _amplify_on_one_image(model)
    for k in range(len(points)):
        euler = type(model.scheduler).from_config(model.scheduler.config)
        euler.set_timesteps(timesteps=[int(points.t[k])])
        sigma_state = x0[k] + euler.sigmas[0] * noise[k]
        torch.testing.assert_close(euler.scale_model_input(sigma_state, euler.timesteps[0]), points.x[k],
                                   rtol=1e-4, atol=1e-5)


def test_unsupported_prediction_type_is_a_one_line_error(tiny_models, tmp_path):
    import json

    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    model = tiny_models("ddim")
    original = model.scheduler
    try:
        model.scheduler = DDIMScheduler.from_config(original.config, prediction_type="flow")
        for run in (lambda: model.sample(PROMPTS, steps=2),
                    lambda: AmplifyObjective(points_per_sample=2).points(model, Concept("c", ("c",)), [0], seed=0)):
            with pytest.raises(CadRayError, match="prediction_type 'flow'; cad-ray supports epsilon, "
                                                  "v_prediction, sample") as error:
                run()
            assert "\n" not in str(error.value)
        model.scheduler = FlowMatchEulerDiscreteScheduler()  # no DDPM forward process for the objectives
        with pytest.raises(CadRayError, match="FlowMatchEulerDiscreteScheduler is not a discrete-time DDPM-family"):
            model.sample(PROMPTS, steps=2)
    finally:
        model.scheduler = original

    from tiny_sd import build_tiny_sd

    folder = build_tiny_sd(tmp_path / "m")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "prediction_type": "flow"}))
    with pytest.raises(CadRayError, match="scheduler: DDIMScheduler has prediction_type 'flow'"):
        load_model(folder)


@pytest.mark.parametrize("name", ["euler", "v-ddim"])
def test_fused_erase_points_give_the_scores_of_separate_passes(tiny_models, name, monkeypatch):
    """The points' forward pass taken from the sampler's guided step (`fused`) sees the same scaled inputs and the
    same target as the separate passes, with any scheduler and prediction type: the same scores, up to float32
    rounding (its conditional outputs come from other batches, and the trajectories carry that on)."""
    from cad_ray.method import attribution
    from cad_ray.method.attribution import CAD

    model = tiny_models(name)
    concept = Concept("parachute", ("a photo of a parachute", "a church"))
    separate = CAD(model, EraseObjective(guidance=GUIDANCE, steps=STEPS, points_per_sample=3), "ff", chunk_size=4,
                   batch=3).attribute(concept, 5)
    separate_passes = []  # the fused run must not fall back to them
    monkeypatch.setattr(attribution, "point_values", lambda *a, **k: separate_passes.append(1))
    fused = CAD(model, EraseObjective(guidance=GUIDANCE, steps=STEPS, points_per_sample=3, fused=True), "ff",
                chunk_size=4, batch=3).attribute(concept, 5)
    assert not separate_passes
    for key in separate.scores:
        scale = float(separate.scores[key].abs().max())
        assert float((fused.scores[key] - separate.scores[key]).abs().max()) <= 1e-3 * scale, key
    assert fused.objective_value == pytest.approx(separate.objective_value, rel=1e-4)
