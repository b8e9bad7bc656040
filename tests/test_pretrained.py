"""Importers (mrl_jax/pretrained): checkpoints written by big_vision, timm and
transformers reproduce those libraries' outputs; `config.model.init` loads
them (and our own runs) into a training run; bad input is named.

The fixtures in tests/fixtures/pretrained/ were made by the real libraries
(each folder's README: versions, commands, what the outputs are).
"""
import json
import os
import pathlib
import re
import shutil
import time

from absl import logging
from flax import nnx
import jax
import ml_collections
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from configs import imagenet_vit_b16
from mrl_jax import checkpoint as checkpoint_lib
from mrl_jax import pretrained
from mrl_jax import train
from mrl_jax.models import text
from mrl_jax.models import vit
from tests import test_align
from tests.test_align import caption_data  # noqa: F401  (the fixture)
from tests import test_reproduce

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "pretrained"
BIG_VISION = FIXTURES / "big_vision_vit"
TIMM = FIXTURES / "timm_vit"
BERT = FIXTURES / "hf_bert"


def _npz(path):
  with np.load(path) as f:
    return dict(f)


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# ----------------------------------------------------------------------------
# Each fixture reproduces its library's outputs.
# ----------------------------------------------------------------------------
def test_big_vision_npz_reproduces_pre_logits():
  encoder = pretrained.load_encoder(str(BIG_VISION / "checkpoint.npz"), "big_vision")
  assert isinstance(encoder, vit.ViT)
  assert encoder.config == dict(
      name="vit", width=64, depth=2, patch_size=8, mlp_dim=128, num_heads=2, pool_type="gap",
      posemb="learn", mlp_activation="gelu_tanh", layernorm_eps=1e-6, final_norm="tokens",
      image_size=32)
  out = encoder(_npz(BIG_VISION / "inputs.npz")["images"])
  expected = _npz(BIG_VISION / "expected.npz")["pre_logits"]
  assert out.shape == (4, 64) and _max_diff(out, expected) < 1e-5


def test_the_gelu_option_matters(monkeypatch):
  """The comparison can fail: with the exact GELU, big_vision's outputs are missed."""
  read = pretrained.read

  def exact_gelu(*args, **kwargs):
    ckpt = read(*args, **kwargs)
    return ckpt._replace(model=dict(ckpt.model, mlp_activation="gelu_exact"))

  monkeypatch.setattr(pretrained, "read", exact_gelu)
  encoder = pretrained.load_encoder(str(BIG_VISION / "checkpoint.npz"), "big_vision")
  diff = _max_diff(encoder(_npz(BIG_VISION / "inputs.npz")["images"]),
                   _npz(BIG_VISION / "expected.npz")["pre_logits"])
  assert diff > 1e-4, diff


def test_timm_reproduces_pre_logits_with_the_exact_gelu(tmp_path):
  encoder = pretrained.load_encoder(str(TIMM), "timm")
  assert encoder.config["mlp_activation"] == "gelu_exact"
  assert encoder.config["pool_type"] == "cls" and encoder.config["num_heads"] == 3
  images = _npz(TIMM / "inputs.npz")["images_nhwc"]
  expected = _npz(TIMM / "expected.npz")
  assert _max_diff(encoder(images), expected["pre_logits"]) < 1e-5
  # The same weights in a model whose config says timm's tanh GELU.
  folder = tmp_path / "timm_tanh"
  shutil.copytree(TIMM, folder)
  cfg = json.loads((folder / "config.json").read_text())
  cfg["model_args"]["act_layer"] = "gelu_tanh"
  (folder / "config.json").write_text(json.dumps(cfg))
  tanh = pretrained.load_encoder(str(folder), "timm")
  assert _max_diff(tanh(images), expected["pre_logits_gelu_tanh"]) < 1e-5
  assert _max_diff(tanh(images), expected["pre_logits"]) > 1e-4


def test_hf_bert_reproduces_the_cls_hidden_state(tmp_path):
  encoder = pretrained.load_encoder(str(BERT), "hf_bert")
  assert isinstance(encoder, text.TextEncoder)
  assert encoder.config == dict(name="text", width=32, depth=2, num_heads=2, mlp_dim=64,
                                pool_type="cls", post_ln=True, type_vocab_size=2,
                                mlp_activation="gelu_exact", layernorm_eps=1e-12)
  inputs = _npz(BERT / "inputs.npz")
  expected = _npz(BERT / "expected.npz")["cls_hidden_state"]
  assert _max_diff(encoder(inputs), expected) < 1e-5
  # The hub's task-model layout: a `bert.` prefix, old LayerNorm gamma/beta names, a head.
  tensors = st_numpy.load_file(str(BERT / "model.safetensors"))
  renamed = {"bert." + re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma",
                              re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)): v
             for k, v in tensors.items()}
  renamed["cls.predictions.bias"] = np.zeros(120, np.float32)
  folder = tmp_path / "bert_hub"
  folder.mkdir()
  shutil.copy(BERT / "config.json", folder)
  st_numpy.save_file(renamed, str(folder / "model.safetensors"))
  assert _max_diff(pretrained.load_encoder(str(folder), "hf_bert")(inputs), expected) < 1e-5


