r"""What the shipped configs cost on real TPU slices, from programs compiled by libtpu.

  python benchmarks/tpu_compile.py [--out=docs/results/tpu_compile.md] [--update_readme]
  python benchmarks/tpu_compile.py --only=loss     # one part: mrl, resnet, align, loss, configs

No TPU needed: every figure is per device, from `mrl_jax.compile` (the buffer
assignment of the compiled executable, FLOPs counted as its report says).
Parts, each printed side by side:

  mrl     ViT-B/16 train step at 224 px, global batch 1024, v5e:4x4: MRL vs FF
          vs MRL-E (FLOPs and peak memory; MRL's "no extra cost").
  resnet  The same for configs/imagenet_resnet50.py (192 px, its largest crop).
  align   configs/align_vit_b16_bert_base.py at its global batch on the slice
          its docstring names: the first of (data parallel, + remat, + FSDP)
          that fits.
  loss    The nested contrastive loss + gradient (softmax and sigmoid; TPU
          kernels and XLA form) vs the same at the full dim only vs a plain jnp
          CLIP loss and a plain loop over the prefixes, B = 16,384, d = 768,
          7 prefixes, batch over v5e:4x4.
  configs Every shipped config on one or two topologies: the README's table.

Writes each part's section of --out (docs/results/tpu_compile.md; parts not
run keep their last text); --update_readme
replaces the README's table between its markers with the `configs` part.
Takes ~10 minutes on 2 cores (mostly compiling the ViT-B/16 programs).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; no TPU is used

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import align_vit_b16_bert_base  # noqa: E402
from configs import fashion_mnist_align  # noqa: E402
from configs import fashion_mnist_vit  # noqa: E402
from configs import imagenet_resnet50  # noqa: E402
from configs import imagenet_vit_b16  # noqa: E402
from configs import imagenet_vit_s16  # noqa: E402
from mrl_jax import compile as compile_lib  # noqa: E402
from mrl_jax import contrastive  # noqa: E402
from mrl_jax import sharding  # noqa: E402

README_BEGIN = "<!-- tpu_compile: configs table (benchmarks/tpu_compile.py --update_readme) -->"
README_END = "<!-- /tpu_compile -->"
GB = 1e9


def gflop(flops: float) -> str:
  """GFLOP with 3 decimals below 10, else 1: tiny configs are not shown as 0."""
  return f"{flops / 1e9:.3f}" if flops < 1e10 else f"{flops / 1e9:.1f}"


_COMPILED: dict = {}


def compile_config(config, topology: str) -> dict:
  """`--mode=compile`'s report, without writing it (once per config and topology)."""
  key = (config.to_json_best_effort(sort_keys=True), topology)
  if key not in _COMPILED:
    _COMPILED[key] = _compile_config(config, topology)
  return _COMPILED[key]


def _compile_config(config, topology: str) -> dict:
  report = compile_lib.compile_report(config, topology)
  return {"mesh": report["mesh"], "programs": report["programs"],
          "chip": compile_lib.chip_of(topology)}


def table(header, rows) -> str:
  widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
  def line(r):
    return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
  return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                    *map(line, rows)])


def part_mrl(get_config=None, what="ViT-B/16 train step, 224 px") -> str:
  rows, base = [], None
  for mode in ("ff", "mrl", "mrl_e"):
    config = (get_config or imagenet_vit_b16.get_config)(mode)
    config.evals = {}  # the train step only
    step = compile_config(config, "v5e:4x4")["programs"]["train_step"]
    base = base or step
    rows.append((mode, f"{step['flops_per_device'] / 1e12:.4f}",
                 f"{step['flops_per_device'] / base['flops_per_device']:.4f}",
                 f"{step['peak_bytes'] / GB:.2f}",
                 f"{step['peak_bytes'] / base['peak_bytes']:.4f}",
                 f"{1e3 * step['step_time_lower_bound_s']:.1f}", step["flops_method"]))
  return (f"{what}, global batch 1024, v5e:4x4 (16 chips), per device:\n\n"
          + table(("mode", "TFLOP", "÷ FF", "peak GB", "÷ FF", "bound ms", "flops by"), rows))


def part_resnet() -> str:
  """The same for the MRL paper's ResNet-50 (its largest training crop, 192 px)."""
  return part_mrl(imagenet_resnet50.get_config, "ResNet-50 train step, 192 px")


