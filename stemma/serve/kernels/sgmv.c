/* Per-row LoRA over rows grouped by adapter (Punica's SGMV, Chen et al. 2023) for the CPU: `stemma.serve.kernels`
   compiles this file once per machine with its C compiler and calls `sgmv` through ctypes.

   For every group g of rows (one adapter, slot s = g_slot[g], rows rows[g_start[g] .. g_start[g+1]]) and every part
   p of the linear (a projection's columns col_p .. col_p + width_p):
       y[r, col_p : col_p + width_p] += (x[r] @ A_s)[off_p : off_p + rank_p] @ B_p,s
   A_s row k is at a + s * slot_stride + k * a_stride ([in, R], R = the parts' ranks summed); B_p,s is
   [rank_p, width_p] at b_ptrs[p] + s * rank_p * width_p. t is scratch for x @ A, [rows, R]. Every row is read and
   written in place: no gather of the group's rows, no padding, no scatter back. Threads: OpenMP, the runtime
   PyTorch already loaded (the caller checks that there is one), n_threads of them. */
#include <stdint.h>

#define RB 4 /* rows per register block */

/* t[i, 0:R] = x[rows[i]] @ A (A row k at a + k * a_stride), R a compile-time constant so the accumulators of
   RB rows x R columns stay in registers. */
#define A_PHASE(R_)                                                                                          \
    static void a_phase_##R_(const float *x, int64_t x_stride, int64_t d_in, const float *a, int64_t a_stride, \
                             const int64_t *rows, int64_t n, float *t, int64_t t_stride)                     \
    {                                                                                                        \
        for (int64_t i0 = 0; i0 < n; i0 += RB) {                                                             \
            const int64_t nr = n - i0 < RB ? n - i0 : RB;                                                    \
            const float *xr[RB];                                                                             \
            for (int64_t i = 0; i < RB; i++) xr[i] = x + rows[i0 + (i < nr ? i : 0)] * x_stride;             \
            float acc[RB][R_];                                                                               \
            for (int64_t i = 0; i < RB; i++)                                                                 \
                for (int64_t c = 0; c < R_; c++) acc[i][c] = 0.f;                                            \
            for (int64_t k = 0; k < d_in; k++) {                                                             \
                const float *ak = a + k * a_stride;                                                          \
                for (int64_t i = 0; i < RB; i++) {                                                           \
                    const float xv = xr[i][k];                                                               \
                    for (int64_t c = 0; c < R_; c++) acc[i][c] += xv * ak[c];                                \
                }                                                                                            \
            }                                                                                                \
            for (int64_t i = 0; i < nr; i++)                                                                 \
                for (int64_t c = 0; c < R_; c++) t[(i0 + i) * t_stride + c] = acc[i][c];                     \
        }                                                                                                    \
    }

A_PHASE(16)
A_PHASE(32)
A_PHASE(48)
A_PHASE(64)

static void a_phase_any(const float *x, int64_t x_stride, int64_t d_in, const float *a, int64_t a_stride,
                        int64_t R, const int64_t *rows, int64_t n, float *t, int64_t t_stride)
{
    for (int64_t c0 = 0; c0 < R; c0 += 16) {
        const int64_t nc = R - c0 < 16 ? R - c0 : 16;
        if (nc == 16) {
            a_phase_16(x, x_stride, d_in, a + c0, a_stride, rows, n, t + c0, t_stride);
            continue;
        }
        for (int64_t i = 0; i < n; i++) {
            float acc[16] = {0};
            const float *xi = x + rows[i] * x_stride;
            for (int64_t k = 0; k < d_in; k++)
                for (int64_t c = 0; c < nc; c++) acc[c] += xi[k] * a[k * a_stride + c0 + c];
            for (int64_t c = 0; c < nc; c++) t[i * t_stride + c0 + c] = acc[c];
        }
    }
}

#define CB 64 /* output columns per register block */