def test_save_big_vision_writes_big_vision_names(tmp_path):
  encoder = pretrained.load_encoder(str(BIG_VISION / "checkpoint.npz"), "big_vision")
  pretrained.save_big_vision(encoder, str(tmp_path / "again.npz"))
  theirs, ours = _npz(BIG_VISION / "checkpoint.npz"), _npz(tmp_path / "again.npz")
  assert set(ours) == {k for k in theirs if not k.startswith("head/")}
  assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
  with pytest.raises(ValueError, match="not a ViT"):
    pretrained.save_big_vision({"blocks/0/norm1/scale": np.ones(3)}, str(tmp_path / "x.npz"))


def _old_augreg_npz(path):
  """The fixture in the names of the 2021 AugReg files: pre-Linen numbering,
  the posemb inside Transformer/posembed_input, an `opt/target/` prefix."""
  old = {}
  for k, v in _npz(BIG_VISION / "checkpoint.npz").items():
    k = (k.replace("LayerNorm_1", "LayerNorm_2")
         .replace("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1")
         .replace("MlpBlock_0", "MlpBlock_3"))
    k = "Transformer/posembed_input/pos_embedding" if k == "pos_embedding" else k
    old["opt/target/" + k] = v
  np.savez(path, **old)
  return str(path)


def test_old_augreg_names_and_posemb_resampling(tmp_path):
  path = _old_augreg_npz(tmp_path / "old.npz")
  images = _npz(BIG_VISION / "inputs.npz")["images"]
  expected = _npz(BIG_VISION / "expected.npz")["pre_logits"]
  assert _max_diff(pretrained.load_encoder(path, "big_vision")(images), expected) < 1e-5
  # At 48 px the 4x4 grid of position embeddings becomes 6x6, bilinearly.
  big = pretrained.load_encoder(path, "big_vision", image_size=48)
  pe = np.asarray(big.pos_embedding[...])
  assert pe.shape == (1, 36, 64) and big.config["image_size"] == 48
  original = _npz(BIG_VISION / "checkpoint.npz")["pos_embedding"]
  np.testing.assert_allclose(pe[0, 0], original[0, 0], atol=1e-6)  # corners are kept
  np.testing.assert_allclose(pe[0, 35], original[0, 15], atol=1e-6)
  assert big(np.zeros((2, 48, 48, 3), np.float32)).shape == (2, 64)


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------
def test_wrong_format_says_what_was_found(tmp_path):
  with pytest.raises(pretrained.FormatError, match=r"timm.*a zip / \.npz file"):
    pretrained.load_encoder(str(BIG_VISION / "checkpoint.npz"), "timm")
  with pytest.raises(pretrained.FormatError, match=r"big_vision .npz.*directory.*'timm'"):
    pretrained.load_encoder(str(TIMM), "big_vision")
  with pytest.raises(pretrained.FormatError, match=r"model_type 'bert'.*None"):
    pretrained.load_encoder(str(TIMM), "hf_bert")
  with pytest.raises(pretrained.FormatError, match=r"mrl_jax.*model_type='bert'"):
    pretrained.load_encoder(str(BERT), "mrl_jax")
  with pytest.raises(ValueError, match="format='onnx' is not one of"):
    pretrained.load_encoder(str(BERT), "onnx")


def test_non_square_posemb_grid(tmp_path):
  params = _npz(BIG_VISION / "checkpoint.npz")
  params["pos_embedding"] = params["pos_embedding"][:, :12]  # 12 patches: no square grid
  np.savez(tmp_path / "rect.npz", **params)
  with pytest.raises(ValueError, match="12 patches is not a square grid"):
    pretrained.load_encoder(str(tmp_path / "rect.npz"), "big_vision")


