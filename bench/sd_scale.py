"""Stable Diffusion 1.4 at its real size, end to end, through the same code as `cad-ray run`.

    python bench/sd_scale.py [--json sd-scale.json] [--workdir DIR] [--keep]      # SD 1.4 shapes, 8 x 8 latents
    python bench/sd_scale.py --scale tiny --json tiny.json                        # the same pipeline, small shapes
    python bench/sd_scale.py --latent 64 --device cuda --steps 10 --json gpu.json # SD 1.4's own latent size

It builds a randomly initialised pipeline with SD 1.4's real shapes -- the UNet (859,520,964 parameters, its
block layout: 320/640/1280/1280 channels, 2 layers per block, 8 heads, 768-d cross-attention), the ViT-L/14
text encoder (768 wide, 12 layers, 12 heads, 3072 intermediate, 77 positions, a 49,408-token vocabulary) and
the VAE (128/256/512/512 channels, 4 latent channels) -- and saves it as a diffusers folder (safetensors;
DDIM scheduler with SD's betas; a byte-level CLIP tokenizer made here, no hub). The UNet's `sample_size` is the
latent size asked for (`--latent`, default 8 = 64 px images on 2 CPU cores; SD 1.4's own is 64 = 512 px).

Then it writes a config (2 concepts, `ff` scope = 148,684,800 components, `--samples` samples of `--steps`
steps, one Ray worker; validation: cad, cad2 and coar on a few random ablations; evaluation: a few images,
cad-erase and random, judged by a TorchScript stand-in classifier) and runs
`python -m cad_ray.cli run --config ... --root ... --quiet` as a child process while a thread samples, every
0.5 s:

- memory: the RSS of that process and all its descendants (Ray's gcs_server, raylet and every Ray worker are
  started by it), plus any process whose command line holds `ray::` that started after this script and is
  not under another process (an orphaned Ray worker); `peak_rss_gb` is the largest such sum. RSS counts
  shared pages (Ray's object store) once per process, so it errs high;
- disk: every file under the run root (hidden temporary files count toward the bytes present, not toward
  the bytes written, since they are renamed into place). `bytes_written_per_concept` is, per concept, the
  largest size seen of every file the attribution wrote for it (`_shards/`, `scores/`, `neurons/`, `layers/`
  partitions of the concept; shards are removed after the reduce, so they are counted as seen), averaged
  over the concepts; `written_over_tables` divides it by the final tables of the concept (scores, neurons,
  layers). The run's weights table (once per run, not per concept) is reported apart.

After the run: `bytes_per_score` (the concept's `scores/` partition / its components), `top100_s`
(`ScoreStore(root).top(concept, k=100)` in a fresh process, after the score and weights files were dropped
from the OS page cache with posix_fadvise, so the query reads the disk), and the wall time of each stage
(from the moment its `=== cad-ray <stage> ===` line appears; attribute includes Ray's start-up). Before the
run, with `--probe` (default on a GPU), it loads the model in this process and times the attribution of the
first concept's samples (`CAD.gradient_sum`, best of two) against the one-trajectory limit (the same
trajectories, then forward/backward over all their points in the same chunks, without the float64 sums), with
peak device memory (`torch.cuda.max_memory_allocated`). The JSON is rewritten after each step, so a run cut
short (a device's lease) keeps what was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GB = 1e9
CONCEPTS = [("parachute", "an image of parachute"), ("church", "an image of church")]


# --- the pipeline -------------------------------------------------------------------------------------------

def clip_vocab(size: int) -> dict[str, int]:
    """A byte-level CLIP vocabulary without merges (any prompt tokenizes, one symbol a token), padded with unused
    tokens to `size` entries so that the special tokens sit where CLIP's do (49406, 49407 for 49,408)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += [f"<|unused{i}|>" for i in range(size - 2 - len(tokens))]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def shapes(scale: str) -> dict:
    """Constructor arguments of the three networks: SD 1.4's, or the same layout a few hundred times narrower."""
    if scale == "sd14":
        return {"unet": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768),
                "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             projection_dim=768),
                "vae": dict(block_out_channels=(128, 256, 512, 512))}
    return {"unet": dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32),
            "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         projection_dim=32),
            "vae": dict(block_out_channels=(32, 32, 32, 32))}


