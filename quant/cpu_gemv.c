/* Fused dequantize + GEMV for HQQ weights on the CPU: y = x @ W.T for a few tokens, read from the packed
 * codes in place. quant/cpu_gemv.py builds this file with the machine's C compiler and calls it through
 * ctypes; quant/gemv.py is its CUDA twin, whose module doc has the math and the layout:
 *
 *     sum_k W[n, k] x[k] = sum_r scale_r * (sum_j code_rj x_j - zero_r * sum_j x_j)
 *
 * over the groups r of output n (r = n * G + group, G = K / g). Grid row r lives in packed row r % step, at
 * bit slot r / step, highest bits first. Two loops:
 *   - outputs: when step is a multiple of G (2, 4 and 8 bits on Mixtral's shapes), an output's groups are
 *     G consecutive packed rows, and the rows of slot s are outputs s * N / PER + [0, N / PER). A call
 *     takes whole outputs of every slot and reads each packed element once, for all of its codes;
 *   - packed_rows (3-bit's padded grid, whose slots split outputs): a call takes packed rows and adds what
 *     they hold into the outputs they touch.
 * `outputs` keeps g partial sums per slot and token and reduces them once an output, not once a group: at
 * 2-bit g16 a reduction per group cost more than the group's products.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {          /* a weight's scales or zeros, one per group: */
    const uint16_t *half; /* float16 [R], or NULL when they are quantized to 8 bits: */
    const uint8_t *codes; /* [R] */
    const uint16_t *scale, *zero; /* float16 [R / group]: value = (code - zero) * scale */
    int64_t group;
    /* 0, or by output (quant/packing.py): output q's G codes of bit slot s at codes + s * slot_stride + q *
     * output_stride, their G / group scales and zeros at scale (zero) + s * group_slot_stride + q * group_output_stride */
    int64_t slot_stride, output_stride, group_slot_stride, group_output_stride;
} Meta;

typedef struct {
    const float *x;      /* [M, K] */
    const float *x_sums; /* [M, G]: each group's sum of x (of the int8 tokens' values, for the _int8 calls) */
    const int8_t *xq;    /* [M, K]: the _int8 calls' tokens, x ~ xq * x_scales, from moe_offload_quantize_tokens */
    const float *x_scales; /* [M, K / 64] */
    const void *codes;   /* [step, g]: uint8 (2, 4 and 8 bits) or int32 (3 bits) */
    Meta scale, zero;
    int64_t tokens, n, k, step; /* M, N, K, packed rows */
    int32_t bits, group_size;
    int32_t vnni; /* the _int8 calls' vector width: 512 or 256 bits (moe_offload_vnni) */
} Problem;

/* float16 -> float32, exactly and without branches, so that meta_rows' loops vectorize (a branch a case kept
 * them scalar; it shows where scales are float16, 4-bit's, and the products are cheap, int8 tokens'). The half's
 * exponent and mantissa, put where a float's lie, read as a float 2^-112 times the value, subnormals included
 * (needs denormals, which the build keeps: no -ffast-math); exponent 31 (inf, nan) is set apart. */
