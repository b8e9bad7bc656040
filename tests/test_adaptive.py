"""Adaptive classification (cascade), funnel retrieval, quantised kNN and post-hoc
baselines, against hand-computed cases and exact search."""
import numpy as np
import pytest

from mrl_jax.evaluators import adaptive
from mrl_jax.evaluators import funnel
from mrl_jax.evaluators import baselines
from mrl_jax.evaluators import knn
from mrl_jax.evaluators import quantize


def _two_class_logits(conf, pred):
  """[M, N, 2] logits whose max softmax prob is conf (> 0.5) on class pred."""
  conf, pred = np.asarray(conf, np.float64), np.asarray(pred)
  logits = np.log(np.stack([1 - conf, conf], -1))  # class 1 has prob conf
  return np.where(pred[..., None] == 1, logits, logits[..., ::-1])


# ----------------------------------------------------------------------------
# Cascade.
# ----------------------------------------------------------------------------
def test_cascade_hand_made():
  dims = [8, 16, 32]
  conf = np.array([[0.9, 0.6, 0.6, 0.8],     # dim 8: t = 0.8 -> examples 0 and 3 (>=) exit
                   [0.95, 0.75, 0.6, 0.9],   # dim 16: t = 0.7 -> example 1 exits
                   [0.99, 0.99, 0.55, 0.9]])  # dim 32 takes the rest: example 2
  pred = np.array([[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 1]])
  logits = _two_class_logits(conf, pred)
  np.testing.assert_allclose(adaptive.confidences(logits)[0], conf)
  p, used = adaptive.cascade_predict(logits, [0.8, 0.7], dims)
  np.testing.assert_array_equal(used, [8, 16, 32, 8])
  np.testing.assert_array_equal(p, [1, 1, 1, 0])  # each example's prediction at its exit dim
  assert adaptive.expected_dims(logits, [0.8, 0.7], dims) == (8 + 16 + 32 + 8) / 4
  _, stage = adaptive.cascade_predict(logits, [0.8, 0.7])
  np.testing.assert_array_equal(stage, [0, 1, 2, 0])
  # A scalar is one threshold for every dim: 0.85 -> only example 0 exits at 8;
  # 1 and 2 are below it at 16; example 3 exits at 16 (0.9).
  _, used = adaptive.cascade_predict(logits, 0.85, dims)
  np.testing.assert_array_equal(used, [8, 32, 32, 16])
  with pytest.raises(ValueError, match="one per dim except the last"):
    adaptive.cascade_predict(logits, [0.5, 0.5, 0.5], dims)


def test_cascade_threshold_extremes():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 50, 5))
  labels = rng.integers(0, 5, 50)
  p, used = adaptive.cascade_predict(logits, 0.0, [4, 8, 16])
  np.testing.assert_array_equal(used, 4)
  np.testing.assert_array_equal(p, logits[0].argmax(-1))
  p, used = adaptive.cascade_predict(logits, 1.01, [4, 8, 16])
  np.testing.assert_array_equal(used, 16)
  assert np.mean(p == labels) == np.mean(logits[-1].argmax(-1) == labels)


def test_adaptive_classification_finds_the_easy_examples():
  # Dim 8 is confident (0.9) and right on the even examples, unsure (0.6) and
  # wrong on the odd ones; dim 64 is always right. The best cascade sends the
  # even examples to 8 and the odd ones to 64 at full-dim accuracy (1.0).
  n, dims = 200, [8, 64]
  labels = np.zeros(n, int)
  easy = np.arange(n) % 2 == 0
  conf = np.stack([np.where(easy, 0.9, 0.6), np.full(n, 0.99)])
  pred = np.stack([np.where(easy, 0, 1), np.zeros(n, int)])
  seeds = (0, 1, 2)
  out = adaptive.adaptive_classification(_two_class_logits(conf, pred), labels, dims,
                                         holdout=0.5, seeds=seeds)
  easy_frac = np.array([easy[adaptive._split(n, 0.5, s, "")[1]].mean() for s in seeds])
  best = out["best"]
  assert best["accuracy"] == best["full_dim_accuracy"] == 1.0
  assert best["expected_dims"] == pytest.approx(np.mean(8 * easy_frac + 64 * (1 - easy_frac)))
  assert all(0.6 < t[0] <= 0.9 for t in best["thresholds"])
  points = {p["budget"]: p for p in out["points"]}
  assert sorted(points) == [8.0, 36.0, 64.0]  # eval_dims([8, 64])
  assert points[8.0]["expected_dims"] == 8
  assert points[8.0]["accuracy"] == pytest.approx(easy_frac.mean())
  assert points[64.0]["accuracy"] == 1.0  # ties in accuracy: the fewest dims
  assert points[64.0]["expected_dims"] == best["expected_dims"]
  assert out["per_dim_accuracy"][8] == pytest.approx(easy_frac.mean())


