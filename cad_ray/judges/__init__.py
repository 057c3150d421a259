"""Judges: what reads the images of an evaluation and gives each one a verdict.

A judge is a class built with the options of a config's `evaluation.judge` section and called on batches:
`judge(images, labels[, prompts=...]) -> dict` of per-image lists, `images` (N, H, W, 3) floats in [0, 1],
`labels` the label a prompt asks for (its class, artist or category). Every judge returns `predicted` (str) and
`correct` (bool); it may add `features` (float32 vectors: the Frechet distance's input) and any column of its own.

A config names a judge by its registered name and passes options; it never names code to import. Registered
are the built-ins below and the plugins installed under the `cad_ray.judges` entry-point group
(`[project.entry-points."cad_ray.judges"] my-judge = "my_package.module:MyJudge"`). `cad-ray judges` lists them
and whether each can run here; no judge's code is imported until a config names it, and nothing here imports
torchvision (it does not import beside the CPU build of torch).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from cad_ray.errors import CadRayError

JUDGE_ENTRY_POINTS = "cad_ray.judges"  # plugins: [project.entry-points."cad_ray.judges"] name = "module:Class"
JUDGES_EXTRA = "pip install -e '.[judges]'"


@dataclass(frozen=True)
class JudgeEntry:
    """A built-in judge: where its class is (imported only by `load`), what it needs, what it follows."""

    name: str
    target: str  # "module:Class"
    description: str  # one short line (`cad-ray judges` prints it after the status and the needs)
    packages: tuple[str, ...] = ()  # import names beyond cad-ray's own dependencies, checked without importing them
    weights: str = ""  # the option that names its weights, which the judge cannot run without ("" when none)
    takes: str = ""  # what that option takes
    install: str = ""  # how to get the packages
    unavailable: str = ""  # why cad-ray cannot run it at all, when it cannot

    def load(self):
        if self.unavailable:
            raise CadRayError(f"judge {self.name!r} cannot run: {self.unavailable}")
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def missing(self) -> list[str]:
        return [p for p in self.packages if find_spec(p) is None]

    def needs(self) -> str:
        """What it needs beyond cad-ray, in a few words: its packages (and where from), the option naming its
        weights."""
        parts = []
        if self.packages:
            where = " (not in cad-ray yet)" if self.unavailable else " (pip: .[judges])" if self.missing() else ""
            parts.append(", ".join(self.packages) + where)
        if self.weights:
            parts.append(f"option {self.weights}: {self.takes}")
        return "; ".join(parts) or "nothing"

    def status(self, options: dict | None = None) -> str:
        """"ready" when it can run now: its packages are installed and, for a judge that needs weights, `options`
        (a config's options for it) name them and a local path exists ("ready (s3)": on S3, found when loaded)."""
        if self.unavailable:
            return "unavailable"
        missing = self.missing()
        if missing:
            return "needs packages"  # which, and how to get them: `needs()`
        if self.weights:
            given = (options or {}).get(self.weights)
            if not given:
                return "needs weights"
            if str(given).startswith("s3://"):
                return "ready (s3)"
            if not Path(str(given)).expanduser().exists():
                return "needs weights (not found)"
        return "ready"


FOLDER = "folder or s3://"
TORCHVISION_REASON = "torchvision, which does not import beside the CPU build of torch"

BUILTIN_JUDGES = {entry.name: entry for entry in (
    # the descriptions are one short line each: `cad-ray judges` reads at 100 columns (docs/editing.md has more)
    JudgeEntry("digits", "cad_ray.judges.digits:DigitsJudge",
               "digit and colour (digits world)"),
    JudgeEntry("classifier", "cad_ray.judges.classifier:ClassifierJudge",
               "a classifier's top-1 vs label", weights="model_file", takes="TorchScript"),
    JudgeEntry("imagenet", "cad_ray.judges.classifier:ImageNetJudge",
               "ImageNet classifier's top-1", weights="weights", takes=FOLDER),
    JudgeEntry("nudenet", "cad_ray.judges.nudity:NudityJudge",
               "NudeNet: nude if a class > 0.5", packages=("nudenet", "onnxruntime", "cv2"),
               install=JUDGES_EXTRA),
    JudgeEntry("clip-score", "cad_ray.judges.clip_score:ClipScoreJudge",
               "CLIP score of image and prompt", weights="weights", takes=FOLDER),
    JudgeEntry("fd-dinov2", "cad_ray.judges.frechet:DinoV2Judge",
               "DINOv2 features for FD-DINOv2", weights="weights", takes=FOLDER),
    JudgeEntry("panel", "cad_ray.judges.panel:PanelJudge",
               "several judges; first decides"),
    JudgeEntry("fid", "", "FID (Inception-v3)", packages=("pytorch_fid", "torchvision"),
               unavailable=f"not in cad-ray yet: pytorch-fid's Inception-v3 needs {TORCHVISION_REASON}; use "
                           "fd-dinov2"),
    JudgeEntry("lpips", "", "LPIPS to unedited image", packages=("lpips", "torchvision"),
               unavailable=f"not in cad-ray yet: its AlexNet needs {TORCHVISION_REASON}, and the judge would need "
                           "each image's unedited twin"),
)}


def plugin_judges() -> dict:
    """The entry points installed under the `cad_ray.judges` group (not imported)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=JUDGE_ENTRY_POINTS)}


def registered_judges() -> dict:
    """Judges a config may name: the built-ins and the plugins installed under the `cad_ray.judges` entry-point
    group (a built-in's name wins; no judge's code is imported until a config names it)."""
    return {**plugin_judges(), **BUILTIN_JUDGES}


def configured_options(spec: dict | None) -> dict[str, dict]:
    """{judge name: its options} for the judges an `evaluation.judge` spec names (a panel's members too)."""
    if not isinstance(spec, dict):
        return {}
    options = {str(spec.get("name", "classifier")): spec}
    for member in (spec.get("judges") or []) if spec.get("name") == "panel" else []:
        if isinstance(member, dict):
            options.setdefault(str(member.get("name", "classifier")), member)
    return options


def judge_listing(spec: dict | None = None) -> list[tuple[str, str, str, str]]:
    """(name, status, needs, description) for every registered judge, without importing any judge's code: a
    package counts as present when `importlib.util.find_spec` finds it. Status "ready" means it can run now; a judge
    that needs weights is "needs weights" unless `spec` (a config's `evaluation.judge`, e.g. a panel) gives them."""
    configured = configured_options(spec)
    rows = []
    for name, judge in sorted(registered_judges().items()):
        if isinstance(judge, JudgeEntry):
            rows.append((name, judge.status(configured.get(name)), judge.needs(), judge.description))
            continue
        top_module = judge.value.split(":")[0].split(".")[0]
        dist = getattr(judge, "dist", None)
        origin = f"plugin {judge.value}" + (f" from {dist.name} {dist.version}" if dist is not None else "")
        status = "ready" if find_spec(top_module) is not None else f"needs {top_module}"
        rows.append((name, status, f"package {top_module}; options: see the plugin", origin))
    return rows


def load_judge(spec: dict | None, model_kind: str):
    """The judge of an evaluation: `{"name": <registered judge>, **options}`, else the digits judges for the
    digits model, else none (images are generated and stored, not judged). A config never names code to import:
    only registered judges."""
    if not spec:
        return BUILTIN_JUDGES["digits"].load()() if model_kind == "digits" else None
    options = dict(spec)
    name = options.pop("name", "classifier")
    judges = registered_judges()
    if name not in judges:
        raise CadRayError(f"unknown judge {name!r} in evaluation.judge; registered judges: {', '.join(sorted(judges))}"
                          f" (plugins register under the {JUDGE_ENTRY_POINTS!r} entry-point group; 'cad-ray judges' "
                          "lists them)")
    judge = judges[name]
    if isinstance(judge, JudgeEntry) and not judge.unavailable and judge.missing():
        raise CadRayError(f"judge {name!r} needs {', '.join(judge.missing())}, which is not installed"
                          + (f" ({judge.install})" if judge.install else ""))
    if isinstance(judge, type):
        cls = judge
    else:
        try:
            cls = judge.load()
        except (ImportError, AttributeError) as e:  # a plugin whose package is broken or missing
            where = getattr(judge, "value", None) or getattr(judge, "target", "")
            raise CadRayError(f"judge {name!r} ({where}) cannot be imported: {type(e).__name__}: {e}") from None
    try:
        return cls(**options)
    except TypeError as e:
        raise CadRayError(f"judge {name!r}: {e}") from None


def judge_batch(judge, images, labels: list[str], prompts: list[str] | None = None) -> dict:
    """Call a judge on a batch, passing the prompts to the judges that take them (`prompts=`), such as the CLIP
    score; other judges (plugins written before) are called as they were."""
    if "prompts" in inspect.signature(judge.judge).parameters:
        return judge.judge(images, labels, prompts=prompts)
    return judge.judge(images, labels)


def reference_features(spec: dict | None):
    """Features of the reference images that an evaluation's judge names (a judge, or a panel member, with the
    option `reference` and a `reference_features()` method, e.g. fd-dinov2), for the Frechet distance; None when
    it names none. Builds only that judge (on the driver, once per evaluation)."""
    if not spec:
        return None
    members = (spec.get("judges") or []) if spec.get("name") == "panel" else [spec]
    for member in members:
        if isinstance(member, dict) and member.get("reference"):
            judge = load_judge(member, "")
            if hasattr(judge, "reference_features"):
                return judge.reference_features()
    return None


def __getattr__(name: str):
    # the judge classes, and the helpers of the judges on a transformers checkpoint (their old home was here),
    # imported when asked for: they import torch, which listing the judges never needs
    modules = {"DigitsJudge": "digits", "ClassifierJudge": "classifier", "ImageNetJudge": "classifier",
               "NudityJudge": "nudity", "ClipScoreJudge": "clip_score", "DinoV2Judge": "frechet",
               "PanelJudge": "panel", **dict.fromkeys(("weights_folder", "load_pretrained", "preprocessor_settings",
                                                        "resize_and_crop"), "pretrained")}
    if name in modules:
        return getattr(importlib.import_module(f"{__name__}.{modules[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