static inline float half_to_float(uint16_t h) {
    const uint32_t magnitude = (uint32_t)(h & 0x7fff) << 13;
    float value;
    memcpy(&value, &magnitude, sizeof value);
    value *= 0x1p112f;
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    bits = magnitude >= (0x7c00u << 13) ? magnitude | 0x7f800000u : bits;
    bits |= (uint32_t)(h & 0x8000) << 16;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* `count` 8-bit codes from `codes`, the first `offset` into a group whose scale and zero are scales[0] and zeros[0]
 * (the next groups' follow), as float32 into out, times `factor` (a power of two): the same arithmetic as
 * quant.hqq.dequantize in float32. */
static void dequantize_codes(const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros, int64_t group,
                             int64_t offset, int64_t count, float factor, float *out) {
    if ((offset | count | group) % 64 == 0) { /* Mixtral's shapes: 64 a loop, in one group, with no division */
        for (int64_t j = 0, i = 0; j < count; j += 64) {
            if (j == (i + 1) * group - offset) i++;
            const float scale = half_to_float(scales[i]) * factor, zero = half_to_float(zeros[i]);
            for (int l = 0; l < 64; l++) out[j + l] = ((float)codes[j + l] - zero) * scale;
        }
        return;
    }
    for (int64_t j = 0; j < count;) { /* a run of codes in one group at a time */
        const int64_t i = (offset + j) / group, run_end = (i + 1) * group - offset;
        const int64_t end = run_end < count ? run_end : count;
        const float scale = half_to_float(scales[i]), zero = half_to_float(zeros[i]);
        for (; j < end; j++) out[j] = ((float)codes[j] - zero) * scale * factor;
    }
}

/* Grid rows [first, first + count) of a scale or zero in grid order, as float32 into out, times `factor`. */
static void meta_rows(const Meta *m, int64_t first, int64_t count, float factor, float *out) {
    if (m->half) {
        for (int64_t j = 0; j < count; j++) out[j] = half_to_float(m->half[first + j]) * factor;
        return;
    }
    const int64_t i = first / m->group;
    dequantize_codes(m->codes + first, m->scale + i, m->zero + i, m->group, first % m->group, count, factor, out);
}

/* Where output q's G codes of bit slot s lie, and the index and offset of their first group's scale and zero. */
typedef struct {
    const uint8_t *codes;
    int64_t group, offset;
} MetaRun;

static inline MetaRun output_codes(const Meta *m, const Problem *p, int s, int64_t q, int64_t G) {
    if (m->slot_stride) /* by output */
        return (MetaRun){m->codes + s * m->slot_stride + q * m->output_stride,
                         s * m->group_slot_stride + q * m->group_output_stride, 0};
    const int64_t first = s * p->step + q * G; /* grid row */
    return (MetaRun){m->codes + first, first / m->group, first % m->group};
}

/* Output q's G scales or zeros of bit slot s, times `factor`: by output where they are so, else by grid row. */
static inline void output_rows(const Meta *m, const Problem *p, int s, int64_t q, int64_t G, float factor,
                               float *out) {
    if (m->half) {
        meta_rows(m, s * p->step + q * G, G, factor, out);
        return;
    }
    const MetaRun run = output_codes(m, p, s, q, G);
    dequantize_codes(run.codes, m->scale + run.group, m->zero + run.group, m->group, run.offset, G, factor, out);
}

/* What output q's zeros of bit slot s take from a token, as zeros_term (below) counts it, with the zeros dequantized
 * on the way and never stored: sum over its G groups of scale * zero * x_sums, each term the same floats as
 * output_rows then zeros_term make. For 8-bit zeros whose groups run 64 at a time in one meta group (Mixtral's);
 * returns 0 for others, which the caller dequantizes. A decode step's token then reads an output's zero codes once,
 * where it wrote G floats and read them back. */
static inline int output_zeros_term(const Meta *m, const Problem *p, int s, int64_t q, int64_t G, float factor,
                                    const float *scale, const float *x_sums, float *term) {
    if (m->half) return 0;
    const MetaRun run = output_codes(m, p, s, q, G);
    if ((run.offset | G | m->group) % 64) return 0;
    float sum = 0.f;
    for (int64_t j = 0, at = run.group; j < G; j += 64) {
        if (j == (at - run.group + 1) * m->group - run.offset) at++;
        const float meta_scale = half_to_float(m->scale[at]) * factor, meta_zero = half_to_float(m->zero[at]);
        for (int l = 0; l < 64; l++)
            sum += scale[j + l] * (((float)run.codes[j + l] - meta_zero) * meta_scale) * x_sums[j + l];
    }
    *term = sum;
    return 1;
}

/* Sixteen lanes, in GCC's and clang's vector extensions: the compiler lowers them to the machine's vector
 * units (two AVX2 registers, one AVX-512, four NEON), so the loops below vectorize whatever the optimizer
 * decides. A group is g / 16 of them: supports() in quant/cpu_gemv.py asks g % 16 == 0. */
typedef float floats16 __attribute__((vector_size(64)));
typedef uint32_t words16 __attribute__((vector_size(64)));

/* Sixteen packed elements from `at`, widened to 32 bits (a loop: GCC 12 widens a converted byte vector
 * one lane at a time, but this loop in one instruction). */
static inline words16 elements16(const void *at, const int bits) {
    words16 v;
    if (bits == 3) {
        memcpy(&v, at, sizeof v);
        return v;
    }
    const uint8_t *bytes = at;
    for (int j = 0; j < 16; j++) v[j] = bytes[j];
    return v;
}

static inline floats16 floats16_at(const float *at) {
    floats16 v;
    memcpy(&v, at, sizeof v);
    return v;
}

static inline float sum16(floats16 v) {
    float sum = 0.f;
    for (int j = 0; j < 16; j++) sum += v[j];
    return sum;
}

/* What slot s's zeros take from an output: sum over its groups of scale * zero * (the group's sum of x). */
static inline float zeros_term(const float *meta, int s, int64_t G, const float *x_sums) {
    const float *scale = meta + 2 * s * G, *zero = meta + (2 * s + 1) * G;
    float sum = 0.f;
    for (int64_t group = 0; group < G; group++) sum += scale[group] * zero[group] * x_sums[group];
    return sum;
}

/* Output q's scales and zeros, every slot's, into meta [PER][2][G]: slot s's codes are masked where they lie,
 * c * 2^shift (below), so its scales carry 2^-shift and its zeros 2^shift. With one token's x_sums, terms[s] is
 * what slot s's zeros take from it, zeros_term's figure, made as the zeros are read (output_zeros_term). By output, the next output's are two
 * blocks (the codes of its scales and zeros, then the float16 scales and zeros of those), asked for here to come
 * during q's products; past the last output the prefetches read nothing. In grid order (24 streams) prefetching
 * them measured no faster. */
static inline void output_meta(const Problem *p, int64_t q, int64_t G, const int bits, float *meta,
                               const float *x_sums, float *terms) {
    const int per = 8 / bits;
    for (int s = 0; s < per; s++) {
        const float up = (float)(1u << (per - 1 - s) * bits);
        output_rows(&p->scale, p, s, q, G, 1.f / up, meta + (2 * s) * G);
        if (x_sums && output_zeros_term(&p->zero, p, s, q, G, up, meta + 2 * s * G, x_sums, terms + s)) continue;
        output_rows(&p->zero, p, s, q, G, up, meta + (2 * s + 1) * G);
        if (x_sums) terms[s] = zeros_term(meta, s, G, x_sums);
    }
    const Meta *m = &p->scale;
    if (m->slot_stride) {
        const uint8_t *codes = m->codes + (q + 1) * m->output_stride;
        const char *halves = (const char *)(m->scale + (q + 1) * m->group_output_stride);
        for (int64_t at = 0; at < m->output_stride; at += 64) __builtin_prefetch(codes + at);
        for (int64_t at = 0; at < 2 * m->group_output_stride; at += 64) __builtin_prefetch(halves + at);
    }
}

/* The packed row of the output after q, where it is this call's (else q's own). An output's codes are one row of K
 * bytes, a page at K = 4096, and the hardware's prefetchers stop at a page's end, so each output began with a wait
 * on memory. So the loops prefetch the next row while they read this one: the int8 loop a cache line a chunk, the
 * float loop all of it before its first group (a prefetch in its inner loop, one in four groups at g16, made it
 * slower than none). Figures in benchmarks/results/cpu_gemv_prefetch_*.json. */
static inline const uint8_t *next_row(const uint8_t *row, int64_t q, int64_t last, int64_t k) {
    return q + 1 < last ? row + k : row;
}

/* Outputs s * rows_per_slot + [first, last) of every slot s, for tokens [m0, m0 + block), into y [M, N].
 * meta: 2 * PER * G floats. Inlined with constant bits, g and block, so the masks are known at compile time
 * and the partial sums (block x PER x g / 16 vectors) can live in registers: each code is unpacked once for
 * the block's tokens. A slot's codes are masked where they lie, c * 2^shift, with no shift down: its scales
 * carry 2^-shift and its zeros 2^shift, powers of two, so every product rounds to the same float as before
 * (one instruction less per 16 weights: a 4-bit 14336 x 4096 matrix on 2 threads, 1.39 -> 1.29 ms for a token
 * and 5.34 -> 4.13 for 4; 2-bit g16 the same, within noise: benchmarks/results/cpu_gemv_{shift,mask}_*.json). */
static inline void outputs(const Problem *p, int64_t first, int64_t last, float *meta, float *y, int64_t m0,
                           const int bits, const int g, const int block) {
    const int per = 8 / bits, chunks = g / 16;
    const int64_t G = p->k / g, rows_per_slot = p->step / G;
    const uint8_t *codes = p->codes;
    const float *x = p->x + m0 * p->k;
    for (int64_t q = first; q < last; q++) {
        floats16 partial[block][per][chunks]; /* by token and slot: sum over groups of scale * code * x */
        for (int m = 0; m < block; m++)
            for (int s = 0; s < per; s++)
                for (int c = 0; c < chunks; c++) partial[m][s][c] = (floats16){0};
        float terms[8]; /* one token: each slot's zeros term, made with the meta */
        output_meta(p, q, G, bits, meta, block == 1 ? p->x_sums + m0 * G : NULL, terms);
        const uint8_t *row = codes + q * p->k, *next = next_row(row, q, last, p->k);
        for (int64_t at = 0; at < p->k; at += 64) __builtin_prefetch(next + at);
        for (int64_t group = 0; group < G; group++) {
            for (int c = 0; c < chunks; c++) {
                const words16 element = elements16(row + group * g + 16 * c, bits);
                for (int s = 0; s < per; s++) {
                    const words16 code = element & (((1u << bits) - 1) << (uint32_t)((per - 1 - s) * bits));
                    const floats16 weight = meta[2 * s * G + group] * __builtin_convertvector(code, floats16);
                    for (int m = 0; m < block; m++)
                        partial[m][s][c] += weight * floats16_at(x + m * p->k + group * g + 16 * c);
                }
            }
        }
        for (int m = 0; m < block; m++) {
            const float *x_sums = p->x_sums + (m0 + m) * G;
            for (int s = 0; s < per; s++) {
                float sum = 0.f;
                for (int c = 0; c < chunks; c++) sum += sum16(partial[m][s][c]);
                y[(m0 + m) * p->n + s * rows_per_slot + q] = sum - (block == 1 ? terms[s] : zeros_term(meta, s, G, x_sums));
            }
        }
    }
}

#define ROW_TILE 64

/* Prefetch a tile's scales or zeros from grid row `row`: a slot's are a stream of their own, ten streams at 3-bit,
 * which the hardware's prefetchers did not keep ahead of. */
static inline void meta_ahead(const Meta *m, int64_t row) {
    if (m->half) {
        __builtin_prefetch(m->half + row);
        __builtin_prefetch(m->half + row + 32);
    } else
        __builtin_prefetch(m->codes + row);
}

/* Packed rows [first, last): what they hold, added into y [M, N], which the caller zeroed. A tile of ROW_TILE
 * packed rows at a time (16 KB at 3-bit g64, read from L1 once per slot): for each slot, the tile's scales and zeros
 * in one meta_rows call, then its rows in order, whose groups run through an output's G in order; the products
 * gather in a vector until the output changes, and only then are summed into y. (A sum into y a row and slot,
 * with a meta_rows call each, spent its time on the calls and on the store-to-load chain through y.) */
static inline void packed_rows(const Problem *p, int64_t first, int64_t last, float *y, const int bits,
                               const int g) {
    const int per = bits == 3 ? 10 : 8 / bits, chunks = g / 16, width = bits == 3 ? 4 : 1; /* element bytes */
    const int64_t G = p->k / g, groups = p->n * G;
    const char *codes = p->codes;
    float scales[ROW_TILE], zeros[ROW_TILE];
    for (int64_t t0 = first; t0 < last; t0 += ROW_TILE) {
        const int64_t t1 = t0 + ROW_TILE < last ? t0 + ROW_TILE : last;
        for (int s = 0; s < per; s++) {
            const int64_t r0 = s * p->step + t0; /* grid row of the tile's first packed row */
            const int64_t count = r0 + (t1 - t0) <= groups ? t1 - t0 : groups - r0; /* 3-bit pads the grid */
            if (count <= 0) break;
            const uint32_t shift = (per - 1 - s) * bits;
            if (r0 + ROW_TILE < groups) meta_ahead(&p->scale, r0 + ROW_TILE), meta_ahead(&p->zero, r0 + ROW_TILE);
            meta_rows(&p->scale, r0, count, 1.f, scales);
            meta_rows(&p->zero, r0, count, 1.f, zeros);
            for (int64_t m = 0; m < p->tokens; m++) {
                const float *x = p->x + m * p->k, *x_sums = p->x_sums + m * G;
                int64_t n = r0 / G, group = r0 % G;
                floats16 sum = {0};
                float zeros_sum = 0.f;
                for (int64_t i = 0; i < count; i++) {
                    floats16 dot = {0};
                    for (int c = 0; c < chunks; c++) {
                        const words16 element = elements16(codes + ((t0 + i) * g + 16 * c) * width, bits);
                        const words16 code = (element >> shift) & ((1u << bits) - 1);
                        dot += __builtin_convertvector(code, floats16) * floats16_at(x + group * g + 16 * c);
                    }
                    sum += scales[i] * dot;
                    zeros_sum += scales[i] * zeros[i] * x_sums[group];
                    if (++group == G || i + 1 == count) { /* output n's last group, or the tile's last row */
                        y[m * p->n + n] += sum16(sum) - zeros_sum;
                        sum = (floats16){0}, zeros_sum = 0.f;
                        if (group == G) group = 0, n++;
                    }
                }
            }
        }
    }
}

/* The entry points, one call a thread. The presets' (bits, g) get loops compiled for them, taking tokens in
 * blocks of up to `most`. At 2-bit g16 a block of 4 keeps its 16 partial sums in registers and unpacks each
 * code once for the four (a 14336 x 4096 matrix times 4 tokens: 5.2 -> 2.6 ms on 2 threads); at 4-bit g64
 * blocks measured no faster, but they do with int8 tokens (below), whose products are cheap. */
#define OUTPUTS_WITH(loop, bits, g, most)                                                                          \
    for (int64_t m0 = 0; m0 < p->tokens;) {                                                                        \
        const int64_t left = p->tokens - m0;                                                                      \
        if ((most) >= 4 && left >= 4)                                                                             \
            loop(p, first, last, meta, y, m0, bits, g, 4), m0 += 4;                                               \
        else if ((most) >= 2 && left >= 2)                                                                        \
            loop(p, first, last, meta, y, m0, bits, g, 2), m0 += 2;                                               \
        else                                                                                                        \
            loop(p, first, last, meta, y, m0, bits, g, 1), m0 += 1;                                               \
    }
#define OUTPUTS(bits, g, most) OUTPUTS_WITH(outputs, bits, g, most)

/* Int8 tokens, integer products (llama.cpp's way on the CPU): each 64 inputs of a token are rounded to int8
 * with a scale of their own, x ~ xq * d, and a slot's masked codes (bytes, c * 2^shift <= 255) multiply them
 * with VNNI's dot product, u8 x s8 -> four products summed into each int32 lane (64 an instruction on
 * AVX-512 VNNI, 32 on AVX-VNNI, which Intel's laptop chips since Alder Lake have without AVX-512):
 *
 *     sum_k W[n, k] x[k] ~ sum_r scale_r * (sum_j code_rj xq_j d_j - zero_r * sum_j xq_j d_j)
 *
 * A lane's four inputs lie in one group (g % 4 == 0) and one 64-input block, so its int32 sum is scaled in
 * float by scale_r * d, then summed; the groups' sums of x are those of xq * d as well, so the error is that
 * of the tokens' rounding alone, weighted by the weights: sum_k W[n, k] (x[k] - xq[k] d[k]). The loop is
 * quant/cpu_gemv_int8.h, included once for each width; Problem.vnni picks one (moe_offload_vnni says which
 * this CPU has). */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VNNI_LOOPS
#include <immintrin.h>

#define AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define AVX_VNNI __attribute__((target("avx2,fma,avxvnni")))

#define INT8_LOOP outputs_int8_512
#define INT8_TARGET AVX512_VNNI
#define LANES 16
#define IVEC __m512i
#define FVEC __m512
#define I_LOAD(at) _mm512_loadu_si512(at)
#define I_AND _mm512_and_si512
#define I_BYTES _mm512_set1_epi8
#define I_ZERO _mm512_setzero_si512
#define DPBUSD _mm512_dpbusd_epi32
#define F_CVT _mm512_cvtepi32_ps
#define F_FMA _mm512_fmadd_ps
#define F_MUL _mm512_mul_ps
#define F_SET1 _mm512_set1_ps
#define F_ZERO _mm512_setzero_ps
#define F_SUM _mm512_reduce_add_ps
#define F_SCALES(at, lane_group) \
    _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps((__mmask16)((1u << (64 / g)) - 1), at))
#include "cpu_gemv_int8.h"
#undef INT8_LOOP
#undef INT8_TARGET
#undef LANES
#undef IVEC
#undef FVEC
#undef I_LOAD
#undef I_AND
#undef I_BYTES
#undef I_ZERO
#undef DPBUSD
#undef F_CVT
#undef F_FMA
#undef F_MUL
#undef F_SET1
#undef F_ZERO
#undef F_SUM
#undef F_SCALES

AVX_VNNI static inline float sum8(__m256 v) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
}

