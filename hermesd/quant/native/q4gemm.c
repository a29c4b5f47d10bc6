/*
 * hermesd's one-token int4 kernel for x86 with AVX2 and FMA.
 *
 * y[m, n] = sum_k x[m, k] * w[n, k], where w[n, k] = (q[n, k] - 8) * s[g, n] + z[g, n] and g = k / group.
 *
 * It reads the codes in the layout torch's AVX2 int4 kernel uses ("halves32": rows in blocks of 32,
 * each block K-major, 16 bytes per k, byte d holding row d in its low nibble and row d + 16 in its
 * high nibble) and torch's [groups, N, 2] (scale, zero) table in bf16, so a store converted for
 * torch's kernel needs no second copy. Two things make it faster than torch's kernel for a few rows:
 * the codes are summed against x per group as plain integers-in-float, and the group's scale and zero
 * are applied once per group (s * sum(x q) + (z - 8 s) * sum(x)) instead of de-quantizing every
 * weight; and x stays fp32 (torch's kernel takes x in the table's dtype, bf16).
 *
 * Built as an optional extension (setup.py) and loaded with ctypes after torch, so OpenMP resolves to
 * the libgomp.so.1 torch already loaded and the two share one thread pool.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* An empty module, so setuptools builds and installs this file like any extension; the kernel itself
 * is called through ctypes (which releases the GIL for the call). */
static struct PyModuleDef q4gemm_module = {
    PyModuleDef_HEAD_INIT, "_q4gemm", "hermesd's AVX2 int4 kernel", -1, NULL, NULL, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit__q4gemm(void) { return PyModule_Create(&q4gemm_module); }

#if defined(__x86_64__) && defined(__GNUC__)
/* Only the kernel is compiled for AVX2 + FMA; callers check the CPU before calling it. */
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#define BLOCK_N 32
#define MAX_GROUP 256  /* the largest group size stores use (tile: 32 KiB of stack per thread) */
#define TILE_MIN_ROWS 3  /* from three rows on, de-quantizing a tile once beats decoding per row pair */

/* Scale and (zero - 8 * scale) of 8 rows from the table's interleaved bf16 (scale, zero) pairs. */
static inline void load_factors(const uint16_t *pairs, __m256 *scale, __m256 *zero) {
    __m256i v = _mm256_loadu_si256((const __m256i *)pairs);
    *scale = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    __m256 z = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
    *zero = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), *scale, z);
}

/* The 32 codes of one k as four float vectors: rows 0-7, 8-15, 16-23, 24-31 of the block. */
static inline void decode_k(const uint8_t *bytes, __m256 q[4]) {
    const __m256i mask = _mm256_set1_epi32(0xF);
    __m128i r = _mm_loadu_si128((const __m128i *)bytes);
    __m256i lo = _mm256_cvtepu8_epi32(r);
    __m256i hi = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(r, r));
    q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(lo, mask));
    q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(hi, mask));
    q[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4));
    q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4));
}

/* Add one group's contribution, s * sum(x q) + z' * sum(x), to a row's four output vectors. */
static inline void apply_group(const uint16_t *pairs, const __m256 acc[4], float xsum, __m256 out[4]) {
    __m256 xs = _mm256_set1_ps(xsum);
    for (int c = 0; c < 4; c++) {
        __m256 scale, zero;
        load_factors(pairs + 16 * c, &scale, &zero);
        out[c] = _mm256_fmadd_ps(acc[c], scale, _mm256_fmadd_ps(xs, zero, out[c]));
    }
}

