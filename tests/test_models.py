"""ViT: variants, shapes, dtypes, parameter count, jit via split/merge, get_model."""
import math

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mrl_jax import matryoshka
from mrl_jax import models
from mrl_jax.models import vit

NESTING = [4, 8, 16]


def _tiny(**kw):
  args = dict(variant="Mu/7", image_size=28, channels=1, representation_size=16,
              head=matryoshka.make_head("mrl", NESTING, 10, rngs=nnx.Rngs(1)),
              num_classes=10, rngs=nnx.Rngs(0))
  args.update(kw)
  return vit.ViT(**args)


def _images(b=3, h=28, w=28, c=1, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, h, w, c))


@pytest.mark.parametrize("variant, expected", [
    ("B/16", dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)),
    ("Ti/4", dict(width=192, depth=12, mlp_dim=768, num_heads=3, patch_size=4)),
    ("S/32", dict(width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=32)),
    ("L/14", dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, patch_size=14)),
    ("H/14", dict(width=1280, depth=32, mlp_dim=5120, num_heads=16, patch_size=14)),
    ("Mu/4", dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4)),
    ("N/7", dict(width=64, depth=4, mlp_dim=128, num_heads=2, patch_size=7)),
])
def test_decode_variant(variant, expected):
  assert vit.decode_variant(variant) == expected


@pytest.mark.parametrize("bad", ["X/16", "B16", "B/0", "B", "b/16", "B/16/2", ""])
def test_unknown_variant_names_field_value_and_choices(bad):
  with pytest.raises(ValueError) as e:
    vit.decode_variant(bad)
  msg = str(e.value)
  assert "config.model.variant" in msg and repr(bad) in msg
  assert "'Ti'" in msg and "'B'" in msg and "'N'" in msg


def _abstract_forward(images_shape, **kw):
  """Shapes and dtypes of (model, outputs) without allocating or compiling."""
  def build_and_run():
    model = _tiny(**kw)
    return model, model(jnp.zeros(images_shape))
  return nnx.eval_shape(build_and_run)


@pytest.mark.parametrize("pool_type, posemb", [("gap", "learn"), ("cls", "learn"),
                                               ("gap", "sincos2d"), ("cls", "sincos2d")])
def test_shapes(pool_type, posemb):
  model, (logits, aux) = _abstract_forward((3, 28, 28, 1), pool_type=pool_type, posemb=posemb)
  assert logits.shape == (len(NESTING), 3, 10)
  assert aux["embedding"].shape == (3, 16) and aux["embedding"].dtype == jnp.float32
  assert aux["pre_logits"].shape == (3, 32)
  # sincos2d position embeddings are fixed, not parameters.
  assert hasattr(model, "pos_embedding") == (posemb == "learn")
  assert hasattr(model, "cls") == (pool_type == "cls")


def test_embedding_size_channels_and_no_head():
  model, (logits, aux) = _abstract_forward(
      (2, 14, 28, 3), representation_size=24, channels=3, image_size=(14, 28), head=None)
  assert logits is None
  assert aux["embedding"].shape == (2, 24)
  assert model.embedding.kernel.shape == (7, 7, 3, 32)
  assert model.pos_embedding.shape == (1, 2 * 4, 32)


def test_no_representation_layer_embeds_pre_logits():
  model = _tiny(representation_size=None, head=None)
  _, aux = model(_images(b=2))
  np.testing.assert_allclose(aux["embedding"], aux["pre_logits"])


def test_explicit_overrides_beat_variant():
  model = nnx.eval_shape(lambda: _tiny(variant="Mu/4", width=48, depth=1, num_heads=3,
                                       patch_size=7, head=None))
  assert model.width == 48 and len(model.blocks) == 1 and model.grid == (4, 4)
  assert model.blocks[0].attn.num_heads == 3
  assert model.blocks[0].mlp.fc1.kernel.shape == (48, 64)  # mlp_dim from Mu
  with pytest.raises(ValueError, match="variant"):
    vit.ViT(image_size=28, channels=1, representation_size=8, rngs=nnx.Rngs(0))


def test_bad_image_size_and_pool_type():
  with pytest.raises(ValueError, match="config.input.image_size=30"):
    _tiny(image_size=30)
  with pytest.raises(ValueError, match="config.model.pool_type='map'"):
    _tiny(pool_type="map")


