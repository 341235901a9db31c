/* Per-head sink + local-window attention on the CPU (moh_compile/kernels/window_native.py).

Why: the PyTorch block kernel (block_sparse.py) runs ATen's flash kernel on small blocks, at
about 1.5-2x the cost per (query, key) pair of the dense kernel's large tiles, plus a separate
sink pass and a merge; at 10% density it reached 50-62% of the ideal speedup (docs/sparse.md).
Here a tile of R consecutive query rows of one head computes its scores over the union of its
rows' visible keys (the sink keys, then one contiguous band: the rows' windows overlap, so the
union is span + R - 1 keys wide), takes an exact softmax per row over that row's own keys (two
column intervals), and accumulates P V. No key outside the tile's union is read, and no
intermediate leaves the thread's scratch buffer (R x union floats).

Layout: q (B, H, S, D), v (B, Hkv, S, D) and out (B, H, S, D) contiguous; kt is K transposed,
(B, Hkv, D, ldk) with ldk >= S + 2 * VW, zero-padded, so score rows are vector loads along the
keys and every load of a 32-key step stays inside the row. Head h reads kv head h / (H / Hkv).
Pattern of head h (the definition: moh_compile.ops.attention.window_mask), query i, key j:
  visible = (j < sink[h]) | (i < sink[h]) | local(i, j), AND (j <= i) when causal, where
  local = i - span < j <= i (one-sided) or |i - j| <= span / 2 (two-sided).
Heads with span < 0 (dense) are skipped: the caller computes them. pairs[h] gets the number of
(query, key) scores computed for head h (the tile unions, so tests can check the work).

Key padding: key_ok (NULL: every key) holds one byte per key, nonzero where it may be attended, at
key_ok + b * ok_sb + h * ok_sh (strides 0 where the mask broadcasts); rows whose keys are all
masked get 0.

Routed heads (MoH + windows): given row_idx, only the listed (b, h, query) rows are computed, in
tiles of up to R listed rows of one (b, h) (task t: tile_bh[t], its rows row_idx[tile_start[t] ...
+ tile_rows[t]], ascending); other rows of `out` are not written. A tile of rows that are not
consecutive scores the union of their windows, so its cost grows with how far apart they are.

Written with GCC vector extensions (also clang): 16-float vectors, the ISA from -march=native.
exp is a degree-6 polynomial of 2^f after range reduction (relative error ~2e-7 on the
arguments softmax gives it, all <= 0).
*/
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

typedef int32_t vi __attribute__((vector_size(64)));
#define R 8 /* query rows per tile: each key load feeds R FMAs */

static inline vf splat(float x) { return (vf){} + x; }
static inline vf select(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

static inline float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < VW; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* exp(x) for x <= 0: x log2(e) = n + f, n integer, |f| <= 1/2; 2^f by its Taylor polynomial in
   f ln 2 (degree 6), 2^n added to the exponent bits. Below 2^-125 the result is ~0 (no denormals). */
static inline vf vexp_nonpos(vf x) {
    vf t = x * 1.44269504088896341f;
    t = select(t < -125.0f, splat(-125.0f), t);
    vi n = -__builtin_convertvector(0.5f - t, vi); /* 0.5 - t > 0: truncation is floor, so n = round(t) */
    vf f = (t - __builtin_convertvector(n, vf)) * 0.69314718055994531f;
    vf p = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 + f * (1.0f / 720))))));
    return (vf)((vi)p + (n << 23));
}

/* S[r, c0 + (j - j0)] = q_r . k_j for j in [j0, j1): 32 keys per step (2 vectors) x R rows of
   accumulators, each kt load feeding R FMAs. Columns up to the next multiple of 32 are written. */