/* One row of x against one block of 32 rows of w; two independent accumulator sets hide FMA latency. */
static void block_row1(const float *x, const float *xsum, const uint8_t *codes, const uint16_t *table,
                       float *y, int N, int K, int group) {
    __m256 out[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int g = 0; g < K / group; g++) {
        __m256 a[4], b[4], q[4];
        for (int c = 0; c < 4; c++) a[c] = b[c] = _mm256_setzero_ps();
        const uint8_t *bytes = codes + (int64_t)g * group * 16;
        const float *xg = x + (int64_t)g * group;
        for (int k = 0; k < group; k += 2) {
            __m256 xa = _mm256_broadcast_ss(xg + k), xb = _mm256_broadcast_ss(xg + k + 1);
            decode_k(bytes + k * 16, q);
            for (int c = 0; c < 4; c++) a[c] = _mm256_fmadd_ps(xa, q[c], a[c]);
            decode_k(bytes + (k + 1) * 16, q);
            for (int c = 0; c < 4; c++) b[c] = _mm256_fmadd_ps(xb, q[c], b[c]);
        }
        for (int c = 0; c < 4; c++) a[c] = _mm256_add_ps(a[c], b[c]);
        apply_group(table + (int64_t)g * N * 2, a, xsum[g], out);
    }
    for (int c = 0; c < 4; c++) _mm256_storeu_ps(y + 8 * c, out[c]);
}

/* Two rows of x against one block: each k's codes are decoded once for both rows. */
static void block_row2(const float *x0, const float *x1, const float *s0, const float *s1,
                       const uint8_t *codes, const uint16_t *table, float *y0, float *y1,
                       int N, int K, int group) {
    __m256 out0[4], out1[4];
    for (int c = 0; c < 4; c++) out0[c] = out1[c] = _mm256_setzero_ps();
    for (int g = 0; g < K / group; g++) {
        __m256 a[4], b[4], q[4];
        for (int c = 0; c < 4; c++) a[c] = b[c] = _mm256_setzero_ps();
        const uint8_t *bytes = codes + (int64_t)g * group * 16;
        int64_t base = (int64_t)g * group;
        for (int k = 0; k < group; k++) {
            __m256 xa = _mm256_broadcast_ss(x0 + base + k), xb = _mm256_broadcast_ss(x1 + base + k);
            decode_k(bytes + k * 16, q);
            for (int c = 0; c < 4; c++) {
                a[c] = _mm256_fmadd_ps(xa, q[c], a[c]);
                b[c] = _mm256_fmadd_ps(xb, q[c], b[c]);
            }
        }
        const uint16_t *pairs = table + (int64_t)g * N * 2;
        apply_group(pairs, a, s0[g], out0);
        apply_group(pairs, b, s1[g], out1);
    }
    for (int c = 0; c < 4; c++) {
        _mm256_storeu_ps(y0 + 8 * c, out0[c]);
        _mm256_storeu_ps(y1 + 8 * c, out1[c]);
    }
}

/* De-quantize one group of one block into tile[k][32] (fp32): w = q * s + (z - 8 s). */
static inline void dequantize_tile(const uint8_t *bytes, const uint16_t *pairs, int group, float *tile) {
    __m256 scale[4], zero[4], q[4];
    for (int c = 0; c < 4; c++) load_factors(pairs + 16 * c, &scale[c], &zero[c]);
    for (int k = 0; k < group; k++) {
        decode_k(bytes + k * 16, q);
        for (int c = 0; c < 4; c++)
            _mm256_store_ps(tile + k * BLOCK_N + 8 * c, _mm256_fmadd_ps(q[c], scale[c], zero[c]));
    }
}