def test_jit_with_split_merge_matches_eager_and_trains():
  # A non-zero head, so that gradients reach the trunk on the first step.
  head = matryoshka.make_head("mrl", NESTING, 10, rngs=nnx.Rngs(1),
                              kernel_init=nnx.initializers.lecun_normal())
  model = _tiny(head=head)
  images, labels = _images(b=4), jnp.array([0, 1, 2, 3])
  eager_logits, eager_aux = model(images)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def forward(params, rest, images):
    return nnx.merge(graphdef, params, rest)(images)

  logits, aux = forward(params, rest, images)
  np.testing.assert_allclose(logits, eager_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux["embedding"], eager_aux["embedding"], rtol=1e-5, atol=1e-5)

  @jax.jit
  def loss_and_grad(params):
    def loss(p):
      lg, _ = nnx.merge(graphdef, p, rest)(images, train=True)
      return matryoshka.softmax_ce(lg, labels)
    return jax.value_and_grad(loss)(params)

  value, grads = loss_and_grad(params)
  assert np.isfinite(float(value))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(g).all() and np.abs(g).sum() > 0, path


def test_dropout_active_only_in_training():
  model = _tiny(dropout=0.5, head=None, rngs=nnx.Rngs(0, dropout=1))
  images = _images(b=2)
  _, a = model(images)
  _, b = model(images)
  _, c = model(images, train=True)
  np.testing.assert_allclose(a["embedding"], b["embedding"])
  assert not np.allclose(a["embedding"], c["embedding"])


def test_vit_b16_parameter_count():
  # ViT-B/16 at 224 without head: patches 16*16*3*768 + 768, position
  # embeddings 196*768 (the class token gets none, as in big_vision), class
  # token 768, 12 blocks of 7,087,872, final LayerNorm 1536. timm's
  # vit_base_patch16_224 (86,567,656) also embeds the class token's position
  # and has the 769,000-parameter ImageNet classifier.
  abstract = nnx.eval_shape(lambda: vit.ViT(
      variant="B/16", image_size=224, channels=3, pool_type="cls",
      representation_size=None, head=None, rngs=nnx.Rngs(0)))
  count = sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert count == 85_797_888


def test_params_carry_logical_axes_and_map_to_the_mesh():
  model = _tiny()  # outside any mesh: annotations are recorded, nothing placed
  assert model.blocks[0].mlp.fc1.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = [("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv", None)]
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(_tiny)
    specs = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
  P = jax.sharding.PartitionSpec
  assert specs["blocks"][0]["mlp"]["fc1"]["kernel"].get_value() == P("fsdp", "tensor")
  assert specs["blocks"][1]["attn"]["query"]["kernel"].get_value() == P("fsdp", "tensor", None)
  assert specs["blocks"][1]["attn"]["out"]["kernel"].get_value() == P("tensor", None, "fsdp")
  assert specs["representation"]["kernel"].get_value() == P("fsdp", None)


