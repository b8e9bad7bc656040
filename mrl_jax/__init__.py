"""Matryoshka representation learning in JAX: `mrl_jax.load(workdir)` embeds
with a trained run (`mrl_jax.embedder`); training is `python -m mrl_jax.main`."""


def load(workdir, **kwargs):
  """`mrl_jax.embedder.load`: the trained run in `workdir` as an `Embedder`.

  Imported here on first use, so `import mrl_jax` stays cheap (no JAX).
  """
  from mrl_jax import embedder  # pylint: disable=g-import-not-at-top
  return embedder.load(workdir, **kwargs)
