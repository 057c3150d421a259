import shutil

import numpy as np
import pytest
import torch

from cad_ray.errors import CadRayError
from cad_ray.models import load_model
from cad_ray.models.digits import DigitsModel


def _outputs(model, prompts=("a red seven", "two", ""), seed=3):
    x = model.initial_noise(len(prompts), seed)
    with torch.no_grad():
        eps = model.predict_noise(x, 500, model.encode(list(prompts)))
    return eps, model.sample(list(prompts), seed=seed, steps=5).images


def test_digits_adapter_round_trip_gives_identical_outputs(tmp_path):
    built = DigitsModel.build(seed=3)
    built.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    loaded = load_model(tmp_path / "m")
    assert loaded.fingerprint() == built.fingerprint()
    for a, b in zip(_outputs(built), _outputs(loaded)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_builtin_digits_model_has_stable_diffusion_scopes_and_keeps_trajectories(digits_model):
    names = [n for n, _ in digits_model.named_parameters()]
    for part in ("attn1.to_q.weight", "attn2.to_k.weight", "ff.net.0.proj.weight", "ff.net.2.weight"):
        assert any(n.endswith(part) for n in names), part
    traj = digits_model.sample(["a red seven", "two"], seed=1, steps=7)
    assert traj.latents.shape == (8, 2, 3, 8, 8) and len(traj.timesteps) == 7
    assert torch.all(traj.timesteps[:-1] > traj.timesteps[1:])
    assert traj.images.shape == (2, 8, 8, 3) and traj.images.min() >= 0 and traj.images.max() <= 1
    assert torch.equal(traj.latents[0], digits_model.initial_noise(2, seed=1))


def test_same_seed_same_images_however_the_batch_is_cut(digits_model):
    both = digits_model.sample(["a red seven", "a blue two"], seed=11, steps=10).images
    second = digits_model.sample(["a blue two"], seed=11, steps=10, ids=[1]).images
    np.testing.assert_allclose(both[1], second[0], atol=1e-5)
    other_seed = digits_model.sample(["a red seven"], seed=12, steps=10).images
    assert np.abs(other_seed[0] - both[0]).max() > 1e-3


def test_batched_predictions_are_the_separate_ones(digits_model):
    # the unlearning steps stack their calls into one: that must not change what each call predicts
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, *digits_model.latent_shape, generator=g)
    own, empty = digits_model.encode(["a three"] * 4), digits_model.encode([""])
    calls = [(x[:4], torch.tensor([10, 200, 500, 900]), own), (x[4:], 300, empty.expand(2, *empty.shape[1:]))]
    with torch.no_grad():
        batched = digits_model.predict_noise_batched(calls)
        separate = [digits_model.predict_noise(*call) for call in calls]
    assert [b.shape for b in batched] == [(4, *digits_model.latent_shape), (2, *digits_model.latent_shape)]
    for b, s in zip(batched, separate):
        torch.testing.assert_close(b, s, rtol=1e-4, atol=1e-5)
    # a time and a condition given once stand for every image of their call, as predict_noise reads them
    once = digits_model.predict_noise_batched([(x[:4], 10, own[:1]), (x[4:], torch.tensor([300]), empty)])
    torch.testing.assert_close(once[0], digits_model.predict_noise(x[:4], 10, own), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(once[1], separate[1], rtol=1e-4, atol=1e-5)


def test_tiny_stable_diffusion_loads_from_a_folder_and_samples(tiny_sd_folder):
    model = load_model(tiny_sd_folder)
    assert model.kind == "stable-diffusion"
    traj = model.sample(["a photo of a parachute", "a church"], seed=0, steps=4)
    assert traj.images.shape == (2, 16, 16, 3) and 0 <= traj.images.min() and traj.images.max() <= 1
    assert traj.latents.shape == (5, 2, 4, 8, 8)
    assert any(n.endswith("ff.net.0.proj.weight") for n, _ in model.named_parameters())
    again = load_model(tiny_sd_folder).sample(["a photo of a parachute", "a church"], seed=0, steps=4)
    assert np.array_equal(traj.images, again.images)


def test_stable_diffusion_round_trip(tiny_sd_folder, tmp_path):
    model = load_model(tiny_sd_folder)
    model.save_pretrained(tmp_path / "copy")
    copy = load_model(tmp_path / "copy")
    assert copy.fingerprint() == model.fingerprint()
    for a, b in zip(_outputs(model, ("a cat", "")), _outputs(copy, ("a cat", ""))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_stable_diffusion_loads_from_s3(tiny_sd_folder, s3_endpoint):
    from cad_ray.models.loading import s3_filesystem

    fs = s3_filesystem()
    fs.mkdir("models")
    fs.put(str(tiny_sd_folder), "models/tiny-sd", recursive=True)
    from_s3 = load_model("s3://models/tiny-sd")
    assert from_s3.fingerprint() == load_model(tiny_sd_folder).fingerprint()
    assert from_s3.source == "s3://models/tiny-sd"
    with pytest.raises(CadRayError, match="cannot read s3://no-such-bucket"):
        load_model("s3://no-such-bucket/model")
    with pytest.raises(CadRayError, match="no such model folder"):
        load_model("s3://models/missing")


class Payload:
    """Not a tensor: torch.load(weights_only=True) must refuse to unpickle it."""


def _unet_as_pickle(src, dst, payload):
    shutil.copytree(src, dst)
    (dst / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(payload, dst / "unet" / "diffusion_pytorch_model.bin")


def test_pickle_checkpoint_that_is_not_weights_only_is_refused(tiny_sd_folder, tmp_path):
    _unet_as_pickle(tiny_sd_folder, tmp_path / "m", {"weights": Payload()})
    with pytest.raises(CadRayError, match="refusing pickle checkpoint .*weights_only=True"):
        load_model(tmp_path / "m")


def test_weights_only_pickle_checkpoint_loads(tiny_sd_folder, tmp_path):
    reference = load_model(tiny_sd_folder)
    _unet_as_pickle(tiny_sd_folder, tmp_path / "m", reference.unet.state_dict())
    assert load_model(tmp_path / "m").fingerprint() == reference.fingerprint()


def test_single_pickle_file_is_refused(tmp_path):
    torch.save(Payload(), tmp_path / "model.ckpt")
    with pytest.raises(CadRayError, match="refusing pickle checkpoint"):
        load_model(tmp_path / "model.ckpt")


def test_corrupt_safetensors_is_a_clear_error(tiny_sd_folder, tmp_path):
    shutil.copytree(tiny_sd_folder, tmp_path / "m")
    weights = tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CadRayError, match="cannot load unet"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("index, message", [(None, "does not exist"), ("{not json", "malformed"),
                                             ('{"_class_name": "FluxPipeline"}', "unsupported pipeline")])
def test_bad_model_folders(tmp_path, index, message):
    folder = tmp_path / "m"
    if index is not None:
        folder.mkdir()
        (folder / "model_index.json").write_text(index)
    with pytest.raises(CadRayError, match=message):
        load_model(folder)


def test_attribution_decodes_no_image_and_a_sample_decodes_its_images_once(monkeypatch):
    """The final images of a sampling run are decoded when they are first asked for: the erase and amplify points
    (fused or not) never ask, which at Stable Diffusion size saves a VAE decode a trajectory (docs/benchmarks.md)."""
    from conftest import untrained_float64_model

    from cad_ray.method.attribution import CAD
    from cad_ray.method.objectives import AmplifyObjective, Concept, EraseObjective

    model = untrained_float64_model(seed=3)
    decoded, decode = [], model.decode
    monkeypatch.setattr(model, "decode", lambda latents: decoded.append(len(latents)) or decode(latents))
    concept = Concept("seven", ("seven",))
    for objective in (EraseObjective(steps=3), EraseObjective(steps=3, fused=True),
                      AmplifyObjective(points_per_sample=2, steps=3)):
        CAD(model, objective, "ff", chunk_size=8, batch=2).attribute(concept, 2)
    assert decoded == []
    trajectory = model.sample(["seven", "a red two"], seed=1, steps=3)
    images = trajectory.images
    assert trajectory.images is images and decoded == [2]
    np.testing.assert_array_equal(images, decode(trajectory.latents[-1]))