static void scores(const float *const *qr, const float *kt, int64_t ldk, int64_t d, int64_t j0, int64_t j1,
                   float *s, int64_t lds, int64_t c0) {
    for (int64_t j = j0; j < j1; j += 2 * VW) {
        vf acc[R][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = splat(0.0f);
        const float *kp = kt + j;
        for (int64_t e = 0; e < d; e++, kp += ldk) {
            vf k0 = load(kp), k1 = load(kp + VW);
            for (int r = 0; r < R; r++) {
                float qv = qr[r][e];
                acc[r][0] += qv * k0;
                acc[r][1] += qv * k1;
            }
        }
        for (int r = 0; r < R; r++) {
            store(s + r * lds + c0 + (j - j0), acc[r][0]);
            store(s + r * lds + c0 + (j - j0) + VW, acc[r][1]);
        }
    }
}

/* Row r's softmax over its visible columns [0, a) and [b0, b1) of S (scaled by `scale`), in
   place: visible columns get exp(scale (s - max)), the others 0. Returns the sum (0: no key). */
typedef int32_t viu __attribute__((vector_size(64), aligned(4)));

/* ok: per column, -1 where its key may be attended (the model's key-padding mask), else 0. */
static float softmax_row(float *s, int64_t ncols, int64_t a, int64_t b0, int64_t b1, float scale,
                         const int32_t *ok) {
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    vf m = splat(-__builtin_inff());
    for (int64_t c = 0; c < ncols; c += VW) {
        vi col = lane + (int32_t)c;
        vi vis = ((col < (int32_t)a) | ((col >= (int32_t)b0) & (col < (int32_t)b1))) & *(const viu *)(ok + c);
        vf x = select(vis, load(s + c), splat(-__builtin_inff()));
        m = select(x > m, x, m);
    }
    float mx = hmax(m);
    if (mx == -__builtin_inff()) {
        memset(s, 0, sizeof(float) * ncols);
        return 0.0f;
    }
    vf sum = splat(0.0f);
    for (int64_t c = 0; c < ncols; c += VW) {
        vi col = lane + (int32_t)c;
        vi vis = ((col < (int32_t)a) | ((col >= (int32_t)b0) & (col < (int32_t)b1))) & *(const viu *)(ok + c);
        vf p = select(vis, vexp_nonpos((load(s + c) - mx) * scale), splat(0.0f));
        store(s + c, p);
        sum += p;
    }
    return hsum(sum);
}

/* acc[r] += sum_{j in [j0, j1)} P[r, c0 + j - j0] v_j[dc : dc + NV * VW] for R rows. NV is a
   literal at every call (2, or 1 for a last 16-wide chunk), so each gets its own code. */
static inline __attribute__((always_inline)) void pv_chunk(const float *p, int64_t lds, int64_t c0, const float *v,
                                                           int64_t d, int64_t j0, int64_t j1, int64_t dc, int NV,
                                                           vf acc[R][2]) {
    for (int64_t j = j0; j < j1; j++) {
        const float *vp = v + j * d + dc;
        vf v0 = load(vp), v1 = NV > 1 ? load(vp + VW) : v0;
        const float *pc = p + c0 + (j - j0);
        for (int r = 0; r < R; r++) {
            float w = pc[r * lds];
            acc[r][0] += w * v0;
            if (NV > 1) acc[r][1] += w * v1;
        }
    }
}

static void pv(const float *p, int64_t lds, const float *v, int64_t d, int64_t na, int64_t jb0, int64_t jb1,
               float *const *orow, const float *inv) {
    for (int64_t dc = 0; dc < d; dc += 2 * VW) {
        int two = dc + 2 * VW <= d;
        vf acc[R][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = splat(0.0f);
        if (two) {
            pv_chunk(p, lds, 0, v, d, 0, na, dc, 2, acc);
            pv_chunk(p, lds, na, v, d, jb0, jb1, dc, 2, acc);
        } else {
            pv_chunk(p, lds, 0, v, d, 0, na, dc, 1, acc);
            pv_chunk(p, lds, na, v, d, jb0, jb1, dc, 1, acc);
        }
        for (int r = 0; r < R; r++) {
            if (!orow[r]) continue;
            store(orow[r] + dc, acc[r][0] * inv[r]);
            if (two) store(orow[r] + dc + VW, acc[r][1] * inv[r]);
        }
    }
}

/* Visible keys of query i as [0, a) and [b0, b1) (key indices; b0 >= a). */
static void row_keys(int64_t i, int64_t s, int64_t span, int64_t sink, int two_sided, int causal, int64_t *a,
                     int64_t *b0, int64_t *b1) {
    int64_t lim = causal ? (i + 1 < s ? i + 1 : s) : s;
    if (i < sink) { /* a sink query is global */
        *a = lim;
        *b0 = *b1 = lim;
        return;
    }
    int64_t ns = sink < s ? sink : s;
    int64_t lo, hi;
    if (two_sided) {
        lo = i - span / 2;
        hi = i + span / 2 + 1;
    } else {
        lo = i - span + 1;
        hi = i + 1;
    }
    if (hi > lim) hi = lim;
    if (lo < ns) lo = ns;
    if (hi < lo) hi = lo;
    *a = ns;
    *b0 = lo;
    *b1 = hi;
}

/* Returns 0, or 1 when a thread could not allocate its scratch buffers (nothing it owned was
   written; the caller raises). */
int window_attention(const float *q, const float *kt, const float *v, float *out, int64_t b, int64_t h,
                      int64_t hkv, int64_t s, int64_t d, int64_t ldk, const int64_t *span, const int64_t *sink,
                      int two_sided, int causal, float scale, int64_t *pairs, int nthreads,
                      const int64_t *row_idx, const int64_t *tile_bh, const int64_t *tile_start,
                      const int64_t *tile_rows, int64_t n_tasks, const uint8_t *key_ok, int64_t ok_sb,
                      int64_t ok_sh) {
    const int64_t tiles = (s + R - 1) / R, rep = h / hkv, lds = s + 4 * VW;
    int failed = 0;
    if (!row_idx) n_tasks = b * h * tiles;
    memset(pairs, 0, sizeof(int64_t) * h);
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = aligned_alloc(64, sizeof(float) * ((R * lds + VW - 1) / VW * VW));
        int32_t *ok = malloc(sizeof(int32_t) * lds);
        int64_t *mine = calloc(h, sizeof(int64_t));
#pragma omp for schedule(dynamic, 4)
        for (int64_t task = 0; task < n_tasks; task++) {
            /* every row of the head, 8 at a time; or (routed heads) the listed rows of one (b, h) */
            int64_t bh = row_idx ? tile_bh[task] : task / tiles, hd = bh % h;
            int64_t rows[R], n_rows = row_idx ? tile_rows[task] : (s - (task % tiles) * R < R ? s - (task % tiles) * R : R);
            for (int r = 0; r < R; r++) {
                int64_t rr = r < n_rows ? r : n_rows - 1;
                rows[r] = row_idx ? row_idx[tile_start[task] + rr] : (task % tiles) * R + rr;
            }
            if (!buf || !mine || !ok) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            if (span[hd] < 0) continue;
            int64_t kvh = (bh / h) * hkv + hd / rep;
            const float *qh = q + bh * s * d, *kth = kt + kvh * d * ldk, *vh = v + kvh * s * d;
            int64_t a[R], b0[R], b1[R], na = 0, jb0 = s, jb1 = 0;
            int global = 0;
            for (int r = 0; r < R; r++) {
                int64_t i = rows[r];
                row_keys(i, s, span[hd], sink[hd], two_sided, causal, &a[r], &b0[r], &b1[r]);
                global |= i < sink[hd];
                if (a[r] > na) na = a[r];
                if (b1[r] > b0[r]) {
                    if (b0[r] < jb0) jb0 = b0[r];
                    if (b1[r] > jb1) jb1 = b1[r];
                }
            }
            if (jb1 <= jb0) jb0 = jb1 = na;
            if (global) { /* one key range [0, hi) holds every row's keys; columns are keys */
                if (jb1 > na) na = jb1;
                jb0 = jb1 = na;
            }
            const int64_t nb = jb1 - jb0, ncols = na + nb;
            const uint8_t *kok = key_ok ? key_ok + (bh / h) * ok_sb + hd * ok_sh : 0;
            for (int64_t c = 0; c < (ncols + VW - 1) / VW * VW; c++) {
                int64_t j = c < na ? c : jb0 + (c - na);
                ok[c] = c < ncols && (!kok || kok[j]) ? -1 : 0;
            }
            const float *qr[R];
            float *orow[R], inv[R];
            for (int r = 0; r < R; r++) {
                qr[r] = qh + rows[r] * d;
                orow[r] = r < n_rows ? out + (bh * s + rows[r]) * d : 0;
            }
            /* sink columns [0, na), then band columns [na, na + nb); the band scores are written after
               the sink ones are complete, so the sink step's spill past na is overwritten */
            scores(qr, kth, ldk, d, 0, na, buf, lds, 0);
            scores(qr, kth, ldk, d, jb0, jb1, buf, lds, na);
            for (int r = 0; r < R; r++) {
                int64_t c2 = global ? b0[r] : na + (b0[r] - jb0), c3 = global ? b1[r] : na + (b1[r] - jb0);
                if (b1[r] <= b0[r]) c2 = c3 = 0;
                float sum = softmax_row(buf + r * lds, ncols, a[r], c2, c3, scale, ok);
                inv[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
            }
            pv(buf, lds, vh, d, na, jb0, jb1, orow, inv);
            mine[hd] += n_rows * ncols;
        }
#pragma omp critical
        for (int64_t x = 0; x < h; x++) pairs[x] += mine ? mine[x] : 0;
        free(buf);
        free(ok);
        free(mine);
    }
    return failed;
}
