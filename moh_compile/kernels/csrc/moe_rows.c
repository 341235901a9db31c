/* Row kernels for fine-grained MoE++ experts (moh_compile/kernels/moe_fine.py).

Why: with many small experts (e.g. 256 experts of 6 neurons) a token chooses a hundred of them,
and per-expert library GEMMs are too narrow to run fast (N = 6) while the gather / scatter of a
d-wide row per (token, expert) pair moves more bytes than the matmul saves. Here one call does a
whole layer: pairs are grouped by (token tile, expert); a thread owns a token tile, so its rows of
x and of the output stay in its L2 cache while it walks the tile's experts, and an expert's
weights (F_e rows) stay in L1 across the tile's tokens that chose it. No gather or scatter
buffers: rows are read and accumulated in place.

Two entry points, the two linear halves of an expert; the activation and the routing weight are
applied in between by the caller (PyTorch), so every activation the op knows works unchanged;
the routing weight w[p] is folded into the output half:
  moe_rows_in:  H[p, :] = W[e] @ x[tok[p]] (+ b[e])        W: (N, F_e, d)
  moe_rows_out: out[tok[p], :] += w[p] * A[p, :] @ Wt[e]    Wt: (N, F_e, d_out)
Pair p belongs to segment s (seg_start[s] <= p < seg_start[s + 1]), whose expert is
seg_expert[s]; the segments of tile i are tile_seg[i] .. tile_seg[i + 1] - 1. Distinct tiles
own distinct tokens, so tiles run on threads without write conflicts.

Written with GCC vector extensions (also clang), so the compiler picks the ISA (-march=native):
16-float vectors, 4 tokens per step so each weight load feeds 4 FMAs.
*/
#include <stdint.h>
#include <string.h>

#include "vec.h"

#define TB 4   /* tokens per step of the input half */
#define TBO 4  /* tokens per step of the output half */

/* h_j[f0 + i] = dot(W[f0 + i], x_j) + b[f0 + i] for i < FB, j < TB (register block of TB x FB
   accumulators: each x load feeds FB FMAs and each weight load TB). Rows past nt are computed on
   duplicate pointers and dropped. FB is a literal at every call, so each FB gets its own code. */
static inline __attribute__((always_inline)) void rows_in_block(
        const float *W, const float *b, int64_t f0, int FB, int64_t d,
        const float *const *x, int nt, float *const *h) {
    const int64_t dv = d - d % VW;
    vf acc[TB][6];
    for (int j = 0; j < TB; j++)
        for (int i = 0; i < FB; i++) acc[j][i] = (vf){0};
    for (int64_t c = 0; c < dv; c += VW) {
        vf xv[TB];
        for (int j = 0; j < TB; j++) xv[j] = load(x[j] + c);
        for (int i = 0; i < FB; i++) {
            vf wv = load(W + (f0 + i) * d + c);
            for (int j = 0; j < TB; j++) acc[j][i] += wv * xv[j];
        }
    }
    for (int j = 0; j < nt; j++)
        for (int i = 0; i < FB; i++) {
            const float *w = W + (f0 + i) * d;
            float s = hsum(acc[j][i]);
            for (int64_t c = dv; c < d; c++) s += w[c] * x[j][c];
            h[j][f0 + i] = b ? s + b[f0 + i] : s;
        }
}

/* h_j = W @ x_j + b for nt <= TB tokens, neurons in blocks of 6 (then 4, 2, 1; a 3-block was
   slower than 2 + 1 here: 14.1 vs 12.6 ms for 512 experts of 3 neurons, 2048 tokens). */
static void rows_in(const float *W, const float *b, int64_t fe, int64_t d,
                    const float *const *x, int nt, float *const *h) {
    int64_t f = 0;
    for (; f + 6 <= fe; f += 6) rows_in_block(W, b, f, 6, d, x, nt, h);
    for (; f + 4 <= fe; f += 4) rows_in_block(W, b, f, 4, d, x, nt, h);
    for (; f + 2 <= fe; f += 2) rows_in_block(W, b, f, 2, d, x, nt, h);
    for (; f < fe; f++) rows_in_block(W, b, f, 1, d, x, nt, h);
}

