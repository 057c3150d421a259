"""Image classifiers as judges: a TorchScript network with its class names, or an ImageNet classifier in
transformers' layout (the published objects judge is an ImageNet ResNet-50, top-1 on the Imagenette classes).
Neither uses torchvision: images are resized and normalised with torch alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cad_ray.errors import CadRayError
from cad_ray.judges.pretrained import load_pretrained, preprocessor_settings, resize_and_crop, weights_folder

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ClassifierJudge:
    """An image classifier as a judge, e.g. an ImageNet ResNet-50 for the Imagenette classes: a TorchScript file
    (`torch.jit.save` of the network; TorchScript runs no Python on load), the class names in output order (a
    list or a text file with one per line), and how a prompt's label maps to a class name (default: itself).
    Images are resized to `size` and normalised with `mean`/`std`; logits are kept as features."""

    def __init__(self, model_file: str, classes: list[str] | str, size: int = 224, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, label_to_class: dict[str, str] | None = None):
        import torch

        try:
            self.network = torch.jit.load(model_file, map_location="cpu").eval()
        except Exception as e:
            raise CadRayError(f"cannot load the classifier judge {model_file}: {e}") from None
        if isinstance(classes, str):
            classes = [line.strip() for line in Path(classes).read_text().splitlines() if line.strip()]
        self.classes, self.size, self.label_to_class = list(classes), size, dict(label_to_class or {})
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def judge(self, images: np.ndarray, labels: list[str]) -> dict:
        import torch

        x = torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
        x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        with torch.no_grad():
            logits = self.network((x - self.mean) / self.std)
        predicted = [self.classes[k] for k in logits.argmax(dim=1).tolist()]
        wanted = [self.label_to_class.get(l, l) for l in labels]
        return {"predicted": predicted, "correct": [p == w for p, w in zip(predicted, wanted)],
                "features": list(logits.numpy().astype(np.float32))}


def class_names(id2label: dict) -> list[str]:
    """The class names in output order, from a transformers config's id2label."""
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def synonyms(class_name: str) -> set[str]:
    """ImageNet names list synonyms ("chain saw, chainsaw"); a prompt's label matches any of them, in any case."""
    return {part.strip().lower() for part in class_name.split(",") if part.strip()}


class ImageNetJudge:
    """An image classifier in transformers' layout (`config.json` with `id2label` and safetensors weights, e.g.
    `ResNetForImageClassification`; a folder or s3://) as a judge: top-1 against the prompt's class. A label
    matches a class when it equals one of the class's comma-separated names, in any case ("chain saw" matches
    "chain saw, chainsaw"), or when `label_to_class` maps it to the class's full name. Images: the shorter side
    resized to size / crop_pct, the centre `size` square, ImageNet normalisation (taken from the checkpoint's
    preprocessor_config.json where it has one; the torchvision recipe Resize(256), CenterCrop(224) by default).
    Logits are kept as features."""

    def __init__(self, weights: str, label_to_class: dict[str, str] | None = None, batch_size: int = 32):
        folder = weights_folder(weights, "imagenet")  # a missing folder fails before transformers loads
        from transformers import AutoModelForImageClassification

        self.network = load_pretrained(AutoModelForImageClassification, folder)
        self.classes = class_names(self.network.config.id2label)
        if all(c == f"LABEL_{k}" for k, c in enumerate(self.classes)):  # transformers' placeholder names
            raise CadRayError(f"judge 'imagenet': {weights} does not name its classes (config.json has no id2label)")
        self.names = [synonyms(c) for c in self.classes]
        self.label_to_class = dict(label_to_class or {})
        unknown = sorted(set(self.label_to_class.values()) - set(self.classes))
        if unknown:
            raise CadRayError(f"judge 'imagenet': label_to_class names {', '.join(map(repr, unknown))}, not classes "
                              f"of {weights}")
        settings = preprocessor_settings(folder)
        size = settings.get("crop_size") or settings.get("size") or {}
        self.size = int(size.get("height") or size.get("shortest_edge") or 224) if isinstance(size, dict) \
            else int(size)
        self.resize = round(self.size / float(settings.get("crop_pct") or 0.875))
        self.mean = tuple(settings.get("image_mean") or IMAGENET_MEAN)
        self.std = tuple(settings.get("image_std") or IMAGENET_STD)
        self.mode = "bicubic" if settings.get("resample") == 3 else "bilinear"  # PIL's codes: 2 bilinear, 3 bicubic
        self.batch_size = batch_size

    def matches(self, label: str, k: int) -> bool:
        if label in self.label_to_class:
            return self.classes[k] == self.label_to_class[label]
        return label.strip().lower() in self.names[k]

    def check_labels(self, labels: list[str]) -> None:
        known = set().union(*self.names)
        unknown = sorted({l for l in labels if l and l not in self.label_to_class and l.strip().lower() not in known})
        if unknown:
            raise CadRayError(f"judge 'imagenet': label(s) {', '.join(map(repr, unknown))} name no class of the "
                              "classifier; map them with the judge's label_to_class option")

    def judge(self, images: np.ndarray, labels: list[str]) -> dict:
        import torch

        self.check_labels(labels)
        logits = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                x = resize_and_crop(images[start:start + self.batch_size], self.resize, self.size, self.mean,
                                    self.std, self.mode)
                logits.append(self.network(pixel_values=x).logits.float())
        logits = torch.cat(logits)
        top1 = logits.argmax(dim=1).tolist()
        return {"predicted": [self.classes[k] for k in top1],
                "correct": [bool(l) and self.matches(l, k) for l, k in zip(labels, top1)],
                "features": list(logits.numpy().astype(np.float32))}
