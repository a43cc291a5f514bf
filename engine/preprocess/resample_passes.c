/* Pillow's 8-bit resample passes (src/libImaging/Resample.c), bit for bit, vectorised.

   Each output value is clip8(((1 << 21) + sum_t in[t] * k[t]) >> 22) with the int32 fixed-point
   coefficients of resample.coefficients (Pillow's own), the sum in int32 as Pillow's (no
   overflow: |sum| < 2^31 for 8-bit inputs and normalized weights). Only the order of the
   integer additions differs from Pillow's loop, and integer addition is associative: the bits
   are the same. Pixels are 4 bytes (R, G, B, X: Pillow's RGB layout); the X lane is computed
   and dropped.

   hpass4: the horizontal pass, rows sharing each tap's weight: four at a time in 16 int32 lanes
   (AVX-512), two in 8 (AVX2), else a scalar loop per row (four accumulators, as Pillow).
   vpass4: the vertical pass, one output row at a time, contiguous over the row's bytes (the
   compiler vectorises it for whatever the CPU has).

   Built by native.py with the system C compiler for the machine it runs on (-march=native). */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define PRECISION_BITS 22
#define ROUND (1 << (PRECISION_BITS - 1))

static inline uint8_t clip8(int32_t s) {
    s >>= PRECISION_BITS;
    return s < 0 ? 0 : s > 255 ? 255 : (uint8_t)s;
}

/* rows x [c0, c1) outputs of the pass width (xmin, count, w: K taps per output) from `in`
   (4-byte pixels, in_stride bytes per row) into `out` (4-byte pixels, column x at x - c0). */
void hpass4(const uint8_t *in, int64_t in_stride, uint8_t *out, int64_t out_stride, int rows,
            int c0, int c1, const int32_t *xmin, const int32_t *count, const int32_t *w, int K) {
    int y = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    for (; y + 4 <= rows; y += 4) {
        const uint8_t *r0 = in + (int64_t)y * in_stride, *r1 = r0 + in_stride,
                      *r2 = r1 + in_stride, *r3 = r2 + in_stride;
        for (int x = c0; x < c1; x++) {
            const int32_t *k = w + (int64_t)x * K;
            int64_t off = (int64_t)xmin[x] * 4;
            int n = count[x];
            __m512i acc = _mm512_set1_epi32(ROUND);
            for (int t = 0; t < n; t++) {
                int64_t o = off + 4 * (int64_t)t;
                int32_t a, b, c, d;
                memcpy(&a, r0 + o, 4); memcpy(&b, r1 + o, 4);
                memcpy(&c, r2 + o, 4); memcpy(&d, r3 + o, 4);
                __m512i px = _mm512_cvtepu8_epi32(_mm_set_epi32(d, c, b, a));
                acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(px, _mm512_set1_epi32(k[t])));
            }
            /* >> 22, then clamp to 0..255 (max with 0, then unsigned saturation to bytes) */
            acc = _mm512_max_epi32(_mm512_srai_epi32(acc, PRECISION_BITS), _mm512_setzero_si512());
            int32_t q[4];
            _mm_storeu_si128((__m128i *)q, _mm512_cvtusepi32_epi8(acc));
            int64_t ox = (int64_t)(x - c0) * 4;
            memcpy(out + (int64_t)y * out_stride + ox, &q[0], 4);
            memcpy(out + (int64_t)(y + 1) * out_stride + ox, &q[1], 4);
            memcpy(out + (int64_t)(y + 2) * out_stride + ox, &q[2], 4);
            memcpy(out + (int64_t)(y + 3) * out_stride + ox, &q[3], 4);
        }
    }
#elif defined(__AVX2__)
    for (; y + 2 <= rows; y += 2) {          /* two rows: 8 int32 lanes */
        const uint8_t *r0 = in + (int64_t)y * in_stride, *r1 = r0 + in_stride;
        for (int x = c0; x < c1; x++) {
            const int32_t *k = w + (int64_t)x * K;
            int64_t off = (int64_t)xmin[x] * 4;
            int n = count[x];
            __m256i acc = _mm256_set1_epi32(ROUND);
            for (int t = 0; t < n; t++) {
                int64_t o = off + 4 * (int64_t)t;
                int32_t a, b;
                memcpy(&a, r0 + o, 4); memcpy(&b, r1 + o, 4);
                __m256i px = _mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, b, a));
                acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(px, _mm256_set1_epi32(k[t])));
            }
            int32_t q[8];
            _mm256_storeu_si256((__m256i *)q, acc);
            uint8_t *o0 = out + (int64_t)y * out_stride + (int64_t)(x - c0) * 4;
            uint8_t *o1 = o0 + out_stride;
            for (int c = 0; c < 4; c++) { o0[c] = clip8(q[c]); o1[c] = clip8(q[4 + c]); }
        }
    }
#endif
    for (; y < rows; y++) {
        const uint8_t *row = in + (int64_t)y * in_stride;
        for (int x = c0; x < c1; x++) {
            const int32_t *k = w + (int64_t)x * K;
            const uint8_t *p = row + (int64_t)xmin[x] * 4;
            int n = count[x];
            int32_t s0 = ROUND, s1 = ROUND, s2 = ROUND, s3 = ROUND;
            for (int t = 0; t < n; t++) {
                int32_t kk = k[t];
                s0 += p[4 * t] * kk; s1 += p[4 * t + 1] * kk;
                s2 += p[4 * t + 2] * kk; s3 += p[4 * t + 3] * kk;
            }
            uint8_t *o = out + (int64_t)y * out_stride + (int64_t)(x - c0) * 4;
            o[0] = clip8(s0); o[1] = clip8(s1); o[2] = clip8(s2); o[3] = clip8(s3);
        }
    }
}

/* Output rows [r0, r1) of the pass height (ymin, count, w: K taps per output row) over rows of
   `width` 4-byte pixels of `in`, into `out` row y - r0 as 3-byte RGB. acc: 4 * width int32. */
void vpass4(const uint8_t *in, int64_t in_stride, uint8_t *out, int64_t out_stride, int r0,
            int r1, int width, const int32_t *ymin, const int32_t *count, const int32_t *w, int K,
            int32_t *acc) {
    int64_t n_bytes = 4 * (int64_t)width;
    for (int y = r0; y < r1; y++) {
        const int32_t *k = w + (int64_t)y * K;
        int n = count[y];
        for (int64_t i = 0; i < n_bytes; i++) acc[i] = ROUND;
        for (int t = 0; t < n; t++) {
            const uint8_t *src = in + (int64_t)(ymin[y] + t) * in_stride;
            int32_t kk = k[t];
            for (int64_t i = 0; i < n_bytes; i++) acc[i] += src[i] * kk;
        }
        uint8_t *o = out + (int64_t)(y - r0) * out_stride;
        for (int64_t i = 0, j = 0; i < n_bytes; i += 4, j += 3) {
            o[j] = clip8(acc[i]); o[j + 1] = clip8(acc[i + 1]); o[j + 2] = clip8(acc[i + 2]);
        }
    }
}
