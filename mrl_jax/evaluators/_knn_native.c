/* Exact top-k cosine search at every prefix dim, on the CPU, in one pass.
 *
 * The native counterpart of `knn._search` (mrl_jax/evaluators/knn.py), for
 * hosts without an accelerator; called through ctypes by `knn_native.py`,
 * which prepares the inputs and splits the queries over threads.
 *
 * Scores are s_j(q, x) = <q[:m_j], x[:m_j]> / |x[:m_j]| (the query's own
 * norm does not change its ranking and is applied by the caller). The
 * features are split into the chunks between consecutive dims; a register
 * tile of QB queries x RB database rows accumulates the dot products chunk
 * by chunk, and after each chunk the running sums ARE the prefix dot
 * products of that dim: they are scaled by 1/|x[:m_j]| and fed to that
 * dim's top-k while still in registers. So every dim costs one multiply and
 * one compare per score on top of a single full-dim pass, and no score
 * matrix is ever stored.
 *
 * Database layout (prepared by the caller): blocks of RB rows, transposed
 * within the block, xb[nblk][d][RB]; inverse prefix norms xinv[nblk][D][RB].
 * Rows that must never be returned (padding, masked rows) have inverse norm
 * NaN: their scores are NaN and NaN > t is false, so they never enter a
 * top-k.
 *
 * Ties go to the lower database row: rows are visited in increasing order
 * (blocks in order, the lanes of a block in order), a score enters a top-k
 * only when strictly above its threshold, and the final order is by
 * (score, lower row).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "../_native_cpu.h"
#ifdef HAVE_AVX2_VERSION
#include <immintrin.h>
#endif

#define QB 4  /* queries per register tile (4 x 2 accumulator vectors) */
#define RB 16 /* database rows per block: two vectors of 8 */
#define CAP 2 /* candidate buffer entries per k (cut_buffer assumes 2) */

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));
/* Unaligned loads from the caller's arrays. */
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));

#define INLINE static inline __attribute__((always_inline))

INLINE v8f load8(const float *p) { return *(const v8f_u *)p; }

/* Bit l (l < 16) set where lane l of the scores (s0, s1) is above t. */
INLINE uint32_t hits_generic(v8f s0, v8f s1, v8f t) {
  const v8i bit = {1, 2, 4, 8, 16, 32, 64, 128};
  v4l l0 = (v4l)((s0 > t) & bit), l1 = (v4l)((s1 > t) & (bit << 8));
  uint64_t o = (uint64_t)(l0[0] | l0[1] | l0[2] | l0[3] | l1[0] | l1[1] | l1[2] | l1[3]);
  return (uint32_t)((o | (o >> 32)) & 0xffff);
}

#ifdef HAVE_AVX2_VERSION
/* The same, two instructions per half; inlined into the AVX2 search only. */
__attribute__((target("avx2,fma"))) static inline uint32_t hits_avx2(v8f s0, v8f s1,
                                                                     v8f t) {
  __m256 a = _mm256_cmp_ps((__m256)s0, (__m256)t, _CMP_GT_OQ);
  __m256 b = _mm256_cmp_ps((__m256)s1, (__m256)t, _CMP_GT_OQ);
  return (uint32_t)_mm256_movemask_ps(a) | (uint32_t)_mm256_movemask_ps(b) << 8;
}
#define HITS(avx2, s0, s1, t) ((avx2) ? hits_avx2(s0, s1, t) : hits_generic(s0, s1, t))
#else
#define HITS(avx2, s0, s1, t) hits_generic(s0, s1, t)
#endif