def test_patch_size_or_width_mismatch_names_both():
  ckpt = pretrained.read(str(BIG_VISION / "checkpoint.npz"), "big_vision")
  target = {"embedding/kernel": jax.ShapeDtypeStruct((16, 16, 3, 768), np.float32)}
  with pytest.raises(ValueError, match=r"patch size 8 and width 64.*patch size 16 and width 768"):
    pretrained.merge(target, ckpt, where="test")


def test_unsupported_timm_options_are_refused(tmp_path):
  folder = tmp_path / "timm_ls"
  shutil.copytree(TIMM, folder)
  tensors = st_numpy.load_file(str(folder / "model.safetensors"))
  tensors["blocks.0.ls1.gamma"] = np.ones(96, np.float32)  # layer scale
  st_numpy.save_file(tensors, str(folder / "model.safetensors"))
  with pytest.raises(ValueError, match=r"no place for: \['blocks.0.ls1.gamma'\]"):
    pretrained.load_encoder(str(folder), "timm")


# ----------------------------------------------------------------------------
# config.model.init: a pretrained start for training.
# ----------------------------------------------------------------------------
def test_init_from_a_run_loads_the_backbone_and_lr_mults_freeze_it(
    tmp_path_factory, fake_dataset_dir, tmp_path, caplog, monkeypatch):
  """Another run's encoder starts this one; heads and representation are
  re-initialised; `lr_mults` of 0 keeps the loaded blocks fixed; on resume
  the checkpoint wins."""
  source, _ = test_reproduce.trained_mrl(tmp_path_factory, fake_dataset_dir)
  source = source / "mrl"
  config = test_reproduce.tiny(fake_dataset_dir)
  config.mrl.mode = "ff"
  config.num_train_steps = 2
  config.checkpoint_every_steps = 2
  config.evals = {}
  monkeypatch.chdir(source.parent)  # a relative workdir, as on a command line
  config.model.init = ml_collections.ConfigDict(dict(path="mrl", format="mrl_jax"))
  config.optimizer.lr_mults = ((r"^blocks/", 0.0),)
  with caplog.at_level(logging.INFO):
    train.run(config, str(tmp_path))
  found = re.search(r"config.model.init .*: loaded (\d+) of (\d+) tensors into the model; "
                    r"initialised: head/linear/bias, head/linear/kernel, representation/bias, "
                    r"representation/kernel; in the checkpoint but not loaded: head/linears/0/",
                    caplog.text)
  assert found and int(found[1]) == int(found[2]) - 4, caplog.text[-2000:]
  s = train.setup(config)
  _, mine = train.restore_model(s, tmp_path, mode="eval")
  theirs = pretrained.read(str(source), "mrl_jax").arrays
  mine = {k.removeprefix("params/"): np.asarray(v)
          for k, v in checkpoint_lib.flatten({"params": mine["params"]}).items()}
  assert all(np.array_equal(mine[k], theirs[k]) for k in mine if k.startswith("blocks/"))
  assert not np.array_equal(mine["embedding/kernel"], theirs["embedding/kernel"])  # trained
  assert "head/linear/kernel" in mine and "head/linears/0/kernel" in theirs  # FF here, MRL there
  caplog.clear()
  config.num_train_steps = 3
  with caplog.at_level(logging.WARNING):
    train.run(config, str(tmp_path))
  assert "config.model.init is not applied: resuming from the checkpoint of step 2" in caplog.text


def test_dual_encoder_text_tower_from_hf_bert(caption_data):
  config = test_align.align_config(caption_data)
  config.text.vocab_path = str(BERT / "vocab.txt")
  config.model.text.update(width=32, depth=2, num_heads=2, mlp_dim=64, post_ln=True,
                           type_vocab_size=2, mlp_activation="gelu_exact",
                           layernorm_eps=1e-12,
                           init=dict(path=str(BERT), format="hf_bert"))
  s = train.setup(config)
  state = pretrained.init_train_state(config, jax.jit(s.init_fn)(), s.tx)
  params = {k: np.asarray(v) for k, v in checkpoint_lib.flatten(state["params"]).items()}
  tensors = st_numpy.load_file(str(BERT / "model.safetensors"))
  np.testing.assert_array_equal(params["text/token_embedding/embedding"],
                                tensors["embeddings.word_embeddings.weight"])
  np.testing.assert_array_equal(params["text/pos_embedding"][0],  # the first max_len rows
                                tensors["embeddings.position_embeddings.weight"][:8])
  assert "text/representation/kernel" in params  # initialised, not in BERT
  # The tokenizer's vocabulary must be the checkpoint's.
  config.text.vocab_path = test_align.align_config(caption_data).text.vocab_path
  s = train.setup(config)
  with pytest.raises(ValueError, match=r"vocabulary has 120 tokens but the model's .* has \d+"):
    pretrained.init_train_state(config, jax.jit(s.init_fn)(), s.tx)