#define INT8_LOOP outputs_int8_256
#define INT8_TARGET AVX_VNNI
#define LANES 8
#define IVEC __m256i
#define FVEC __m256
#define I_LOAD(at) _mm256_loadu_si256((const __m256i *)(at))
#define I_AND _mm256_and_si256
#define I_BYTES _mm256_set1_epi8
#define I_ZERO _mm256_setzero_si256
#define DPBUSD _mm256_dpbusd_avx_epi32
#define F_CVT _mm256_cvtepi32_ps
#define F_FMA _mm256_fmadd_ps
#define F_MUL _mm256_mul_ps
#define F_SET1 _mm256_set1_ps
#define F_ZERO _mm256_setzero_ps
#define F_SUM sum8
/* g < 32 is g == 16 here: two scales, 8 bytes */
#define F_SCALES(at, lane_group) \
    _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd((const double *)(at)))), lane_group)
#include "cpu_gemv_int8.h"

#define INT8_ENTRY(width, target)                                                                                 \
    target static void gemv_outputs_int8_##width(const Problem *p, int64_t first, int64_t last, float *meta,     \
                                                 float *y) {                                                      \
        if (p->bits == 2 && p->group_size == 16) {                                                                \
            OUTPUTS_WITH(outputs_int8_##width, 2, 16, 4)                                                          \
        } else if (p->bits == 4 && p->group_size == 64) {                                                         \
            OUTPUTS_WITH(outputs_int8_##width, 4, 64, 4)                                                          \
        } else {                                                                                                  \
            OUTPUTS_WITH(outputs_int8_##width, p->bits, p->group_size, 1)                                         \
        }                                                                                                         \
    }
INT8_ENTRY(512, AVX512_VNNI)
INT8_ENTRY(256, AVX_VNNI)

/* The VNNI widths this CPU has, which Problem.vnni may ask for: 512 (AVX-512 VNNI: Intel since Cascade Lake, AMD
 * since Zen 4) and 256 (AVX-VNNI: Intel since Alder Lake, AMD since Zen 5), as bits: 1 for 256, 2 for 512. */
int moe_offload_vnni(void) {
    __builtin_cpu_init();
    const int wide = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vnni");
    const int narrow =
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("avxvnni");
    return (wide ? 2 : 0) | (narrow ? 1 : 0);
}
#else
int moe_offload_vnni(void) { return 0; }
#endif

void moe_offload_gemv_outputs(const Problem *p, int64_t first, int64_t last, float *meta, float *y) {
#ifdef VNNI_LOOPS
    if (p->vnni == 512) {
        gemv_outputs_int8_512(p, first, last, meta, y);
        return;
    }
    if (p->vnni == 256) {
        gemv_outputs_int8_256(p, first, last, meta, y);
        return;
    }
#endif
    if (p->bits == 2 && p->group_size == 16) {
        OUTPUTS(2, 16, 4)
    } else if (p->bits == 4 && p->group_size == 64) {
        OUTPUTS(4, 64, 1)
    } else {
        OUTPUTS(p->bits, p->group_size, 1)
    }
}

void moe_offload_gemv_packed_rows(const Problem *p, int64_t first, int64_t last, float *y) {
    memset(y, 0, sizeof(float) * p->tokens * p->n);
    if (p->bits == 3 && p->group_size == 64)
        packed_rows(p, first, last, y, 3, 64);
    else
        packed_rows(p, first, last, y, p->bits, p->group_size);
}

/* Both loops over `threads` even shares of [0, total), one an OpenMP thread, each with its own scratch
 * (`stride` floats apart). Built with -fopenmp, the team is the process's libgomp's, which is torch's: the
 * threads that run torch's own parallel operators, not a second set that competes with them for the cores. */
void moe_offload_gemv_outputs_parallel(const Problem *p, int64_t threads, int64_t total, float *meta,
                                       int64_t stride, float *y) {
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t i = 0; i < threads; i++)
        moe_offload_gemv_outputs(p, total * i / threads, total * (i + 1) / threads, meta + i * stride, y);
}

void moe_offload_gemv_packed_rows_parallel(const Problem *p, int64_t threads, int64_t total, float *partial,
                                           int64_t stride) {
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t i = 0; i < threads; i++)
        moe_offload_gemv_packed_rows(p, total * i / threads, total * (i + 1) / threads, partial + i * stride);
}

/* y [M, N] = x [M, K] @ W.T for a W [N, K] of float16 or bfloat16 (on the CPU the embedding table and lm_head stay
 * at the checkpoint's width: offload/decoder.py), rows [first, last): each weight widened exactly to float32, the
 * products and sums in float32, as F.linear(x, W.float()) makes them but for the order of the sums; K % 64 == 0.
 * Several tokens share a row widened once into L1. */
static inline floats16 widened16(const uint16_t *at, const int bf16) {
    floats16 v;
    for (int j = 0; j < 16; j++) {
        if (bf16) {
            const uint32_t bits = (uint32_t)at[j] << 16;
            memcpy(&v[j], &bits, sizeof bits);
        } else
            v[j] = half_to_float(at[j]);
    }
    return v;
}

/* The dot product of K floats at a and b, K % 64 == 0: four vector sums hide the adds' latency. */
static inline float dot64(const float *a, const float *b, int64_t k) {
    floats16 sum[4] = {{0}, {0}, {0}, {0}};
    for (int64_t j = 0; j < k; j += 64)
        for (int u = 0; u < 4; u++) sum[u] += floats16_at(a + j + 16 * u) * floats16_at(b + j + 16 * u);
    return sum16(sum[0] + sum[1] + sum[2] + sum[3]);
}

static inline void wide_rows(const float *x, int64_t tokens, int64_t k, const uint16_t *w, int64_t first,
                             int64_t last, float *y, int64_t n, const int bf16) {
    float widened[tokens > 1 ? k : 1]; /* one row, widened once for all the tokens (16 KB at K = 4096) */
    for (int64_t row = first; row < last; row++) {
        const uint16_t *weights = w + row * k;
        if (tokens == 1) { /* widened on the way into the products: no trip through memory */
            floats16 sum[4] = {{0}, {0}, {0}, {0}};
            for (int64_t j = 0; j < k; j += 64)
                for (int u = 0; u < 4; u++)
                    sum[u] += widened16(weights + j + 16 * u, bf16) * floats16_at(x + j + 16 * u);
            y[row] = sum16(sum[0] + sum[1] + sum[2] + sum[3]);
            continue;
        }
        /* the products below read no memory: the next row's lines, asked for here, arrive while they run */
        const uint16_t *next = row + 1 < last ? weights + k : weights;
        for (int64_t j = 0; j < k; j += 32) {
            __builtin_prefetch(next + j);
            for (int u = 0; u < 2; u++) {
                const floats16 v = widened16(weights + j + 16 * u, bf16);
                memcpy(widened + j + 16 * u, &v, sizeof v);
            }
        }
        for (int64_t m = 0; m < tokens; m++) y[m * n + row] = dot64(widened, x + m * k, k);
    }
}

void moe_offload_gemv_wide(const float *x, int64_t tokens, int64_t k, const uint16_t *w, int32_t bf16,
                           int64_t first, int64_t last, float *y, int64_t n) {
    if (bf16)
        wide_rows(x, tokens, k, w, first, last, y, n, 1);
    else
        wide_rows(x, tokens, k, w, first, last, y, n, 0);
}

void moe_offload_gemv_wide_parallel(const float *x, int64_t tokens, int64_t k, const uint16_t *w, int32_t bf16,
                                    int64_t threads, float *y, int64_t n) {
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t i = 0; i < threads; i++)
        moe_offload_gemv_wide(x, tokens, k, w, bf16, n * i / threads, n * (i + 1) / threads, y, n);
}

