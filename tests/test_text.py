"""WordPiece tokenizer (BERT's cases) and the BERT-style text encoder."""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrl_jax import sharding
from mrl_jax.data import tokenizer
from mrl_jax.models import text
from mrl_jax.models import vit

# ----------------------------------------------------------------------------
# Tokenizer.
# ----------------------------------------------------------------------------
# google-research/bert tokenization_test.py's vocabulary, [PAD] first, plus
# the pieces of its docstring example "unaffable".
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "want", "##want", "##ed", "wa",
         "un", "runn", "##ing", ",", "##aff", "##able", "hello", "!", "?",
         "how", "are", "you", "\u535A", "\u63A8", "ah", "zz", "cafe"]


def _tok(max_len=8, **kw):
  return tokenizer.WordPieceTokenizer.from_vocab(VOCAB, max_len=max_len, **kw)


def _pieces(tok, s):
  return [tok.id_to_token(i) for i in tok.encode(s)]


def test_basic_tokenizer_lowercases_splits_punctuation_and_strips_accents():
  assert tokenizer.basic_tokenize(" \tHeLLo!how  \n Are yoU?  ") == [
      "hello", "!", "how", "are", "you", "?"]
  assert tokenizer.basic_tokenize("H\u00E9llo") == ["hello"]
  assert tokenizer.basic_tokenize(" \tHeLLo!how  \n Are yoU?  ", lowercase=False) == [
      "HeLLo", "!", "how", "Are", "yoU", "?"]
  assert tokenizer.basic_tokenize("H\u00E9llo", lowercase=False) == ["H\u00E9llo"]
  # CJK ideographs are words by themselves; control characters disappear.
  assert tokenizer.basic_tokenize("ah\u535A\u63A8zz") == ["ah", "\u535A", "\u63A8", "zz"]
  assert tokenizer.basic_tokenize("a\x00b\u0007c\ufffdd e$f") == ["abcd", "e", "$", "f"]


def test_wordpiece_greedy_longest_match_and_unknown_words():
  tok = _tok()
  assert _pieces(tok, "unaffable") == ["un", "##aff", "##able"]
  assert _pieces(tok, "unwanted running") == ["un", "##want", "##ed", "runn", "##ing"]
  assert _pieces(tok, "UNwant\u00E9d,running") == ["un", "##want", "##ed", ",", "runn", "##ing"]
  assert _pieces(tok, "unwantedX running") == ["[UNK]", "runn", "##ing"]
  assert _pieces(tok, "Caf\u00E9 ah\u535A\u63A8zz") == ["cafe", "ah", "\u535A", "\u63A8", "zz"]
  assert _pieces(tok, "un" * 51) == ["[UNK]"]  # > 100 characters
  assert _pieces(tok, "") == [] and _pieces(tok, " \t\n") == []
  # Cased: 'UNwant' is not in the (lowercase) vocabulary.
  assert _pieces(_tok(lowercase=False), "UNwanted running") == ["[UNK]", "runn", "##ing"]
  # The chunk cache returns what a fresh tokenizer computes.
  assert tok.encode("unwanted running") == _tok().encode("unwanted running")


def test_encode_batch_specials_padding_truncation_empty_and_bytes():
  tok = _tok(max_len=6)
  out = tok.encode_batch(["unwanted", "unwanted running", "", "  \n", "hello".encode()])
  assert {k: v.dtype for k, v in out.items()} == dict(
      ids=np.int32, truncated=np.int32, empty=np.int32)
  cls, sep, un, want, ed, runn, hello = (VOCAB.index(t) for t in (
      "[CLS]", "[SEP]", "un", "##want", "##ed", "runn", "hello"))
  np.testing.assert_array_equal(out["ids"], [
      [cls, un, want, ed, sep, 0],
      [cls, un, want, ed, runn, sep],  # 5 pieces cut to 4, [SEP] kept last
      [cls, sep, 0, 0, 0, 0],
      [cls, sep, 0, 0, 0, 0],
      [cls, hello, sep, 0, 0, 0]])
  np.testing.assert_array_equal(out["truncated"], [0, 1, 0, 0, 0])
  np.testing.assert_array_equal(out["empty"], [0, 0, 1, 1, 0])
  # An exact fit is not truncated; max_len overrides the default.
  assert tok.encode_batch(["unwanted"], max_len=5)["truncated"][0] == 0
  assert tok.encode_batch(["unwanted"], max_len=4)["ids"].tolist() == [[cls, un, want, sep]]
  assert tok.decode(out["ids"][1]) == "unwanted runn"
  assert tok.decode(out["ids"][0], skip_special=False) == "[CLS] unwanted [SEP]"
  assert (tok.vocab_size, tok.pad_id, tok.cls_id, tok.sep_id) == (len(VOCAB), 0, cls, sep)
  with pytest.raises(ValueError, match="max_len=1"):
    tok.encode_batch(["a"], max_len=1)