# The slice configs/align_vit_b16_bert_base.py's docstring names, and half of it.
ALIGN_TOPOLOGIES = ("v5e:16x16", "v5e:8x16")


def part_align() -> str:
  attempts = [("data parallel", {}),
              ("+ remat", {"model.image.remat": True, "model.text.remat": True}),
              ("+ remat + FSDP", {"model.image.remat": True, "model.text.remat": True,
                                  "mesh.data": 1, "mesh.fsdp": -1})]
  rows = []
  for topology in ALIGN_TOPOLOGIES:
    hbm = compile_lib.chip_of(topology).hbm_bytes / 2**30
    for label, overrides in attempts:
      config = align_vit_b16_bert_base.get_config()
      config.update_from_flattened_dict(overrides)
      out = compile_config(config, topology)
      for name, p in out["programs"].items():
        rows.append((topology, label, name, f"{p['peak_bytes'] / GB:.2f} / {hbm:.0f}",
                     "yes" if p["fits"] else "NO", gflop(p["flops_per_device"]),
                     f"{1e3 * p['step_time_lower_bound_s']:.1f}"))
      if all(p["fits"] for p in out["programs"].values()):
        break
  return ("configs/align_vit_b16_bert_base.py (global batch 16384), per device; on each "
          "slice the first setting that fits ends its list:\n\n"
          + table(("topology", "setting", "program", "peak GB / HBM GiB", "fits", "GFLOP",
                   "bound ms"), rows))


def _plain_clip(x, y, t):
  """Normalise, x @ y.T / t, log-softmax both ways: the CLIP loss everyone knows."""
  x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  y = y / jnp.linalg.norm(y, axis=-1, keepdims=True)
  logits = x @ y.T / t
  diag = jnp.diagonal(logits)
  return 0.5 * (jnp.mean(jax.nn.logsumexp(logits, axis=1) - diag)
                + jnp.mean(jax.nn.logsumexp(logits, axis=0) - diag))


def part_loss(batch=16_384, d=768, topology="v5e:4x4") -> str:
  dims = (12, 24, 48, 96, 192, 384, 768)
  devices = compile_lib.topology_devices(topology)
  mesh = sharding.create_mesh({"data": -1}, devices)
  chip = compile_lib.chip_of(topology)
  emb = jax.ShapeDtypeStruct((batch, d), jnp.float32, sharding=sharding.batch_sharding(mesh))
  def softmax(dims, kernels="tpu"):
    return lambda x, y: contrastive.contrastive(x, y, dims, temperature=0.07, kernels=kernels)

  def sigmoid(dims, kernels="tpu"):
    return lambda x, y: contrastive.contrastive(
        x, y, dims, kind="sigmoid", temperature=0.1, bias=-10.0, kernels=kernels)
  losses = {
      "plain jnp CLIP, full dim": lambda x, y: _plain_clip(x, y, 0.07),
      "plain jnp, loop over 7 prefixes": lambda x, y: sum(
          _plain_clip(x[:, :m], y[:, :m], 0.07) for m in dims),
      "contrastive softmax, full dim": softmax((d,)),
      "contrastive softmax, 7 prefixes": softmax(dims),
      "contrastive softmax, 7 prefixes, XLA form": softmax(dims, "never"),
      "contrastive sigmoid, full dim": sigmoid((d,)),
      "contrastive sigmoid, 7 prefixes": sigmoid(dims),
      "contrastive sigmoid, 7 prefixes, XLA form": sigmoid(dims, "never"),
  }
  rows, base = [], None
  for name, loss in losses.items():
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    p = compile_lib.measure(step, (emb, emb), mesh, chip)
    nbytes = p["bytes_accessed"] if p["bytes_accessed"] is not None else p["xla_bytes_accessed"]
    p = dict(p, nbytes=nbytes, bytes_by=("XLA, loops once" if p["bytes_accessed"] is None
                                         else p["flops_method"]))
    base = base or p
    rows.append((name, f"{p['temp_bytes'] / GB:.3f}", f"{p['temp_bytes'] / base['temp_bytes']:.2f}",
                 f"{p['nbytes'] / GB:.2f}", f"{p['nbytes'] / base['nbytes']:.2f}",
                 f"{p['flops_per_device'] / 1e9:.1f}",
                 f"{p['flops_per_device'] / base['flops_per_device']:.2f}",
                 p["flops_method"], p["bytes_by"]))
  return (f"Loss + gradient w.r.t. both embeddings, B = {batch:,} over {topology} "
          f"({len(devices)} chips), d = {d}, prefixes {list(dims)}, per device; ÷ = over the "
          "plain CLIP loss. `contrastive` rows run its Pallas kernels (as on a TPU) unless "
          "marked XLA form (as on GPUs and CPUs). temp is the HBM the compiler assigns "
          "beyond arguments and outputs. XLA's own counts take each loop body once, so "
          "FLOPs and bytes are counted as the last two columns say: from a compile with "
          "every scan unrolled, or for FLOPs from the jaxpr (the plain losses' loops are "
          "the TPU compiler's own, windowed all-gather matmuls: their bytes are XLA's, "
          "an undercount):\n\n"
          + table(("loss", "temp GB", "÷", "bytes GB", "÷", "GFLOP", "÷", "flops by",
                   "bytes by"), rows))