/* ---------------------------------------------------------------------- */
/* Top-k for k > 1: a candidate buffer of CAP * k entries per (dim,       */
/* query). Scores above the threshold are appended in row order; a full   */
/* buffer is cut back (cut_buffer) to the entries at or above a new       */
/* threshold that at least k of them reach. Appending costs O(1) and a    */
/* cut O(k) per ~k candidates, so the work per (dim, query) is            */
/* O(candidates), about k ln(N / k) of them: a heap would pay O(log k)    */
/* per candidate, and with one top-k per dim that is where the time goes. */
/* Seeded thresholds (search_body) cut the candidates to ~k + a few       */
/* sqrt(k / f) for a sample rate f: ~420 instead of ~1,100 per list at     */
/* N = 60,000, k = 100, f = 1/32.                                          */
/* The final top-k is an exact cut (cut_exact) and a sort on 64-bit keys. */
/* Order: higher score first, then lower row (rows are unique, so this is */
/* a strict total order).                                                 */
/* ---------------------------------------------------------------------- */
/* (score, row) as one unsigned key that sorts ascending in the order
 * above: the score's bits made monotonic and inverted, then the row. */
INLINE uint64_t entry_key(float score, int32_t row) {
  uint32_t u;
  score += 0.0f; /* -0 -> +0: equal scores, equal keys but for the row */
  memcpy(&u, &score, sizeof(u));
  u = (u & 0x80000000u) ? ~u : u | 0x80000000u; /* ascending with the score */
  return (uint64_t)(~u) << 32 | (uint32_t)row;
}

/* Sorts keys ascending: quicksort with branchless partitions (keys are
 * unique) and insertion sort below 16. */
static void sort_keys(uint64_t *a, int64_t n) {
  while (n > 16) {
    uint64_t x = a[0], y = a[n / 2], z = a[n - 1];
    uint64_t pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
    int64_t lt = 0;
    for (int64_t i = 0; i < n; i++) { /* [0, lt) < pivot */
      uint64_t v = a[i];
      a[i] = a[lt];
      a[lt] = v;
      lt += v < pivot;
    }
    /* a[lt, n) >= pivot; move the pivot to a[lt]. */
    for (int64_t i = lt; i < n; i++) {
      if (a[i] == pivot) {
        a[i] = a[lt];
        a[lt] = pivot;
        break;
      }
    }
    if (lt < n - lt - 1) {
      sort_keys(a, lt);
      a += lt + 1;
      n -= lt + 1;
    } else {
      sort_keys(a + lt + 1, n - lt - 1);
      n = lt;
    }
  }
  for (int64_t i = 1; i < n; i++) {
    uint64_t v = a[i];
    int64_t j = i - 1;
    while (j >= 0 && a[j] > v) {
      a[j + 1] = a[j];
      j--;
    }
    a[j + 1] = v;
  }
}

/* Sorts entries [0, n) best first (score descending, then row ascending). */
static void sort_entries(float *s, int32_t *r, int64_t n, uint64_t *keys) {
  for (int64_t i = 0; i < n; i++) keys[i] = entry_key(s[i], r[i]);
  sort_keys(keys, n);
  for (int64_t i = 0; i < n; i++) {
    int32_t row = (int32_t)(uint32_t)keys[i];
    uint32_t u = ~(uint32_t)(keys[i] >> 32);
    u = (u & 0x80000000u) ? u & 0x7fffffffu : ~u;
    memcpy(&s[i], &u, sizeof(u));
    r[i] = row;
  }
}

typedef struct {
  float thr;     /* candidates must score above this (-inf at first); k == 1: the best score */
  int32_t count; /* entries in the buffer; k == 1: the best row (-1: none) */
} topk_state;

/* The k-th largest of a[0, n) (k <= n); reorders a. Quickselect with
 * branchless three-way partitions: candidate scores are random-looking, so
 * a compare-and-branch partition mispredicts about every other element. */
static float kth_largest(float *a, int64_t n, int64_t k) {
  int64_t lo = 0, hi = n, want = k - 1; /* 0-based rank, descending */
  while (hi - lo > 1) {
    float x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi - 1];
    /* median of three */
    float pivot = x > y ? (y > z ? y : (x > z ? z : x)) : (x > z ? x : (y > z ? z : y));
    int64_t gt = lo;
    for (int64_t i = lo; i < hi; i++) { /* [lo, gt) > pivot */
      float v = a[i];
      a[i] = a[gt];
      a[gt] = v;
      gt += v > pivot;
    }
    int64_t eq = gt;
    for (int64_t i = gt; i < hi; i++) { /* [gt, eq) == pivot */
      float v = a[i];
      a[i] = a[eq];
      a[eq] = v;
      eq += v == pivot;
    }
    if (want < gt) hi = gt;
    else if (want < eq) return pivot;
    else lo = eq;
  }
  return a[lo];
}