def build_pipeline(folder: str, scale: str, latent: int, device: str) -> dict:
    """The random pipeline, saved as a diffusers folder; returns the parameter counts."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from cad_ray.models.loading import quiet_libraries
    from cad_ray.models.stable_diffusion import StableDiffusionModel

    quiet_libraries()
    size = shapes(scale)
    torch.manual_seed(0)
    vocab = clip_vocab(49408)
    with torch.device(device):  # a GPU initialises 1 B random weights in a moment; 2 CPU cores in about a minute
        unet = UNet2DConditionModel(
            sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32, **size["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"], **size["text"]))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            norm_num_groups=32, sample_size=8 * latent, **size["vae"])
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    model = StableDiffusionModel(unet, text_encoder, tokenizer, vae, scheduler)
    model.to("cpu")
    model.save_pretrained(folder)  # safetensors, one file per network
    return {name: sum(p.numel() for p in module.parameters()) for name, module in model.weight_modules().items()}


# --- measuring a process tree -------------------------------------------------------------------------------

class Monitor:
    """Samples, every `period` seconds, the RSS of a process tree (plus orphaned Ray workers) and the files
    under a folder, until stopped."""

    def __init__(self, pid: int, root: str | None = None, period: float = 0.5):
        import psutil

        self.psutil, self.pid, self.root, self.period = psutil, pid, root, period
        self.started = time.time()
        self.peak_rss, self.peak_parts, self.peak_files = 0, {}, 0
        self.max_size: dict[str, int] = {}  # path under root -> largest size seen (hidden temporaries excluded)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def processes(self):
        psutil = self.psutil
        try:
            root = psutil.Process(self.pid)
            tree = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        seen = {p.pid for p in tree}
        for p in psutil.process_iter(["pid", "ppid", "cmdline", "create_time"]):
            info = p.info
            if info["pid"] in seen or info["ppid"] != 1 or (info["create_time"] or 0) < self.started:
                continue
            if any("ray::" in part for part in info["cmdline"] or []):
                tree.append(p)
        return tree

    def _role(self, p) -> str:
        if p.pid == self.pid:
            return "driver"
        try:
            command = " ".join(p.cmdline())
        except self.psutil.Error:
            return "other"
        if "ray::" in command or "default_worker.py" in command:
            return "ray workers"
        return "other (raylet, gcs, dashboard, ...)"

    def sample(self) -> None:
        parts: dict[str, int] = {}
        for p in self.processes():
            try:
                rss = p.memory_info().rss
            except self.psutil.Error:
                continue
            role = self._role(p)
            parts[role] = parts.get(role, 0) + rss
        total = sum(parts.values())
        if total > self.peak_rss:
            self.peak_rss, self.peak_parts = total, parts
        if self.root and os.path.isdir(self.root):
            present = 0
            for folder, _, files in os.walk(self.root):
                for name in files:
                    path = os.path.join(folder, name)
                    try:
                        size = os.path.getsize(path)
                    except OSError:
                        continue
                    present += size
                    if not name.startswith("."):
                        key = os.path.relpath(path, self.root)
                        self.max_size[key] = max(size, self.max_size.get(key, 0))
            self.peak_files = max(self.peak_files, present)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)
        self.sample()


def run_monitored(command: list[str], root: str | None, log_path: Path, env: dict | None = None) -> dict:
    """Run `command` as a child, sampling memory (and files under `root`), timestamping each line it prints."""
    start = time.time()
    lines = []
    with open(log_path, "a") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                   env=env, cwd=REPO)
        with Monitor(process.pid, root) as monitor:
            for line in process.stdout:
                lines.append((time.time() - start, line.rstrip("\n")))
                log.write(f"[{time.time() - start:8.1f}s] {line}")
                log.flush()
            rc = process.wait()
    return {"rc": rc, "seconds": time.time() - start, "lines": lines, "peak_rss": monitor.peak_rss,
            "peak_parts": monitor.peak_parts, "peak_files": monitor.peak_files, "max_size": monitor.max_size,
            "samples": monitor.samples}


# --- the run ------------------------------------------------------------------------------------------------

def write_inputs(work: Path, folder: Path, args) -> Path:
    """The run's config, its evaluation prompts (benchmark CSV format) and a TorchScript stand-in judge."""
    import torch
    import yaml

    class StandIn(torch.nn.Module):  # an "ImageNet classifier" for two classes: mean brightness decides
        def forward(self, x):
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([m, -m], dim=1)

    torch.jit.save(torch.jit.script(StandIn()), str(work / "judge.pt"))
    (work / "classes.txt").write_text("".join(f"{name}\n" for name, _ in CONCEPTS))
    (work / "prompts.csv").write_text("prompt,evaluation_seed,class\n" + "".join(
        f"{prompt},{k + 1},{name}\n" for k, (name, prompt) in enumerate(CONCEPTS)))
    points = args.samples * args.steps
    config = {
        "model": str(folder), "seed": 0, "scope": "ff",
        "samples": args.samples, "block": args.samples, "batch": args.samples, "chunk_size": args.chunk or points,
        "erase": {"steps": args.steps, "guidance": 7.5},
        "concepts": [{"name": name, "prompts": [prompt]} for name, prompt in CONCEPTS],
        "workers": 1, "device": args.device, "keep_shards": args.keep_shards,
        "validation": {"fractions": [0.001, 0.01], "ablations": args.ablations, "eval_samples": 1,
                       "eval_points_per_sample": min(2, args.steps), "projections": args.projections,
                       "sketch_points_per_sample": min(2, args.steps), "block": args.ablations},
        "evaluation": {"targets": [CONCEPTS[0][0]], "edits": ["cad-erase", "random"], "ratios": [0.01],
                       "recovery_ratios": [], "selection": "ff/global/none", "prompts": str(work / "prompts.csv"),
                       "images_per_prompt": 1, "steps": args.steps, "guidance": 7.5, "batch_size": 8,
                       "judge": {"name": "classifier", "model_file": str(work / "judge.pt"),
                                 "classes": str(work / "classes.txt"), "size": 32}},
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def stage_seconds(lines: list[tuple[float, str]], total: float) -> dict:
    """Each stage from its `=== cad-ray <stage> ===` line to its `... complete in` line; the report from there to
    the `report:` line; `exit` the rest (Ray's shutdown)."""
    out, current, last = {}, None, 0.0
    for t, line in lines:
        if line.startswith("=== cad-ray "):
            current, last = line.split()[2], t
        elif current and " complete in " in line:
            out[current], current, last = round(t - last, 1), None, t
        elif line.startswith("report: "):
            out["report"], last = round(t - last, 1), t
    out["exit"] = round(total - last, 1)
    return out


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages (clean pages of a file we own: no privileges needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold_top(root: Path, concept: str) -> dict:
    for table in ("scores", "weights"):
        for file in (root / table).rglob("*.parquet"):
            drop_from_page_cache(file)
    code = ("import time, json; t0 = time.perf_counter(); from cad_ray.store import ScoreStore; t1 = time.perf_counter(); "
            f"top = ScoreStore({str(root)!r}).top({concept!r}, k=100); t2 = time.perf_counter(); "
            "print(json.dumps({'import_s': t1 - t0, 'top100_s': t2 - t1, 'rows': len(top)}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def sizes_under(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def table_figures(root: Path, max_size: dict[str, int]) -> dict:
    import pandas as pd

    per_concept = {}
    for name, _ in CONCEPTS:
        part = f"concept={name}/objective=erase"
        tables = {t: sizes_under(root / t / part) for t in ("scores", "neurons", "layers")}
        components = int(pd.read_parquet(root / "layers" / part)["count"].sum())
        written = {kind: sum(size for path, size in max_size.items() if path.startswith(f"{kind}/{part}/"))
                   for kind in ("_shards", "scores", "neurons", "layers")}
        per_concept[name] = {
            "components": components, "table_bytes": tables, "tables_total": sum(tables.values()),
            "bytes_per_score": round(tables["scores"] / components, 3),
            "written_bytes": written, "written_total": sum(written.values()),
            "written_over_tables": round(sum(written.values()) / sum(tables.values()), 3)}
    return per_concept


def attribution_probe(folder: Path, args, config_path: Path) -> dict:
    """In this process: the first concept's attribution timed (best of two) against the one-trajectory limit,
    with peak device memory."""
    import torch

    from cad_ray.config import load_config
    from cad_ray.method.attribution import CAD, gradients_for
    from cad_ray.method.concepts import build_concept
    from cad_ray.method.objectives import Points, concept_trajectories, point_values
    from cad_ray.models import load_model
    from cad_ray.stages.attribution_worker import objective_for

    config = load_config(config_path)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(str(folder), device=device)
    concept = build_concept(config.concepts[0], model)
    objective = objective_for(config, "erase")
    cad = CAD(model, objective, config.scope, config.chunk_size, config.seed, config.batch)
    samples = list(range(config.samples))
    cuda = model.device.type == "cuda"

    def synced():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def limit() -> float:
        """The same trajectories, then forward/backward over all their points in the same chunks (no float64
        sums, no copy of the weights)."""
        params = [p for _, p in cad.parameters]
        start = synced()
        prompts = [concept.prompt(s)[0] for s in samples]
        traj = concept_trajectories(model, concept, prompts, samples, config.seed, objective.guidance, objective.steps)
        steps = len(traj.timesteps)
        x = traj.model_inputs.reshape(-1, *traj.latents.shape[2:])
        t = traj.timesteps.repeat_interleave(len(samples)).to(model.device)
        with torch.no_grad():
            cond = model.encode(prompts).repeat(steps, 1, 1)
            base = model.encode([""] * len(samples)).repeat(steps, 1, 1)
        with gradients_for(params):
            for lo in range(0, len(t), config.chunk_size):
                hi = lo + config.chunk_size
                with torch.no_grad():
                    target = model.predict_noise(x[lo:hi], t[lo:hi], base[lo:hi])
                points = Points(x[lo:hi], t[lo:hi], cond[lo:hi], target, torch.zeros(len(t[lo:hi])), 1.0)
                point_values(model, points).sum().backward()
                for p in params:
                    p.grad = None
        return synced() - start

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ours = float("inf")
    for _ in range(2):  # the first call with new shapes pays for kernel selection
        start = synced()
        cad.gradient_sum(concept, samples)
        ours = min(ours, synced() - start)
    peak = torch.cuda.max_memory_allocated() / GB if cuda else None
    lim = min(limit() for _ in range(2))
    return {"device": str(model.device), "threads": torch.get_num_threads(), "samples": len(samples),
            "steps": objective.steps, "chunk_size": config.chunk_size, "attribution_s": round(ours, 3),
            "attribution_s_per_sample": round(ours / len(samples), 3), "limit_s": round(lim, 3),
            "over_limit": round(ours / lim, 3), "peak_gpu_memory_gb": None if peak is None else round(peak, 2)}


def release_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_figures(figures: dict, path: str | None) -> str:
    """Written after each step, so a run cut short still leaves what it measured."""
    text = json.dumps(figures, indent=1)
    if path:
        Path(path).write_text(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["sd14", "tiny"], default="sd14",
                        help="sd14: SD 1.4's real shapes; tiny: the same layout, narrow (a quick check of the script)")
    parser.add_argument("--latent", type=int, default=8, help="latent size N (N x N; images 8N px); SD 1.4's is 64")
    parser.add_argument("--samples", type=int, default=2, help="samples per concept")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps T (attribution and images)")
    parser.add_argument("--chunk", type=int, default=None, help="points per forward/backward (default: all of a "
                        "shard's points up to 16 x 16 latents, one sample's above)")
    parser.add_argument("--ablations", type=int, default=6, help="random ablations per fraction (2 fractions)")
    parser.add_argument("--projections", type=int, default=2, help="projections K of the second-order sketch")
    parser.add_argument("--device", default=None, help="torch device of the workers (default: cuda if present)")
    parser.add_argument("--probe", action=argparse.BooleanOptionalAction, default=None,
                        help="time the attribution in this process against the limit (default: on a GPU only)")
    parser.add_argument("--workdir", default=None, help="where the model folder and run root go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--keep-shards", action="store_true", help="keep_shards: true in the config (to look at them)")
    parser.add_argument("--build-only", default=None, help=argparse.SUPPRESS)  # internal: build into this folder
    args = parser.parse_args()

    if args.build_only:
        counts = build_pipeline(args.build_only, args.scale, args.latent, args.device or "cpu")
        print("PARAMETERS " + json.dumps(counts), flush=True)
        return
    if args.chunk is None and args.latent > 16:
        args.chunk = args.steps
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cad-ray-sd-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    folder, root, log = work / "model", work / "run", work / "run.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    figures: dict = {"scale": args.scale, "latent": args.latent, "image_px": 8 * args.latent,
                     "samples": args.samples, "steps": args.steps, "device": args.device or "default",
                     "concepts": [name for name, _ in CONCEPTS], "workers": 1, "cpus": os.cpu_count(),
                     "workdir": str(work)}
    try:
        # build in a child process: the random init and safetensors' serialisation hold ~2 copies of the weights,
        # which must not stay in this process (nor count toward the run's memory)
        build_device = args.device if args.device and args.device.startswith("cuda") else "cpu"
        build = run_monitored([sys.executable, __file__, "--build-only", str(folder), "--scale", args.scale,
                               "--latent", str(args.latent), "--device", build_device], None, log, env)
        if build["rc"]:
            raise SystemExit(f"building the pipeline failed (rc {build['rc']}); see {log}")
        counts = json.loads(next(line for _, line in build["lines"] if line.startswith("PARAMETERS "))[11:])
        figures.update(parameters=counts, model_bytes=sizes_under(folder),
                       build_s=round(build["seconds"], 1), build_peak_rss_gb=round(build["peak_rss"] / GB, 2))
        print(f"built {folder}: {counts} parameters, {figures['model_bytes'] / GB:.2f} GB, {build['seconds']:.0f} s",
              flush=True)

        config = write_inputs(work, folder, args)
        # the probe runs before the run so that its figures exist even if the run is cut short (a device's lease)
        if args.probe or (args.probe is None and (args.device or "").startswith("cuda")):
            figures["probe"] = attribution_probe(folder, args, config)
            release_device_memory()
        write_figures(figures, args.json)
        command = [sys.executable, "-m", "cad_ray.cli", "run", "--config", str(config), "--root", str(root), "--quiet"]
        result = run_monitored(command, str(root), log, env)
        if result["rc"]:
            tail = "\n".join(line for _, line in result["lines"][-20:])
            raise SystemExit(f"cad-ray run failed (rc {result['rc']}); see {log}:\n{tail}")
        per_concept = table_figures(root, result["max_size"])
        first = per_concept[CONCEPTS[0][0]]
        top = cold_top(root, CONCEPTS[0][0])
        n = len(per_concept)
        weights_bytes = sizes_under(root / "weights")
        figures.update(
            components=first["components"],
            peak_rss_gb=round(result["peak_rss"] / GB, 2),
            peak_rss_parts_gb={k: round(v / GB, 2) for k, v in result["peak_parts"].items()},
            bytes_per_score=first["bytes_per_score"],
            bytes_written_per_concept=round(sum(c["written_total"] for c in per_concept.values()) / n),
            tables_bytes_per_concept=round(sum(c["tables_total"] for c in per_concept.values()) / n),
            written_over_tables=round(sum(c["written_total"] for c in per_concept.values())
                                      / sum(c["tables_total"] for c in per_concept.values()), 3),
            weights_table_bytes=weights_bytes, weights_bytes_per_component=round(weights_bytes / first["components"], 3),
            peak_root_bytes=result["peak_files"], final_root_bytes=sizes_under(root),
            top100_s=round(top["top100_s"], 3), top100_import_s=round(top["import_s"], 3),
            stage_s=stage_seconds(result["lines"], result["seconds"]), run_s=round(result["seconds"], 1),
            per_concept=per_concept, memory_samples=result["samples"],
            cad_ray_lines=[line for _, line in result["lines"] if " complete in " in line or line.startswith("report:")])
        figures["total_s"] = round(build["seconds"] + result["seconds"], 1)
        figures["goals"] = {
            "total_s <= 2400": figures["total_s"] <= 2400, "peak_rss_gb <= 12": figures["peak_rss_gb"] <= 12,
            "bytes_per_score <= 4.5": figures["bytes_per_score"] <= 4.5,
            "written_over_tables <= 2": figures["written_over_tables"] <= 2, "top100_s <= 3": figures["top100_s"] <= 3}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(write_figures(figures, args.json))


if __name__ == "__main__":
    main()
