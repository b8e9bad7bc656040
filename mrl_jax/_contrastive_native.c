/* The nested softmax contrastive loss of every prefix, fused, on the CPU
 * (and the sigmoid loss on the same tiles and panels: mrl_sigmoid_*).
 *
 * The native counterpart of `matryoshka._softmax_fwd` (and `_sigmoid_fwd`)
 * for all the prefixes at once, for hosts without an accelerator:
 * `contrastive_native.py` calls each loss as two XLA FFI custom calls (the
 * handlers at the end of this file), on XLA's own buffers inside the jitted
 * program.
 *
 * For prefix m (M of them) the logits are l_ij = <x_i[:m], y_j[:m]> a_i c_j
 * (a_i = 1 / (|x_i[:m]| tau_m), c_j = 1 / |y_j[:m]|). The features are laid
 * out in chunks between consecutive dims, each padded with zeros to a
 * multiple of 8 (bounds[] are the padded offsets), and the batch is padded
 * to a multiple of 24 rows, which every sum masks out (-inf row / column
 * biases). A register tile of 4 x rows by 24 y rows accumulates the dot
 * products chunk by chunk: after chunk m the running sums ARE the prefix-m
 * dots. So every prefix costs elementwise work on registers on top of one
 * full-dim pass; the chunk products never go through memory, as XLA's
 * per-chunk matmuls on a CPU must.
 *
 * Forward: e = exp(l - shift_m) (taken as 2^z, log2(e) folded into the
 * logit scales) is summed along rows and columns, lse = shift + log(sum),
 * and every prefix's dots are stored (tile-major, in the order the backward
 * reads them, with streaming stores) for the backward pass, which then does
 * the 2 matrix products the full-dim loss does and no third. shift_m >= max l - 70, so
 * no e overflows; a prefix whose sums underflowed (< e^-60) gets exact
 * max-shifted log-sum-exps from the stored dots instead, and two exps per
 * logit in the backward (two[m] = 1).
 *
 * Backward: the cotangent of l_ij is G = gm (exp(l - lse_r_i) + exp(l -
 * lse_c_j)), gm = g_m / (2 B), the softmax halves of both directions. With
 * gd = G a_i c_j, a panel of 96 x rows by 192 y rows holds
 *   h_c = sum_{m >= c} gd_m     (chunk c feeds every prefix from c on),
 * built in place from the last prefix down; after each prefix c,
 * dx_i[chunk c] += sum_j h_c,ij y_j[chunk c] and dy_j[chunk c] += sum_i
 * h_c,ij x_i[chunk c] run on it as register-tiled (6 x 16) matrix products;
 * ga_i = sum_j G dots c_j and gc_j = sum_i G dots a_i are the cotangents of
 * the logit scales.
 *
 * The whole loss (mrl_contrastive_loss_forward / _backward) adds the O(B d)
 * parts: the prefix norms, the diagonal and label-smoothing terms, and the
 * gradients through the norms and the inverse temperatures. Rows are split
 * into shares, one per CPU this process may run on by default, that run on
 * XLA's CPU thread pool inside the FFI handlers (on pthreads elsewhere).
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "_native_cpu.h"

#define TI 4    /* x rows per register tile */
#define TJ 24   /* y rows per register tile (3 vectors) */
#define ROWS 24 /* the batch is padded to a multiple of this (of TI, TJ and 6) */
#define UNIT 12 /* threads share the x rows in multiples of this (of TI and 6) */
#define GROUP 32 /* x tiles per forward group (their rows stay in L2) */
#define RUN 4    /* y blocks per forward run */
#define KC 160   /* forward feature blocks: chunks merged up to >= KC ... */
#define KMAX 256 /* ... and split down to <= KMAX features */
#define PR 96    /* backward panel: x rows ... */
#define PC 192   /* ... by y rows */

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));

#define INLINE static inline __attribute__((always_inline))

INLINE v8f load8(const float *p) { return *(const v8f_u *)p; }
INLINE void store8(float *p, v8f v) { *(v8f_u *)p = v; }
/* A store that bypasses the caches (p 32-byte aligned): for the stored dots,
 * written once per call and read back only by the backward pass, which
 * would otherwise evict the features every tile reads. */
#if defined(__x86_64__) && defined(__GNUC__)
#include <xmmintrin.h>
typedef float v4f __attribute__((vector_size(16)));
INLINE void stream8(float *p, v8f v) {
  v4f lo = {v[0], v[1], v[2], v[3]}, hi = {v[4], v[5], v[6], v[7]};
  _mm_stream_ps(p, (__m128)lo);
  _mm_stream_ps(p + 4, (__m128)hi);
}
#define STREAM_FENCE() _mm_sfence()
#else
INLINE void stream8(float *p, v8f v) { store8(p, v); }
#define STREAM_FENCE() ((void)0)
#endif
/* Scalars broadcast through vector-scalar arithmetic (one vbroadcastss). */

/* 2^z to ~3 ulp (z = n + r, n an integer, |r| <= 1/2, a degree-5 minimax
 * polynomial for 2^r, times 2^n): the exps are taken in base 2, log2(e)
 * folded into the logit scales and biases, which saves the base-e range
 * reduction. z is clamped to >= -126, so a -inf argument (a padded row or
 * column) gives 2^-126 (~1e-38): next to sums >= e^-60 it adds nothing, and
 * every cotangent it enters is multiplied by an exact 0 (its row or column
 * scale). */
INLINE v8f vexp2(v8f z) {
  const float lo = -126.0f;
  v8i keep = (v8i)(z >= lo);
  z = (v8f)(((v8i)z & keep) | ((v8i)((v8f){0} + lo) & ~keep));
  const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
  v8f t = z + magic;
  v8f r = z - (t - magic);
  v8f p = r * 1.3302220031619072e-3f + 9.672933258116245e-3f;
  p = p * r + 5.55061511695385e-2f;
  p = p * r + 2.4022217094898224e-1f;
  p = p * r + 6.931470632553101e-1f;
  p = p * r + 1.0f;
  /* t's bits are 0x4B400000 + n: shifted left by 23, only n is left */
  return (v8f)((v8i)p + ((v8i)t << 23));
}
#define LOG2E 1.44269504088896341f
#define LN2 0.693147180559945309f

/* log1p(e) for e in [0, 1]: e times a degree-8 minimax polynomial for
 * log1p(e) / e (3e-8 relative; no division). */
INLINE v8f vlog1p01(v8f e) {
  v8f p = e * 0.005288171581923962f - 0.029758933931589127f;
  p = p * e + 0.07869814336299896f;
  p = p * e - 0.13709241151809692f;
  p = p * e + 0.19131067395210266f;
  p = p * e - 0.24850526452064514f;
  p = p * e + 0.3332024812698364f;
  p = p * e - 0.4999956488609314f;
  p = p * e + 1.0f;
  return e * p;
}

INLINE v8f vabs(v8f v) { return (v8f)((v8i)v & 0x7fffffff); }
INLINE v8f vpos(v8f v) { return (v8f)((v8i)v & (v8i)(v > 0.0f)); } /* max(v, 0) */

/* softplus(v) = max(v, 0) + log1p(exp(-|v|)) (-inf: ~1e-38) */
INLINE v8f vsoftplus(v8f v) { return vpos(v) + vlog1p01(vexp2(vabs(v) * -LOG2E)); }

/* sigmoid(v) from v and e = exp(-|v|) */
INLINE v8f vsigmoid(v8f v, v8f e) {
  v8i pos = (v8i)(v >= 0.0f);
  v8f num = (v8f)((pos & (v8i)((v8f){0} + 1.0f)) | (~pos & (v8i)e));
  return num / (e + 1.0f);
}

/* Negate lane jj (0-23) of the three vectors u0, u1, u2: the diagonal
 * logit's sign in the sigmoid loss. */
#define FLIP_LANE(jj, u0, u1, u2)                       \
  do {                                                  \
    int jj_ = (jj);                                     \
    if (jj_ < 8) u0[jj_] = -u0[jj_];                    \
    else if (jj_ < 16) u1[jj_ - 8] = -u1[jj_ - 8];      \
    else u2[jj_ - 16] = -u2[jj_ - 16];                  \
  } while (0)

/* The offset of prefix m's dots of tile (ti, bj) (nbj y blocks, M
 * prefixes), in the order the backward reads them: by x tiles; within each
 * by runs of the PC / TJ y blocks of a backward panel; within a run by
 * prefix, from the last; then by y block. One prefix of a panel row is one
 * contiguous read. */
#define CB (PC / TJ)
INLINE int64_t dots_at(int64_t nbj, int64_t M, int64_t ti, int64_t bj, int64_t m) {
  int64_t r0 = bj / CB * CB, nb = nbj - r0 < CB ? nbj - r0 : CB;
  return ((ti * nbj + r0) * M + (M - 1 - m) * nb + (bj - r0)) * (TI * TJ);
}

#define FOR_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define FOR_TILE(X) X(0) X(1) X(2) X(3)

/* ---------------------------------------------------------------------- */
/* Forward.                                                               */
/* ---------------------------------------------------------------------- */
typedef struct {
  int64_t bp, dp, m;      /* padded rows, padded features, prefixes */
  const int32_t *bounds;  /* [m + 1] padded chunk offsets */
  const float *xk;        /* [bp/4][dp][4]: x packed by tiles */
  const float *yk;        /* [bp/24][dp][24]: y packed by blocks */
  const float *a, *c;     /* [m][bp] logit scales, a times log2(e) (0 on padded rows) */
  const float *cb;        /* [m][bp] -shift_m log2(e) (-inf on padded columns) */
  const float *rb;        /* [bp] row bias: 0, or -inf on padded rows */
  float *dots;            /* bp * bp * m floats, tiles of [4][24] (dots_at) */
  float *rowp;            /* [m][bp][8] lane partials of the row sums */
  int64_t nkb;            /* feature blocks */
  const int32_t *kb;      /* [nkb + 1] their offsets */
  int aligned;            /* dots is 32-byte aligned: stream the stores */
  int sigmoid;            /* the sigmoid loss: a plain, cb = bias_m (-inf on padded
                             columns), colp's first 8 floats of each prefix the
                             lane partials of its sum of softplus */
  int64_t b;              /* real rows (the diagonal's sign, sigmoid) */
} Fwd;

/* One tile over features [k0, k1); acc holds the 12 accumulators between
 * blocks. The prefixes whose chunk ends in (k0, k1] are finished here. */