/* Keeps the entries of the buffer (in row order) that are above t, and
 * among those equal to t the lowest rows, up to `ties` of them; stable and
 * branchless. Returns the new count. */
static int64_t compact(float *s, int32_t *r, int64_t n, float t, int64_t ties) {
  int64_t w = 0;
  for (int64_t i = 0; i < n; i++) {
    float v = s[i];
    int64_t tie = v == t;
    int64_t keep = (v > t) | (tie & (ties > 0));
    ties -= keep & tie;
    s[w] = v;
    r[w] = r[i];
    w += keep;
  }
  return w;
}

/* Keeps the entries scoring >= t, in order. Returns the new count. */
static int64_t compact_at_least(float *s, int32_t *r, int64_t n, float t) {
  int64_t w = 0;
  for (int64_t i = 0; i < n; i++) {
    float v = s[i];
    s[w] = v;
    r[w] = r[i];
    w += v >= t;
  }
  return w;
}

/* The buffer cut to exactly its best k (row order kept); the threshold
 * becomes the k-th best score. */
static void cut_exact(topk_state *st, float *s, int32_t *r, int64_t k, float *tmp) {
  int64_t n = st->count, above = 0;
  memcpy(tmp, s, (size_t)n * sizeof(float));
  float t = kth_largest(tmp, n, k);
  for (int64_t i = 0; i < n; i++) above += s[i] > t;
  st->count = (int32_t)compact(s, r, n, t, k - above);
  st->thr = t;
}

/* A full buffer (2k entries) cut back to between k and ~1.2k entries: the
 * threshold t is read off a sorted sample of the scores so that about 60%
 * of them are >= t, checked by counting; every entry >= t is kept. Any t
 * with at least k entries >= t is a valid threshold (it is at most the
 * k-th best score so far), and this costs a count and a copy per entry
 * instead of a selection. The exact cut is the fallback. */
#define SAMPLE 31
static void cut_buffer(topk_state *st, float *s, int32_t *r, int64_t k, float *tmp) {
  int64_t n = st->count;
  float sample[SAMPLE];
  for (int a = 0; a < SAMPLE; a++) sample[a] = s[(int64_t)a * n / SAMPLE];
  for (int rank = 18; rank < SAMPLE; rank += 6) { /* ~60% of them, then ~80% */
    float t = kth_largest(sample, SAMPLE, rank + 1);
    int64_t at_least = 0;
    for (int64_t i = 0; i < n; i++) at_least += s[i] >= t;
    if (at_least >= k && at_least <= n - n / 8) {
      st->count = (int32_t)compact_at_least(s, r, n, t);
      /* Rows scoring exactly t were kept, so later rows must beat it. */
      st->thr = t;
      return;
    }
  }
  cut_exact(st, s, r, k, tmp);
}

/* ---------------------------------------------------------------------- */
/* The search.                                                            */
/* ---------------------------------------------------------------------- */
/* Appends the lanes of `s` set in `m` (8 bits), with their rows, at
 * buf[count...] in lane order: a compress-store through a permutation
 * table on AVX2 (no branch per lane), else lane by lane. May write up to 8
 * entries past the new count, which the buffers leave room for (BUF). */
INLINE void append_generic(float *cs, int32_t *cr, int32_t *count, const float *s,
                           int32_t first_row, uint32_t m) {
  while (m) {
    int l = __builtin_ctz(m);
    m &= m - 1;
    cs[*count] = s[l];
    cr[*count] = first_row + l;
    ++*count;
  }
}