/* y[rows[i], c0:c0+CB] += t[i, 0:rk] @ b[:, c0:c0+CB] for the rows of one group. */
static void b_block(const float *t, int64_t t_stride, const float *b, int64_t rk, int64_t w, int64_t c0,
                    float *y, int64_t y_stride, const int64_t *rows, int64_t n)
{
    const int64_t nc = w - c0 < CB ? w - c0 : CB;
    for (int64_t i0 = 0; i0 < n; i0 += RB) {
        const int64_t nr = n - i0 < RB ? n - i0 : RB;
        if (nc == CB) {
            float acc[RB][CB];
            for (int64_t i = 0; i < RB; i++)
                for (int64_t c = 0; c < CB; c++) acc[i][c] = 0.f;
            const float *tr[RB];
            for (int64_t i = 0; i < RB; i++) tr[i] = t + (i0 + (i < nr ? i : 0)) * t_stride;
            for (int64_t j = 0; j < rk; j++) {
                const float *bj = b + j * w + c0;
                for (int64_t i = 0; i < RB; i++) {
                    const float tv = tr[i][j];
                    for (int64_t c = 0; c < CB; c++) acc[i][c] += tv * bj[c];
                }
            }
            for (int64_t i = 0; i < nr; i++) {
                float *yi = y + rows[i0 + i] * y_stride + c0;
                for (int64_t c = 0; c < CB; c++) yi[c] += acc[i][c];
            }
        } else {
            for (int64_t i = i0; i < i0 + nr; i++) {
                float *yi = y + rows[i] * y_stride + c0;
                for (int64_t j = 0; j < rk; j++) {
                    const float tv = t[i * t_stride + j];
                    const float *bj = b + j * w + c0;
                    for (int64_t c = 0; c < nc; c++) yi[c] += tv * bj[c];
                }
            }
        }
    }
}

/* One linear, every group and part (see the top of the file). */
void sgmv(const float *x, int64_t x_stride, float *y, int64_t y_stride, int64_t d_in,
          const float *a, int64_t a_stride, int64_t slot_stride, int64_t R,
          int64_t n_parts, const int64_t *p_col, const int64_t *p_width, const int64_t *p_off, const int64_t *p_rank,
          const int64_t *b_ptrs,
          int64_t n_groups, const int64_t *g_slot, const int64_t *g_start, const int64_t *rows, float *t,
          int64_t n_threads)
{
    int64_t n_items = 0;
    for (int64_t p = 0; p < n_parts; p++) n_items += (p_width[p] + CB - 1) / CB;
    #pragma omp parallel num_threads(n_threads)
    {
        #pragma omp for schedule(dynamic, 1)
        for (int64_t g = 0; g < n_groups; g++) {
            const float *ag = a + g_slot[g] * slot_stride;
            const int64_t *gr = rows + g_start[g], n = g_start[g + 1] - g_start[g];
            float *tg = t + g_start[g] * R;
            switch (R) {
            case 16: a_phase_16(x, x_stride, d_in, ag, a_stride, gr, n, tg, R); break;
            case 32: a_phase_32(x, x_stride, d_in, ag, a_stride, gr, n, tg, R); break;
            case 48: a_phase_48(x, x_stride, d_in, ag, a_stride, gr, n, tg, R); break;
            case 64: a_phase_64(x, x_stride, d_in, ag, a_stride, gr, n, tg, R); break;
            default: a_phase_any(x, x_stride, d_in, ag, a_stride, R, gr, n, tg, R);
            }
        }
        /* work items: (group, part, column block), so both threads stream weights even with few groups */
        #pragma omp for schedule(dynamic, 4)
        for (int64_t item = 0; item < n_groups * n_items; item++) {
            const int64_t g = item / n_items;
            int64_t rest = item % n_items, p = 0;
            while (rest >= (p_width[p] + CB - 1) / CB) rest -= (p_width[p++] + CB - 1) / CB;
            const int64_t w = p_width[p], rk = p_rank[p];
            const float *b = (const float *)b_ptrs[p] + g_slot[g] * rk * w;
            b_block(t + g_start[g] * R + p_off[p], R, b, rk, w, rest * CB, y + p_col[p], y_stride,
                    rows + g_start[g], g_start[g + 1] - g_start[g]);
        }
    }
}
