/* The int8 tokens' loop (see quant/cpu_gemv.c, which includes this file once for each vector width it has):
 * outputs as outputs() takes them, the products in integers. The includer defines:
 *   INT8_LOOP, INT8_TARGET    the function's name and its target attribute
 *   LANES                     int32 lanes a vector: 16 (AVX-512) or 8 (AVX-VNNI); a chunk is 4 * LANES inputs
 *   IVEC, FVEC                the integer and float vector types
 *   I_LOAD(at), I_AND(a, b), I_BYTES(c), I_ZERO(), DPBUSD(acc, u8, s8)
 *   F_CVT(i), F_FMA(a, b, c), F_MUL(a, b), F_SET1(x), F_ZERO(), F_SUM(v)
 *   F_SCALES(at, lane_group)  lane j = at[lane_group[j]], reading at most CHUNK / g floats from `at`
 * g is 16, 32 or a multiple of 64, so a chunk holds whole groups or lies in one. */
#define CHUNK (4 * LANES)

INT8_TARGET static inline void INT8_LOOP(const Problem *p, int64_t first, int64_t last, float *meta, float *y,
                                         int64_t m0, const int bits, const int g, const int block) {
    const int per = 8 / bits;
    const int64_t G = p->k / g, rows_per_slot = p->step / G, blocks = p->k / 64;
    const uint8_t *codes = p->codes;
    const int8_t *xq = p->xq + m0 * p->k;
    const float *d = p->x_scales + m0 * blocks;
    /* lane j holds inputs 4j..4j+3 of a chunk: where g < CHUNK, group 4j / g of the chunk's first */
    int32_t lanes[LANES];
    for (int j = 0; j < LANES; j++) lanes[j] = g < CHUNK ? 4 * j / g : 0;
    IVEC lane_group;
    memcpy(&lane_group, lanes, sizeof lane_group);
    for (int64_t q = first; q < last; q++) {
        FVEC partial[block][per]; /* by token and slot: sum over chunks of scale * d * (codes . xq) */
        float terms[8]; /* one token: each slot's zeros term, made with the meta */
        output_meta(p, q, G, bits, meta, block == 1 ? p->x_sums + m0 * G : NULL, terms);
        for (int m = 0; m < block; m++)
            for (int s = 0; s < per; s++) partial[m][s] = F_ZERO();
        const uint8_t *row = codes + q * p->k, *next = next_row(row, q, last, p->k); /* G packed rows, g bytes each */
        for (int64_t c = 0; c < p->k / CHUNK; c++) {
            __builtin_prefetch(next + CHUNK * c);
            const IVEC element = I_LOAD(row + CHUNK * c);
            const int64_t b = c * CHUNK / 64; /* the tokens' 64-input block */
            for (int s = 0; s < per; s++) {
                const IVEC code = I_AND(element, I_BYTES((char)(((1u << bits) - 1) << ((per - 1 - s) * bits))));
                const float *scale = meta + 2 * s * G;
                const FVEC weight = g < CHUNK ? F_SCALES(scale + c * (CHUNK / g), lane_group)
                                              : F_SET1(scale[c * CHUNK / g]);
                for (int m = 0; m < block; m++) {
                    const IVEC dot = DPBUSD(I_ZERO(), code, I_LOAD(xq + m * p->k + CHUNK * c));
                    partial[m][s] = F_FMA(F_CVT(dot), F_MUL(weight, F_SET1(d[m * blocks + b])), partial[m][s]);
                }
            }
        }
        for (int m = 0; m < block; m++) {
            const float *x_sums = p->x_sums + (m0 + m) * G;
            for (int s = 0; s < per; s++) {
                const float sum = F_SUM(partial[m][s]);
                y[(m0 + m) * p->n + s * rows_per_slot + q] = sum - (block == 1 ? terms[s] : zeros_term(meta, s, G, x_sums));
            }
        }
    }
}

#undef CHUNK
