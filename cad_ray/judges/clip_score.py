"""The CLIP score judge: how well each image matches its prompt, with transformers' CLIP (the published quality
judge uses CLIP ViT-B/32; give its folder, e.g. a copy of openai/clip-vit-base-patch32, or s3://)."""

from __future__ import annotations

import numpy as np

from cad_ray.errors import CadRayError
from cad_ray.judges.pretrained import load_pretrained, preprocessor_settings, resize_and_crop, weights_folder

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def clip_score(image_embeddings, text_embeddings):
    """100 * max(cos(image, text), 0) per pair: the CLIP score as published (Hessel et al.; torchmetrics'
    CLIPScore, the erasure papers' quality number), and the raw cosine."""
    import torch

    cosine = torch.nn.functional.cosine_similarity(image_embeddings.float(), text_embeddings.float(), dim=-1)
    return 100 * cosine.clamp(min=0), cosine


def pooled(output):
    """The projected embedding: transformers 5 returns an output whose pooler_output holds it, 4.x a tensor."""
    return output if hasattr(output, "shape") else output.pooler_output


class ClipScoreJudge:
    """A quality judge: `clip_score` (100 * max(cos, 0)) and `clip_cosine` of each image with its own prompt. It
    gives no verdict (`predicted` "", `correct` False, as for images that are not judged); in a `panel` it sits
    beside a judge that does. Images: the shorter side resized to the checkpoint's size (bicubic, with
    antialiasing, on the float image rather than PIL's 8-bit one), the centre square, CLIP's normalisation.
    Prompts longer than the text encoder's window are truncated, as the published scripts' tokenizer does."""

    def __init__(self, weights: str, batch_size: int = 32):
        folder = weights_folder(weights, "clip-score")  # a missing folder fails before transformers loads
        from transformers import CLIPModel, CLIPTokenizer

        self.model = load_pretrained(CLIPModel, folder)
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        except Exception as e:
            raise CadRayError(f"judge 'clip-score': cannot load the tokenizer from {weights}: "
                              f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
        settings = preprocessor_settings(folder)
        crop = settings.get("crop_size") or self.model.config.vision_config.image_size
        self.crop = int(crop["height"]) if isinstance(crop, dict) else int(crop)
        size = settings.get("size") or self.crop
        self.resize = int(size.get("shortest_edge", self.crop)) if isinstance(size, dict) else int(size)
        self.mean = tuple(settings.get("image_mean") or CLIP_MEAN)
        self.std = tuple(settings.get("image_std") or CLIP_STD)
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        self.batch_size = batch_size

    def scores(self, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        scores, cosines = [], []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                pixels = resize_and_crop(images[start:start + self.batch_size], self.resize, self.crop, self.mean,
                                         self.std)
                text = self.tokenizer(list(prompts[start:start + self.batch_size]), padding=True, truncation=True,
                                      max_length=self.max_length, return_tensors="pt")
                image_embeddings = pooled(self.model.get_image_features(pixel_values=pixels))
                text_embeddings = pooled(self.model.get_text_features(input_ids=text["input_ids"],
                                                                      attention_mask=text["attention_mask"]))
                score, cosine = clip_score(image_embeddings, text_embeddings)
                scores.append(score.numpy())
                cosines.append(cosine.numpy())
        return np.concatenate(scores), np.concatenate(cosines)

    def judge(self, images: np.ndarray, labels: list[str], prompts: list[str] | None = None) -> dict:
        if prompts is None or len(prompts) != len(images):
            raise CadRayError("judge 'clip-score' needs each image's prompt (the evaluation passes prompts=)")
        score, cosine = self.scores(images, prompts)
        return {"predicted": [""] * len(images), "correct": [False] * len(images),
                "clip_score": [float(s) for s in score], "clip_cosine": [float(c) for c in cosine]}