INLINE void fwd_tile(const Fwd *F, int64_t ti, int64_t bj, int64_t k0, int64_t k1, float *st,
                     int first, int last, float *colp) {
  const int64_t dp = F->dp, bp = F->bp, nbj = bp / TJ;
  const float *xt = F->xk + ti * dp * TI, *yb = F->yk + bj * dp * TJ;
  const int64_t i0 = ti * TI, j0 = bj * TJ;
#define DECL(q) v8f A##q##0, A##q##1, A##q##2;
  FOR_TILE(DECL)
#undef DECL
  if (first) {
#define ZERO(q) A##q##0 = A##q##1 = A##q##2 = (v8f){0};
    FOR_TILE(ZERO)
#undef ZERO
  } else {
#define LOAD(q) A##q##0 = load8(st + q * 24); A##q##1 = load8(st + q * 24 + 8); A##q##2 = load8(st + q * 24 + 16);
    FOR_TILE(LOAD)
#undef LOAD
  }
  int64_t f = k0;
  int64_t m = 0;
  while (F->bounds[m + 1] <= k0) m++;
  for (;; m++) {
    int64_t e = F->bounds[m + 1] < k1 ? F->bounds[m + 1] : k1;
#pragma GCC unroll 4
    for (; f < e; f++) {
      const float *xf = xt + f * TI;
      v8f y0 = load8(yb + f * TJ), y1 = load8(yb + f * TJ + 8), y2 = load8(yb + f * TJ + 16);
#define FMA(q) { float xq = xf[q]; A##q##0 += xq * y0; A##q##1 += xq * y1; A##q##2 += xq * y2; }
      FOR_TILE(FMA)
#undef FMA
    }
    if (F->bounds[m + 1] > k1) break; /* the chunk goes on in the next block */
    /* Prefix m is complete: store its dots, add its exps to the sums. */
    float *dt = F->dots != NULL ? F->dots + dots_at(nbj, F->m, ti, bj, m) : NULL;
    const float *cm = F->c + m * bp + j0, *cbm = F->cb + m * bp + j0, *am = F->a + m * bp;
    v8f c0 = load8(cm), c1 = load8(cm + 8), c2 = load8(cm + 16);
    v8f b0 = load8(cbm), b1 = load8(cbm + 8), b2 = load8(cbm + 16);
    v8f cs0 = {0}, cs1 = {0}, cs2 = {0};
    /* row q's dots out to the stored dots */
#define PUT_DOTS(q)                                                     \
  if (dt == NULL) {                                                     \
  } else if (F->aligned) {                                              \
    stream8(dt + q * 24, A##q##0);                                      \
    stream8(dt + q * 24 + 8, A##q##1);                                  \
    stream8(dt + q * 24 + 16, A##q##2);                                 \
  } else {                                                              \
    store8(dt + q * 24, A##q##0);                                       \
    store8(dt + q * 24 + 8, A##q##1);                                   \
    store8(dt + q * 24 + 16, A##q##2);                                  \
  }
    if (F->sigmoid) {
      /* softplus(+-(l + bias)) summed: the diagonal's sign flipped (rows
       * < b: a padded row's -inf must not turn to +inf) */
      const int diag = i0 >= j0 && i0 < j0 + TJ;
      v8f acc = {0};
#define SIG(q)                                                                   \
  {                                                                              \
    PUT_DOTS(q)                                                                  \
    float aq = am[i0 + q], rq = F->rb[i0 + q];                                   \
    v8f u0 = A##q##0 * (aq * c0) + (b0 + rq), u1 = A##q##1 * (aq * c1) + (b1 + rq); \
    v8f u2 = A##q##2 * (aq * c2) + (b2 + rq);                                    \
    if (diag && i0 + q < F->b) FLIP_LANE(i0 + q - j0, u0, u1, u2);               \
    acc += (vsoftplus(u0) + vsoftplus(u1)) + vsoftplus(u2);                      \
  }
      FOR_TILE(SIG)
#undef SIG
      float *cp = colp + m * bp;
      store8(cp, load8(cp) + acc);
      if (F->bounds[m + 1] == k1) break;
      continue;
    }
    float *rp = F->rowp + (m * bp + i0) * 8;
    /* PAD: a tile with padded rows, whose -inf row biases mask them out of
     * the column sums (the last tiles only: the rest skip the add). */
#define EPI(q, PAD)                                                     \
  {                                                                     \
    PUT_DOTS(q)                                                         \
    float aq = am[i0 + q], rq = PAD ? F->rb[i0 + q] : 0.0f;             \
    v8f e0 = vexp2(A##q##0 * (aq * c0) + (PAD ? b0 + rq : b0));         \
    v8f e1 = vexp2(A##q##1 * (aq * c1) + (PAD ? b1 + rq : b1));         \
    v8f e2 = vexp2(A##q##2 * (aq * c2) + (PAD ? b2 + rq : b2));         \
    store8(rp + q * 8, load8(rp + q * 8) + ((e0 + e1) + e2));           \
    cs0 += e0;                                                          \
    cs1 += e1;                                                          \
    cs2 += e2;                                                          \
  }
#define EPI_PAD(q) EPI(q, 1)
#define EPI_FULL(q) EPI(q, 0)
    if (F->rb[i0 + TI - 1] != 0.0f) {
      FOR_TILE(EPI_PAD)
    } else {
      FOR_TILE(EPI_FULL)
    }
#undef EPI_FULL
#undef EPI_PAD
#undef EPI
#undef PUT_DOTS
    float *cp = colp + m * bp + j0;
    store8(cp, load8(cp) + cs0);
    store8(cp + 8, load8(cp + 8) + cs1);
    store8(cp + 16, load8(cp + 16) + cs2);
    if (F->bounds[m + 1] == k1) break;
  }
  if (!last) {
#define STORE(q) store8(st + q * 24, A##q##0); store8(st + q * 24 + 8, A##q##1); store8(st + q * 24 + 16, A##q##2);
    FOR_TILE(STORE)
#undef STORE
  }
}

/* x tiles [t0, t1) against every y block; colp: this call's zeroed [m][bp]
 * column sums; st: GROUP * RUN * 96 floats of scratch. */
INLINE void fwd_body(const Fwd *F, int64_t t0, int64_t t1, float *colp, float *st) {
  const int64_t nbj = F->bp / TJ;
  for (int64_t b0 = 0; b0 < nbj; b0 += RUN) {
    int64_t b1 = b0 + RUN < nbj ? b0 + RUN : nbj;
    for (int64_t g0 = t0; g0 < t1; g0 += GROUP) {
      int64_t g1 = g0 + GROUP < t1 ? g0 + GROUP : t1;
      for (int64_t k = 0; k < F->nkb; k++) {
        for (int64_t b = b0; b < b1; b++) {
          for (int64_t g = g0; g < g1; g++) {
            fwd_tile(F, g, b, F->kb[k], F->kb[k + 1], st + ((b - b0) * GROUP + (g - g0)) * 96,
                     k == 0, k == F->nkb - 1, colp);
          }
        }
      }
    }
  }
}

/* ---------------------------------------------------------------------- */
/* Backward.                                                              */
/* ---------------------------------------------------------------------- */
typedef struct {
  int64_t bp, dp, m;
  const int32_t *bounds;
  const float *x, *y;     /* [dp/8][bp][8]: padded, in slabs of 8 features */
  const float *a, *c;     /* [m][bp]: a times log2(e) */
  const float *cb;        /* [m][bp] (column bias - shift_m, or - lse_c where two[m]) log2(e) */
  const float *rb;        /* [bp] row and column bias: 0, or -inf on padded rows */
  const float *wr, *wc;   /* [m][bp] one exp: gm e^(shift - lse) of rows / columns;
                             two exps: wr = (row bias - lse_r) log2(e), wc unused */
  const int32_t *two;     /* [m] */
  const float *gm;        /* [m] g_m ln(2) / (2 B); sigmoid: g_m / B */
  const float *dots;      /* the forward's */
  int sigmoid;            /* the sigmoid loss: a plain, cb = bias_m (-inf on padded columns) */
  int64_t b;              /* real rows */
} Bwd;

/* The cotangents of prefix m of one tile (4 x rows from i0, 24 y rows from
 * block bj): ga / gc partials, and h_m = gd_m + h_(m+1) into the panel h at
 * (pr, pc), in place (last: m is the last prefix, h holds nothing yet). */
INLINE void bwd_tile(const Bwd *B, int64_t ti, int64_t bj, int64_t m, float *gap, float *gcp,
                     float *gbp, float *h, int64_t pr, int64_t pc, int last) {
  const int64_t bp = B->bp, M = B->m, i0 = ti * TI, j0 = bj * TJ;
  const float *dt = B->dots + dots_at(bp / TJ, M, ti, bj, m);
  const float *cm = B->c + m * bp + j0, *am = B->a + m * bp;
  const float *cbm = B->cb + m * bp + j0;
  v8f cv[3], bv[3], gcv[3];
  for (int v = 0; v < 3; v++) cv[v] = load8(cm + 8 * v), bv[v] = load8(cbm + 8 * v), gcv[v] = (v8f){0};
  float *gp = gap + (m * bp + i0) * 8, *hr = h + pr * PC + pc;
  if (B->sigmoid) { /* G = -+ sigmoid(v) g_m / B, v as in the forward; gbp: sum of G */
    const int diag = i0 >= j0 && i0 < j0 + TJ;
    const float gmm = B->gm[m];
    v8f gb = {0};
    for (int q = 0; q < TI; q++, hr += PC) {
      float aq = am[i0 + q], rq = B->rb[i0 + q];
      v8f ac[3], u[3], dv[3];
      for (int v = 0; v < 3; v++) {
        dv[v] = load8(dt + q * 24 + 8 * v), ac[v] = aq * cv[v];
        u[v] = dv[v] * ac[v] + (bv[v] + rq);
      }
      const int flip = diag && i0 + q < B->b;
      if (flip) FLIP_LANE(i0 + q - j0, u[0], u[1], u[2]);
      v8f ga = {0};
      for (int v = 0; v < 3; v++) {
        v8f e = vexp2(vabs(u[v]) * -LOG2E);
        u[v] = vsigmoid(u[v], e) * gmm;
      }
      if (flip) FLIP_LANE(i0 + q - j0, u[0], u[1], u[2]); /* G: the sign back on the diagonal */
      for (int v = 0; v < 3; v++) {
        v8f g = u[v], gd = g * ac[v];
        store8(hr + 8 * v, last ? gd : gd + load8(hr + 8 * v));
        v8f t = g * dv[v];
        ga += t * cv[v];
        gcv[v] += t * aq;
        gb += g;
      }
      store8(gp + q * 8, load8(gp + q * 8) + ga);
    }
    float *cp = gcp + m * bp + j0, *bq = gbp + m * 8;
    for (int v = 0; v < 3; v++) store8(cp + 8 * v, load8(cp + 8 * v) + gcv[v]);
    store8(bq, load8(bq) + gb);
    return;
  }
  if (!B->two[m]) { /* padded rows need no bias here: their a is 0 and their w finite */
    const float *wcm = B->wc + m * bp + j0, *wrm = B->wr + m * bp;
    v8f wv[3];
    for (int v = 0; v < 3; v++) wv[v] = load8(wcm + 8 * v);
    for (int q = 0; q < TI; q++, hr += PC) {
      float aq = am[i0 + q], wq = wrm[i0 + q];
      v8f ga = {0};
      for (int v = 0; v < 3; v++) {
        v8f dv = load8(dt + q * 24 + 8 * v), ac = aq * cv[v];
        v8f g = vexp2(dv * ac + bv[v]) * (wv[v] + wq);
        v8f gd = g * ac;
        store8(hr + 8 * v, last ? gd : gd + load8(hr + 8 * v));
        v8f t = g * dv; /* G dots */
        ga += t * cv[v];
        gcv[v] += t * aq;
      }
      store8(gp + q * 8, load8(gp + q * 8) + ga);
    }
  } else { /* bv: column bias - lse_c; wr: row bias - lse_r */
    const float *wrm = B->wr + m * bp, *cbias = B->rb + j0; /* as columns */
    float gmm = B->gm[m];
    for (int q = 0; q < TI; q++, hr += PC) {
      float aq = am[i0 + q], rq = B->rb[i0 + q], wq = wrm[i0 + q];
      v8f ga = {0};
      for (int v = 0; v < 3; v++) {
        v8f dv = load8(dt + q * 24 + 8 * v), ac = aq * cv[v], l = dv * ac;
        v8f g = (vexp2(l + (load8(cbias + 8 * v) + wq)) + vexp2(l + (bv[v] + rq))) * gmm;
        v8f gd = g * ac;
        store8(hr + 8 * v, last ? gd : gd + load8(hr + 8 * v));
        v8f t = g * dv;
        ga += t * cv[v];
        gcv[v] += t * aq;
      }
      store8(gp + q * 8, load8(gp + q * 8) + ga);
    }
  }
  float *cp = gcp + m * bp + j0;
  for (int v = 0; v < 3; v++) store8(cp + 8 * v, load8(cp + 8 * v) + gcv[v]);
}

/* out[r][f] += sum_k p(r, k) v[k][f] (init: = instead of +=) for 6 rows r,
 * k < nk and the 16 features [f, f + 16) (w16) or 8: p(r, k) = p[r * rs + k
 * * ks]. v and out are in the slab layout of the backward's features, [dp /
 * 8][bp][8]: they point at row 0 of f's slab, the next 8 features are `slab`
 * floats on. */
INLINE void gemm6(const float *p, int64_t rs, int64_t ks, int64_t nk, const float *v,
                  float *out, int64_t slab, int w16, int init) {
#define DECL(q) v8f S##q##0, S##q##1;
  FOR_ROWS(DECL)
#undef DECL
  if (w16) {
    const float *v1 = v + slab;
    float *o1 = out + slab;
#define LOAD(q) S##q##0 = init ? (v8f){0} : load8(out + q * 8); S##q##1 = init ? (v8f){0} : load8(o1 + q * 8);
    FOR_ROWS(LOAD)
#undef LOAD
#pragma GCC unroll 4
    for (int64_t k = 0; k < nk; k++) {
      const float *pk = p + k * ks;
      v8f a0 = load8(v + k * 8), a1 = load8(v1 + k * 8);
#define FMA(q) { float w = pk[q * rs]; S##q##0 += w * a0; S##q##1 += w * a1; }
      FOR_ROWS(FMA)
#undef FMA
    }
#define STORE(q) store8(out + q * 8, S##q##0); store8(o1 + q * 8, S##q##1);
    FOR_ROWS(STORE)
#undef STORE
  } else {
#define LOAD(q) S##q##0 = init ? (v8f){0} : load8(out + q * 8);
    FOR_ROWS(LOAD)
#undef LOAD
#pragma GCC unroll 4
    for (int64_t k = 0; k < nk; k++) {
      const float *pk = p + k * ks;
      v8f a0 = load8(v + k * 8);
#define FMA(q) S##q##0 += pk[q * rs] * a0;
      FOR_ROWS(FMA)
#undef FMA
    }
#define STORE(q) store8(out + q * 8, S##q##0);
    FOR_ROWS(STORE)
#undef STORE
  }
}

/* x rows [r_begin, r_end) (multiples of UNIT) against every y row, by
 * panels of PR x PC; in each, the prefixes from the last: h_m of every tile,
 * then chunk m's two products with it. dx: rows of this call, written;
 * gap [m][bp][8] lane partials of ga, rows of this call, accumulated into;
 * dyp [dp/8][bp][8]: this call's partial, written; gcp [m][bp] (+ [m][8]
 * lane partials of the sigmoid bias's cotangent): this call's zeroed
 * partials; scratch: the PR * PC panel. */
INLINE void bwd_body(const Bwd *B, int64_t r_begin, int64_t r_end, float *dx, float *dyp,
                     float *gap, float *gcp, float *scratch) {
  const int64_t bp = B->bp, M = B->m, slab = bp * 8;
  float *h = scratch;
  for (int64_t c0 = 0; c0 < bp; c0 += PC) {
    int64_t nc = c0 + PC < bp ? PC : bp - c0;
    for (int64_t r0 = r_begin; r0 < r_end; r0 += PR) {
      int64_t nr = r0 + PR < r_end ? PR : r_end - r0;
      for (int64_t m = M - 1; m >= 0; m--) {
        /* (x tile, y block) in the order of the stored dots: a sequential read */
        for (int64_t ti = r0 / TI; ti < (r0 + nr) / TI; ti++)
          for (int64_t bj = c0 / TJ; bj < (c0 + nc) / TJ; bj++)
            bwd_tile(B, ti, bj, m, gap, gcp, gcp + M * bp, h, ti * TI - r0, bj * TJ - c0,
                     m == M - 1);
        int64_t lo = B->bounds[m], hi = B->bounds[m + 1];
        for (int64_t f = lo; f < hi; f += 16) {
          int w16 = f + 16 <= hi;
          int64_t fs = (f / 8) * slab; /* f's slab */
          /* dx_i[f] += sum_j h_ij y_j[f] (the first column panel sets it) */
          for (int64_t r = 0; r < nr; r += 6)
            gemm6(h + r * PC, PC, 1, nc, B->y + fs + c0 * 8, dx + fs + (r0 + r) * 8, slab, w16,
                  c0 == 0);
          /* dy_j[f] += sum_i h_ij x_i[f] (this call's first row panel sets it) */
          for (int64_t r = 0; r < nc; r += 6)
            gemm6(h + r, 1, PC, nr, B->x + fs + r0 * 8, dyp + fs + (c0 + r) * 8, slab, w16,
                  r0 == r_begin);
        }
      }
    }
  }
}

/* Exact row and column log-sum-exps of prefix m from the stored dots (for a
 * prefix whose one-shift sums underflowed): max-shifted, summed in double.
 * Single-threaded: a rare path. a, c: [b], the caller's; lr, lc: [b]. */
static void exact_lse(const float *dots, int64_t bp, int64_t M, int64_t m, int64_t b,
                      const float *a, const float *c, float *lr, float *lc) {
  const int64_t nbj = bp / TJ;
  float *rmax = malloc(sizeof(float) * 2 * bp);
  double *rsum = calloc(2 * bp, sizeof(double));
  if (rmax == NULL || rsum == NULL) {
    free(rmax);
    free(rsum);
    for (int64_t i = 0; i < b; i++) lr[i] = lc[i] = NAN;
    return;
  }
  float *cmax = rmax + bp;
  double *csum = rsum + bp;
  for (int64_t i = 0; i < 2 * bp; i++) rmax[i] = -INFINITY;
  for (int pass = 0; pass < 2; pass++) {
    for (int64_t ti = 0; ti < bp / TI; ti++) {
      for (int64_t bj = 0; bj < nbj; bj++) {
        const float *dt = dots + dots_at(nbj, M, ti, bj, m);
        for (int q = 0; q < TI; q++) {
          int64_t i = ti * TI + q;
          if (i >= b) continue;
          for (int r = 0; r < TJ; r++) {
            int64_t j = bj * TJ + r;
            if (j >= b) continue;
            float l = dt[q * TJ + r] * a[i] * c[j];
            if (pass == 0) {
              if (l > rmax[i]) rmax[i] = l;
              if (l > cmax[j]) cmax[j] = l;
            } else {
              rsum[i] += exp((double)l - rmax[i]);
              csum[j] += exp((double)l - cmax[j]);
            }
          }
        }
      }
    }
  }
  for (int64_t i = 0; i < b; i++) {
    lr[i] = (float)(rmax[i] + log(rsum[i]));
    lc[i] = (float)(cmax[i] + log(csum[i]));
  }
  free(rmax);
  free(rsum);
}

/* Each body compiled twice: with AVX2 + FMA where the CPU has them, and for
 * the baseline instruction set. */
#ifdef HAVE_AVX2_VERSION
__attribute__((target("avx2,fma"))) static void fwd_avx2(const Fwd *F, int64_t t0, int64_t t1,
                                                         float *colp, float *st) {
  fwd_body(F, t0, t1, colp, st);
}
__attribute__((target("avx2,fma"))) static void bwd_avx2(const Bwd *B, int64_t r0, int64_t r1,
                                                         float *dx, float *dyp, float *gap,
                                                         float *gcp, float *scratch) {
  bwd_body(B, r0, r1, dx, dyp, gap, gcp, scratch);
}
#endif
static void fwd_generic(const Fwd *F, int64_t t0, int64_t t1, float *colp, float *st) {
  fwd_body(F, t0, t1, colp, st);
}
static void bwd_generic(const Bwd *B, int64_t r0, int64_t r1, float *dx, float *dyp,
                        float *gap, float *gcp, float *scratch) {
  bwd_body(B, r0, r1, dx, dyp, gap, gcp, scratch);
}

static int force_generic = 0;
static int num_threads_override = 0;

/* on != 0: run the baseline version even where AVX2 + FMA exist (tests). */
void mrl_contrastive_force_generic(int on) { force_generic = on; }

/* n > 0: use n threads; 0: the CPUs this process may run on. */
void mrl_contrastive_set_threads(int n) { num_threads_override = n > 0 ? n : 0; }

/* 1 if the AVX2 + FMA version runs on this CPU. */
int mrl_contrastive_uses_avx2(void) { return mrl_cpu_runs_avx2(force_generic); }

#define MAX_THREADS 64

static int num_threads(void) {
  int n = num_threads_override;
  if (n <= 0) {
    cpu_set_t set;
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    n = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : (int)online;
  }
  return n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : n;
}

/* ---------------------------------------------------------------------- */
/* Threads.                                                               */
/* ---------------------------------------------------------------------- */
typedef struct {
  void (*fn)(void *ctx, int t, int n);
  void *ctx;
  int t, n;
} Job;

static void *job_main(void *p) {
  Job *j = p;
  j->fn(j->ctx, j->t, j->n);
  return NULL;
}

#ifdef MRL_WITH_XLA_FFI
#include <stdatomic.h>

#include "xla/ffi/api/c_api.h"

/* Inside an FFI handler, the shares run on XLA's own CPU thread pool: its
 * threads would otherwise spin for work beside ours on the same cores.
 * Shares are claimed from a counter by the scheduled tasks and the caller
 * alike, so they all get done even if no task ever starts (XLA may run
 * tasks late, inline, or on a pool of one); a task that starts after the
 * last share only drops its reference. */
static __thread const XLA_FFI_Api *pool_api = NULL;
static __thread XLA_FFI_ExecutionContext *pool_ctx = NULL;

typedef struct {
  void (*fn)(void *ctx, int t, int n);
  void *ctx;
  int n;
  atomic_int next, done, refs;
} Shares;

static void shares_work(Shares *S) {
  for (;;) {
    int t = atomic_fetch_add(&S->next, 1);
    if (t >= S->n) return;
    S->fn(S->ctx, t, S->n);
    atomic_fetch_add_explicit(&S->done, 1, memory_order_release);
  }
}

static void shares_release(Shares *S) {
  if (atomic_fetch_sub(&S->refs, 1) == 1) free(S);
}

static void pool_task(void *p) {
  shares_work(p);
  shares_release(p);
}

/* 0 when the n shares ran on XLA's pool (and the caller), -1 if not tried. */
static int pool_parallel(int n, void (*fn)(void *, int, int), void *ctx) {
  Shares *S = malloc(sizeof(Shares));
  if (S == NULL) return -1;
  S->fn = fn, S->ctx = ctx, S->n = n;
  atomic_init(&S->next, 0);
  atomic_init(&S->done, 0);
  atomic_init(&S->refs, 1);
  for (int k = 0; k < n - 1; k++) {
    atomic_fetch_add(&S->refs, 1);
    XLA_FFI_ThreadPool_Schedule_Args args = {XLA_FFI_ThreadPool_Schedule_Args_STRUCT_SIZE, NULL,
                                             pool_ctx, pool_task, S};
    XLA_FFI_Error *err = pool_api->XLA_FFI_ThreadPool_Schedule(&args);
    if (err != NULL) { /* no pool: the caller does the rest */
      XLA_FFI_Error_Destroy_Args d = {XLA_FFI_Error_Destroy_Args_STRUCT_SIZE, NULL, err};
      pool_api->XLA_FFI_Error_Destroy(&d);
      atomic_fetch_sub(&S->refs, 1);
      break;
    }
  }
  shares_work(S);
  while (atomic_load_explicit(&S->done, memory_order_acquire) < n) sched_yield();
  shares_release(S);
  return 0;
}
#endif

/* fn(ctx, t, n) for t < n on n threads (the caller's is the last). */
static void parallel(int n, void (*fn)(void *, int, int), void *ctx) {
  if (n > MAX_THREADS) n = MAX_THREADS;
#ifdef MRL_WITH_XLA_FFI
  if (pool_api != NULL && n > 1 && pool_parallel(n, fn, ctx) == 0) return;
#endif
  Job jobs[MAX_THREADS];
  pthread_t th[MAX_THREADS];
  int started[MAX_THREADS] = {0};
  for (int t = 0; t < n; t++) jobs[t] = (Job){fn, ctx, t, n};
  for (int t = 0; t < n - 1; t++) started[t] = pthread_create(&th[t], NULL, job_main, &jobs[t]) == 0;
  fn(ctx, n - 1, n);
  for (int t = 0; t < n - 1; t++) {
    if (started[t]) pthread_join(th[t], NULL);
    else fn(ctx, t, n); /* no thread: run its share here */
  }
}

/* [lo, hi) of whole units of `unit` rows for thread t of n over bp rows. */
static void share(int64_t bp, int64_t unit, int t, int n, int64_t *lo, int64_t *hi) {
  int64_t units = bp / unit;
  *lo = unit * (units * t / n);
  *hi = unit * (units * (t + 1) / n);
}

/* ---------------------------------------------------------------------- */
/* Buffers kept between calls.                                            */
/* ---------------------------------------------------------------------- */
static pthread_mutex_t scratch_lock = PTHREAD_MUTEX_INITIALIZER;
static int64_t scratch_limit = (int64_t)2 << 30; /* set with the dots' limit (FFI handlers) */

/* 2 MB aligned anonymous memory, transparent huge pages asked for. */
static void *map_bytes(int64_t *bytes) {
  int64_t cap = (*bytes + ((int64_t)1 << 21) - 1) & ~(((int64_t)1 << 21) - 1);
  void *p = mmap(NULL, (size_t)cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
  madvise(p, (size_t)cap, MADV_HUGEPAGE);
#endif
  *bytes = cap;
  return p;
}

/* The passes' scratch (megabytes: the padded inputs, the gradient partials)
 * comes from a few cached blocks: allocated fresh, it is mapped and
 * page-faulted in on every call, which cost 1-5 ms a step at B = 1024. */
#define SCRATCH_SLOTS 4
typedef struct {
  void *p;
  int64_t cap;
} Block;
static Block scratch_cache[SCRATCH_SLOTS];

static int64_t scratch_cached_locked(void) {
  int64_t total = 0;
  for (int k = 0; k < SCRATCH_SLOTS; k++) total += scratch_cache[k].cap;
  return total;
}

/* A block of >= bytes (64-byte aligned), or p NULL. */
static Block scratch_take(int64_t bytes) {
  Block blk = {NULL, 0};
  pthread_mutex_lock(&scratch_lock);
  int best = -1;
  for (int k = 0; k < SCRATCH_SLOTS; k++)
    if (scratch_cache[k].p != NULL && scratch_cache[k].cap >= bytes &&
        (best < 0 || scratch_cache[k].cap < scratch_cache[best].cap))
      best = k;
  if (best >= 0) {
    blk = scratch_cache[best];
    scratch_cache[best] = (Block){NULL, 0};
  }
  pthread_mutex_unlock(&scratch_lock);
  if (blk.p == NULL) {
    blk.cap = bytes;
    blk.p = map_bytes(&blk.cap);
    if (blk.p == NULL) blk.cap = 0;
  }
  return blk;
}

/* Back into the cache (in place of a smaller block if full), or unmapped. */
static void scratch_give(Block blk) {
  if (blk.p == NULL) return;
  pthread_mutex_lock(&scratch_lock);
  int slot = -1;
  for (int k = 0; k < SCRATCH_SLOTS; k++)
    if (slot < 0 || scratch_cache[k].cap < scratch_cache[slot].cap) slot = k;
  Block out = blk;
  if (scratch_cache[slot].cap < blk.cap &&
      scratch_cached_locked() - scratch_cache[slot].cap + blk.cap <= scratch_limit) {
    out = scratch_cache[slot];
    scratch_cache[slot] = blk;
  }
  pthread_mutex_unlock(&scratch_lock);
  if (out.p != NULL) munmap(out.p, (size_t)out.cap);
}

/* Unmap the cached blocks until they fit in scratch_limit. */
static void scratch_trim_locked(void) {
  while (scratch_cached_locked() > scratch_limit) {
    int big = 0;
    for (int k = 1; k < SCRATCH_SLOTS; k++)
      if (scratch_cache[k].cap > scratch_cache[big].cap) big = k;
    munmap(scratch_cache[big].p, (size_t)scratch_cache[big].cap);
    scratch_cache[big] = (Block){NULL, 0};
  }
}

/* ---------------------------------------------------------------------- */
/* The whole forward and backward passes on unpadded inputs.              */
/* ---------------------------------------------------------------------- */
typedef struct {
  int64_t b, d, bp, dp, m;
  const int32_t *dims;
  int32_t *bounds;
} Shape;

static int make_shape(Shape *s, int64_t b, int64_t d, int64_t m, const int32_t *dims) {
  s->b = b;
  s->d = d;
  s->m = m;
  s->dims = dims;
  s->bp = (b + ROWS - 1) / ROWS * ROWS;
  s->bounds = malloc(sizeof(int32_t) * (m + 1));
  if (s->bounds == NULL) return -1;
  s->bounds[0] = 0;
  int32_t lo = 0;
  for (int64_t k = 0; k < m; k++) {
    s->bounds[k + 1] = s->bounds[k] + (dims[k] - lo + 7) / 8 * 8;
    lo = dims[k];
  }
  s->dp = s->bounds[m];
  return 0;
}

/* Bytes of the stored dots for a batch of b and m prefixes. */
int64_t mrl_contrastive_dots_size(int64_t b, int64_t m) {
  int64_t bp = (b + ROWS - 1) / ROWS * ROWS;
  return bp * bp * m * (int64_t)sizeof(float);
}

typedef struct {
  const Shape *s;
  const float *x, *y, *a, *c, *shift;
  float *xk, *yk, *ap, *cp, *cb, *rb, *rowp, **colp, *st;
  Fwd F;
  int avx2;
} FwdJob;

/* Rows [i0, i0 + R) of v ([b][d]; rows from b on are zeros) packed for the
 * forward: padded feature f of row i0 + q at dst[f * R + q] (R <= 24). */
static void pack_rows(const float *v, const Shape *s, int64_t i0, int R, float *dst) {
  const float *row[24];
  int nv = s->b - i0 < R ? (int)(s->b - i0) : R;
  if (nv < 0) nv = 0;
  for (int q = 0; q < nv; q++) row[q] = v + (i0 + q) * s->d;
  for (int64_t k = 0; k < s->m; k++) {
    int32_t c0 = k ? s->dims[k - 1] : 0, w = s->dims[k] - c0;
    float *o = dst + s->bounds[k] * R;
    for (int32_t j = 0; j < w; j++, o += R) {
      for (int q = 0; q < nv; q++) o[q] = row[q][c0 + j];
      for (int q = nv; q < R; q++) o[q] = 0.0f;
    }
    memset(o, 0, sizeof(float) * R * (s->bounds[k + 1] - s->bounds[k] - w));
  }
}

/* Row i of v ([b][d]; zeros from b on) into the backward's slabs: padded
 * feature f at dst[(f / 8) * bp * 8 + f % 8] (dst: row i of slab 0). */
static void pack_slabs(const float *v, const Shape *s, int64_t i, float *dst) {
  const int64_t slab = s->bp * 8;
  const float *row = i < s->b ? v + i * s->d : v;
  for (int64_t k = 0; k < s->m; k++) {
    int32_t c0 = k ? s->dims[k - 1] : 0, w = i < s->b ? s->dims[k] - c0 : 0;
    for (int32_t j = 0; j < s->bounds[k + 1] - s->bounds[k]; j += 8) {
      float *o = dst + (s->bounds[k] + j) / 8 * slab;
      int nf = w - j < 8 ? (w - j > 0 ? w - j : 0) : 8;
      if (nf == 8) {
        memcpy(o, row + c0 + j, sizeof(float) * 8);
      } else {
        for (int q = 0; q < nf; q++) o[q] = row[c0 + j + q];
        for (int q = nf; q < 8; q++) o[q] = 0.0f;
      }
    }
  }
}

static void fwd_prep(void *p, int t, int n) {
  FwdJob *J = p;
  const Shape *s = J->s;
  int64_t lo, hi;
  share(s->bp, ROWS, t, n, &lo, &hi); /* y by blocks */
  for (int64_t i = lo; i < hi; i += TJ) pack_rows(J->y, s, i, TJ, J->yk + i * s->dp);
  share(s->bp, UNIT, t, n, &lo, &hi); /* x by tiles, this share's */
  for (int64_t i = lo; i < hi; i += TI) pack_rows(J->x, s, i, TI, J->xk + i * s->dp);
  const int sig = J->F.sigmoid; /* shift: the biases */
  for (int64_t i = lo; i < hi; i++) {
    J->rb[i] = i < s->b ? 0.0f : -INFINITY;
    for (int64_t k = 0; k < s->m; k++) {
      J->ap[k * s->bp + i] = i < s->b ? J->a[k * s->b + i] * (sig ? 1.0f : LOG2E) : 0.0f;
      J->cp[k * s->bp + i] = i < s->b ? J->c[k * s->b + i] : 0.0f;
      J->cb[k * s->bp + i] = i < s->b ? (sig ? J->shift[k] : -J->shift[k] * LOG2E) : -INFINITY;
    }
  }
}

static void fwd_run(void *p, int t, int n) {
  FwdJob *J = p;
  int64_t lo, hi;
  share(J->s->bp, UNIT, t, n, &lo, &hi);
  float *st = J->st + (int64_t)t * GROUP * RUN * 96;
#ifdef HAVE_AVX2_VERSION
  if (J->avx2) {
    fwd_avx2(&J->F, lo / TI, hi / TI, J->colp[t], st);
    return;
  }
#endif
  fwd_generic(&J->F, lo / TI, hi / TI, J->colp[t], st);
}

/* x, y [b][d]; dims [m] increasing, the last <= d; a, c [m][b]; shift [m]
 * with shift_m >= max l - 70. Out: lse_r, lse_c [m][b]; two [m]; dots
 * (mrl_contrastive_dots_size bytes, 32-byte aligned or not; NULL: not
 * stored). 0 on success, -1 out of memory. */
static int forward_impl(const float *x, const float *y, int64_t b, int64_t d,
                        const int32_t *dims, int64_t m, const float *a, const float *c,
                        const float *shift, float *lse_r, float *lse_c, int32_t *two,
                        double *sums, float *dots) {
  Shape s;
  if (make_shape(&s, b, d, m, dims)) return -1;
  int n = num_threads();
  if (n > s.bp / UNIT) n = (int)(s.bp / UNIT);
  FwdJob J = {0};
  J.s = &s;
  J.x = x, J.y = y, J.a = a, J.c = c, J.shift = shift;
  int64_t bp = s.bp, dp = s.dp;
  float *buf = NULL;
  int32_t *kb = malloc(sizeof(int32_t) * (2 * dp / 8 + 2));
  float **colp = malloc(sizeof(float *) * n);
  size_t nbuf = 2 * bp * dp + 4 * m * bp + bp + (size_t)m * bp * 8 + (size_t)n * m * bp +
                (size_t)n * GROUP * RUN * 96;
  Block blk = scratch_take((int64_t)(nbuf * sizeof(float)));
  buf = blk.p;
  if (kb == NULL || colp == NULL || buf == NULL) {
    free(kb), free(colp), scratch_give(blk), free(s.bounds);
    return -1;
  }
  J.xk = buf;
  J.yk = J.xk + bp * dp;
  J.ap = J.yk + bp * dp;
  J.cp = J.ap + m * bp;
  J.cb = J.cp + m * bp;
  J.rb = J.cb + m * bp;
  J.rowp = J.rb + bp;
  float *colbase = J.rowp + m * bp * 8;
  for (int t = 0; t < n; t++) colp[t] = colbase + (int64_t)t * m * bp;
  J.colp = colp;
  J.st = colbase + (int64_t)n * m * bp;
  memset(J.rowp, 0, sizeof(float) * (m * bp * 8 + (size_t)n * m * bp));
  /* Feature blocks: whole chunks merged up to >= KC, long ones split. */
  int64_t nkb = 0;
  kb[0] = 0;
  for (int64_t k = 0; k < m; k++) {
    int32_t end = s.bounds[k + 1];
    while (end - kb[nkb] > KMAX) {
      kb[nkb + 1] = kb[nkb] + ((end - kb[nkb]) > 2 * KMAX ? KMAX : (end - kb[nkb]) / 16 * 8);
      nkb++;
    }
    if (end - kb[nkb] >= KC || k == m - 1) kb[++nkb] = end;
  }
  J.F = (Fwd){bp, dp, m, s.bounds, J.xk, J.yk, J.ap, J.cp, J.cb, J.rb, dots, J.rowp, nkb, kb,
           ((uintptr_t)dots & 31) == 0, sums != NULL, b};
  J.avx2 = mrl_contrastive_uses_avx2();
#ifdef MADV_HUGEPAGE
  if (dots != NULL) { /* 2 MB pages for the stored dots: ~240 page faults per GB, not ~250k */
    uintptr_t p0 = ((uintptr_t)dots + (1 << 21) - 1) & ~(uintptr_t)((1 << 21) - 1);
    uintptr_t p1 = ((uintptr_t)dots + mrl_contrastive_dots_size(b, m)) & ~(uintptr_t)((1 << 21) - 1);
    if (p1 > p0) madvise((void *)p0, p1 - p0, MADV_HUGEPAGE);
  }
#endif
  parallel(n, fwd_prep, &J);
  parallel(n, fwd_run, &J);
  if (J.F.aligned) STREAM_FENCE();
  for (int64_t k = 0; sums != NULL && k < m; k++) { /* sigmoid: the lane partials summed */
    double v = 0;
    for (int t = 0; t < n; t++)
      for (int q = 0; q < 8; q++) v += colp[t][k * bp + q];
    sums[k] = v;
  }
  /* Sums -> log-sum-exps; a prefix whose sums underflowed gets exact ones. */
  for (int64_t k = 0; sums == NULL && k < m; k++) {
    float lo_sum = INFINITY;
    for (int64_t i = 0; i < b; i++) {
      const float *rp = J.rowp + (k * bp + i) * 8;
      float r = ((rp[0] + rp[1]) + (rp[2] + rp[3])) + ((rp[4] + rp[5]) + (rp[6] + rp[7]));
      float cs = 0.0f;
      for (int t = 0; t < n; t++) cs += colp[t][k * bp + i];
      lse_r[k * b + i] = shift[k] + logf(r);
      lse_c[k * b + i] = shift[k] + logf(cs);
      if (r < lo_sum) lo_sum = r;
      if (cs < lo_sum) lo_sum = cs;
    }
    two[k] = !(lo_sum >= 8.75651076e-27f); /* e^-60 */
    if (two[k] && dots == NULL) { /* rare: compute and store the dots, then the exact sums */
      free(kb), free(colp), scratch_give(blk), free(s.bounds);
      int64_t bytes = mrl_contrastive_dots_size(b, m);
      float *tmp = aligned_alloc(64, (bytes + 63) / 64 * 64);
      if (tmp == NULL) return -1;
      int rc = forward_impl(x, y, b, d, dims, m, a, c, shift, lse_r, lse_c, two, NULL, tmp);
      free(tmp);
      return rc;
    }
    if (two[k]) exact_lse(dots, bp, m, k, b, a + k * b, c + k * b, lse_r + k * b,
                          lse_c + k * b);
  }
  free(kb);
  free(colp);
  scratch_give(blk);
  free(s.bounds);
  return 0;
}

int mrl_contrastive_forward(const float *x, const float *y, int64_t b, int64_t d,
                            const int32_t *dims, int64_t m, const float *a, const float *c,
                            const float *shift, float *lse_r, float *lse_c, int32_t *two,
                            float *dots) {
  return forward_impl(x, y, b, d, dims, m, a, c, shift, lse_r, lse_c, two, NULL, dots);
}

/* The sigmoid loss's B x B part: x, y, dims, a, c as above (a = t_m / |x_i[:m]|,
 * not scaled by log2 e), bias [m]. Out: sums [m] = sum_ij softplus(v_ij),
 * v = l + bias off the diagonal and -(l + bias) on it; dots as above. */
int mrl_sigmoid_forward(const float *x, const float *y, int64_t b, int64_t d,
                        const int32_t *dims, int64_t m, const float *a, const float *c,
                        const float *bias, double *sums, float *dots) {
  return forward_impl(x, y, b, d, dims, m, a, c, bias, NULL, NULL, NULL, sums, dots);
}

typedef struct {
  const Shape *s;
  const float *x, *y, *a, *c, *shift, *lse_r, *lse_c, *g;
  const int32_t *two;
  float *xp, *yp, *ap, *cp, *cb, *rb, *wr, *wc, *gm, *dxp, **dyp, *gap, **gcp, *scratch;
  float *dx, *dy, *ga, *gc;
  Bwd B;
  int avx2;
  /* Optional: called for each row i as soon as its dx, dy, ga, gc are out
   * (by share t), while they are in cache. */
  void (*row_done)(void *ctx, int64_t i, int t);
  void *row_ctx;
} BwdJob;

static void bwd_prep(void *p, int t, int n) {
  BwdJob *J = p;
  const Shape *s = J->s;
  int64_t lo, hi, m = s->m, bp = s->bp;
  share(bp, UNIT, t, n, &lo, &hi);
  for (int64_t i = lo; i < hi; i++) { /* x, y in slabs [dp/8][bp][8] */
    pack_slabs(J->x, s, i, J->xp + i * 8);
    pack_slabs(J->y, s, i, J->yp + i * 8);
    int valid = i < s->b;
    J->rb[i] = valid ? 0.0f : -INFINITY;
    for (int64_t k = 0; k < m; k++) {
      int64_t o = k * bp + i, u = k * s->b + i;
      /* exponents in base 2 (a, biases times log2 e), G times ln 2: so gd =
       * G a c and gc come out exact, ga times ln 2 (undone in bwd_post) */
      J->cp[o] = valid ? J->c[u] : 0.0f;
      if (J->B.sigmoid) { /* natural units; shift: the biases */
        J->ap[o] = valid ? J->a[u] : 0.0f;
        J->cb[o] = valid ? J->shift[k] : -INFINITY;
        continue;
      }
      J->ap[o] = valid ? J->a[u] * LOG2E : 0.0f;
      if (!J->two[k]) {
        J->cb[o] = valid ? -J->shift[k] * LOG2E : -INFINITY;
        J->wr[o] = valid ? J->gm[k] * expf(J->shift[k] - J->lse_r[u]) : 0.0f;
        J->wc[o] = valid ? J->gm[k] * expf(J->shift[k] - J->lse_c[u]) : 0.0f;
      } else {
        J->cb[o] = valid ? -J->lse_c[u] * LOG2E : -INFINITY;
        J->wr[o] = valid ? -J->lse_r[u] * LOG2E : -INFINITY;
        J->wc[o] = 0.0f;
      }
    }
  }
  /* this share's zeroed partials (dx and its dy partial are set, not added
   * to, by the first products into them) */
  memset(J->gcp[t], 0, sizeof(float) * (m * bp + m * 8));
  for (int64_t k = 0; k < m; k++) memset(J->gap + (k * bp + lo) * 8, 0, sizeof(float) * (hi - lo) * 8);
}

static void bwd_run(void *p, int t, int n) {
  BwdJob *J = p;
  int64_t lo, hi;
  share(J->s->bp, UNIT, t, n, &lo, &hi);
  float *scr = J->scratch + (int64_t)t * PR * PC;
#ifdef HAVE_AVX2_VERSION
  if (J->avx2) {
    bwd_avx2(&J->B, lo, hi, J->dxp, J->dyp[t], J->gap, J->gcp[t], scr);
    return;
  }
#endif
  bwd_generic(&J->B, lo, hi, J->dxp, J->dyp[t], J->gap, J->gcp[t], scr);
}

/* Unpad the gradients: rows of thread t; dy and gc summed over threads. */
static void bwd_post(void *p, int t, int n) {
  BwdJob *J = p;
  const Shape *s = J->s;
  int64_t lo, hi, nt = n, bp = s->bp, m = s->m;
  share(bp, UNIT, t, n, &lo, &hi);
  if (hi > s->b) hi = s->b;
  for (int64_t i = lo; i < hi; i++) {
    for (int64_t k = 0; k < m; k++) { /* out of the slabs, 8 features at a time */
      int32_t c0 = k ? s->dims[k - 1] : 0, w = s->dims[k] - c0;
      float *dst = J->dx + i * s->d + c0, *dst_y = J->dy + i * s->d + c0;
      for (int32_t j = 0; j < w; j += 8) {
        int64_t o = (s->bounds[k] + j) / 8 * bp * 8 + i * 8;
        float vx[8], vy[8] = {0};
        memcpy(vx, J->dxp + o, sizeof(vx));
        for (int64_t u = 0; u < nt; u++)
          for (int q = 0; q < 8; q++) vy[q] += J->dyp[u][o + q];
        int nf = w - j < 8 ? w - j : 8;
        memcpy(dst + j, vx, sizeof(float) * nf);
        memcpy(dst_y + j, vy, sizeof(float) * nf);
      }
    }
    for (int64_t f = s->dims[m - 1]; f < s->d; f++) J->dx[i * s->d + f] = J->dy[i * s->d + f] = 0.0f;
    for (int64_t k = 0; k < m; k++) {
      const float *gp = J->gap + (k * bp + i) * 8;
      J->ga[k * s->b + i] =
          (((gp[0] + gp[1]) + (gp[2] + gp[3])) + ((gp[4] + gp[5]) + (gp[6] + gp[7]))) *
          (J->B.sigmoid ? 1.0f : LOG2E);
      float v = 0.0f;
      for (int64_t u = 0; u < nt; u++) v += J->gcp[u][k * bp + i];
      J->gc[k * s->b + i] = v;
    }
    if (J->row_done != NULL) J->row_done(J->row_ctx, i, t);
  }
}

/* The cotangents of x, y, a, c for the loss sum_m g_m 0.5 (mean_i lse_r_i
 * + mean_j lse_c_j), given the forward's outputs. 0, or -1 out of memory. */
static int backward_rows(const float *x, const float *y, int64_t b, int64_t d,
                         const int32_t *dims, int64_t m, const float *a, const float *c,
                         const float *shift, const float *lse_r, const float *lse_c,
                         const int32_t *two, const float *g, const float *dots, float *dx,
                         float *dy, float *ga, float *gc, float *gbias,
                         void (*row_done)(void *ctx, int64_t i, int t), void *row_ctx) {
  Shape s;
  if (make_shape(&s, b, d, m, dims)) return -1;
  int n = num_threads();
  if (n > s.bp / UNIT) n = (int)(s.bp / UNIT);
  int64_t bp = s.bp, dp = s.dp;
  BwdJob J = {0};
  J.s = &s;
  J.x = x, J.y = y, J.a = a, J.c = c, J.shift = shift, J.lse_r = lse_r, J.lse_c = lse_c;
  J.two = two, J.dx = dx, J.dy = dy, J.ga = ga, J.gc = gc;
  J.row_done = row_done, J.row_ctx = row_ctx;
  size_t nbuf = (size_t)(3 + n) * bp * dp + (size_t)(5 + n) * m * bp + (size_t)n * m * 8 + bp + m +
                (size_t)m * bp * 8 + (size_t)n * PR * PC;
  Block blk = scratch_take((int64_t)(nbuf * sizeof(float)));
  float *buf = blk.p;
  float **dyp = malloc(sizeof(float *) * n), **gcp = malloc(sizeof(float *) * n);
  if (buf == NULL || dyp == NULL || gcp == NULL) {
    scratch_give(blk), free(dyp), free(gcp), free(s.bounds);
    return -1;
  }
  float *q = buf;
  J.xp = q, q += bp * dp;
  J.yp = q, q += bp * dp;
  J.dxp = q, q += bp * dp;
  for (int t = 0; t < n; t++) dyp[t] = q, q += bp * dp;
  J.ap = q, q += m * bp;
  J.cp = q, q += m * bp;
  J.cb = q, q += m * bp;
  J.wr = q, q += m * bp;
  J.wc = q, q += m * bp;
  for (int t = 0; t < n; t++) gcp[t] = q, q += m * bp + m * 8;
  J.rb = q, q += bp;
  J.gm = q, q += m;
  J.gap = q, q += m * bp * 8;
  J.scratch = q;
  J.dyp = dyp, J.gcp = gcp;
  const int sig = gbias != NULL; /* shift: the biases */
  for (int64_t k = 0; k < m; k++) J.gm[k] = sig ? g[k] / (float)b : g[k] * (0.5f / (float)b) * LN2;
  J.B = (Bwd){bp, dp, m, s.bounds, J.xp, J.yp, J.ap, J.cp, J.cb, J.rb, J.wr, J.wc,
              two, J.gm, dots, sig, b};
  J.avx2 = mrl_contrastive_uses_avx2();
  parallel(n, bwd_prep, &J);
  parallel(n, bwd_run, &J);
  parallel(n, bwd_post, &J);
  for (int64_t k = 0; sig && k < m; k++) {
    double v = 0;
    for (int t = 0; t < n; t++)
      for (int q = 0; q < 8; q++) v += gcp[t][m * bp + k * 8 + q];
    gbias[k] = (float)v;
  }
  scratch_give(blk);
  free(dyp);
  free(gcp);
  free(s.bounds);
  return 0;
}

int mrl_contrastive_backward(const float *x, const float *y, int64_t b, int64_t d,
                             const int32_t *dims, int64_t m, const float *a, const float *c,
                             const float *shift, const float *lse_r, const float *lse_c,
                             const int32_t *two, const float *g, const float *dots, float *dx,
                             float *dy, float *ga, float *gc) {
  return backward_rows(x, y, b, d, dims, m, a, c, shift, lse_r, lse_c, two, g, dots, dx, dy, ga,
                       gc, NULL, NULL, NULL);
}

/* The cotangents of x, y, a, c and the biases [m] for the loss sum_m g_m
 * sums_m / B of mrl_sigmoid_forward, given its stored dots. 0, or -1 as the
 * forward. */
int mrl_sigmoid_backward(const float *x, const float *y, int64_t b, int64_t d,
                         const int32_t *dims, int64_t m, const float *a, const float *c,
                         const float *bias, const float *g, const float *dots, float *dx,
                         float *dy, float *ga, float *gc, float *gbias) {
  return backward_rows(x, y, b, d, dims, m, a, c, bias, NULL, NULL, NULL, g, dots, dx, dy, ga,
                       gc, gbias, NULL, NULL);
}

/* ---------------------------------------------------------------------- */
/* The whole loss: prefix norms, diagonal and label-smoothing terms too.  */
/* ---------------------------------------------------------------------- */
#define NORM_EPS2 1e-24f /* matryoshka._NORM_EPS ** 2: the floor of a squared norm */
#define MAX_PREFIXES 64  /* the loss entry points take at most this many */

/* Per prefix and row: a = inv_tau / |x[:m]|, c = 1 / |y[:m]|, the diagonal
 * dots <x_i[:m], y_i[:m]>, and shift_m = max(max_i diag logit, inv_tau -
 * 70). All [m][b]; within a chunk the squares and products are summed in
 * 8 float lanes, the chunks' sums in double. */
typedef struct {
  const float *x, *y, *inv_tau;
  const int32_t *dims;
  int64_t b, d, m;
  float *a, *c, *sxy, *rx2, *ry2; /* rx2, ry2: 1 / max(|.|^2, eps^2), 0 where floored */
} Norms;

static void norms_run(void *p, int t, int n) {
  Norms *N = p;
  int64_t lo = N->b * t / n, hi = N->b * (t + 1) / n;
  for (int64_t i = lo; i < hi; i++) {
    const float *xi = N->x + i * N->d, *yi = N->y + i * N->d;
    double sx = 0, sy = 0, sxy = 0;
    int32_t f = 0;
    for (int64_t k = 0; k < N->m; k++) {
      v8f vx = {0}, vy = {0}, vxy = {0};
      for (; f + 8 <= N->dims[k]; f += 8) {
        v8f a = load8(xi + f), c = load8(yi + f);
        vx += a * a;
        vy += c * c;
        vxy += a * c;
      }
      for (int q = 0; q < 8; q++) sx += vx[q], sy += vy[q], sxy += vxy[q];
      for (; f < N->dims[k]; f++) {
        sx += (double)xi[f] * xi[f];
        sy += (double)yi[f] * yi[f];
        sxy += (double)xi[f] * yi[f];
      }
      int64_t o = k * N->b + i;
      float fx = (float)sx, fy = (float)sy;
      float qx = fx > NORM_EPS2 ? fx : NORM_EPS2, qy = fy > NORM_EPS2 ? fy : NORM_EPS2;
      float ix = 1.0f / sqrtf(qx), iy = 1.0f / sqrtf(qy);
      N->a[o] = N->inv_tau[k] * ix;
      N->c[o] = iy;
      N->sxy[o] = (float)sxy;
      N->rx2[o] = fx > NORM_EPS2 ? ix * ix : 0.0f;
      N->ry2[o] = fy > NORM_EPS2 ? iy * iy : 0.0f;
    }
  }
}

/* u_m = sum_i a_i x_i[:m], v_m = sum_j c_j y_j[:m] ([m][d], zero past dims_m):
 * the label-smoothing term's mean logit is <u_m, v_m> / b^2. */
static void smoothing_sums(const Norms *N, double *u, double *v) {
  memset(u, 0, sizeof(double) * N->m * N->d);
  memset(v, 0, sizeof(double) * N->m * N->d);
  for (int64_t k = 0; k < N->m; k++)
    for (int64_t i = 0; i < N->b; i++) {
      float ai = N->a[k * N->b + i], ci = N->c[k * N->b + i];
      const float *xi = N->x + i * N->d, *yi = N->y + i * N->d;
      for (int32_t f = 0; f < N->dims[k]; f++) {
        u[k * N->d + f] += (double)ai * xi[f];
        v[k * N->d + f] += (double)ci * yi[f];
      }
    }
}

typedef struct {
  float *a, *c, *sxy, *rx2, *ry2, *shift;
  double *u, *v; /* eps != 0 only */
} Stats;

static void stats_free(Stats *S) {
  free(S->a);
  free(S->u);
}

static int stats_make(const float *x, const float *y, int64_t b, int64_t d,
                      const int32_t *dims, int64_t m, const float *inv_tau, float eps,
                      Stats *S) {
  memset(S, 0, sizeof(*S));
  S->a = malloc(sizeof(float) * (5 * m * b + m));
  if (S->a == NULL) return -1;
  S->c = S->a + m * b, S->sxy = S->c + m * b, S->rx2 = S->sxy + m * b;
  S->ry2 = S->rx2 + m * b, S->shift = S->ry2 + m * b;
  Norms N = {x, y, inv_tau, dims, b, d, m, S->a, S->c, S->sxy, S->rx2, S->ry2};
  int n = num_threads();
  if (n > b / 64) n = b / 64 > 0 ? (int)(b / 64) : 1;
  parallel(n, norms_run, &N);
  for (int64_t k = 0; k < m; k++) {
    float top = inv_tau[k] - 70.0f;
    for (int64_t i = 0; i < b; i++) {
      int64_t o = k * b + i;
      float l = S->sxy[o] * S->a[o] * S->c[o];
      if (l > top) top = l;
    }
    S->shift[k] = top;
  }
  if (eps != 0.0f) {
    S->u = malloc(sizeof(double) * 2 * m * d);
    if (S->u == NULL) {
      stats_free(S);
      return -1;
    }
    S->v = S->u + m * d;
    smoothing_sums(&N, S->u, S->v);
  }
  return 0;
}

/* The per-prefix loss of `matryoshka._softmax_fwd` (both directions, label
 * smoothing eps): loss [m]; lse_r, lse_c [m][b], two [m] and (unless NULL)
 * dots are the backward's residuals. 0, or -1 out of memory. */
int mrl_contrastive_loss_forward(const float *x, const float *y, int64_t b, int64_t d,
                                 const int32_t *dims, int64_t m, const float *inv_tau,
                                 float eps, float *loss, float *lse_r, float *lse_c,
                                 int32_t *two, float *dots) {
  Stats S;
  if (stats_make(x, y, b, d, dims, m, inv_tau, eps, &S)) return -1;
  int rc = mrl_contrastive_forward(x, y, b, d, dims, m, S.a, S.c, S.shift, lse_r, lse_c, two,
                                   dots);
  for (int64_t k = 0; rc == 0 && k < m; k++) {
    double lr = 0, lc = 0, diag = 0;
    for (int64_t i = 0; i < b; i++) {
      int64_t o = k * b + i;
      lr += lse_r[o];
      lc += lse_c[o];
      diag += (double)S.sxy[o] * S.a[o] * S.c[o];
    }
    double v = 0.5 * (lr + lc) / b - (1.0 - eps) * diag / b;
    if (eps != 0.0f) {
      double dot = 0;
      for (int64_t f = 0; f < d; f++) dot += S.u[k * d + f] * S.v[k * d + f];
      v -= eps * dot / ((double)b * b);
    }
    loss[k] = (float)v;
  }
  stats_free(&S);
  return rc;
}

typedef struct {
  const float *x, *y, *g, *inv_tau;
  const int32_t *dims;
  int64_t b, d, m;
  float eps;
  const Stats *S;
  float *dx, *dy, *ga, *gc;
  double *dt; /* [n][m] partials of the inverse temperatures' cotangents */
  int sigmoid; /* the sigmoid loss: its diagonal is in the kernel, no eps */
} Tail;

/* Row i, by share t: the diagonal and label-smoothing terms' cotangents,
 * then the norms' (a_i = inv_tau rx_i, c_j = ry_j), added to dx, dy, and
 * each inverse temperature's, sum_i ga_i a_i / inv_tau (share t's partial).
 * Called by the backward's last pass as each row's dx, dy, ga, gc are out. */
static void tail_row(void *p, int64_t i, int t) {
  Tail *T = p;
  const Stats *S = T->S;
  int64_t b = T->b, d = T->d, m = T->m;
  double *dt = T->dt + (int64_t)t * m;
  double bx[MAX_PREFIXES], by[MAX_PREFIXES];
  {
    const float *xi = T->x + i * d, *yi = T->y + i * d;
    float *dxi = T->dx + i * d, *dyi = T->dy + i * d;
    /* Per prefix: coefficients of x_i, y_i in dx_i and of y_i, x_i in dy_i. */
    float ax[MAX_PREFIXES], wd[MAX_PREFIXES], ay[MAX_PREFIXES];
    for (int64_t k = 0; k < m; k++) {
      int64_t o = k * b + i;
      float gk = T->g[k], ai = S->a[o], ci = S->c[o];
      /* cotangent of the diagonal logit (softmax's -(1 - eps) mean_i l_ii) */
      float w = T->sigmoid ? 0.0f : -(1.0f - T->eps) * gk / (float)b;
      float ga = T->ga[o] + w * S->sxy[o] * ci, gc = T->gc[o] + w * S->sxy[o] * ai;
      wd[k] = w * ai * ci;
      if (T->eps != 0.0f) {
        double sv = 0, su = 0, e = -(double)T->eps * gk / ((double)b * b);
        for (int32_t f = 0; f < T->dims[k]; f++) {
          sv += (double)xi[f] * S->v[k * d + f];
          su += (double)yi[f] * S->u[k * d + f];
        }
        ga += (float)(e * sv);
        gc += (float)(e * su);
        bx[k] = e * ai;
        by[k] = e * ci;
      }
      dt[k] += (double)ga * ai / T->inv_tau[k];
      ax[k] = -ga * ai * S->rx2[o];
      ay[k] = -gc * ci * S->ry2[o];
    }
    /* Chunks from the largest down: each coefficient summed over m >= chunk. */
    float sax = 0, swd = 0, say = 0;
    for (int64_t k = m - 1; k >= 0; k--) {
      sax += ax[k], swd += wd[k], say += ay[k];
      int32_t f0 = k ? T->dims[k - 1] : 0;
      for (int32_t f = f0; f < T->dims[k]; f++) {
        float gx = sax * xi[f] + swd * yi[f], gy = say * yi[f] + swd * xi[f];
        if (T->eps != 0.0f) {
          double ex = 0, ey = 0;
          for (int64_t q = k; q < m; q++) {
            ex += bx[q] * S->v[q * d + f];
            ey += by[q] * S->u[q * d + f];
          }
          gx += (float)ex;
          gy += (float)ey;
        }
        dxi[f] += gx;
        dyi[f] += gy;
      }
    }
  }
}

/* Both losses' backward (sigmoid: d_bias != NULL; inv_tau its scales, bias
 * its biases, lse_r, lse_c, two unused). */
static int loss_backward(const float *x, const float *y, int64_t b, int64_t d,
                         const int32_t *dims, int64_t m, const float *inv_tau, float eps,
                         const float *lse_r, const float *lse_c, const int32_t *two,
                         const float *bias, const float *g, const float *dots, float *dx,
                         float *dy, float *d_inv_tau, float *d_bias) {
  const int sigmoid = d_bias != NULL;
  Stats S;
  if (stats_make(x, y, b, d, dims, m, inv_tau, eps, &S)) return -1;
  float *own = NULL, *ga = malloc(sizeof(float) * 2 * m * b);
  double *dt = calloc((size_t)MAX_THREADS * m, sizeof(double)); /* per backward share */
  int rc = ga != NULL && dt != NULL ? 0 : -1;
  if (rc == 0 && dots == NULL) { /* recompute them (the same kernel: the same bits) */
    int64_t bytes = mrl_contrastive_dots_size(b, m);
    own = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (own == NULL) {
      rc = -1;
    } else if (sigmoid) {
      double sums[MAX_PREFIXES];
      rc = mrl_sigmoid_forward(x, y, b, d, dims, m, S.a, S.c, bias, sums, own);
    } else { /* the log-sum-exps are the caller's: only the dots are kept */
      float *tmp = malloc(sizeof(float) * 2 * m * b + sizeof(int32_t) * m);
      rc = tmp != NULL ? mrl_contrastive_forward(x, y, b, d, dims, m, S.a, S.c, S.shift, tmp,
                                                 tmp + m * b, (int32_t *)(tmp + 2 * m * b), own)
                       : -1;
      free(tmp);
    }
    dots = own;
  }
  Tail T = {x, y, g, inv_tau, dims, b, d, m, eps, &S, dx, dy, ga, ga + m * b, dt, sigmoid};
  if (rc == 0)
    rc = backward_rows(x, y, b, d, dims, m, S.a, S.c, sigmoid ? bias : S.shift, lse_r, lse_c,
                       two, g, dots, dx, dy, ga, ga + m * b, d_bias, tail_row, &T);
  if (rc == 0) {
    for (int64_t k = 0; k < m; k++) {
      double v = 0;
      for (int u = 0; u < MAX_THREADS; u++) v += dt[u * m + k];
      d_inv_tau[k] = (float)v;
    }
  }
  free(own);
  free(ga);
  free(dt);
  stats_free(&S);
  return rc;
}

/* The cotangents of x, y and the inverse temperatures for cotangents g [m]
 * of the forward's loss; dots: the forward's, or NULL (recomputed here).
 * 0, or -1 out of memory. */
int mrl_contrastive_loss_backward(const float *x, const float *y, int64_t b, int64_t d,
                                  const int32_t *dims, int64_t m, const float *inv_tau,
                                  float eps, const float *lse_r, const float *lse_c,
                                  const int32_t *two, const float *g, const float *dots,
                                  float *dx, float *dy, float *d_inv_tau) {
  return loss_backward(x, y, b, d, dims, m, inv_tau, eps, lse_r, lse_c, two, NULL, g, dots, dx,
                       dy, d_inv_tau, NULL);
}

/* The per-prefix sigmoid loss of `matryoshka._sigmoid_fwd`: loss [m] =
 * sum_ij softplus(-z_ij (l_ij + bias_m)) / B, l_ij = <x_i[:m], y_j[:m]>
 * scale_m / (|x_i[:m]| |y_j[:m]|) (scale = 1 / temperature), z = +1 on the
 * diagonal and -1 off it; dots (unless NULL) the backward's residual. 0, or
 * -1 out of memory. */
int mrl_sigmoid_loss_forward(const float *x, const float *y, int64_t b, int64_t d,
                             const int32_t *dims, int64_t m, const float *scale,
                             const float *bias, float *loss, float *dots) {
  Stats S;
  if (stats_make(x, y, b, d, dims, m, scale, 0.0f, &S)) return -1;
  double sums[MAX_PREFIXES];
  int rc = mrl_sigmoid_forward(x, y, b, d, dims, m, S.a, S.c, bias, sums, dots);
  for (int64_t k = 0; rc == 0 && k < m; k++) loss[k] = (float)(sums[k] / b);
  stats_free(&S);
  return rc;
}

/* Cotangents of x, y, scale and bias for sum_m g_m loss_m; dots: the
 * forward's, or NULL (recomputed). 0, or -1 out of memory. */
int mrl_sigmoid_loss_backward(const float *x, const float *y, int64_t b, int64_t d,
                              const int32_t *dims, int64_t m, const float *scale,
                              const float *bias, const float *g, const float *dots, float *dx,
                              float *dy, float *d_scale, float *d_bias) {
  return loss_backward(x, y, b, d, dims, m, scale, 0.0f, NULL, NULL, NULL, bias, g, dots, dx, dy,
                       d_scale, d_bias);
}

/* ---------------------------------------------------------------------- */
/* XLA FFI handlers (C API, xla/ffi/api/c_api.h).                         */
/* ---------------------------------------------------------------------- */
#ifdef MRL_WITH_XLA_FFI
static XLA_FFI_Error *ffi_error(const XLA_FFI_Api *api, XLA_FFI_Error_Code code,
                                const char *msg) {
  XLA_FFI_Error_Create_Args args = {XLA_FFI_Error_Create_Args_STRUCT_SIZE, NULL, msg, code};
  return api->XLA_FFI_Error_Create(&args);
}

/* A call that only asks for the handler's metadata (the FFI version it was
 * built against): answered, and *done set. */
static XLA_FFI_Error *ffi_metadata(XLA_FFI_CallFrame *cf, int *done) {
  *done = 0;
  if (cf->extension_start == NULL || cf->extension_start->type != XLA_FFI_Extension_Metadata)
    return NULL;
  *done = 1;
  XLA_FFI_Metadata_Extension *ext = (XLA_FFI_Metadata_Extension *)cf->extension_start;
  if (ext->extension_base.struct_size < XLA_FFI_Metadata_Extension_STRUCT_SIZE ||
      ext->metadata->struct_size < XLA_FFI_Metadata_STRUCT_SIZE)
    return ffi_error(cf->api, XLA_FFI_Error_Code_INVALID_ARGUMENT,
                     "mrl_jax contrastive: unexpected XLA FFI metadata struct size");
  ext->metadata->api_version = (XLA_FFI_Api_Version){XLA_FFI_Api_Version_STRUCT_SIZE, NULL,
                                                     XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR};
  ext->metadata->traits = 0;
  if (ext->metadata->struct_size >= offsetof(XLA_FFI_Metadata, state_type_id) +
                                        sizeof(XLA_FFI_TypeId))
    ext->metadata->state_type_id.type_id = 0; /* stateless */
  return NULL;
}

/* Decodes the call's buffers against sig: a dtype letter (f: f32, s: s32)
 * and a rank per argument, '|', the same per result, into o[] (arguments,
 * then results). Every handler's first arguments are x, y [B, d], dims [M],
 * the inverse temperatures [M] and eps [1] (softmax) or the biases [M]
 * (sigmoid: per_prefix4): checked here, *b, *d, *m set. NULL, or the error
 * to return. */
static XLA_FFI_Error *ffi_operands(XLA_FFI_CallFrame *cf, const char *name, const char *sig,
                                   int per_prefix4, XLA_FFI_Buffer **o, int64_t *b, int64_t *d,
                                   int64_t *m) {
  static __thread char msg[160];
  const char *bar = strchr(sig, '|');
  int64_t k = 0, nargs = 0;
  for (const char *c = sig; *c; c += 2) {
    if (c == bar) {
      nargs = k;
      c++; /* past the '|' */
    }
    int is_ret = c > bar;
    int64_t i = is_ret ? k - nargs : k, size = is_ret ? cf->rets.size : cf->args.size;
    XLA_FFI_DataType dtype = c[0] == 'f' ? XLA_FFI_DataType_F32 : XLA_FFI_DataType_S32;
    /* XLA_FFI_ArgType_BUFFER == XLA_FFI_RetType_BUFFER == 1 */
    int type = i < size ? (int)(is_ret ? cf->rets.types[i] : cf->args.types[i]) : 0;
    XLA_FFI_Buffer *buf = type == 1 ? (is_ret ? cf->rets.rets[i] : cf->args.args[i]) : NULL;
    if (buf == NULL || buf->dtype != dtype || buf->rank != c[1] - '0') {
      snprintf(msg, sizeof(msg), "%s: operand %lld is not %s buffer of rank %c", name,
               (long long)k, c[0] == 'f' ? "a float32" : "an int32", c[1]);
      return ffi_error(cf->api, XLA_FFI_Error_Code_INVALID_ARGUMENT, msg);
    }
    o[k++] = buf;
  }
  if (cf->args.size != nargs || cf->rets.size != k - nargs) {
    snprintf(msg, sizeof(msg), "%s: %lld arguments and %lld results, not %lld and %lld", name,
             (long long)cf->args.size, (long long)cf->rets.size, (long long)nargs,
             (long long)(k - nargs));
    return ffi_error(cf->api, XLA_FFI_Error_Code_INVALID_ARGUMENT, msg);
  }
  *b = o[0]->dims[0], *d = o[0]->dims[1], *m = o[2]->dims[0];
  if (o[1]->dims[0] != *b || o[1]->dims[1] != *d || o[3]->dims[0] != *m ||
      o[4]->dims[0] != (per_prefix4 ? *m : 1) ||
      *m < 1 || *m > MAX_PREFIXES || *b < 1) {
    snprintf(msg, sizeof(msg), "%s: inconsistent shapes", name);
    return ffi_error(cf->api, XLA_FFI_Error_Code_INVALID_ARGUMENT, msg);
  }
  return NULL;
}

/* Whether buf has the shape [n0] (n1 < 0) or [n0, n1]. */
static int ffi_shape(const XLA_FFI_Buffer *buf, int64_t n0, int64_t n1) {
  return buf->dims[0] == n0 && (n1 < 0 || buf->dims[1] == n1);
}

/* The stored dots between a forward call and its backward: one process-wide
 * buffer, reused across calls (XLA would allocate a fresh output buffer per
 * call, and at B = 4096 the page faults of its 470 MB cost about as much as
 * the forward itself). Each forward fills it under a new generation number,
 * which its token output carries to the backward; a backward whose token no
 * longer matches (another forward ran in between: two losses in one program,
 * several devices, a scan) or that got no stored dots (above the limit)
 * recomputes them first, so results never depend on the cache. */
static pthread_mutex_t ws_lock = PTHREAD_MUTEX_INITIALIZER; /* held through a call using it */
static float *ws_data = NULL;
static int64_t ws_cap = 0, ws_limit = (int64_t)2 << 30;
static uint32_t ws_gen = 0, ws_next = 0; /* 0: holds nothing */

static void ws_free_locked(void) {
  if (ws_data != NULL) munmap(ws_data, (size_t)ws_cap);
  ws_data = NULL;
  ws_cap = 0;
  ws_gen = 0;
}

/* A buffer of >= bytes, or NULL (over the limit, or out of memory). */
static float *ws_reserve_locked(int64_t bytes) {
  if (bytes > ws_limit) return NULL;
  if (ws_cap >= bytes) return ws_data;
  ws_free_locked();
  int64_t cap = bytes;
  void *p = map_bytes(&cap);
  if (p == NULL) return NULL;
  ws_data = p;
  ws_cap = cap;
  return ws_data;
}

/* The most bytes the stored dots' buffer may take, and separately the
 * cached scratch (default 2 GiB; 0: never store, every backward recomputes
 * the dots, and no scratch is kept); a smaller limit frees what is above. */
void mrl_contrastive_set_workspace_limit(int64_t bytes) {
  pthread_mutex_lock(&ws_lock);
  ws_limit = bytes > 0 ? bytes : 0;
  if (ws_cap > ws_limit) ws_free_locked();
  pthread_mutex_unlock(&ws_lock);
  pthread_mutex_lock(&scratch_lock);
  scratch_limit = bytes > 0 ? bytes : 0;
  scratch_trim_locked();
  pthread_mutex_unlock(&scratch_lock);
}

/* Bytes held between calls now: the stored dots' buffer and the scratch. */
int64_t mrl_contrastive_workspace_bytes(void) {
  pthread_mutex_lock(&ws_lock);
  int64_t v = ws_cap;
  pthread_mutex_unlock(&ws_lock);
  pthread_mutex_lock(&scratch_lock);
  v += scratch_cached_locked();
  pthread_mutex_unlock(&scratch_lock);
  return v;
}

/* The loss's forward call: fwd(ctx, store) with the stored dots' buffer
 * (NULL: over the limit), under the lock, then the generation of what it
 * stored into token [1] (0: nothing). 0, or the kernel's error. */
static int ffi_forward_stored(XLA_FFI_CallFrame *cf, int64_t b, int64_t m,
                              int (*fwd)(void *ctx, float *store), void *ctx,
                              XLA_FFI_Buffer *token) {
  pool_api = cf->api, pool_ctx = cf->ctx;
  pthread_mutex_lock(&ws_lock);
  float *store = ws_reserve_locked(mrl_contrastive_dots_size(b, m));
  ws_gen = 0;
  int rc = fwd(ctx, store);
  uint32_t gen = 0;
  if (rc == 0 && store != NULL) {
    if (++ws_next == 0 || ws_next > 0x7fffffffu) ws_next = 1;
    gen = ws_gen = ws_next;
  }
  pthread_mutex_unlock(&ws_lock);
  pool_api = NULL, pool_ctx = NULL;
  ((int32_t *)token->data)[0] = (int32_t)gen;
  return rc;
}

/* The loss's backward call: bwd(ctx, dots) with the forward's stored dots
 * if token still names them (held under the lock), else NULL (the kernel
 * recomputes them). */
static int ffi_backward_stored(XLA_FFI_CallFrame *cf, const XLA_FFI_Buffer *token,
                               int (*bwd)(void *ctx, const float *dots), void *ctx) {
  uint32_t gen = (uint32_t)((const int32_t *)token->data)[0];
  pool_api = cf->api, pool_ctx = cf->ctx;
  pthread_mutex_lock(&ws_lock);
  int held = gen != 0 && gen == ws_gen;
  if (!held) pthread_mutex_unlock(&ws_lock); /* recomputed: no need to hold it */
  int rc = bwd(ctx, held ? ws_data : NULL);
  if (held) pthread_mutex_unlock(&ws_lock);
  pool_api = NULL, pool_ctx = NULL;
  return rc;
}

static XLA_FFI_Error *ffi_out_of_memory(XLA_FFI_CallFrame *cf, int rc, const char *msg) {
  return rc ? ffi_error(cf->api, XLA_FFI_Error_Code_RESOURCE_EXHAUSTED, msg) : NULL;
}

typedef struct {
  XLA_FFI_Buffer **o;
  int64_t b, d, m;
} Call;

static int softmax_fwd_call(void *p, float *store) {
  Call *C = p;
  XLA_FFI_Buffer **o = C->o; /* x, y, dims, inv_tau, eps | loss, lse_r, lse_c, two */
  return mrl_contrastive_loss_forward(o[0]->data, o[1]->data, C->b, C->d, o[2]->data, C->m,
                                      o[3]->data, ((const float *)o[4]->data)[0], o[5]->data,
                                      o[6]->data, o[7]->data, o[8]->data, store);
}

static int softmax_bwd_call(void *p, const float *dots) {
  Call *C = p;
  XLA_FFI_Buffer **o = C->o; /* x, y, dims, inv_tau, eps, lse_r, lse_c, two, g | dx, dy, dtau */
  return mrl_contrastive_loss_backward(o[0]->data, o[1]->data, C->b, C->d, o[2]->data, C->m,
                                       o[3]->data, ((const float *)o[4]->data)[0], o[5]->data,
                                       o[6]->data, o[7]->data, o[8]->data, dots, o[10]->data,
                                       o[11]->data, o[12]->data);
}

static int sigmoid_fwd_call(void *p, float *store) {
  Call *C = p;
  XLA_FFI_Buffer **o = C->o; /* x, y, dims, scale, bias | loss */
  return mrl_sigmoid_loss_forward(o[0]->data, o[1]->data, C->b, C->d, o[2]->data, C->m,
                                  o[3]->data, o[4]->data, o[5]->data, store);
}

static int sigmoid_bwd_call(void *p, const float *dots) {
  Call *C = p;
  XLA_FFI_Buffer **o = C->o; /* x, y, dims, scale, bias, g | dx, dy, dscale, dbias */
  return mrl_sigmoid_loss_backward(o[0]->data, o[1]->data, C->b, C->d, o[2]->data, C->m,
                                   o[3]->data, o[4]->data, o[5]->data, dots, o[7]->data,
                                   o[8]->data, o[9]->data, o[10]->data);
}

/* Args x, y [B, d] f32, dims [M] s32, inv_tau [M], eps [1]; rets loss [M],
 * lse_r, lse_c [M, B], two [M] s32, token [1] s32 (the generation of the
 * stored dots, 0: not stored). */
XLA_FFI_Error *mrl_contrastive_ffi_forward(XLA_FFI_CallFrame *cf) {
  int done;
  XLA_FFI_Error *err = ffi_metadata(cf, &done);
  if (done) return err;
  XLA_FFI_Buffer *o[10];
  Call C = {o, 0, 0, 0};
  if ((err = ffi_operands(cf, "mrl_contrastive_forward", "f2f2s1f1f1|f1f2f2s1s1", 0, o, &C.b,
                          &C.d, &C.m)))
    return err;
  int64_t b = C.b, m = C.m;
  if (!ffi_shape(o[5], m, -1) || !ffi_shape(o[6], m, b) || !ffi_shape(o[7], m, b) ||
      !ffi_shape(o[8], m, -1) || !ffi_shape(o[9], 1, -1))
    return ffi_error(cf->api, XLA_FFI_Error_Code_INVALID_ARGUMENT,
                     "mrl_contrastive_forward: inconsistent result shapes");
  return ffi_out_of_memory(cf, ffi_forward_stored(cf, b, m, softmax_fwd_call, &C, o[9]),
                           "mrl_contrastive_forward: out of memory");
}

/* Args x, y, dims, inv_tau, eps, lse_r, lse_c, two, g [M], token; rets dx,
 * dy [B, d], d_inv_tau [M]. */
XLA_FFI_Error *mrl_contrastive_ffi_backward(XLA_FFI_CallFrame *cf) {
  int done;
  XLA_FFI_Error *err = ffi_metadata(cf, &done);
  if (done) return err;
  XLA_FFI_Buffer *o[13];
  Call C = {o, 0, 0, 0};
  if ((err = ffi_operands(cf, "mrl_contrastive_backward", "f2f2s1f1f1f2f2s1f1s1|f2f2f1", 0, o,
                          &C.b, &C.d, &C.m)))
    return err;
  int64_t b = C.b, d = C.d, m = C.m;
  if (!ffi_shape(o[5], m, b) || !ffi_shape(o[6], m, b) || !ffi_shape(o[7], m, -1) ||
      !ffi_shape(o[8], m, -1) || !ffi_shape(o[9], 1, -1) || !ffi_shape(o[10], b, d) ||
      !ffi_shape(o[11], b, d) || !ffi_shape(o[12], m, -1))
    return ffi_error(cf->api, XLA_FFI_Error_Code_INVALID_ARGUMENT,
                     "mrl_contrastive_backward: inconsistent shapes");
  return ffi_out_of_memory(cf, ffi_backward_stored(cf, o[9], softmax_bwd_call, &C),
                           "mrl_contrastive_backward: out of memory");
}

/* Args x, y [B, d] f32, dims [M] s32, scale [M], bias [M]; rets loss [M],
 * token [1] s32 (as the softmax forward's). */
XLA_FFI_Error *mrl_sigmoid_ffi_forward(XLA_FFI_CallFrame *cf) {
  int done;
  XLA_FFI_Error *err = ffi_metadata(cf, &done);
  if (done) return err;
  XLA_FFI_Buffer *o[7];
  Call C = {o, 0, 0, 0};
  if ((err = ffi_operands(cf, "mrl_sigmoid_forward", "f2f2s1f1f1|f1s1", 1, o, &C.b, &C.d,
                          &C.m)))
    return err;
  if (!ffi_shape(o[5], C.m, -1) || !ffi_shape(o[6], 1, -1))
    return ffi_error(cf->api, XLA_FFI_Error_Code_INVALID_ARGUMENT,
                     "mrl_sigmoid_forward: inconsistent result shapes");
  return ffi_out_of_memory(cf, ffi_forward_stored(cf, C.b, C.m, sigmoid_fwd_call, &C, o[6]),
                           "mrl_sigmoid_forward: out of memory");
}

/* Args x, y, dims, scale, bias, g [M], token; rets dx, dy [B, d], d_scale,
 * d_bias [M]. */
XLA_FFI_Error *mrl_sigmoid_ffi_backward(XLA_FFI_CallFrame *cf) {
  int done;
  XLA_FFI_Error *err = ffi_metadata(cf, &done);
  if (done) return err;
  XLA_FFI_Buffer *o[11];
  Call C = {o, 0, 0, 0};
  if ((err = ffi_operands(cf, "mrl_sigmoid_backward", "f2f2s1f1f1f1s1|f2f2f1f1", 1, o, &C.b,
                          &C.d, &C.m)))
    return err;
  int64_t b = C.b, d = C.d, m = C.m;
  if (!ffi_shape(o[5], m, -1) || !ffi_shape(o[6], 1, -1) || !ffi_shape(o[7], b, d) ||
      !ffi_shape(o[8], b, d) || !ffi_shape(o[9], m, -1) || !ffi_shape(o[10], m, -1))
    return ffi_error(cf->api, XLA_FFI_Error_Code_INVALID_ARGUMENT,
                     "mrl_sigmoid_backward: inconsistent shapes");
  return ffi_out_of_memory(cf, ffi_backward_stored(cf, o[6], sigmoid_bwd_call, &C),
                           "mrl_sigmoid_backward: out of memory");
}
#endif /* MRL_WITH_XLA_FFI */
