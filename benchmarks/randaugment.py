r"""Host cost of RandAugment: the ImageNet train transform with and without it.

  python benchmarks/randaugment.py
  python benchmarks/randaugment.py --num_images=400 --reps=5

On --num_images synthetic ImageNet-like JPEGs (smooth random content at
ImageNet's typical size, ~410 x 470 px, quality 90), one process on one
core, times the training transform of `configs/imagenet_vit_s16.py` per
example: JPEG decode (PIL) + Inception crop + resize to 224 + flip, then

  base   nothing more (the `,light` recipe)
  randaug  + RandAugment(2, 10) (`mrl_jax/data/randaugment.py`)

and prints images/s and CPU-ms per image of each, and randaug / base. The
two are run in turn within each of --reps repetitions (the medians are
printed), so load from other processes hits them alike. Normalisation to
float32 is left out of both (it is the same work in each). How many host
cores a TPU host then needs: images/s per core against the accelerator's
step rate.

Measured on a shared 2-core AMD EPYC VM (`--num_images=400 --reps=5`; 99 KB
mean JPEG):

  base        445.0 img/s    2.25 CPU-ms/img
  randaug     344.3 img/s    2.90 CPU-ms/img
  randaug / base throughput: 0.77
"""
import argparse
import io
import statistics
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from mrl_jax.data import preprocess  # noqa: E402
from mrl_jax.data import randaugment  # noqa: E402


def synthetic_jpegs(n: int, seed: int = 0) -> list[bytes]:
  """Smooth random images (JPEG sizes like photographs', unlike white noise)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    h, w = int(rng.integers(360, 460)), int(rng.integers(420, 520))
    small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 12, (h, w, 3))
    image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    out.append(buf.getvalue())
  return out


def transform(jpeg: bytes, rng: np.random.Generator, randaug: bool) -> np.ndarray:
  image = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
  image = preprocess.inception_crop(image, rng)
  image = preprocess.resize(image, 224)
  image = preprocess.random_flip(image, rng)
  if randaug:
    image = randaugment.randaugment(image, rng, 2, 10)
  return image


def time_one(jpegs, randaug: bool, seed: int) -> tuple[float, float]:
  """(wall seconds, CPU seconds) for all images."""
  rng = np.random.default_rng(seed)
  wall, cpu = time.perf_counter(), time.process_time()
  for jpeg in jpegs:
    transform(jpeg, rng, randaug)
  return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_images", type=int, default=200)
  parser.add_argument("--reps", type=int, default=3)
  args = parser.parse_args(argv)
  jpegs = synthetic_jpegs(args.num_images)
  kb = statistics.mean(len(j) for j in jpegs) / 1e3
  print(f"{len(jpegs)} JPEGs, mean {kb:.0f} KB; one process, one core")
  time_one(jpegs[:4], True, 0)  # warm-up
  results = {"base": [], "randaug": []}
  for rep in range(args.reps):
    for name in results:
      results[name].append(time_one(jpegs, name == "randaug", rep))
  rates = {}
  for name, runs in results.items():
    wall = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    rates[name] = len(jpegs) / wall
    print(f"{name:8s} {rates[name]:8.1f} img/s  {1e3 * cpu / len(jpegs):6.2f} CPU-ms/img")
  print(f"randaug / base throughput: {rates['randaug'] / rates['base']:.2f}")


if __name__ == "__main__":
  main()