CONFIGS = (
    ("configs/fashion_mnist_vit.py", fashion_mnist_vit.get_config, ("v5e:1x1", "v5e:2x2")),
    ("configs/fashion_mnist_align.py", fashion_mnist_align.get_config, ("v5e:1x1", "v5e:2x2")),
    ("configs/imagenet_resnet50.py", imagenet_resnet50.get_config, ("v5e:4x4",)),
    ("configs/imagenet_vit_s16.py", imagenet_vit_s16.get_config, ("v5e:2x2", "v5e:4x4")),
    ("configs/imagenet_vit_b16.py", imagenet_vit_b16.get_config, ("v5e:4x4", "v4:2x2x4")),
    ("configs/align_vit_b16_bert_base.py", align_vit_b16_bert_base.get_config,
     ALIGN_TOPOLOGIES[:1]),
)


def part_configs() -> str:
  rows = []
  for path, get_config, topologies in CONFIGS:
    for topology in topologies:
      out = compile_config(get_config(), topology)
      hbm = out["chip"].hbm_bytes / 2**30
      for name, p in out["programs"].items():
        rows.append((f"`{path.split('/')[-1]}`", topology, name,
                     f"{p['peak_bytes'] / GB:.2f} / {hbm:.0f}", "yes" if p["fits"] else "NO",
                     gflop(p["flops_per_device"]),
                     f"{1e3 * p['step_time_lower_bound_s']:.2f}"))
  return ("Shipped configs as they are (default mesh: data parallel), per device:\n\n"
          + table(("config", "topology", "program", "peak GB / HBM GiB", "fits",
                   "GFLOP", "bound ms"), rows))


PARTS = {"mrl": part_mrl, "resnet": part_resnet, "align": part_align, "loss": part_loss,
         "configs": part_configs}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", choices=sorted(PARTS), action="append")
  parser.add_argument("--out", default=str(REPO / "docs" / "results" / "tpu_compile.md"),
                      help="Markdown file whose sections the parts run replace.")
  parser.add_argument("--update_readme", action="store_true")
  args = parser.parse_args()
  sections = {}
  for name in args.only or PARTS:
    t0 = time.perf_counter()
    sections[name] = PARTS[name]()
    print(sections[name] + f"\n\n({name}: {time.perf_counter() - t0:.0f} s)\n", flush=True)
  out = pathlib.Path(args.out)
  # Parts not run this time keep the text of their last run.
  kept = dict(re.findall(r"^## (\w+)\n\n(.*?)(?=^## |\Z)", out.read_text(), re.M | re.S)
              ) if out.exists() else {}
  kept = {k: v.strip() for k, v in kept.items()}
  kept.update(sections)
  out.write_text(
      "# Compiled for TPU slices\n\nGenerated by `python benchmarks/tpu_compile.py` "
      f"(libtpu, jax {jax.__version__}); every figure is per device.\n\n"
      + "\n\n".join(f"## {k}\n\n{kept[k]}" for k in PARTS if k in kept) + "\n")
  if args.update_readme and "configs" in sections:
    readme = REPO / "README.md"
    text = readme.read_text()
    start, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    readme.write_text(text[:start] + "\n" + sections["configs"] + "\n" + text[end:])


if __name__ == "__main__":
  main()