#ifdef HAVE_AVX2_VERSION
__attribute__((target("avx2,fma"))) static inline void append_avx2(
    float *cs, int32_t *cr, int32_t *count, const float *s, int32_t first_row,
    uint32_t m, const int32_t *perm) {
  __m256i idx = _mm256_loadu_si256((const __m256i *)(perm + 8 * m));
  __m256i rows = _mm256_add_epi32(_mm256_set1_epi32(first_row),
                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  _mm256_storeu_ps(cs + *count, _mm256_permutevar8x32_ps(_mm256_loadu_ps(s), idx));
  _mm256_storeu_si256((__m256i *)(cr + *count), _mm256_permutevar8x32_epi32(rows, idx));
  *count += __builtin_popcount(m);
}
#define APPEND(avx2, cs, cr, count, s, first_row, m, perm)                   \
  ((avx2) ? append_avx2(cs, cr, count, s, first_row, m, perm)                \
          : append_generic(cs, cr, count, s, first_row, m))
#else
#define APPEND(avx2, cs, cr, count, s, first_row, m, perm) \
  append_generic(cs, cr, count, s, first_row, m)
#endif

/* perm[8 m + i] = the lane of the i-th set bit of m (m < 256). */
static void fill_permutations(int32_t *perm) {
  for (int m = 0; m < 256; m++) {
    int n = 0;
    for (int l = 0; l < 8; l++) {
      if (m >> l & 1) perm[8 * m + n++] = l;
    }
    while (n < 8) perm[8 * m + n++] = 0;
  }
}

/* Candidate buffer entries per (dim, query): CAP * k, plus room for the
 * 16 rows of one block and a vector store past them. */
#define BUF(k) ((size_t)CAP * (size_t)(k) + 32)

/* One register tile (QB queries) against database blocks [b0, b1).
 * Every (dim, query) has a threshold, state[at].thr (at = dim * QB + query):
 * for k == 1 the best score so far, else that of its candidate buffer
 * cand_s / cand_r [D][QB][BUF(k)]. After each chunk, each query's 16 scores
 * are compared with its threshold (strictly: among equal scores the first
 * row seen, the lowest, stays). Pairs with lanes above it park their scores
 * in `parked` [D][QB][RB] and the lanes in `masks` [D][QB], and are handled
 * after the block, so that no call is made while the accumulators are live:
 * k == 1 takes the best hit lane, k > 1 appends the hit lanes to the buffer
 * and cuts it back when full.
 * k == 1: a new best is rare (~ln N times per list), so a pair parks only
 * on a hit, a branch that is almost never taken; so do k > 1 lists with
 * seeded thresholds (`sparse`: ~7% of their (dim, query, block)s have a
 * hit). Otherwise ~15% of them have one, where such a branch mispredicts,
 * so every pair parks and only the list of pairs with hits depends on the
 * test. */
INLINE void tile_pass(const float *qt, int64_t d, const float *xb,
                      const float *xinv, int64_t b0, int64_t b1, int64_t bstep,
                      const int32_t *bounds, int64_t num_dims, int64_t k,
                      float *cand_s, int32_t *cand_r, topk_state *state, float *tmp,
                      float *parked, uint32_t *masks, int32_t *pending,
                      const int32_t *perm, int sparse, int avx2) {
  for (int64_t b = b0; b < b1; b += bstep) {
    const float *xbb = xb + b * d * RB;
    const float *ib = xinv + b * num_dims * RB;
    int64_t npending = 0; /* pending[0, npending): the pairs with hits, in order */
    v8f acc[QB][2];
    for (int qi = 0; qi < QB; qi++) acc[qi][0] = acc[qi][1] = (v8f){0};
    for (int64_t j = 0; j < num_dims; j++) {
      /* The chunk (m_{j-1}, m_j]: afterwards acc holds the dots at m_j. */
      for (int64_t f = bounds[j]; f < bounds[j + 1]; f++) {
        v8f x0 = load8(xbb + f * RB), x1 = load8(xbb + f * RB + 8);
        for (int qi = 0; qi < QB; qi++) {
          float qv = qt[qi * d + f];
          acc[qi][0] += qv * x0;
          acc[qi][1] += qv * x1;
        }
      }
      v8f i0 = load8(ib + j * RB), i1 = load8(ib + j * RB + 8);
      for (int qi = 0; qi < QB; qi++) {
        v8f s0 = acc[qi][0] * i0, s1 = acc[qi][1] * i1;
        int64_t at = j * QB + qi;
        float t = state[at].thr;
        v8f tv = {t, t, t, t, t, t, t, t};
        uint32_t h = HITS(avx2, s0, s1, tv); /* strict: earlier rows win ties */
        /* Rare hits (k == 1, sparse): a branch almost never taken; else
         * every pair parks and only the pending count depends on h. */
        if (!(k == 1 || sparse) || __builtin_expect(h != 0, 0)) {
          masks[at] = h;
          *(v8f_u *)(parked + at * RB) = s0;
          *(v8f_u *)(parked + at * RB + 8) = s1;
          pending[npending] = (int32_t)at;
          npending += h != 0;
        }
      }
    }
    for (int64_t p = 0; p < npending; p++) {
      int64_t at = pending[p];
      uint32_t h = masks[at];
      const float *ps = parked + at * RB;
      topk_state *st = state + at;
      if (k == 1) {
        float best = st->thr;
        int32_t row = st->count;
        while (h) { /* lanes in row order, strict >: the lowest row wins ties */
          int l = __builtin_ctz(h);
          h &= h - 1;
          if (ps[l] > best) {
            best = ps[l];
            row = (int32_t)(b * RB) + l;
          }
        }
        st->thr = best;
        st->count = row;
      } else {
        float *cs = cand_s + (size_t)at * BUF(k);
        int32_t *cr = cand_r + (size_t)at * BUF(k);
        APPEND(avx2, cs, cr, &st->count, ps, (int32_t)(b * RB), h & 0xff, perm);
        APPEND(avx2, cs, cr, &st->count, ps + 8, (int32_t)(b * RB + 8), h >> 8, perm);
        if (st->count >= (int32_t)(CAP * k)) cut_buffer(st, cs, cr, k, tmp);
      }
    }
  }
}

INLINE int search_body(const float *q, int64_t nq, int64_t d, const float *xb,
                       const float *xinv, int64_t nblk, const int32_t *bounds,
                       int64_t num_dims, int64_t k, int64_t query_block,
                       int64_t db_block, float *out_s, int32_t *out_i,
                       int64_t out_q_stride, int64_t sample_step, int64_t sample_k,
                       int avx2) {
  int64_t tiles_per_block = (query_block + QB - 1) / QB;
  size_t nstate = (size_t)(tiles_per_block * num_dims * QB);
  float *qbuf = malloc((size_t)(tiles_per_block * QB * d) * sizeof(float));
  float *cand_s = NULL;
  int32_t *cand_r = NULL;
  topk_state *state = malloc(nstate * sizeof(topk_state));
  float *tmp = NULL;
  float *parked = malloc((size_t)(num_dims * QB * RB) * sizeof(float));
  uint32_t *masks = malloc((size_t)(num_dims * QB) * sizeof(uint32_t));
  int32_t *pending = malloc((size_t)(num_dims * QB) * sizeof(int32_t));
  int32_t *perm = NULL;
  uint64_t *keys = NULL;
  float *seed = malloc(nstate * sizeof(float));
  int ok = qbuf && state && parked && masks && pending && seed;
  if (k > 1) {
    ok = ok && (cand_s = malloc(nstate * BUF(k) * sizeof(float))) != NULL;
    ok = ok && (cand_r = malloc(nstate * BUF(k) * sizeof(int32_t))) != NULL;
    ok = ok && (tmp = malloc(BUF(k) * sizeof(float))) != NULL;
    ok = ok && (perm = malloc(256 * 8 * sizeof(int32_t))) != NULL;
    ok = ok && (keys = malloc(BUF(k) * sizeof(uint64_t))) != NULL;
    if (ok) fill_permutations(perm);
  }

  for (int64_t q0 = 0; ok && q0 < nq; q0 += query_block) {
    int64_t nqb = nq - q0 < query_block ? nq - q0 : query_block;
    int64_t ntiles = (nqb + QB - 1) / QB;
    /* This block's queries, zero-padded to whole tiles. */
    memset(qbuf, 0, (size_t)(ntiles * QB * d) * sizeof(float));
    memcpy(qbuf, q + q0 * d, (size_t)(nqb * d) * sizeof(float));
    size_t n = (size_t)(ntiles * num_dims * QB);
    /* Seeded thresholds (sample_step > 0): each list's threshold starts at
     * the sample_k-th best score among every sample_step-th block, found by
     * a search of those blocks alone. That is no valid threshold of the
     * exact top-k (it may be above the k-th best score), but if at least k
     * scores of the whole database beat it, the k-th best does too and the
     * top-k is exact; a list with fewer is searched again from -inf. A
     * random-looking sample of rate f puts about k f of the top k in the
     * sample, so sample_k a few deviations above k f makes that rare, and
     * the list then takes ~sample_k / f candidates instead of ~k ln(N / k). */
    int seeded = k > 1 && sample_step > 0 && sample_k > 0 && sample_k <= k;
    if (seeded) {
      /* The sample's top-ks lists (ks >= 2: buffers, as in the full pass;
       * ks <= k, so they fit in the full pass's buffers). */
      int64_t ks = sample_k < 2 ? 2 : sample_k;
      for (size_t a = 0; a < n; a++) {
        state[a].thr = -INFINITY;
        state[a].count = 0;
      }
      /* Runs of db_block sample blocks, as in the full pass below. */
      for (int64_t b0 = 0; b0 < nblk; b0 += db_block * sample_step) {
        int64_t b1 = b0 + db_block * sample_step < nblk ? b0 + db_block * sample_step : nblk;
        for (int64_t t = 0; t < ntiles; t++) {
          size_t off = (size_t)(t * num_dims * QB);
          tile_pass(qbuf + t * QB * d, d, xb, xinv, b0, b1, sample_step, bounds, num_dims,
                    ks, cand_s + off * BUF(ks), cand_r + off * BUF(ks), state + off, tmp,
                    parked, masks, pending, perm, 0, avx2);
        }
      }
      for (size_t a = 0; a < n; a++) {
        int64_t cnt = state[a].count;
        seed[a] = -INFINITY;
        if (cnt >= sample_k) {
          memcpy(tmp, cand_s + a * BUF(ks), (size_t)cnt * sizeof(float));
          seed[a] = kth_largest(tmp, cnt, sample_k);
        }
      }
    }
    /* k == 1: count holds the best row (-1: none yet). */
    for (size_t a = 0; a < n; a++) {
      state[a].thr = seeded ? seed[a] : -INFINITY;
      state[a].count = k == 1 ? -1 : 0;
    }
    /* The database in cache-sized runs of blocks, each run against every
     * tile of the query block while it is in cache. */
    for (int64_t b0 = 0; b0 < nblk; b0 += db_block) {
      int64_t b1 = b0 + db_block < nblk ? b0 + db_block : nblk;
      for (int64_t t = 0; t < ntiles; t++) {
        size_t off = (size_t)(t * num_dims * QB);
        tile_pass(qbuf + t * QB * d, d, xb, xinv, b0, b1, 1, bounds, num_dims, k,
                  k > 1 ? cand_s + off * BUF(k) : NULL, k > 1 ? cand_r + off * BUF(k) : NULL,
                  state + off, tmp, parked, masks, pending, perm, seeded, avx2);
      }
    }
    /* Seeded lists with fewer than k candidates (all of a list's
     * candidates beat its seed) are searched again from -inf, the tile's
     * other lists held at +inf (nothing beats it) meanwhile. The results
     * below read only the buffers, so no threshold needs restoring. */
    for (int64_t t = 0; seeded && t < ntiles; t++) {
      size_t off = (size_t)(t * num_dims * QB);
      int redo = 0;
      for (size_t a = off; a < off + (size_t)(num_dims * QB); a++) {
        int real = t * QB + (int64_t)(a % QB) < nqb; /* not a padding query */
        int again = real && state[a].count < k && seed[a] > -INFINITY;
        state[a].thr = again ? -INFINITY : INFINITY;
        if (again) state[a].count = 0;
        redo |= again;
      }
      if (redo) {
        tile_pass(qbuf + t * QB * d, d, xb, xinv, 0, nblk, 1, bounds, num_dims, k,
                  cand_s + off * BUF(k), cand_r + off * BUF(k), state + off, tmp, parked,
                  masks, pending, perm, 0, avx2);
      }
    }
    /* Results [D, out_q_stride, k] for this block's queries. */
    for (int64_t t = 0; t < ntiles; t++) {
      for (int64_t j = 0; j < num_dims; j++) {
        for (int qi = 0; qi < QB && t * QB + qi < nqb; qi++) {
          size_t st = (size_t)((t * num_dims + j) * QB + qi);
          int64_t row = (j * out_q_stride + q0 + t * QB + qi) * k;
          float *os = out_s + row;
          int32_t *oi = out_i + row;
          if (k == 1) {
            os[0] = state[st].count >= 0 ? state[st].thr : -INFINITY;
            oi[0] = state[st].count;
          } else {
            float *cs = cand_s + st * BUF(k);
            int32_t *cr = cand_r + st * BUF(k);
            int64_t cnt = state[st].count;
            if (cnt > k) {
              cut_exact(&state[st], cs, cr, k, tmp);
              cnt = k;
            }
            sort_entries(cs, cr, cnt, keys);
            for (int64_t a = 0; a < k; a++) {
              os[a] = a < cnt ? cs[a] : -INFINITY;
              oi[a] = a < cnt ? cr[a] : -1;
            }
          }
        }
      }
    }
  }
  free(qbuf);
  free(cand_s);
  free(cand_r);
  free(state);
  free(tmp);
  free(parked);
  free(masks);
  free(pending);
  free(perm);
  free(keys);
  free(seed);
  return ok ? 0 : -1;
}

/* The same body compiled twice: with AVX2 + FMA where the CPU has them,
 * and for the baseline instruction set. */
#define SEARCH_ARGS                                                           \
  const float *q, int64_t nq, int64_t d, const float *xb, const float *xinv, \
      int64_t nblk, const int32_t *bounds, int64_t num_dims, int64_t k,      \
      int64_t query_block, int64_t db_block, float *out_s, int32_t *out_i,   \
      int64_t out_q_stride, int64_t sample_step, int64_t sample_k
#define SEARCH_PASS                                                                      \
  q, nq, d, xb, xinv, nblk, bounds, num_dims, k, query_block, db_block, out_s, out_i, \
      out_q_stride, sample_step, sample_k
#ifdef HAVE_AVX2_VERSION
__attribute__((target("avx2,fma"))) static int search_avx2(SEARCH_ARGS) {
  return search_body(SEARCH_PASS, 1);
}
#endif

static int search_generic(SEARCH_ARGS) { return search_body(SEARCH_PASS, 0); }

/* Re-ranking for funnel search: for each query, the rows of its shortlist
 * [K] (-1 = none) scored by cosine at prefix dim m (the query's norm left
 * out: it does not change the ranking), best `size` of them into out
 * [nq, size], ties to the lower row, -1 past the valid rows. x is the
 * database [n, d] row-major; s / r are caller scratch of K entries. */
static void rerank_query(const float *qv, const float *x, int64_t d, const int32_t *rows,
                         int64_t num_rows, int64_t m, int64_t size, float *s, int32_t *r,
                         uint64_t *keys, int32_t *out) {
  int64_t n = 0;
  for (int64_t c = 0; c < num_rows; c++) {
    if (rows[c] < 0) continue;
    const float *xr = x + (int64_t)rows[c] * d;
    float dot = 0.0f, sq = 0.0f;
    for (int64_t f = 0; f < m; f++) {
      dot += qv[f] * xr[f];
      sq += xr[f] * xr[f];
    }
    s[n] = dot / sqrtf(sq > 1e-24f ? sq : 1e-24f);
    r[n] = rows[c];
    n++;
  }
  sort_entries(s, r, n, keys);
  for (int64_t a = 0; a < size; a++) out[a] = a < n ? r[a] : -1;
}

int mrl_knn_rerank(const float *q, int64_t nq, int64_t d, const float *x,
                   const int32_t *shortlist, int64_t num_rows, int64_t m, int64_t size,
                   int32_t *out) {
  float *s = malloc((size_t)(num_rows > 0 ? num_rows : 1) * sizeof(float));
  int32_t *r = malloc((size_t)(num_rows > 0 ? num_rows : 1) * sizeof(int32_t));
  uint64_t *keys = malloc((size_t)(num_rows > 0 ? num_rows : 1) * sizeof(uint64_t));
  int ok = s != NULL && r != NULL && keys != NULL;
  for (int64_t i = 0; ok && i < nq; i++) {
    rerank_query(q + i * d, x, d, shortlist + i * num_rows, num_rows, m, size, s, r, keys,
                 out + i * size);
  }
  free(s);
  free(r);
  free(keys);
  return ok ? 0 : -1;
}

/* The database layout of the search, blocks [b0, b1) of it: x [n, d]
 * row-major -> xb [nblk, d, RB], rows transposed within each block of RB,
 * the last block zero-padded; and xinv [nblk, D, RB], 1 / |x[:m_j]| (the
 * squared norm floored at sq_eps, summed in double), NaN for rows that
 * must never score: mask[r] == 0 (mask may be NULL: every row) and the
 * padding. Blocks are independent, so callers split them over threads. */
void mrl_knn_prepare_database(const float *x, int64_t n, int64_t d, const int32_t *bounds,
                              int64_t num_dims, const uint8_t *mask, double sq_eps,
                              int64_t b0, int64_t b1, float *xb, float *xinv) {
  for (int64_t b = b0; b < b1; b++) {
    float *out = xb + b * d * RB;
    float *inv = xinv + b * num_dims * RB;
    int64_t rows = n - b * RB < RB ? n - b * RB : RB;
    if (rows < RB) memset(out, 0, (size_t)(d * RB) * sizeof(float));
    for (int64_t r = 0; r < rows; r++) {
      const float *row = x + (b * RB + r) * d;
      for (int64_t f = 0; f < d; f++) out[f * RB + r] = row[f];
      double sq = 0.0;
      int valid = mask == NULL || mask[b * RB + r];
      for (int64_t j = 0; j < num_dims; j++) {
        for (int64_t f = bounds[j]; f < bounds[j + 1]; f++) sq += (double)row[f] * row[f];
        inv[j * RB + r] = valid ? (float)(1.0 / sqrt(sq > sq_eps ? sq : sq_eps)) : NAN;
      }
    }
    for (int64_t r = rows; r < RB; r++) {
      for (int64_t j = 0; j < num_dims; j++) inv[j * RB + r] = NAN;
    }
  }
}

/* Queries per register tile: thread slices of whole tiles waste none. */
int64_t mrl_knn_queries_per_tile(void) { return QB; }

/* Rows per database block, for the caller's layout. */
int64_t mrl_knn_rows_per_block(void) { return RB; }

static int force_generic = 0;

/* on != 0: run the baseline version even where AVX2 + FMA exist (tests). */
void mrl_knn_force_generic(int on) { force_generic = on; }

/* 1 if the AVX2 + FMA version runs on this CPU. */
int mrl_knn_uses_avx2(void) { return mrl_cpu_runs_avx2(force_generic); }

/* Queries q [nq, d] (row-major) against the prepared database; writes
 * out_s / out_i [D, out_q_stride, k] at query rows [0, nq) (the caller
 * offsets the pointers to its slice). Returns 0, or -1 if out of memory. */
int mrl_knn_search(SEARCH_ARGS) {
#ifdef HAVE_AVX2_VERSION
  if (mrl_knn_uses_avx2()) return search_avx2(SEARCH_PASS);
#endif
  return search_generic(SEARCH_PASS);
}
