"""What a VAE decode costs beside a guided UNet step at Stable Diffusion 1.4's shapes (random weights, CPU):
why attribution's trajectories no longer decode their final images (docs/benchmarks.md).

    python bench/vae_decode_cost.py --threads 2 --repeats 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--latent", type=int, default=64, help="latent side (64: 512 px images)")
    args = parser.parse_args()

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from sd_scale import shapes

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = shapes("sd14")
    unet = UNet2DConditionModel(
        sample_size=args.latent, in_channels=4, out_channels=4, layers_per_block=2, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32, **size["unet"]).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=32, sample_size=8 * args.latent, **size["vae"]).eval()
    x, cond = torch.randn(2, 4, args.latent, args.latent), torch.randn(2, 77, 768)
    with torch.no_grad():
        for _ in range(args.repeats):
            start = time.perf_counter()
            unet(x, torch.tensor([500, 500]), encoder_hidden_states=cond)
            step = time.perf_counter() - start
            start = time.perf_counter()
            vae.decode(x[:1])
            decode = time.perf_counter() - start
            print(f"UNet forward at batch 2 (one guided step of one image): {step:.2f} s; "
                  f"VAE decode of one {8 * args.latent} px image: {decode:.2f} s", flush=True)


if __name__ == "__main__":
    main()