/* 1 when built with -fopenmp: the _parallel calls then run on OpenMP threads, else on the caller's alone. */
int moe_offload_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* x [M, K] -> xq [M, K] and d [M, K / 64]: each 64 inputs of a token rounded to int8 by a scale of their own,
 * max |x| / 127; x_sums [M, K / g], each group's sum of xq * d. A block that is not finite gets a NaN scale and
 * NaN sums, so that its outputs are NaN, as the float products would be. The loops vectorize: the largest |x| is
 * the largest of the floats' bits less the sign (an integer max, where fmaxf was a call a value and would pass
 * a nan over: bits past infinity's are a nan), and a group's sum is its integers' sum, times the scale once. */
void moe_offload_quantize_tokens(const float *x, int64_t tokens, int64_t k, int64_t g, int8_t *xq, float *d,
                                 float *x_sums) {
    const int64_t G = k / g, per_block = g < 64 ? 64 / g : 1; /* the groups a block touches */
    memset(x_sums, 0, sizeof(float) * tokens * G);
    for (int64_t m = 0; m < tokens; m++) {
        for (int64_t b = 0; b < k / 64; b++) {
            const float *in = x + m * k + 64 * b;
            int8_t *out = xq + m * k + 64 * b;
            float *sums = x_sums + m * G + 64 * b / g;
            uint32_t most_bits = 0;
            for (int j = 0; j < 64; j++) {
                uint32_t bits;
                memcpy(&bits, in + j, sizeof bits);
                bits &= 0x7fffffffu;
                most_bits = bits > most_bits ? bits : most_bits;
            }
            if (most_bits >= 0x7f800000u) { /* an infinity or a nan */
                memset(out, 0, 64);
                d[m * (k / 64) + b] = __builtin_nanf("");
                for (int64_t i = 0; i < per_block; i++) sums[i] = __builtin_nanf("");
                continue;
            }
            float most;
            memcpy(&most, &most_bits, sizeof most);
            const float scale = most / 127.f, inverse = most > 0.f ? 127.f / most : 0.f;
            for (int j = 0; j < 64; j++) out[j] = (int8_t)(int32_t)__builtin_rintf(in[j] * inverse);
            d[m * (k / 64) + b] = scale;
            const int span = g < 64 ? (int)g : 64; /* the inputs of one group in this block */
            for (int64_t i = 0; i < per_block; i++) {
                int32_t sum = 0;
                for (int j = 0; j < span; j++) sum += out[i * span + j];
                sums[i] += (float)sum * scale;
            }
        }
    }
}