@pytest.mark.parametrize("holdout", [0.0, 1.0, 0.01, 0.99, -0.5])
def test_adaptive_holdout_errors(holdout):
  logits = np.zeros((2, 10, 3))
  with pytest.raises(ValueError, match=r"config\.evals\.adaptive\.holdout=.*Fix"):
    adaptive.adaptive_classification(logits, np.zeros(10, int), [4, 8], holdout=holdout,
                                     field="config.evals.adaptive.holdout")


# ----------------------------------------------------------------------------
# Funnel.
# ----------------------------------------------------------------------------
def _db(n=300, q=20, d=16, seed=0):
  rng = np.random.default_rng(seed)
  database = rng.normal(size=(n, d)).astype(np.float32)
  database[n // 2] = database[3]  # an exact tie: the lower row first
  queries = rng.normal(size=(q, d)).astype(np.float32)
  queries[0] = database[3] + 0.01
  return queries, database


def test_funnel_with_whole_database_shortlist_is_exact_search():
  queries, database = _db()
  _, exact = knn.knn_search(queries, database, [16], 7)
  for stages in ([(4, 300), (16, 7)], [(4, 10_000), (8, 300), (16, 20)]):
    np.testing.assert_array_equal(funnel.funnel_search(queries, database, stages, 7), exact[0])
  np.testing.assert_array_equal(
      funnel.single_shortlist_search(queries, database, 4, 300, 16, 7), exact[0])
  assert list(exact[0, 0, :2]) == [3, 150]  # _db's tie
  # A real shortlist: the first stage is the exact search at its dim, the
  # re-ranked list a subset of it.
  _, at4 = knn.knn_search(queries, database, [4], 300)
  got = funnel.funnel_search(queries, database, [(4, 300)], 300)
  np.testing.assert_array_equal(got, at4[0])
  short = funnel.funnel_search(queries, database, [(4, 300), (16, 7)], 5)
  np.testing.assert_array_equal(short, exact[0, :, :5])


def test_funnel_errors():
  queries, database = _db(n=40, q=2, d=8)
  with pytest.raises(ValueError, match="non-increasing"):
    funnel.funnel_search(queries, database, [(4, 10), (8, 20)], 5)
  with pytest.raises(ValueError, match=r"1 <= dim <= 8"):
    funnel.funnel_search(queries, database, [(4, 10), (16, 5)], 5)
  with pytest.raises(ValueError, match="last shortlist"):
    funnel.funnel_search(queries, database, [(4, 10), (8, 5)], 6)


def test_funnel_mflops_hand_computed():
  # 1000 * 8 + 200 * 16 + 100 * 64 = 17,600 multiply-adds = 35,200 FLOPs.
  assert funnel.funnel_mflops(1000, [(8, 200), (16, 100), (64, 10)]) == pytest.approx(
      (0.0352, 0.128))
  assert funnel.funnel_mflops(1000, [(8, 200), (64, 10)], final_dim=2048)[1] == pytest.approx(
      2 * 1000 * 2048 / 1e6)
  # A shortlist beyond the database is the whole database: 100 * 8 + 100 * 16.
  assert funnel.funnel_mflops(100, [(8, 500), (16, 10)])[0] == pytest.approx(2 * 2400 / 1e6)


def test_funnel_metrics():
  queries, database = _db()
  rng = np.random.default_rng(1)
  db_labels, q_labels = rng.integers(0, 3, 300), rng.integers(0, 3, 20)
  out = funnel.funnel_metrics(queries, q_labels, database, db_labels,
                              {"whole": [(4, 300), (16, 7)],
                               "short": [(4, 50), (8, 20), (16, 7)]},
                              ks=(7,), warmup=False)
  assert set(out) == {"exact", "whole", "short"}
  assert out["exact"]["speedup_vs_exact"] == 1.0
  for metric in ("map@7", "precision@7", "recall@7", "knn_top1"):
    assert out["whole"][metric] == out["exact"][metric]
  assert out["short"]["mflops_per_query"] == pytest.approx(2 * (300 * 4 + 50 * 8 + 20 * 16) / 1e6)
  assert out["short"]["flops_reduction_vs_exact"] == pytest.approx(
      300 * 16 / (300 * 4 + 50 * 8 + 20 * 16))
  assert all(v["seconds"] > 0 for v in out.values())
  with pytest.raises(ValueError, match=r"funnels\.tiny.*max\(ks\)=7"):
    funnel.funnel_metrics(queries, q_labels, database, db_labels, {"tiny": [(4, 5)]}, ks=(7,))


# ----------------------------------------------------------------------------
# Quantisation.
# ----------------------------------------------------------------------------
def test_quantize_codes_and_bytes():
  np.testing.assert_array_equal(quantize.quantize([[0.5, -0.1, 0.0, -3.0]], "binary"),
                                [[1, -1, 1, -1]])
  x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
  scale = quantize.int8_scale(x)
  codes = quantize.quantize(x, "int8", scale=scale)
  assert codes.dtype == np.int8 and np.abs(codes).max(0).tolist() == [127] * 6
  err = np.abs(quantize.dequantize(codes, "int8", scale=scale) - x)
  assert np.all(err <= scale / 2 + 1e-6)
  assert quantize.bytes_per_vector([8, 12, 64], "binary") == {8: 1, 12: 2, 64: 8}
  assert quantize.bytes_per_vector([8, 12], "int8") == {8: 8, 12: 12}
  assert quantize.bytes_per_vector([8], "float32") == {8: 32}
  with pytest.raises(ValueError, match="must be one of"):
    quantize.quantize(x, "int4")


def test_quantized_knn_matches_brute_force():
  rng = np.random.default_rng(0)
  database = rng.normal(size=(200, 16)).astype(np.float32)
  queries = rng.normal(size=(30, 16)).astype(np.float32)
  db_labels, q_labels = rng.integers(0, 4, 200), rng.integers(0, 4, 30)
  dims = [4, 16]

  def unit(a, m):
    return a[:, :m] / np.linalg.norm(a[:, :m], axis=1, keepdims=True)

  want = {"binary": {}, "int8": {}}
  for m in dims:
    hamming = (np.sign(queries[:, None, :m]) != np.sign(database[None, :, :m])).sum(-1)
    want["binary"][m] = np.mean(db_labels[hamming.argmin(1)] == q_labels)
    scale = np.abs(unit(database, m)).max(0) / 127
    cq = np.clip(np.rint(unit(queries, m) / scale), -127, 127)
    cx = np.clip(np.rint(unit(database, m) / scale), -127, 127)
    want["int8"][m] = np.mean(db_labels[((cq * scale) @ (cx * scale).T).argmax(1)] == q_labels)
  for kind in want:
    assert quantize.quantized_knn(queries, q_labels, database, db_labels, dims, kind) == \
        pytest.approx(want[kind]), kind
  assert quantize.quantized_knn(queries, q_labels, database, db_labels, dims, "float32") == \
      knn.knn_top1(queries, q_labels, database, db_labels, dims)


# ----------------------------------------------------------------------------
# Post-hoc baselines.
# ----------------------------------------------------------------------------
def test_svd_recovers_a_two_dim_subspace():
  rng = np.random.default_rng(0)
  plane = rng.normal(size=(2, 6))
  x = (rng.normal(size=(100, 2)) @ plane + rng.normal(size=6)).astype(np.float32)
  proj = baselines.svd_project(x, [1, 2, 6])
  np.testing.assert_allclose(proj.basis.T @ proj.basis, np.eye(6), atol=1e-5)
  np.testing.assert_allclose(proj(x, 2) @ proj.basis[:, :2].T + proj.mean, x, atol=1e-4)
  np.testing.assert_allclose(proj(x, 6)[:, 2:], 0, atol=1e-4)  # nothing beyond the plane
  np.testing.assert_array_equal(proj(x, 6)[:, :2], proj(x, 2))
  # Without centring the plane must pass through 0 to be recovered by 2 vectors.
  y = x - proj.mean
  raw = baselines.svd_project(y, [2], center=False)
  assert raw.mean is None
  np.testing.assert_allclose(raw(y, 2) @ raw.basis.T, y, atol=1e-4)


def test_random_features_nest():
  x = np.arange(30, dtype=np.float32).reshape(3, 10)
  proj = baselines.random_features(10, [3, 7], seed=1)
  np.testing.assert_array_equal(proj(x, 7)[:, :3], proj(x, 3))
  assert len(set(proj.columns.tolist())) == 7
  np.testing.assert_array_equal(proj.columns,
                                baselines.random_features(10, [3, 7], seed=1).columns)
  np.testing.assert_array_equal(proj(x, 3), x[:, proj.columns[:3]])


def test_prefix_baseline_is_truncation():
  x = np.arange(30, dtype=np.float32).reshape(3, 10)
  proj = baselines.make_projection(x, [2, 5], "prefix")
  np.testing.assert_array_equal(proj(x, 2), x[:, :2])
  # The linear probe on the first m coordinates sees only those: blobs that
  # differ only in coordinate 3 are separable at 4 dims, not at 2.
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 400)
  emb = rng.normal(size=(400, 6)).astype(np.float32)
  emb[:, 3] += 8 * y
  data = {"embedding": emb, "label": y}
  top1 = baselines.baseline_linear(data, data, [2, 4], "prefix")
  assert top1[4] > 0.99 and top1[2] < 0.65, top1


def test_baselines_on_separable_blobs():
  rng = np.random.default_rng(0)
  centers = 4 * rng.normal(size=(3, 8))

  def split(n):
    y = rng.integers(0, 3, n)
    return {"embedding": (centers[y] + rng.normal(size=(n, 8))).astype(np.float32), "label": y}

  train, eval_ = split(300), split(100)
  for method in ("svd", "random", "prefix"):
    lin = baselines.baseline_linear(train, eval_, [4, 8], method)
    assert set(lin) == {4, 8} and lin[8] > 0.9, (method, lin)
  near = baselines.baseline_knn(train, eval_, [2, 8], "svd")
  assert near[8] > 0.9 and near[2] > 0.8, near
  with pytest.raises(ValueError, match="must be one of"):
    baselines.baseline_knn(train, eval_, [2], "pca")