def test_posemb_sincos_2d_values():
  pe = vit.posemb_sincos_2d(2, 3, 8)
  assert pe.shape == (1, 6, 8)
  # Token 0 sits at (y, x) = (0, 0): sin parts 0, cos parts 1.
  np.testing.assert_allclose(pe[0, 0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-6)
  # Token 4 is (y, x) = (1, 1); omega = [1, 1e-4]: x and y parts equal.
  np.testing.assert_allclose(pe[0, 4, :4], [np.sin(1), np.sin(1e-4), np.cos(1), np.cos(1e-4)],
                             atol=1e-6)
  np.testing.assert_allclose(pe[0, 4, :4], pe[0, 4, 4:], atol=1e-6)


# ----------------------------------------------------------------------------
# get_model.
# ----------------------------------------------------------------------------
def _config(**model_overrides):
  config = ml_collections.ConfigDict()
  config.input = dict(image_size=28)
  config.model = dict(name="vit", variant="Mu/7", pool_type="gap", posemb="sincos2d",
                      representation_size=16, dropout=0.0, dtype="float32")
  config.model.update(model_overrides)
  return config


def test_get_model_bfloat16_compute_float32_params_and_embedding():
  def build(dtype):
    head = matryoshka.make_head("mrl_e", NESTING, 5, rngs=nnx.Rngs(1),
                                kernel_init=nnx.initializers.lecun_normal())
    return models.get_model(_config(dtype=dtype), num_classes=5, head=head,
                            channels=1, rngs=nnx.Rngs(0))
  model = build("bfloat16")
  assert model.dtype == jnp.bfloat16 and model.num_classes == 5
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  logits, aux = model(_images(b=2))
  assert logits.shape == (3, 2, 5)
  assert aux["embedding"].dtype == jnp.float32
  assert aux["pre_logits"].dtype == jnp.bfloat16
  # Same params, float32 compute: bf16 changes the numbers only a little.
  ref_logits, ref_aux = build("float32")(_images(b=2))
  np.testing.assert_allclose(aux["embedding"], ref_aux["embedding"], atol=0.1, rtol=0.1)
  np.testing.assert_allclose(logits, ref_logits, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("overrides, match", [
    (dict(name="vgg"), r"config.model.name='vgg'.*\['dual_encoder', 'resnet', 'vit'\]"),
    (dict(variant="Q/4"), r"config.model.variant='Q/4'"),
    (dict(dtype="float16"), r"config.model.dtype='float16'"),
    (dict(pool_type="max"), r"config.model.pool_type='max'"),
])
def test_get_model_and_check_variant_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    models.check_variant(_config(**overrides))
  with pytest.raises(ValueError, match=match):
    models.get_model(_config(**overrides), num_classes=3, head=None, channels=1,
                     rngs=nnx.Rngs(0))


def test_scan_layers_matches_the_python_loop():
  """A scanned ViT computes what the looped one does with the same weights."""
  scanned = _tiny(scan_layers=True)
  looped = _tiny()
  kernel = scanned.blocks.mlp.fc1.kernel
  assert kernel.shape[0] == 2  # Mu: depth 2, stacked on a leading axis
  assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
  # Copy the scanned weights into the looped model, layer by layer.
  stacked = nnx.state(scanned.blocks, nnx.Param)
  for i, block in enumerate(looped.blocks):
    nnx.update(block, jax.tree.map(lambda x: x[i], stacked))
  for name in ("embedding", "encoder_norm", "representation", "head"):
    nnx.update(getattr(looped, name), nnx.state(getattr(scanned, name)))
  images = _images()
  forward = nnx.jit(lambda m, x: m(x)[1]["embedding"])
  np.testing.assert_allclose(forward(scanned, images), forward(looped, images),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_changes_memory_not_results(scan_layers):
  images, labels = _images(), jnp.array([1, 2, 3])

  def loss_and_grads(model):
    def loss(m):
      logits, _ = m(images, train=True)
      return matryoshka.softmax_ce(logits, labels)
    return nnx.jit(nnx.value_and_grad(loss))(model)

  plain = loss_and_grads(_tiny(scan_layers=scan_layers))
  remat = loss_and_grads(_tiny(scan_layers=scan_layers, remat=True))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               plain, remat)


def test_drop_path_drops_whole_examples_at_its_rate():
  y = jnp.ones((4000, 3, 2))
  out = np.asarray(vit.drop_path(y, 0.25, jax.random.key(0)))
  kept = out[:, 0, 0] > 0
  assert abs(kept.mean() - 0.75) < 0.03
  np.testing.assert_allclose(out[kept], 1 / 0.75, rtol=1e-6)  # the expectation is kept
  assert np.all(out[~kept] == 0) and np.all(out == out[:, :1, :1])


def test_stochastic_depth_in_training_only_and_the_same_scanned_or_looped():
  scanned = _tiny(scan_layers=True, drop_path=0.5)
  looped = _tiny(drop_path=0.5)
  stacked = nnx.state(scanned.blocks, nnx.Param)
  for i, block in enumerate(looped.blocks):
    nnx.update(block, jax.tree.map(lambda x: x[i], stacked))
  for name in ("embedding", "encoder_norm", "representation", "head"):
    nnx.update(getattr(looped, name), nnx.state(getattr(scanned, name)))
  images = _images(b=16)
  train = nnx.jit(lambda m, x, k: m(x, train=True, rng=k)[1]["embedding"])
  a, b = train(scanned, images, jax.random.key(1)), train(looped, images, jax.random.key(1))
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # same keys, same drops
  assert not np.allclose(a, train(scanned, images, jax.random.key(2)))
  # Evaluation and key-less calls run every block.
  plain = _tiny(scan_layers=True)
  nnx.update(plain, nnx.state(scanned))
  ev = lambda m: nnx.jit(lambda m, x: m(x)[1]["embedding"])(m, images)  # noqa: E731
  np.testing.assert_allclose(ev(scanned), ev(plain), rtol=1e-6)


def test_dropout_draws_from_the_step_key():
  """With a key per step (the trainer's), dropout masks change from step to step."""
  model = _tiny(dropout=0.3)
  images = _images(b=8)
  train = nnx.jit(lambda m, x, k: m(x, train=True, rng=k)[1]["embedding"])
  a, b = train(model, images, jax.random.key(1)), train(model, images, jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, train(model, images, jax.random.key(2)))
  ev = nnx.jit(lambda m, x: m(x)[1]["embedding"])
  np.testing.assert_array_equal(ev(model, images), ev(model, images))