/* R rows of x (R constant after inlining) times one de-quantized tile, added into y. */
static inline __attribute__((always_inline)) void tile_rows(int R, const float *x, int ldx, const float *tile,
                                                            int group, float *y, int ldy, int first) {
    __m256 acc[3][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + r * ldy + 8 * c);
    for (int k = 0; k < group; k++) {
        __m256 t[4];
        for (int c = 0; c < 4; c++) t[c] = _mm256_load_ps(tile + k * BLOCK_N + 8 * c);
        for (int r = 0; r < R; r++) {
            __m256 xr = _mm256_broadcast_ss(x + (int64_t)r * ldx + k);
            for (int c = 0; c < 4; c++) acc[r][c] = _mm256_fmadd_ps(xr, t[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) _mm256_storeu_ps(y + r * ldy + 8 * c, acc[r][c]);
}

/* Many rows against one block: each group is de-quantized once into an L1-sized tile that every row
 * reuses, three rows at a time (12 accumulators hide the FMA latency). */
static void block_rows(const float *x, int M, int ldx, const uint8_t *codes, const uint16_t *table,
                       float *y, int ldy, int N, int K, int group) {
    float tile[MAX_GROUP * BLOCK_N] __attribute__((aligned(32)));
    for (int g = 0; g < K / group; g++) {
        dequantize_tile(codes + (int64_t)g * group * 16, table + (int64_t)g * N * 2, group, tile);
        const float *xg = x + (int64_t)g * group;
        int m = 0;
        for (; m + 3 <= M; m += 3)
            tile_rows(3, xg + (int64_t)m * ldx, ldx, tile, group, y + (int64_t)m * ldy, ldy, g == 0);
        if (M - m == 2) tile_rows(2, xg + (int64_t)m * ldx, ldx, tile, group, y + (int64_t)m * ldy, ldy, g == 0);
        if (M - m == 1) tile_rows(1, xg + (int64_t)m * ldx, ldx, tile, group, y + (int64_t)m * ldy, ldy, g == 0);
    }
}

/*
 * y[M, N] (row stride ldy) = x[M, K] (row stride ldx) @ w.T for codes in the halves32 layout.
 * xsum is scratch of M * K / group floats. Returns 0, or -1 for shapes this kernel does not take
 * (N not a multiple of 32: torch packs a short last block differently; K not a multiple of group;
 * an odd group or one above MAX_GROUP), in which case nothing was written.
 */
int hq4_gemm_halves32(const float *x, int M, int ldx, const uint8_t *codes, const uint16_t *table,
                      float *y, int ldy, int N, int K, int group, float *xsum, int threads) {
    if (N % BLOCK_N || group <= 0 || group % 2 || group > MAX_GROUP || K % group || M <= 0) return -1;
    int groups = K / group;
    for (int m = 0; m < M; m++) {
        for (int g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int k = 0; k < group; k++) s += x[(int64_t)m * ldx + (int64_t)g * group + k];
            xsum[m * groups + g] = s;
        }
    }
    int blocks = N / BLOCK_N;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int nb = 0; nb < blocks; nb++) {
        const uint8_t *bc = codes + (int64_t)nb * K * (BLOCK_N / 2);
        const uint16_t *bt = table + (int64_t)nb * BLOCK_N * 2;
        if (M >= TILE_MIN_ROWS) {
            block_rows(x, M, ldx, bc, bt, y + nb * BLOCK_N, ldy, N, K, group);
            continue;
        }
        int m = 0;
        for (; m + 1 < M; m += 2) {
            block_row2(x + (int64_t)m * ldx, x + (int64_t)(m + 1) * ldx, xsum + m * groups,
                       xsum + (m + 1) * groups, bc, bt, y + (int64_t)m * ldy + nb * BLOCK_N,
                       y + (int64_t)(m + 1) * ldy + nb * BLOCK_N, N, K, group);
        }
        if (m < M) {
            block_row1(x + (int64_t)m * ldx, xsum + m * groups, bc, bt, y + (int64_t)m * ldy + nb * BLOCK_N,
                       N, K, group);
        }
    }
    return 0;
}

#pragma GCC pop_options

int hq4_available(void) { return 1; }

#else  /* another architecture or compiler: callers use torch's kernel */

int hq4_gemm_halves32(const float *x, int M, int ldx, const uint8_t *codes, const uint16_t *table,
                      float *y, int ldy, int N, int K, int group, float *xsum, int threads) {
    (void)x; (void)M; (void)ldx; (void)codes; (void)table; (void)y; (void)ldy;
    (void)N; (void)K; (void)group; (void)xsum; (void)threads;
    return -1;
}

int hq4_available(void) { return 0; }

#endif