/* out_j += aw_j * sum_{i < FB} a_j[f0 + i] * Wt[f0 + i] for TBO distinct rows; the
   TBO x FB routed activations are broadcast into registers once, outside the column loop. */
static inline __attribute__((always_inline)) void rows_out_block(
        const float *Wt, int64_t f0, int FB, int64_t dout,
        const float *const *a, const float *aw, float *const *out) {
    const int64_t dv = dout - dout % VW;
    vf av[TBO][6];
    for (int j = 0; j < TBO; j++)
        for (int i = 0; i < FB; i++) av[j][i] = (vf){0} + aw[j] * a[j][f0 + i];
    for (int64_t c = 0; c < dv; c += VW) {
        vf acc[TBO];
        for (int j = 0; j < TBO; j++) acc[j] = load(out[j] + c);
        for (int i = 0; i < FB; i++) {
            vf wv = load(Wt + (f0 + i) * dout + c);
            for (int j = 0; j < TBO; j++) acc[j] += av[j][i] * wv;
        }
        for (int j = 0; j < TBO; j++) store(out[j] + c, acc[j]);
    }
    for (int64_t c = dv; c < dout; c++)
        for (int j = 0; j < TBO; j++) {
            float s = out[j][c];
            for (int i = 0; i < FB; i++) s += aw[j] * a[j][f0 + i] * Wt[(f0 + i) * dout + c];
            out[j][c] = s;
        }
}

/* out_j += aw_j * a_j @ Wt for TBO rows, neurons in blocks of 6 (then 4, 3, 2, 1: a 3-neuron
   expert reads and writes its output rows once, not twice; 12.9 -> 9.7 ms at 512 experts of 3
   neurons, 2048 tokens). A short step passes a scratch row with weight 0 for its unused rows
   (caller), so every loop has a constant trip count and the accumulators stay in registers (a
   variable count cost 1.4x here). */
static void rows_out(const float *Wt, int64_t fe, int64_t dout,
                     const float *const *a, const float *aw, float *const *out) {
    int64_t f = 0;
    for (; f + 6 <= fe; f += 6) rows_out_block(Wt, f, 6, dout, a, aw, out);
    for (; f + 4 <= fe; f += 4) rows_out_block(Wt, f, 4, dout, a, aw, out);
    for (; f + 3 <= fe; f += 3) rows_out_block(Wt, f, 3, dout, a, aw, out);
    for (; f + 2 <= fe; f += 2) rows_out_block(Wt, f, 2, dout, a, aw, out);
    for (; f < fe; f++) rows_out_block(Wt, f, 1, dout, a, aw, out);
}

void moe_rows_in(const float *x, int64_t d, const int64_t *tok,
                 const int64_t *seg_start, const int64_t *seg_expert,
                 const int64_t *tile_seg, int64_t n_tiles,
                 const float *W, const float *b, int64_t fe, float *H, int nthreads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t t = 0; t < n_tiles; t++) {
        for (int64_t s = tile_seg[t]; s < tile_seg[t + 1]; s++) {
            const int64_t e = seg_expert[s];
            const float *We = W + e * fe * d;
            const float *be = b ? b + e * fe : 0;
            for (int64_t p = seg_start[s]; p < seg_start[s + 1]; p += TB) {
                int nt = (int)(seg_start[s + 1] - p < TB ? seg_start[s + 1] - p : TB);
                const float *xs[TB];
                float *hs[TB];
                for (int j = 0; j < TB; j++) {
                    int64_t q = p + (j < nt ? j : 0);  /* rows past nt: duplicates, results dropped */
                    xs[j] = x + tok[q] * d;
                    hs[j] = H + q * fe;
                }
                rows_in(We, be, fe, d, xs, nt, hs);
            }
        }
    }
}