def test_bad_init_and_lr_mults_fail_at_config_check(fake_dataset_dir):
  config = test_reproduce.tiny(fake_dataset_dir)
  config.model.init = dict(path="x.npz", format="npz")
  with pytest.raises(ValueError, match=r"config.model.init.format='npz' is not one of"):
    train.setup(config)
  config.model.init = dict(path="x.npz", format="big_vision", dont_load=("head(",))
  with pytest.raises(ValueError, match=r"dont_load has a bad regex 'head\('"):
    train.setup(config)
  del config.model["init"]
  config.optimizer.lr_mults = (("^blocks/", -1.0),)
  with pytest.raises(ValueError, match=r"lr_mults.*regex, multiplier >= 0"):
    train.setup(config)


# ----------------------------------------------------------------------------
# An AugReg-sized start: big_vision's layout at one size, fine-tuned at another.
# ----------------------------------------------------------------------------
def augreg_finetune_step(tmp_path, data_dir, *, variant, from_size, to_size, batch_size):
  """A random ViT in the AugReg architecture ([cls], learned posemb) at
  `from_size` px, written as a big_vision .npz, starts one MRL step of
  `imagenet_vit_b16.py:mrl,finetune` at `to_size` px (posemb resampled)."""
  src = vit.ViT(variant=variant, image_size=from_size, channels=3, pool_type="cls",
                posemb="learn", representation_size=None, rngs=nnx.Rngs(1))
  npz = tmp_path / "augreg.npz"
  pretrained.save_big_vision(src, str(npz))
  src = checkpoint_lib.flatten(nnx.state(src, nnx.Param))
  config = imagenet_vit_b16.get_config("mrl,finetune")
  config.model.variant = variant
  config.model.init.path = str(npz)
  config.dataset.data_dir = data_dir
  config.input.image_size = to_size
  config.input.worker_count = config.input.read_threads = 0
  config.batch_size = config.eval_batch_size = batch_size
  config.num_train_steps = config.checkpoint_every_steps = 1
  config.log_every_steps = 1
  config.evals = {}
  s = train.setup(config)
  state = pretrained.init_train_state(config, jax.jit(s.init_fn)(), s.tx)
  mine = {k: np.asarray(v) for k, v in checkpoint_lib.flatten(state["params"]).items()}
  grid = to_size // vit.decode_variant(variant)["patch_size"]
  np.testing.assert_array_equal(mine["pos_embedding"],
                                pretrained.resample_posemb(src["pos_embedding"], grid))
  for k in src:
    if k != "pos_embedding":
      np.testing.assert_array_equal(mine[k], src[k], err_msg=k)
  del state
  train.run(config, str(tmp_path / "run"))
  (metrics,) = train.MetricsLog.read(tmp_path / "run" / "metrics.jsonl")
  assert metrics["step"] == 1 and np.isfinite(metrics["loss"]), metrics
  return metrics


def test_augreg_layout_finetunes_at_a_larger_size(tmp_path, mock_imagenet_dir, caplog):
  with caplog.at_level(logging.INFO):
    augreg_finetune_step(tmp_path, mock_imagenet_dir, variant="Mu/16", from_size=32,
                         to_size=48, batch_size=8)
  # 2 blocks x 16 + patch embedding 2 + posemb + cls + final norm 2; 7 MRL
  # heads x 2 + the representation layer 2 initialised.
  assert re.search(r"config.model.init \(.*augreg.npz, big_vision\): loaded 38 of 54 tensors "
                   r"into the model; initialised: head/linears/0/bias, .*\(\+4 more\); in the "
                   r"checkpoint but not loaded: none", caplog.text)


@pytest.mark.skipif(not os.environ.get("MRL_JAX_SLOW"),
                    reason="ViT-B/16 at 384 px: minutes on a CPU; set MRL_JAX_SLOW=1")
def test_augreg_b16_from_224_to_384(tmp_path, mock_imagenet_dir):
  """~3 min and ~20 GB of host memory on 2 cores (8 simulated devices, each
  holding the replicated parameters and optimizer state)."""
  t0 = time.perf_counter()
  metrics = augreg_finetune_step(tmp_path, mock_imagenet_dir, variant="B/16", from_size=224,
                                 to_size=384, batch_size=8)
  print(f"ViT-B/16 224 -> 384 px, one step of batch 8: loss {metrics['loss']:.4f}, "
        f"{time.perf_counter() - t0:.0f} s in all")
