"""The `cad-ray` command: thin wiring from arguments to the library.

Errors the user can fix (`CadRayError`) print as one line on stderr with exit status 1; argparse's usage
errors exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .errors import CadRayError

MODEL_HELP = ("model folder in diffusers layout or s3://bucket/prefix (default: the built-in digits model). "
              "S3 credentials and endpoint come from the environment (AWS_* variables) or ~/.aws")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def write_atomically(path: Path, write) -> None:
    """Write through a temporary sibling and rename, so a failure never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cmd_sample(args: argparse.Namespace) -> None:
    import numpy as np

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise CadRayError(f"--out must end in .png (image grid) or .npz (array 'images'), got {args.out!r}")
    from .models import load_model

    model = load_model(args.model, device=args.device)
    prompts = [args.prompt] * args.n
    trajectory = model.sample(prompts, seed=args.seed, guidance=args.guidance, steps=args.steps, progress=True)
    images = trajectory.images.astype(np.float32)
    if out.suffix.lower() == ".npz":
        write_atomically(out, lambda p: np.savez_compressed(p, images=images))
    else:
        from PIL import Image

        from .quality import image_grid

        write_atomically(out, lambda p: Image.fromarray(image_grid(images)).save(p, format="PNG"))
    print(f"wrote {out}: {args.n} image(s) of {args.prompt!r}, seed {args.seed}, "
          f"guidance {trajectory.guidance}, {len(trajectory.timesteps)} steps, model {model.source}")
    if model.kind == "digits":
        from .digits import COLOUR_NAMES
        from .judges import builtin_judges

        judges = builtin_judges()
        verdicts = [f"{d}/{COLOUR_NAMES[c]}" for d, c in zip(judges.digits(images), judges.colours(images))]
        print("judged (digit/colour):", " ".join(verdicts))


def cmd_quality(args: argparse.Namespace) -> None:
    from .models import load_model
    from .quality import digits_quality, meets_quality_bar, quality_summary

    model = load_model(args.model, device=args.device)
    if model.kind != "digits":
        raise CadRayError("quality judges exist for the digits model only")
    summary = quality_summary(digits_quality(model, args.n, args.seed, args.guidance, args.steps))
    summary.update(seed=args.seed, guidance=args.guidance or model.default_guidance,
                   steps=args.steps or model.default_steps, meets_bar=meets_quality_bar(summary))
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        write_atomically(Path(args.out), lambda p: p.write_text(text + "\n"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cad-ray",
        description="Component attribution for text-to-image diffusion models (CAD), distributed on Ray.",
        epilog="Run 'cad-ray COMMAND --help' for each command's options.")
    parser.add_argument("--version", action="version", version=f"cad-ray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("sample", help="generate images for a prompt",
                       description="Generate N images for a prompt with classifier-free guidance. "
                                   "The same seed gives the same images.")
    p.add_argument("--prompt", required=True, help='prompt text, e.g. "a red seven" ("" is unconditional)')
    p.add_argument("--n", type=_positive_int, default=8, help="number of images (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default: 0)")
    p.add_argument("--out", required=True, help="FILE.png (grid upscaled for viewing) or FILE.npz "
                                                "(array 'images', shape (N, H, W, 3), values in [0, 1])")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale "
                                                                "(default: the model's, 3.0 for digits)")
    p.add_argument("--steps", type=_positive_int, default=None, help="sampling steps (default: the model's, 50)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: cpu)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("quality", help="judge the digits model on every (digit, colour) prompt",
                       description="Sample N images for each of the 40 (digit, colour) prompts and report the "
                                   "judged digit and colour accuracy against the quality bar "
                                   "(digit >= 90%% overall and >= 75%% per digit, colour >= 95%%).")
    p.add_argument("--n", type=_positive_int, default=25, help="images per prompt (default: 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--steps", type=_positive_int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="also write the summary as JSON to this file")
    p.set_defaults(func=cmd_quality)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CadRayError as e:
        print(f"cad-ray {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cad-ray {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