void moe_rows_out(const float *A, const float *w, int64_t fe, const int64_t *tok,
                  const int64_t *seg_start, const int64_t *seg_expert,
                  const int64_t *tile_seg, int64_t n_tiles,
                  const float *Wt, int64_t dout, float *out, int nthreads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t t = 0; t < n_tiles; t++) {
        float spare[dout];  /* written by the unused rows of a short step */
        memset(spare, 0, sizeof(spare));
        for (int64_t s = tile_seg[t]; s < tile_seg[t + 1]; s++) {
            const float *We = Wt + seg_expert[s] * fe * dout;
            for (int64_t p = seg_start[s]; p < seg_start[s + 1];) {
                int nt = (int)(seg_start[s + 1] - p < TBO ? seg_start[s + 1] - p : TBO);
                const float *as[TBO];
                float aw[TBO];
                float *os[TBO];
                /* a token that chose this expert in two slots has adjacent pairs (stable sort):
                   end the step before the repeat, or its two accumulators would overwrite */
                for (int j = 1; j < nt; j++)
                    if (tok[p + j] == tok[p + j - 1]) { nt = j; break; }
                for (int j = 0; j < TBO; j++) {
                    int64_t q = p + (j < nt ? j : 0);
                    as[j] = A + q * fe;
                    aw[j] = j < nt ? w[q] : 0.0f;
                    os[j] = j < nt ? out + tok[q] * dout : spare;
                }
                rows_out(We, fe, dout, as, aw, os);
                p += nt;
            }
        }
    }
}

/* Group the FFN (token, slot) pairs by (token tile, expert), tokens ascending within a group (a
   counting sort, the routing of the two entry points above). idx / wts: (T, k) expert ids and
   routing weights; ids >= n (zero-computation experts) are skipped. counts: n_tiles * n scratch.
   Outputs: tok / w per pair, seg_start (segments + 1), seg_expert, tile_seg (n_tiles + 1).
   Returns the number of pairs. */
int64_t moe_rows_plan(const int64_t *idx, const float *wts, int64_t T, int64_t k, int64_t n,
                      int64_t tile, int64_t n_tiles, int64_t *counts, int64_t *tile_pairs,
                      int64_t *tok, float *w, int64_t *seg_start, int64_t *seg_expert,
                      int64_t *tile_seg, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < n_tiles; t++) {
        int64_t *c = counts + t * n, pairs = 0, segs = 0;
        memset(c, 0, n * sizeof(int64_t));
        const int64_t end = (t + 1) * tile < T ? (t + 1) * tile : T;
        for (int64_t i = t * tile * k; i < end * k; i++)
            if (idx[i] < n) c[idx[i]]++;
        for (int64_t e = 0; e < n; e++) {
            pairs += c[e];
            segs += c[e] > 0;
        }
        tile_pairs[t + 1] = pairs;
        tile_seg[t + 1] = segs;
    }
    tile_pairs[0] = tile_seg[0] = 0;
    for (int64_t t = 0; t < n_tiles; t++) {
        tile_pairs[t + 1] += tile_pairs[t];
        tile_seg[t + 1] += tile_seg[t];
    }
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < n_tiles; t++) {
        int64_t *c = counts + t * n, pos = tile_pairs[t], seg = tile_seg[t];
        for (int64_t e = 0; e < n; e++) {
            const int64_t m = c[e];
            c[e] = pos;  /* from here on: the next free pair of expert e in this tile */
            if (m) {
                seg_start[seg] = pos;
                seg_expert[seg++] = e;
                pos += m;
            }
        }
        const int64_t end = (t + 1) * tile < T ? (t + 1) * tile : T;
        for (int64_t r = t * tile; r < end; r++)
            for (int64_t j = 0; j < k; j++) {
                const int64_t e = idx[r * k + j];
                if (e < n) {
                    const int64_t q = c[e]++;
                    tok[q] = r;
                    w[q] = wts[r * k + j];
                }
            }
    }
    seg_start[tile_seg[n_tiles]] = tile_pairs[n_tiles];
    return tile_pairs[n_tiles];
}
