"""`cad-ray sample` and `cad-ray quality`: images of a model and the judges' verdicts on them.
Libraries (torch, numpy, pandas, pyarrow, pydantic, Ray), and the modules of cad_ray that import them, are
imported inside the commands, lazy for start-up speed (`cad-ray --help` imports none of them)."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from cad_ray.errors import CadRayError


def write_atomically(path: Path, write) -> None:
    """`write(tmp)` to a temporary sibling, renamed onto `path` only when complete (cad_ray.store's writer)."""
    from cad_ray.store import atomic_local_file

    try:
        with atomic_local_file(str(path)) as tmp:
            write(Path(tmp))
    except OSError as e:  # a full disk, a quota: nothing half-written is left (the temporary file is removed)
        raise CadRayError(f"cannot write {path}: {e.strerror or e}") from None


def cmd_sample(args: argparse.Namespace) -> None:
    import numpy as np

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise CadRayError(f"--out must end in .png (image grid) or .npz (array 'images'), got {args.out!r}")
    from cad_ray.models import load_model
    from cad_ray.store.root import check_output

    check_output(args.out)  # before sampling: a run root's files, a folder, a place that cannot be written

    model = load_model(args.model, device=args.device)
    prompts = [args.prompt] * args.n
    trajectory = model.sample(prompts, seed=args.seed, guidance=args.guidance, steps=args.steps, progress=True)
    images = trajectory.images.astype(np.float32)
    if out.suffix.lower() == ".npz":
        write_atomically(out, lambda p: np.savez_compressed(p.open("wb"), images=images))
    else:
        from PIL import Image

        from cad_ray.digits.quality import image_grid

        write_atomically(out, lambda p: Image.fromarray(image_grid(images)).save(p, format="PNG"))
    print(f"wrote {out}: {args.n} image(s) of {args.prompt!r}, seed {args.seed}, "
          f"guidance {trajectory.guidance}, {len(trajectory.timesteps)} steps, model {model.source}")
    if model.kind == "digits":
        from cad_ray.digits import COLOUR_NAMES
        from cad_ray.digits.judges import NO_DIGIT_WORD, builtin_judges  # torch: imported once a command needs it

        judges = builtin_judges()
        print(judged_line(judges.digit_words(images), [COLOUR_NAMES[c] for c in judges.colours(images)],
                          NO_DIGIT_WORD))


SHOWN_ONE_BY_ONE = 16  # up to this many images, each one's verdict; beyond it, how many of each


def judged_line(digits: list[str], colours: list[str], no_digit_word: str) -> str:
    """The judges' verdicts on sampled images in one short line: each image's digit/colour for a few images, else
    a count per verdict (most frequent first). An image judged `no_digit_word` (noise) reads 'no digit'."""
    verdicts = ["no digit" if d == no_digit_word else f"{d}/{c}" for d, c in zip(digits, colours)]
    if len(verdicts) <= SHOWN_ONE_BY_ONE:
        return "judged (digit/colour): " + ", ".join(verdicts)
    counts = Counter(verdicts).most_common()
    return f"judged (digit/colour) of {len(verdicts)} images: " + ", ".join(f"{n} {v}" for v, n in counts)


def cmd_quality(args: argparse.Namespace) -> None:
    from cad_ray.models import load_model
    from cad_ray.digits.quality import digits_quality, meets_quality_bar, quality_summary
    from cad_ray.store.root import check_output

    if args.out:
        check_output(args.out)
    model = load_model(args.model, device=args.device)
    if model.kind != "digits":
        raise CadRayError("quality judges exist for the digits model only")
    summary = quality_summary(digits_quality(model, args.n, args.seed, args.guidance, args.steps,
                                                    progress=True))
    summary.update(seed=args.seed, guidance=args.guidance or model.default_guidance,
                   steps=args.steps or model.default_steps, meets_bar=meets_quality_bar(summary))
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        write_atomically(Path(args.out), lambda p: p.write_text(text + "\n"))
