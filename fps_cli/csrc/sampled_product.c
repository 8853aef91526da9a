/* The delta's gradient on the CPU: the sampled dense-dense product, reading dy and x row-major.
 *
 * out[p] += sum_t dy[t, i] * x[t, cols[p]] for the entries p = crow[i] .. crow[i + 1] - 1 of the pattern rows
 * i = first .. last - 1. Tokens are walked in order, eight at a time: for each row the eight dy values are loaded
 * once and each entry's output is read and written once per eight tokens. Every entry is summed by one caller in
 * token order, with the same grouping of the eight products whatever the row split, and compiled without
 * floating-point contraction (-ffp-contract=off), so the bits depend on neither the thread count nor the compiler.
 *
 * Built at first use by fps_cli/sampled_product.py with the system C compiler and loaded with ctypes.
 */
#include <stdint.h>

#define ACCUMULATE_ROWS(NAME, T)                                                                                     \
    void NAME(const T *dy, int64_t dy_stride, const T *x, int64_t x_stride, int64_t tokens, const int64_t *crow,    \
              const int64_t *cols, T *out, int64_t first, int64_t last) {                                           \
        int64_t t = 0;                                                                                               \
        for (; t + 8 <= tokens; t += 8) {                                                                            \
            const T *d = dy + t * dy_stride, *r = x + t * x_stride;                                                  \
            for (int64_t i = first; i < last; i++) {                                                                 \
                T a0 = d[i], a1 = d[dy_stride + i], a2 = d[2 * dy_stride + i], a3 = d[3 * dy_stride + i];            \
                T a4 = d[4 * dy_stride + i], a5 = d[5 * dy_stride + i], a6 = d[6 * dy_stride + i];                   \
                T a7 = d[7 * dy_stride + i];                                                                         \
                for (int64_t p = crow[i]; p < crow[i + 1]; p++) {                                                    \
                    const T *c = r + cols[p];                                                                        \
                    out[p] += (a0 * c[0] + a1 * c[x_stride] + a2 * c[2 * x_stride] + a3 * c[3 * x_stride]) +         \
                              (a4 * c[4 * x_stride] + a5 * c[5 * x_stride] + a6 * c[6 * x_stride] +                  \
                               a7 * c[7 * x_stride]);                                                                \
                }                                                                                                    \
            }                                                                                                        \
        }                                                                                                            \
        for (; t < tokens; t++) {                                                                                    \
            const T *d = dy + t * dy_stride, *r = x + t * x_stride;                                                  \
            for (int64_t i = first; i < last; i++)                                                                   \
                for (int64_t p = crow[i]; p < crow[i + 1]; p++) out[p] += d[i] * r[cols[p]];                         \
        }                                                                                                            \
    }

ACCUMULATE_ROWS(fps_accumulate_rows_f32, float)
ACCUMULATE_ROWS(fps_accumulate_rows_f64, double)
