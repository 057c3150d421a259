"""Features for the Frechet distance on Stable Diffusion images: DINOv2 (FD-DINOv2, Stein et al., NeurIPS 2023,
which tracks human judgement better than FID's Inception features), from transformers' `Dinov2Model`, against
reference images the user supplies (a folder of images or a Parquet table of encoded images, local or s3://).
FID proper needs pytorch-fid's Inception-v3, which needs torchvision: see `cad-ray judges`."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from cad_ray.errors import CadRayError
from cad_ray.judges.pretrained import load_pretrained, resize_and_crop, weights_folder
from cad_ray.models.loading import fetch_s3_folder, is_s3
from cad_ray.s3 import s3_filesystem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_COLUMNS = ("image_png", "image", "png", "jpg", "jpeg", "bytes")  # the first one a table has holds its images
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def decode(data) -> np.ndarray:
    """Encoded image bytes (or a Hugging Face datasets image struct {'bytes': ...}) -> (H, W, 3) floats in [0, 1]."""
    from PIL import Image

    if isinstance(data, dict):
        data = data.get("bytes")
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


def parquet_images(tables: list, where: str) -> list[np.ndarray]:
    images = []
    for table in tables:
        column = next((c for c in IMAGE_COLUMNS if c in table.column_names), None)
        if column is None:
            raise CadRayError(f"reference table {where} has no image column (one of {', '.join(IMAGE_COLUMNS)}); "
                              f"it has {', '.join(table.column_names)}")
        images += [decode(v) for v in table.column(column).to_pylist()]
    return images


def reference_images(source: str) -> list[np.ndarray]:
    """The reference images: a Parquet file, or a folder (local or s3://) of Parquet files or of image files."""
    import pyarrow.parquet as pq

    try:
        if str(source).endswith(".parquet"):
            if is_s3(source):
                with s3_filesystem().open(source, "rb") as f:
                    return parquet_images([pq.read_table(f)], source)
            return parquet_images([pq.read_table(Path(source).expanduser())], source)
        folder = fetch_s3_folder(source) if is_s3(source) else Path(source).expanduser()
        if not folder.is_dir():
            raise CadRayError(f"reference images {source}: no such folder or Parquet file")
        tables = sorted(folder.rglob("*.parquet"))
        if tables:
            return parquet_images([pq.read_table(t) for t in tables], source)
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        images = [decode(p.read_bytes()) for p in files]
    except CadRayError:
        raise
    except Exception as e:  # unreadable files, bad Parquet, S3 errors: one line that names the source
        raise CadRayError(f"cannot read reference images {source}: {type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]}") from None
    if not images:
        raise CadRayError(f"reference images {source}: no images ({', '.join(IMAGE_SUFFIXES)}) or Parquet files")
    return images


class DinoV2Judge:
    """DINOv2 features of every image as `features` (the CLS token after the final layer norm, as FD-DINOv2
    takes it), for the evaluation's Frechet distance; `reference_features()` gives the same features of the
    reference images (`reference`: a folder of images, a Parquet table with an image column, local or s3://).
    It gives no verdict (`predicted` "", `correct` False); in a `panel` it sits beside a judge that does.
    Images: the shorter side resized to `size` (bicubic, antialiased), the centre square, ImageNet
    normalisation."""

    def __init__(self, weights: str, reference: str | None = None, size: int = 224, batch_size: int = 32):
        folder = weights_folder(weights, "fd-dinov2")  # a missing folder fails before transformers loads
        from transformers import Dinov2Model

        self.model = load_pretrained(Dinov2Model, folder)
        self.reference, self.size, self.batch_size = reference, int(size), batch_size

    def features(self, images) -> np.ndarray:
        """Features of a batch (N, H, W, 3) or of a list of images of any sizes."""
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                chunk = images[start:start + self.batch_size]
                pixels = torch.cat([resize_and_crop(image[None], self.size, self.size, IMAGENET_MEAN, IMAGENET_STD)
                                    for image in chunk])
                out.append(self.model(pixel_values=pixels).pooler_output.float().numpy())
        return np.concatenate(out).astype(np.float32)

    def reference_features(self) -> np.ndarray:
        if not self.reference:
            raise CadRayError("judge 'fd-dinov2' has no reference images: give its option 'reference' (a folder of "
                              "images or a Parquet table, local or s3://)")
        return self.features(reference_images(self.reference))

    def judge(self, images: np.ndarray, labels: list[str]) -> dict:
        return {"predicted": [""] * len(images), "correct": [False] * len(images),
                "features": list(self.features(images))}