def test_vocab_file_errors_name_path_and_fix(tmp_path):
  missing = tmp_path / "nope" / "vocab.txt"
  with pytest.raises(FileNotFoundError, match=f"{missing}.*build_vocab"):
    tokenizer.WordPieceTokenizer(missing, max_len=8)
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(ValueError, match=f"{empty} is empty"):
    tokenizer.WordPieceTokenizer(empty, max_len=8)
  binary = tmp_path / "binary.txt"
  binary.write_bytes(b"\xff\xfe\x00")
  with pytest.raises(ValueError, match=f"{binary} could not be read"):
    tokenizer.WordPieceTokenizer(binary, max_len=8)
  with pytest.raises(ValueError, match=f"{tmp_path} could not be read"):
    tokenizer.WordPieceTokenizer(tmp_path, max_len=8)  # a directory
  no_sep = tmp_path / "no_sep.txt"
  no_sep.write_text("[PAD]\n[UNK]\n[CLS]\nhello\n")
  with pytest.raises(ValueError, match=rf"{no_sep} lacks the special tokens \['\[SEP\]'\]"):
    tokenizer.WordPieceTokenizer(no_sep, max_len=8)
  pad_late = tmp_path / "pad_late.txt"
  pad_late.write_text("[UNK]\n[PAD]\n[CLS]\n[SEP]\n")
  with pytest.raises(ValueError, match=rf"{pad_late} has '\[UNK\]' at id 0.*\[PAD\]"):
    tokenizer.WordPieceTokenizer(pad_late, max_len=8)
  with pytest.raises(ValueError, match="max_len"):
    _tok(max_len=1)


def test_build_and_write_vocab_round_trip(tmp_path):
  captions = ["A dog runs.", "a dog sleeps", b"Two dogs, one cat!", "\u00C9t\u00E9 dog"]
  tokens = tokenizer.build_vocab(captions)
  assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  # By count, then alphabetically.
  assert tokens[5:] == ["dog", "a", "!", ",", ".", "cat", "dogs", "ete", "one",
                        "runs", "sleeps", "two"]
  assert tokenizer.build_vocab(captions, min_count=2)[5:] == ["dog", "a"]
  path = tokenizer.write_vocab(tokens, tmp_path / "sub" / "vocab.txt")
  tok = tokenizer.WordPieceTokenizer(path, max_len=8)
  assert tok.vocab_size == len(tokens)
  ids = tok.encode_batch(["A dog runs.", "zebra"])["ids"]
  assert tok.decode(ids[0]) == "a dog runs ."
  assert tok.decode(ids[1]) == "[UNK]"


# ----------------------------------------------------------------------------
# Text encoder.
# ----------------------------------------------------------------------------
VOCAB_SIZE, MAX_LEN = 40, 12
# [CLS]=2 ... [SEP]=3, then [PAD]=0; the rows have 5, 3 and 8 real tokens.
IDS = jnp.array([[2, 7, 8, 9, 3, 0, 0, 0],
                 [2, 11, 3, 0, 0, 0, 0, 0],
                 [2, 5, 6, 7, 8, 9, 10, 3]], jnp.int32)


def _encoder(**kw):
  args = dict(vocab_size=VOCAB_SIZE, max_len=MAX_LEN, variant="Mu",
              representation_size=16, rngs=nnx.Rngs(0))
  args.update(kw)
  return text.TextEncoder(**args)


_forward = nnx.jit(lambda m, ids: m(ids)[1])


@pytest.mark.parametrize("pool_type", text.POOL_TYPES)
def test_shapes_and_padding_invariance(pool_type):
  model = _encoder(pool_type=pool_type)
  aux = _forward(model, IDS)
  assert aux["embedding"].shape == (3, 16) and aux["embedding"].dtype == jnp.float32
  assert aux["pre_logits"].shape == (3, 32)
  # Up to max_len extra [PAD]s change nothing: padded keys are masked out
  # and padded positions are never pooled.
  padded = _forward(model, jnp.pad(IDS, ((0, 0), (0, MAX_LEN - IDS.shape[1]))))
  np.testing.assert_allclose(padded["embedding"], aux["embedding"], atol=1e-5)
  # A different real token does change the embedding.
  changed = _forward(model, IDS.at[:, 1].set(12))
  assert not np.allclose(changed["embedding"], aux["embedding"], atol=1e-3)


def test_block_ignores_the_content_of_padded_positions():
  block = vit.Encoder1DBlock(32, 64, 2, dropout=0.0, dtype=jnp.float32,
                              param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  mask = IDS != 0
  x = jax.random.normal(jax.random.key(0), (3, 8, 32))
  noise = jax.random.normal(jax.random.key(1), x.shape) * 10
  apply = nnx.jit(lambda b, x: b(x, mask, train=False))
  y = apply(block, x)
  y_noisy = apply(block, jnp.where(mask[..., None], x, noise))
  np.testing.assert_allclose(np.where(mask[..., None], y_noisy, 0),
                             np.where(mask[..., None], y, 0), atol=1e-5)


def test_last_pooling_takes_the_last_real_token():
  model = _encoder(pool_type="last", representation_size=None)

  @nnx.jit
  def by_hand(m, ids):  # The forward pass up to the pooling, written out.
    mask = ids != 0
    x = m.token_embedding(ids) + m.pos_embedding[:, :ids.shape[1]]
    x = m.embedding_norm(x)
    for block in m.blocks:
      x = block(x, mask, train=False)
    return m.encoder_norm(x)  # [B, L, width]

  hidden = by_hand(model, IDS)
  expected = hidden[jnp.arange(3), jnp.array([4, 2, 7])]  # the [SEP]s
  np.testing.assert_allclose(_forward(model, IDS)["pre_logits"], expected, atol=1e-5)


def test_params_carry_logical_axes_and_map_to_the_mesh():
  for scan_layers in (False, True):
    model = nnx.eval_shape(lambda: _encoder(scan_layers=scan_layers))
    params = list(nnx.iter_graph(model))
    params = [(p, v) for p, v in params if isinstance(v, nnx.Param)]
    assert len(params) > 10
    for path, param in params:
      names = param.get_metadata().get("out_sharding")
      assert names is not None and len(names) == param.ndim, (path, names, param.shape)
  assert model.token_embedding.embedding.get_metadata()["out_sharding"] == ("vocab", "embed")
  assert model.blocks.attn.query.kernel.get_metadata()["out_sharding"] == (
      "layers", "embed", "heads", "kv")
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = [("embed", "fsdp"), *sharding.DEFAULT_RULES[1:]]
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(nnx.state(nnx.eval_shape(_encoder), nnx.Param))
  P = jax.sharding.PartitionSpec
  assert specs["token_embedding"]["embedding"].get_value() == P("tensor", "fsdp")
  assert specs["pos_embedding"].get_value() == P(None, None, "fsdp")
  assert specs["blocks"][0]["mlp"]["fc1"]["kernel"].get_value() == P("fsdp", "tensor")
  assert specs["representation"]["kernel"].get_value() == P("fsdp", None)


def test_jit_split_merge_and_grad():
  model = _encoder(pool_type="mean")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def loss_and_grad(params, ids):
    def loss(p):
      _, aux = nnx.merge(graphdef, p, rest)(ids, train=True)
      return jnp.mean(aux["embedding"] ** 2)
    return jax.value_and_grad(loss)(params)

  value, grads = loss_and_grad(params, IDS)
  assert np.isfinite(float(value))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(g).all() and np.abs(g).sum() > 0, path
  # Rows of unused tokens and of positions past the input get no gradient.
  assert np.abs(grads["token_embedding"]["embedding"][1]).sum() == 0
  assert np.abs(grads["pos_embedding"][0, IDS.shape[1]:]).sum() == 0


def test_scan_layers_matches_the_python_loop_and_remat_the_gradients():
  scanned = _encoder(scan_layers=True, pool_type="last")
  looped = _encoder(pool_type="last")
  assert scanned.blocks.mlp.fc1.kernel.shape[0] == 2  # Mu: depth 2, stacked
  stacked = nnx.state(scanned.blocks, nnx.Param)
  for i, block in enumerate(looped.blocks):
    nnx.update(block, jax.tree.map(lambda x: x[i], stacked))
  for name in ("token_embedding", "embedding_norm", "encoder_norm", "representation"):
    nnx.update(getattr(looped, name), nnx.state(getattr(scanned, name)))
  looped.pos_embedding[...] = scanned.pos_embedding[...]
  np.testing.assert_allclose(_forward(scanned, IDS)["embedding"],
                             _forward(looped, IDS)["embedding"], rtol=1e-5, atol=1e-5)

  def loss_and_grads(model):
    loss = lambda m: jnp.sum(m(IDS, train=True)[1]["embedding"] ** 2)
    return nnx.jit(nnx.value_and_grad(loss))(model)

  remat = _encoder(scan_layers=True, pool_type="last", remat=True)
  nnx.update(remat, nnx.state(scanned))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               loss_and_grads(scanned), loss_and_grads(remat))


def test_variants_and_bad_arguments():
  assert text.decode_variant("B") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12)
  with pytest.raises(ValueError, match=r"variant='X'.*'Mu'.*'tiny'.*'B'"):
    text.decode_variant("X")
  with pytest.raises(ValueError, match="variant"):
    text.TextEncoder(vocab_size=10, max_len=4, representation_size=None, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"pool_type='max'.*\('cls', 'last', 'mean'\)"):
    _encoder(pool_type="max")
  model = nnx.eval_shape(lambda: _encoder(variant="tiny", width=48, num_heads=3))
  assert model.width == 48 and len(model.blocks) == 2
  assert model.blocks[0].mlp.fc1.kernel.shape == (48, 512)
  model = _encoder()
  with pytest.raises(ValueError, match=f"length 13 .* max_len={MAX_LEN}"):
    model(jnp.ones((1, MAX_LEN + 1), jnp.int32))
  with pytest.raises(ValueError, match="integer token ids"):
    model(jnp.ones((1, 4), jnp.float32))
