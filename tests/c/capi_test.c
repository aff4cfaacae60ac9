/*
 * End-to-end test of include/dspark.h against libdspark: the standalone cache with the
 * default model's shape (30 layers, 3 KV heads, 9 query heads, head dim 64), attention
 * compared with a naive C implementation, sequence operations, save/load round trips, every
 * documented error path, and registration into ggml.
 *
 * Usage: capi_test TMPDIR        run every check, print one line per failure, exit 1 if any
 *        capi_test --layout      print sizeof/offsetof of the public structs (for tests/capi.rs)
 */
#include "dspark.h"

#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------ */
/* Checks                                                                               */

static int g_checks, g_failures;

#define CHECK(cond, ...)                                                                 \
    do {                                                                                 \
        g_checks++;                                                                      \
        if (!(cond)) {                                                                   \
            g_failures++;                                                                \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);              \
            fprintf(stderr, __VA_ARGS__);                                                \
            fprintf(stderr, "\n");                                                       \
        }                                                                                \
    } while (0)

/* A call must return `want`; on failure, dspark_last_error() must say something, and on
 * success it must be empty. */
#define EXPECT(want, call)                                                               \
    do {                                                                                 \
        int got_ = (int)(call);                                                          \
        const char *msg_ = dspark_last_error();                                          \
        CHECK(got_ == (int)(want), "%s returned %s, want %s (%s)", #call,                \
              dspark_status_name(got_), dspark_status_name(want), msg_);                 \
        if (got_ == (int)(want))                                                         \
            CHECK((want) == DSPARK_OK ? msg_[0] == 0 : msg_[0] != 0,                     \
                  "last_error %s after %s", msg_[0] ? "set" : "empty", #call);           \
    } while (0)

#define OK(call) EXPECT(DSPARK_OK, call)

/* ------------------------------------------------------------------------------------ */
/* Data                                                                                 */

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;

static double uniform(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (double)(g_rng >> 11) / 9007199254740992.0;
}

static float gauss(void) {
    double u = uniform(), v = uniform();
    if (u < 1e-12) u = 1e-12;
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

static float *random_rows(size_t n) {
    float *x = malloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = gauss();
    return x;
}

/* IEEE half conversions (round to nearest even), for the f16 format's exact reference. */
static uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, e = (x >> 23) & 0xffu, m = x & 0x7fffffu;
    if (e == 0xff) return (uint16_t)(sign | 0x7c00u | (m ? 0x200u : 0));
    int32_t exp = (int32_t)e - 127 + 15;
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        m |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp), h = m >> shift, rem = m & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)exp << 10) | (m >> 13), rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, x;
    if (e == 0) {
        if (m == 0) {
            x = sign;
        } else {
            e = 127 - 15 + 1;
            while (!(m & 0x400u)) { m <<= 1; e--; }
            x = sign | (e << 23) | ((m & 0x3ffu) << 13);
        }
    } else if (e == 31) {
        x = sign | 0x7f800000u | (m << 13);
    } else {
        x = sign | ((e - 15 + 127) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}

static float round_f16(float x) { return f16_to_f32(f32_to_f16(x)); }

/* ------------------------------------------------------------------------------------ */
/* The naive reference: softmax attention in double, ggml FLASH_ATTN_EXT semantics.     */

enum { N_LAYER = 30, N_HEAD_KV = 3, N_HEAD = 9, HEAD_DIM = 64, ROW = N_HEAD_KV * HEAD_DIM };

typedef struct ref_args {
    float scale, max_bias, softcap;
    int causal;
    const float *mask; /* [n_q][stride] or NULL (already f16-rounded by the caller) */
    int stride;
    const float *sinks;      /* [N_HEAD] or NULL */
    const unsigned char *gone; /* [len] removed positions or NULL */
} ref_args;

static float alibi_slope(float max_bias, int h, int n_head) {
    if (max_bias <= 0.0f) return 1.0f;
    int n2 = 1;
    while (n2 * 2 <= n_head) n2 *= 2;
    float m0 = powf(2.0f, -max_bias / (float)n2), m1 = powf(2.0f, -(max_bias / 2.0f) / (float)n2);
    return h < n2 ? powf(m0, (float)(h + 1)) : powf(m1, (float)(2 * (h - n2) + 1));
}

/* k, v: [len][ROW] as stored (the caller rounds to f16 where the cache does). */
static void ref_attn(const float *q, int n_q, const float *k, const float *v, int len,
                     const ref_args *a, float *out) {
    double *score = malloc((size_t)(len + 1) * sizeof *score);
    for (int i = 0; i < n_q; i++) {
        int pos = len - n_q + i;
        for (int h = 0; h < N_HEAD; h++) {
            int kh = h / (N_HEAD / N_HEAD_KV);
            float slope = alibi_slope(a->max_bias, h, N_HEAD);
            const float *qi = q + ((size_t)i * N_HEAD + h) * HEAD_DIM;
            double mx = -INFINITY;
            for (int c = 0; c < len; c++) {
                score[c] = -INFINITY;
                if ((a->causal && c > pos) || (a->gone && a->gone[c])) continue;
                double mv = a->mask ? (double)slope * a->mask[(size_t)i * a->stride + c] : 0.0;
                if (mv == -INFINITY) continue;
                const float *kc = k + (size_t)c * ROW + kh * HEAD_DIM;
                double dot = 0;
                for (int j = 0; j < HEAD_DIM; j++) dot += (double)qi[j] * kc[j];
                double s = dot * a->scale;
                if (a->softcap != 0.0f) s = a->softcap * tanh(s / a->softcap);
                score[c] = s + mv;
                if (score[c] > mx) mx = score[c];
            }
            double sink = a->sinks ? a->sinks[h] : -INFINITY;
            if (sink > mx) mx = sink;
            double sum = a->sinks ? exp(sink - mx) : 0.0, acc[HEAD_DIM] = {0};
            int any = 0;
            for (int c = 0; c < len; c++) {
                if (score[c] == -INFINITY) continue;
                double w = exp(score[c] - mx);
                sum += w;
                any = 1;
                const float *vc = v + (size_t)c * ROW + kh * HEAD_DIM;
                for (int j = 0; j < HEAD_DIM; j++) acc[j] += w * vc[j];
            }
            float *o = out + ((size_t)i * N_HEAD + h) * HEAD_DIM;
            for (int j = 0; j < HEAD_DIM; j++) o[j] = (any && sum > 0) ? (float)(acc[j] / sum) : 0.0f;
        }
    }
    free(score);
}

/* Relative L2 error of `got` against `want`, and max absolute error. */
static double rel_err(const float *got, const float *want, size_t n, double *max_abs) {
    double num = 0, den = 0, mx = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)got[i] - want[i];
        num += d * d;
        den += (double)want[i] * want[i];
        if (fabs(d) > mx || d != d) mx = d != d ? INFINITY : fabs(d);
    }
    if (max_abs) *max_abs = mx;
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static float *rounded_copy(const float *x, size_t n) {
    float *y = malloc(n * sizeof *y);
    for (size_t i = 0; i < n; i++) y[i] = round_f16(x[i]);
    return y;
}

/* ------------------------------------------------------------------------------------ */
/* Helpers around the API                                                               */

static dspark_cache_t *make_cache(const char *format, uint32_t window, uint32_t max_tokens,
                                  uint32_t n_seq, uint32_t n_layer) {
    dspark_cache_params p;
    OK(dspark_cache_params_init(&p));
    p.n_layer = n_layer;
    p.n_head_kv = N_HEAD_KV;
    p.n_head = N_HEAD;
    p.head_dim = HEAD_DIM;
    p.max_tokens = max_tokens;
    p.n_seq_max = n_seq;
    p.format = format;
    p.window = window;
    p.n_threads = 2;
    dspark_cache_t *c = NULL;
    OK(dspark_cache_new(&p, &c));
    CHECK(c != NULL, "cache_new gave NULL");
    return c;
}

/* Per-layer K/V of a test sequence: layer l uses rows offset by l so layers differ. */
static const float *layer_rows(const float *base, int l) { return base + (size_t)l * ROW; }

/* Attention of layer l / seq vs the reference; returns the relative error. */
static double attn_vs_ref(dspark_cache_t *c, int l, uint32_t seq, const float *q, int n_q,
                          const dspark_attn_params *p, const float *k, const float *v, int len,
                          const ref_args *ra, int f16) {
    size_t n = (size_t)n_q * N_HEAD * HEAD_DIM;
    float *got = malloc(n * sizeof *got), *want = malloc(n * sizeof *want);
    OK(dspark_cache_attn(c, (uint32_t)l, seq, q, (uint32_t)n_q, p, got));
    const float *kk = k, *vv = v;
    float *kr = NULL, *vr = NULL;
    if (f16) {
        kr = rounded_copy(k, (size_t)len * ROW);
        vr = rounded_copy(v, (size_t)len * ROW);
        kk = kr;
        vv = vr;
    }
    ref_attn(q, n_q, kk, vv, len, ra, want);
    double e = rel_err(got, want, n, NULL);
    free(got);
    free(want);
    free(kr);
    free(vr);
    return e;
}

static ref_args default_ref(void) {
    ref_args r;
    memset(&r, 0, sizeof r);
    r.scale = 1.0f / sqrtf((float)HEAD_DIM);
    r.causal = 1;
    return r;
}

/* ------------------------------------------------------------------------------------ */
/* Tests                                                                                */

static void test_version(void) {
    CHECK(dspark_version() == DSPARK_VERSION, "library %u, header %u", dspark_version(),
          (unsigned)DSPARK_VERSION);
    char want[32];
    snprintf(want, sizeof want, "%d.%d.%d", DSPARK_VERSION_MAJOR, DSPARK_VERSION_MINOR,
             DSPARK_VERSION_PATCH);
    CHECK(strcmp(dspark_version_string(), want) == 0, "version string %s", dspark_version_string());
    CHECK(strcmp(dspark_status_name(DSPARK_ERR_RANGE), "DSPARK_ERR_RANGE") == 0, "status name");
    CHECK(strcmp(dspark_status_name(12345), "DSPARK_ERR_UNKNOWN") == 0, "unknown status name");
}

static void test_create_errors(void) {
    dspark_cache_params p;
    dspark_cache_t *c = (dspark_cache_t *)0x1; /* must stay untouched on failure */
    EXPECT(DSPARK_ERR_NULL, dspark_cache_params_init(NULL));
    EXPECT(DSPARK_ERR_NULL, dspark_cache_new(NULL, &c));
    OK(dspark_cache_params_init(&p));
    CHECK(p.size == sizeof p, "params_init size %zu, sizeof %zu", p.size, sizeof p);
    p.n_layer = N_LAYER; p.n_head_kv = N_HEAD_KV; p.n_head = N_HEAD; p.head_dim = HEAD_DIM;
    p.max_tokens = 64;
    EXPECT(DSPARK_ERR_NULL, dspark_cache_new(&p, NULL));

    dspark_cache_params q = p;
    q.size = 0;
    EXPECT(DSPARK_ERR_SIZE, dspark_cache_new(&q, &c));
    q.size = sizeof q - 4; /* cuts profile */
    EXPECT(DSPARK_ERR_SIZE, dspark_cache_new(&q, &c));
    q.size = offsetof(dspark_cache_params, profile) - 4; /* cuts kv_budget_bytes */
    EXPECT(DSPARK_ERR_SIZE, dspark_cache_new(&q, &c));
    /* API version 3's struct ended with kv_budget_bytes: no profile. */
    q.size = offsetof(dspark_cache_params, profile);
    q.profile = "/nonexistent/profile.json"; /* beyond its size: must not be read */
    dspark_cache_t *v3 = NULL;
    OK(dspark_cache_new(&q, &v3));
    OK(dspark_cache_delete(v3));
    q = p;
    q.size = offsetof(dspark_cache_params, kv_budget_bytes) - 4; /* cuts an older field */
    EXPECT(DSPARK_ERR_SIZE, dspark_cache_new(&q, &c));
    /* A newer caller's larger struct: accepted when the unknown tail is zero. */
    struct { dspark_cache_params p; uint64_t future[2]; } big;
    memset(&big, 0, sizeof big);
    big.p = p;
    big.p.size = sizeof big;
    dspark_cache_t *ok = NULL;
    OK(dspark_cache_new(&big.p, &ok));
    OK(dspark_cache_delete(ok));
    big.future[1] = 7;
    EXPECT(DSPARK_ERR_SIZE, dspark_cache_new(&big.p, &c));

    q = p; q.n_layer = 0;
    EXPECT(DSPARK_ERR_ARG, dspark_cache_new(&q, &c));
    q = p; q.max_tokens = 0;
    EXPECT(DSPARK_ERR_ARG, dspark_cache_new(&q, &c));
    q = p; q.n_seq_max = 0;
    EXPECT(DSPARK_ERR_ARG, dspark_cache_new(&q, &c));
    q = p; q.n_head = 10;
    EXPECT(DSPARK_ERR_ARG, dspark_cache_new(&q, &c));
    q = p; q.head_dim = 48;
    EXPECT(DSPARK_ERR_ARG, dspark_cache_new(&q, &c));
    q = p; q.head_dim = 8192;
    EXPECT(DSPARK_ERR_ARG, dspark_cache_new(&q, &c));
    q = p; q.n_layer = 10000; q.n_seq_max = 1000; q.max_tokens = 0x7fffffff;
    EXPECT(DSPARK_ERR_ARG, dspark_cache_new(&q, &c)); /* 10^7 lanes: over 1 GB when empty */
    q = p; q.n_layer = 1000; q.head_dim = 4096;
    EXPECT(DSPARK_ERR_ARG, dspark_cache_new(&q, &c)); /* 1000 x 1 MB of zero pages */
    q = p; q.max_tokens = 0x80000000u;
    EXPECT(DSPARK_ERR_ARG, dspark_cache_new(&q, &c)); /* positions are int32_t */
    /* Names are exact and lowercase: no spaces, signs, leading zeros or capitals. */
    const char *bad[] = {"k9v4", "k1v4", "", "f32", "k4", "q4_0", "k4v4x", " k4v4", "k4v4 ", "k04v4",
                         "k+4v4", "k4v+4", "k4v04", "K4V4", "K3V3", "k4V4", "F16", " f16",
                         "f16 ", "f016"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        q = p; q.format = bad[i];
        EXPECT(DSPARK_ERR_FORMAT, dspark_cache_new(&q, &c));
    }
    q = p; q.profile = "/nonexistent/profile.json";
    EXPECT(DSPARK_ERR_FORMAT, dspark_cache_new(&q, &c));
    CHECK(strstr(dspark_last_error(), "cannot read profile") != NULL, "profile error: %s", dspark_last_error());
    CHECK(c == (dspark_cache_t *)0x1, "out written on failure");
    const char *good[] = {"f16", "k8v8", "k4v4", "k4v2", "k3v3", "k2v8", "k5v6", "k7v4"};
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        q = p; q.format = good[i];
        dspark_cache_t *g = NULL;
        OK(dspark_cache_new(&q, &g));
        OK(dspark_cache_delete(g));
    }
}

/* f16: attention must match the naive reference on f16-rounded K/V to float precision. */
static void test_attention_f16(void) {
    const int T = 200, NQ = 5;
    dspark_cache_t *c = make_cache("f16", 128, 512, 2, N_LAYER);
    float *k = random_rows((size_t)(T + N_LAYER) * ROW), *v = random_rows((size_t)(T + N_LAYER) * ROW);
    for (int l = 0; l < N_LAYER; l++) {
        int done = 0, chunk = 1;
        while (done < T) {
            int m = T - done < chunk ? T - done : chunk;
            OK(dspark_cache_append(c, (uint32_t)l, 0, layer_rows(k, l) + (size_t)done * ROW,
                                   layer_rows(v, l) + (size_t)done * ROW, (uint32_t)m));
            done += m;
            chunk = chunk * 2 + 3;
        }
        uint32_t len = 0;
        OK(dspark_cache_seq_len(c, (uint32_t)l, 0, &len));
        CHECK(len == (uint32_t)T, "layer %d len %u", l, len);
    }
    float *q = random_rows((size_t)NQ * N_HEAD * HEAD_DIM);
    ref_args ra = default_ref();
    double worst = 0;
    for (int l = 0; l < N_LAYER; l++) {
        double e = attn_vs_ref(c, l, 0, q, NQ, NULL, layer_rows(k, l), layer_rows(v, l), T, &ra, 1);
        if (e > worst) worst = e;
    }
    CHECK(worst < 1e-5, "f16 causal attention rel err %g", worst);
    printf("f16: causal attention, 30 layers, rel. error %.2e\n", worst);

    /* Every parameter: non-causal, f32 mask with -inf, sinks, softcap, ALiBi, scale. */
    float *mask = malloc((size_t)NQ * (T + 7) * sizeof *mask);
    uint16_t *mask16 = malloc((size_t)NQ * (T + 7) * sizeof *mask16);
    for (int i = 0; i < NQ * (T + 7); i++) {
        float m = uniform() < 0.2 ? -INFINITY : (float)(uniform() * 4 - 2);
        mask[i] = round_f16(m);
        mask16[i] = f32_to_f16(m);
    }
    float sinks[N_HEAD];
    for (int h = 0; h < N_HEAD; h++) sinks[h] = gauss() * 2;
    dspark_attn_params ap;
    OK(dspark_attn_params_init(&ap));
    CHECK(ap.size == sizeof ap && ap.flags == DSPARK_ATTN_CAUSAL, "attn_params_init");
    ap.flags = 0;
    ap.scale = 0.09f;
    ap.mask = mask;
    ap.mask_type = DSPARK_MASK_F32;
    ap.mask_stride = (uint32_t)(T + 7);
    ap.sinks = sinks;
    ap.softcap = 3.0f;
    ap.max_bias = 8.0f;
    ap.n_threads = 1;
    ref_args rb = ra;
    rb.causal = 0; rb.scale = 0.09f; rb.mask = mask; rb.stride = T + 7; rb.sinks = sinks;
    rb.softcap = 3.0f; rb.max_bias = 8.0f;
    double e = attn_vs_ref(c, 7, 0, q, NQ, &ap, layer_rows(k, 7), layer_rows(v, 7), T, &rb, 1);
    CHECK(e < 1e-5, "all-parameter attention rel err %g", e);
    ap.mask = mask16;
    ap.mask_type = DSPARK_MASK_F16;
    ap.n_threads = 2;
    e = attn_vs_ref(c, 7, 0, q, NQ, &ap, layer_rows(k, 7), layer_rows(v, 7), T, &rb, 1);
    CHECK(e < 1e-5, "f16-mask attention rel err %g", e);
    /* Causal + mask: both apply. */
    ap.flags = DSPARK_ATTN_CAUSAL;
    rb.causal = 1;
    e = attn_vs_ref(c, 29, 0, q, NQ, &ap, layer_rows(k, 29), layer_rows(v, 29), T, &rb, 1);
    CHECK(e < 1e-5, "causal+mask attention rel err %g", e);

    /* Many queries (a prefill batch) and one query (decode). */
    float *q64 = random_rows((size_t)64 * N_HEAD * HEAD_DIM);
    e = attn_vs_ref(c, 3, 0, q64, 64, NULL, layer_rows(k, 3), layer_rows(v, 3), T, &ra, 1);
    CHECK(e < 1e-5, "64-query causal rel err %g", e);
    e = attn_vs_ref(c, 3, 0, q64, 1, NULL, layer_rows(k, 3), layer_rows(v, 3), T, &ra, 1);
    CHECK(e < 1e-5, "1-query rel err %g", e);

    /* Errors of attn. */
    size_t nout = (size_t)64 * N_HEAD * HEAD_DIM;
    float *out = malloc(nout * sizeof *out);
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_attn(c, N_LAYER, 0, q, 1, NULL, out));
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_attn(c, 0, 2, q, 1, NULL, out));
    EXPECT(DSPARK_ERR_NULL, dspark_cache_attn(c, 0, 0, NULL, 1, NULL, out));
    EXPECT(DSPARK_ERR_NULL, dspark_cache_attn(c, 0, 0, q, 1, NULL, NULL));
    OK(dspark_cache_attn(c, 0, 0, NULL, 0, NULL, NULL)); /* zero queries: nothing to do */
    EXPECT(DSPARK_ERR_NULL, dspark_cache_attn(NULL, 0, 0, q, 1, NULL, out));
    dspark_attn_params bad = ap;
    bad.size = 8;
    EXPECT(DSPARK_ERR_SIZE, dspark_cache_attn(c, 0, 0, q, 1, &bad, out));
    bad = ap; bad.mask_stride = (uint32_t)T - 1;
    EXPECT(DSPARK_ERR_ARG, dspark_cache_attn(c, 0, 0, q, 1, &bad, out));
    bad = ap; bad.mask_type = (dspark_mask_type)7;
    EXPECT(DSPARK_ERR_ARG, dspark_cache_attn(c, 0, 0, q, 1, &bad, out));
    bad = ap; bad.flags = 0x80;
    EXPECT(DSPARK_ERR_ARG, dspark_cache_attn(c, 0, 0, q, 1, &bad, out));
    bad = ap; bad.scale = NAN;
    EXPECT(DSPARK_ERR_ARG, dspark_cache_attn(c, 0, 0, q, 1, &bad, out));
    /* Causal with more queries than tokens. */
    EXPECT(DSPARK_ERR_ARG, dspark_cache_attn(c, 0, 1, q, 1, NULL, out));
    /* out overlapping q. */
    memcpy(out, q64, nout * sizeof *out);
    EXPECT(DSPARK_ERR_ARG, dspark_cache_attn(c, 0, 0, out, 2, NULL, out + 10));
    /* An empty sequence, non-causal: zeros. */
    dspark_attn_params nc;
    OK(dspark_attn_params_init(&nc));
    nc.flags = 0;
    out[0] = 1.0f;
    OK(dspark_cache_attn(c, 0, 1, q, 2, &nc, out));
    CHECK(out[0] == 0.0f && out[2 * N_HEAD * HEAD_DIM - 1] == 0.0f, "empty sequence gives zeros");

    /* Append errors leave the sequence as it was. */
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_append(c, N_LAYER, 0, k, v, 1));
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_append(c, 0, 2, k, v, 1));
    EXPECT(DSPARK_ERR_NULL, dspark_cache_append(c, 0, 0, NULL, v, 1));
    EXPECT(DSPARK_ERR_NULL, dspark_cache_append(c, 0, 0, k, NULL, 1));
    OK(dspark_cache_append(c, 0, 0, NULL, NULL, 0));
    float *big = random_rows((size_t)313 * ROW);
    EXPECT(DSPARK_ERR_FULL, dspark_cache_append(c, 0, 0, big, big, 313));
    uint32_t len = 0;
    OK(dspark_cache_seq_len(c, 0, 0, &len));
    CHECK(len == (uint32_t)T, "len %u after a refused append", len);
    EXPECT(DSPARK_ERR_NULL, dspark_cache_seq_len(c, 0, 0, NULL));
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_seq_len(c, 0, 9, &len));
    OK(dspark_cache_append(c, 0, 1, big, big, 312));
    OK(dspark_cache_append(c, 0, 1, big, big, 200));
    EXPECT(DSPARK_ERR_FULL, dspark_cache_append(c, 0, 1, big, big, 1));

    OK(dspark_cache_delete(c));
    free(k); free(v); free(q); free(q64); free(mask); free(mask16); free(out); free(big);
}

/* Compressed formats with window 0: every page but the first (the sinks) is compressed once
 * it is full, so the stored bits per value are exactly (16 + 11 * codec_bits) / 12 for 12
 * full pages. codec_bits (mean of K and V): d = 64 rows cost b + 8/32 + 16/64 bits. */
static void test_attention_packed(const char *format, double tol, double codec_bits) {
    const int T = 768, NQ = 4, L = 4;
    dspark_cache_t *c = make_cache(format, 0, 1024, 1, L);
    float *k = random_rows((size_t)(T + L) * ROW), *v = random_rows((size_t)(T + L) * ROW);
    for (int l = 0; l < L; l++)
        OK(dspark_cache_append(c, (uint32_t)l, 0, layer_rows(k, l), layer_rows(v, l), (uint32_t)T));
    float *q = random_rows((size_t)NQ * N_HEAD * HEAD_DIM);
    ref_args ra = default_ref();
    ra.scale = 0.25f; /* peakier than 1/sqrt(d): makes K errors visible */
    dspark_attn_params ap;
    OK(dspark_attn_params_init(&ap));
    ap.scale = 0.25f;
    double worst = 0;
    for (int l = 0; l < L; l++) {
        double e = attn_vs_ref(c, l, 0, q, NQ, &ap, layer_rows(k, l), layer_rows(v, l), T, &ra, 0);
        if (e > worst) worst = e;
    }
    dspark_stats s;
    s.size = sizeof s;
    OK(dspark_cache_stats(c, &s));
    CHECK(worst < tol, "%s attention rel err %g >= %g", format, worst, tol);
    CHECK(s.pages_compressed > 0 && s.pages_f16 > 0, "%s pages %llu f16, %llu packed", format,
          (unsigned long long)s.pages_f16, (unsigned long long)s.pages_compressed);
    double want_bits = (16.0 + 11.0 * codec_bits) / 12.0;
    CHECK(fabs(s.bits_per_elem - want_bits) < 1e-9 && s.pages_f16 == 2 * L &&
              s.pages_compressed == 2 * 11 * L,
          "%s bits/elem %g, want %g", format, s.bits_per_elem, want_bits);
    CHECK(fabs(s.compression_ratio * s.bits_per_elem - 16.0) < 1e-9, "ratio %g", s.compression_ratio);
    CHECK(s.attn_calls == (uint64_t)L, "attn_calls %llu", (unsigned long long)s.attn_calls);
    CHECK(s.elems == (uint64_t)2 * L * T * ROW, "elems %llu", (unsigned long long)s.elems);
    printf("%s: 4 layers x 768 tokens, window 0: attention rel. error %.2e, %.3f bits/elem, "
           "%.2fx vs f16, %llu bytes\n",
           format, worst, s.bits_per_elem, s.compression_ratio, (unsigned long long)s.kv_bytes);
    OK(dspark_cache_delete(c));
    free(k); free(v); free(q);
}

/* Sequence operations against the reference (format f16, so comparisons are tight). */
static void test_sequences(void) {
    const int T = 200, L = N_LAYER, NQ = 3;
    dspark_cache_t *c = make_cache("f16", 64, 256, 3, L);
    float *k = random_rows((size_t)(T + L) * ROW), *v = random_rows((size_t)(T + L) * ROW);
    for (int l = 0; l < L; l++)
        OK(dspark_cache_append(c, (uint32_t)l, 0, layer_rows(k, l), layer_rows(v, l), (uint32_t)T));
    float *q = random_rows((size_t)NQ * N_HEAD * HEAD_DIM);
    size_t n = (size_t)NQ * N_HEAD * HEAD_DIM;
    float *o0 = malloc(n * sizeof *o0), *o1 = malloc(n * sizeof *o1);
    ref_args ra = default_ref();

    /* seq_cp: bit-identical. */
    OK(dspark_cache_seq_cp(c, 0, 1));
    for (int l = 0; l < L; l += 7) {
        OK(dspark_cache_attn(c, (uint32_t)l, 0, q, NQ, NULL, o0));
        OK(dspark_cache_attn(c, (uint32_t)l, 1, q, NQ, NULL, o1));
        CHECK(memcmp(o0, o1, n * sizeof *o0) == 0, "seq_cp copy differs at layer %d", l);
    }
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_seq_cp(c, 0, 3));
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_seq_cp(c, 3, 0));
    OK(dspark_cache_seq_cp(c, 1, 1));

    /* Appending to the copy leaves the source alone. */
    float *extra = random_rows((size_t)10 * ROW);
    OK(dspark_cache_append(c, 5, 1, extra, extra, 10));
    uint32_t len0 = 0, len1 = 0;
    OK(dspark_cache_seq_len(c, 5, 0, &len0));
    OK(dspark_cache_seq_len(c, 5, 1, &len1));
    CHECK(len0 == (uint32_t)T && len1 == (uint32_t)T + 10, "lens %u %u", len0, len1);

    /* seq_rm of a tail: length drops, new tokens continue from p0. */
    OK(dspark_cache_seq_rm(c, 1, 150, -1));
    for (int l = 0; l < L; l++) {
        OK(dspark_cache_seq_len(c, (uint32_t)l, 1, &len1));
        CHECK(len1 == 150, "layer %d len %u after seq_rm tail", l, len1);
    }
    double e = attn_vs_ref(c, 5, 1, q, NQ, NULL, layer_rows(k, 5), layer_rows(v, 5), 150, &ra, 1);
    CHECK(e < 1e-5, "after tail removal rel err %g", e);
    float *k2 = malloc((size_t)170 * ROW * sizeof *k2), *v2 = malloc((size_t)170 * ROW * sizeof *v2);
    memcpy(k2, layer_rows(k, 5), (size_t)150 * ROW * sizeof *k2);
    memcpy(v2, layer_rows(v, 5), (size_t)150 * ROW * sizeof *v2);
    float *nk = random_rows((size_t)20 * ROW), *nv = random_rows((size_t)20 * ROW);
    memcpy(k2 + (size_t)150 * ROW, nk, (size_t)20 * ROW * sizeof *k2);
    memcpy(v2 + (size_t)150 * ROW, nv, (size_t)20 * ROW * sizeof *v2);
    OK(dspark_cache_append(c, 5, 1, nk, nv, 20));
    e = attn_vs_ref(c, 5, 1, q, NQ, NULL, k2, v2, 170, &ra, 1);
    CHECK(e < 1e-5, "after re-append rel err %g", e);

    /* seq_rm in the middle: a hole that attention skips; positions are kept. */
    dspark_stats before, after;
    before.size = after.size = sizeof before;
    OK(dspark_cache_stats(c, &before));
    OK(dspark_cache_seq_rm(c, 0, 10, 20));
    OK(dspark_cache_seq_rm(c, 0, 64, 128)); /* a whole page: freed */
    OK(dspark_cache_stats(c, &after));
    CHECK(after.kv_bytes < before.kv_bytes, "hole freed nothing (%llu -> %llu)",
          (unsigned long long)before.kv_bytes, (unsigned long long)after.kv_bytes);
    OK(dspark_cache_seq_len(c, 9, 0, &len0));
    CHECK(len0 == (uint32_t)T, "len %u after a hole", len0);
    unsigned char gone[256] = {0};
    for (int p = 10; p < 20; p++) gone[p] = 1;
    for (int p = 64; p < 128; p++) gone[p] = 1;
    ref_args rh = ra;
    rh.gone = gone;
    for (int l = 0; l < L; l += 9) {
        e = attn_vs_ref(c, l, 0, q, NQ, NULL, layer_rows(k, l), layer_rows(v, l), T, &rh, 1);
        CHECK(e < 1e-5, "with holes rel err %g at layer %d", e, l);
    }
    /* Removing a range beyond the end or empty ranges does nothing. */
    OK(dspark_cache_seq_rm(c, 0, 250, -1));
    OK(dspark_cache_seq_rm(c, 0, 30, 30));
    OK(dspark_cache_seq_len(c, 0, 0, &len0));
    CHECK(len0 == (uint32_t)T, "len %u", len0);
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_seq_rm(c, 3, 0, -1));
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_seq_rm(c, -2, 0, -1));
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_seq_rm(c, 0, -1, -1));
    /* p0 is a position 0 .. max_tokens (256 here); a negative p1 means "to the end", as in
     * llama.cpp, and p1 <= p0 otherwise does nothing. */
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_seq_rm(c, 0, 257, -1));
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_seq_rm(c, 0, 0x7fffffff, 10));
    OK(dspark_cache_seq_rm(c, 0, 256, -1));
    OK(dspark_cache_seq_rm(c, 0, 40, 30));
    OK(dspark_cache_seq_len(c, 0, 0, &len0));
    CHECK(len0 == (uint32_t)T, "len %u after empty removals", len0);
    OK(dspark_cache_append(c, 3, 2, k, v, 9));
    OK(dspark_cache_seq_rm(c, 2, 3, -5));
    OK(dspark_cache_seq_len(c, 3, 2, &len0));
    CHECK(len0 == 3, "seq_rm(p1 = -5) left %u tokens, want 3 (to the end)", len0);
    OK(dspark_cache_seq_rm(c, 2, 0, -1));

    /* seq_keep: the others are emptied. */
    OK(dspark_cache_seq_keep(c, 1));
    OK(dspark_cache_seq_len(c, 0, 0, &len0));
    OK(dspark_cache_seq_len(c, 5, 1, &len1));
    CHECK(len0 == 0 && len1 == 170, "after keep: %u %u", len0, len1);
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_seq_keep(c, 3));

    /* seq_rm(-1): everything. */
    OK(dspark_cache_seq_rm(c, -1, 0, -1));
    dspark_stats s;
    s.size = sizeof s;
    OK(dspark_cache_stats(c, &s));
    CHECK(s.kv_bytes == 0 && s.cells == 0 && s.bits_per_elem == 0.0, "empty cache holds %llu bytes",
          (unsigned long long)s.kv_bytes);
    OK(dspark_cache_delete(c));
    free(k); free(v); free(q); free(o0); free(o1); free(extra); free(k2); free(v2); free(nk); free(nv);
}

/* Attention outputs of every layer of seqs 0 and 1, for comparing caches. */
static float *snapshot(dspark_cache_t *c, int L, const float *q, int nq) {
    size_t n = (size_t)nq * N_HEAD * HEAD_DIM;
    float *all = calloc((size_t)2 * L * n + 2 * L, sizeof *all);
    dspark_attn_params ap;
    OK(dspark_attn_params_init(&ap));
    ap.flags = 0;
    for (int s = 0; s < 2; s++)
        for (int l = 0; l < L; l++) {
            OK(dspark_cache_attn(c, (uint32_t)l, (uint32_t)s, q, (uint32_t)nq, &ap,
                                 all + ((size_t)s * L + l) * n));
            uint32_t len = 0;
            OK(dspark_cache_seq_len(c, (uint32_t)l, (uint32_t)s, &len));
            all[(size_t)2 * L * n + (size_t)s * L + l] = (float)len;
        }
    return all;
}

static int same_snapshot(const float *a, const float *b, int L, int nq) {
    size_t n = (size_t)2 * L * nq * N_HEAD * HEAD_DIM + 2 * L;
    return memcmp(a, b, n * sizeof *a) == 0;
}

static int write_file(const char *path, const void *buf, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    size_t w = fwrite(buf, 1, len, f);
    return fclose(f) == 0 && w == len;
}

static void test_persistence(const char *tmpdir) {
    const int T = 260, L = N_LAYER, NQ = 2;
    dspark_cache_t *a = make_cache("k4v4", 64, 512, 2, L);
    float *k = random_rows((size_t)(T + L) * ROW), *v = random_rows((size_t)(T + L) * ROW);
    for (int l = 0; l < L; l++) {
        OK(dspark_cache_append(a, (uint32_t)l, 0, layer_rows(k, l), layer_rows(v, l), (uint32_t)T));
        OK(dspark_cache_append(a, (uint32_t)l, 1, layer_rows(v, l), layer_rows(k, l), 70));
    }
    OK(dspark_cache_seq_rm(a, 0, 100, 140)); /* a hole survives the round trip */
    float *q = random_rows((size_t)NQ * N_HEAD * HEAD_DIM);
    float *snap_a = snapshot(a, L, q, NQ);

    size_t size = 0, written = 0;
    OK(dspark_cache_save_size(a, &size));
    EXPECT(DSPARK_ERR_NULL, dspark_cache_save_size(a, NULL));
    unsigned char *buf = malloc(size + 16);
    EXPECT(DSPARK_ERR_BUFFER, dspark_cache_save_mem(a, buf, size - 1, &written));
    CHECK(written == 0, "written set on failure");
    EXPECT(DSPARK_ERR_NULL, dspark_cache_save_mem(a, NULL, size, &written));
    OK(dspark_cache_save_mem(a, buf, size + 16, &written));
    CHECK(written == size, "wrote %zu, save_size said %zu", written, size);
    CHECK(memcmp(buf, "DSPARKKV", 8) == 0, "magic");
    /* Memory round trip: bit-identical attention. */
    dspark_cache_t *b = make_cache("k4v4", 64, 512, 2, L);
    OK(dspark_cache_load_mem(b, buf, written));
    float *snap_b = snapshot(b, L, q, NQ);
    CHECK(same_snapshot(snap_a, snap_b, L, NQ), "memory round trip differs");
    dspark_stats sa, sb;
    sa.size = sb.size = sizeof sa;
    OK(dspark_cache_stats(a, &sa));
    OK(dspark_cache_stats(b, &sb));
    CHECK(sa.kv_bytes == sb.kv_bytes && sa.pages_compressed == sb.pages_compressed &&
              sa.cells == sb.cells, "stats differ after load");
    /* Appending after a load continues at the saved length. */
    OK(dspark_cache_append(b, 0, 1, k, v, 1));
    uint32_t len = 0;
    OK(dspark_cache_seq_len(b, 0, 1, &len));
    CHECK(len == 71, "len %u after load + append", len);

    /* File round trip. */
    char path[4096], bad_path[4096];
    snprintf(path, sizeof path, "%s/cache.dspark", tmpdir);
    OK(dspark_cache_save_file(a, path));
    dspark_cache_t *cf = make_cache("k4v4", 64, 512, 2, L);
    OK(dspark_cache_load_file(cf, path));
    float *snap_f = snapshot(cf, L, q, NQ);
    CHECK(same_snapshot(snap_a, snap_f, L, NQ), "file round trip differs");
    FILE *f = fopen(path, "rb");
    long fsize = -1;
    if (f) { fseek(f, 0, SEEK_END); fsize = ftell(f); fclose(f); }
    CHECK(fsize == (long)size, "file is %ld bytes, memory form %zu", fsize, size);

    /* Refusals leave the target untouched: d holds other content. */
    dspark_cache_t *d = make_cache("k4v4", 64, 512, 2, L);
    for (int l = 0; l < L; l++) {
        OK(dspark_cache_append(d, (uint32_t)l, 0, layer_rows(v, l), layer_rows(k, l), 90));
        OK(dspark_cache_append(d, (uint32_t)l, 1, layer_rows(k, l), layer_rows(k, l), 3));
    }
    float *snap_d = snapshot(d, L, q, NQ);
    size_t cuts[] = {0, 5, 8, 40, 63, 64, 67, 68, 1000, written / 2, written - 5, written - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof *cuts; i++)
        EXPECT(DSPARK_ERR_CORRUPT, dspark_cache_load_mem(d, buf, cuts[i]));
    unsigned char *bad = malloc(written + 8);
    size_t flips[] = {9, 17, 40, 48, 64, 65, 200, written / 3, written - 10, written - 1};
    for (size_t i = 0; i < sizeof flips / sizeof *flips; i++) {
        memcpy(bad, buf, written);
        bad[flips[i]] ^= 0x5a;
        int st = dspark_cache_load_mem(d, bad, written);
        CHECK(st == DSPARK_ERR_CORRUPT || (flips[i] < 12 && st == DSPARK_ERR_VERSION),
              "flipped byte %zu: %s", flips[i], dspark_status_name(st));
    }
    memcpy(bad, buf, written); /* a newer version */
    bad[8] = 4;
    EXPECT(DSPARK_ERR_VERSION, dspark_cache_load_mem(d, bad, written));
    memcpy(bad, buf, written); /* trailing garbage */
    memset(bad + written, 0, 8);
    EXPECT(DSPARK_ERR_CORRUPT, dspark_cache_load_mem(d, bad, written + 8));
    const char *foreign = "GGUF\3\0\0\0 this is not a cache, not at all, certainly not";
    EXPECT(DSPARK_ERR_CORRUPT, dspark_cache_load_mem(d, foreign, strlen(foreign)));
    for (size_t i = 0; i < written; i++) bad[i] = (unsigned char)(uniform() * 256);
    EXPECT(DSPARK_ERR_CORRUPT, dspark_cache_load_mem(d, bad, written));
    EXPECT(DSPARK_ERR_NULL, dspark_cache_load_mem(d, NULL, 10));
    EXPECT(DSPARK_ERR_CORRUPT, dspark_cache_load_mem(d, NULL, 0));
    /* Valid data of another shape or format. */
    dspark_cache_t *other = make_cache("k4v4", 64, 512, 2, L - 1);
    EXPECT(DSPARK_ERR_MISMATCH, dspark_cache_load_mem(other, buf, written));
    OK(dspark_cache_delete(other));
    other = make_cache("k8v4", 64, 512, 2, L);
    EXPECT(DSPARK_ERR_MISMATCH, dspark_cache_load_mem(other, buf, written));
    OK(dspark_cache_delete(other));
    other = make_cache("k4v4", 64, 256, 2, L);
    EXPECT(DSPARK_ERR_MISMATCH, dspark_cache_load_mem(other, buf, written));
    OK(dspark_cache_delete(other));
    /* Files: truncated, corrupt, missing, unwritable. */
    snprintf(bad_path, sizeof bad_path, "%s/truncated.dspark", tmpdir);
    CHECK(write_file(bad_path, buf, written - 100), "cannot write %s", bad_path);
    EXPECT(DSPARK_ERR_CORRUPT, dspark_cache_load_file(d, bad_path));
    memcpy(bad, buf, written);
    bad[written / 2] ^= 1;
    CHECK(write_file(bad_path, bad, written), "cannot write %s", bad_path);
    EXPECT(DSPARK_ERR_CORRUPT, dspark_cache_load_file(d, bad_path));
    snprintf(bad_path, sizeof bad_path, "%s/missing.dspark", tmpdir);
    EXPECT(DSPARK_ERR_IO, dspark_cache_load_file(d, bad_path));
    snprintf(bad_path, sizeof bad_path, "%s/no/such/dir/x.dspark", tmpdir);
    EXPECT(DSPARK_ERR_IO, dspark_cache_save_file(a, bad_path));
    EXPECT(DSPARK_ERR_NULL, dspark_cache_save_file(a, NULL));
    EXPECT(DSPARK_ERR_NULL, dspark_cache_load_file(d, NULL));
    float *snap_d2 = snapshot(d, L, q, NQ);
    CHECK(same_snapshot(snap_d, snap_d2, L, NQ), "a refused load changed the cache");

    OK(dspark_cache_delete(a));
    OK(dspark_cache_delete(b));
    OK(dspark_cache_delete(cf));
    OK(dspark_cache_delete(d));
    free(k); free(v); free(q); free(buf); free(bad);
    free(snap_a); free(snap_b); free(snap_f); free(snap_d); free(snap_d2);
}

/* The saved size of one long sequence (default model, k4v4, window 128), for the report. */
static void test_save_size(void) {
    const int T = 2048, L = N_LAYER;
    dspark_cache_t *c = make_cache("k4v4", 128, 4096, 1, L);
    float *k = random_rows((size_t)(T + L) * ROW), *v = random_rows((size_t)(T + L) * ROW);
    for (int l = 0; l < L; l++)
        OK(dspark_cache_append(c, (uint32_t)l, 0, layer_rows(k, l), layer_rows(v, l), (uint32_t)T));
    size_t size = 0;
    OK(dspark_cache_save_size(c, &size));
    dspark_stats s;
    s.size = sizeof s;
    OK(dspark_cache_stats(c, &s));
    /* Pages as stored (4.5-bit rows, plus the f16 first page and recent window), each with a
     * 4-byte index and a tag; per lane a length and a hole count, per stream a page count. */
    size_t want = (size_t)s.kv_bytes + 64 + 4 + (size_t)L * 8 + (size_t)2 * L * 4 +
                  5 * (size_t)(s.pages_f16 + s.pages_compressed);
    CHECK(size == want, "saved %zu bytes for %llu held, want %zu", size, (unsigned long long)s.kv_bytes, want);
    printf("k4v4 save, %d tokens x %d layers, window 128: %zu bytes = %.0f bytes/token "
           "(%.3f bits/elem; f16 KV: %d bytes/token)\n",
           T, L, size, (double)size / T, 8.0 * size / ((double)T * L * 2 * ROW), L * 2 * ROW * 2);
    OK(dspark_cache_delete(c));
    free(k);
    free(v);
}

static void test_handles(void) {
    dspark_cache_t *c = make_cache("k4v4", 128, 64, 1, 2);
    float rows[N_HEAD * HEAD_DIM] = {0}, out[N_HEAD * HEAD_DIM];
    uint32_t len;
    OK(dspark_cache_append(c, 0, 0, rows, rows, 1));
    OK(dspark_cache_delete(c));
    /* Every call on the deleted handle is refused. */
    EXPECT(DSPARK_ERR_HANDLE, dspark_cache_append(c, 0, 0, rows, rows, 1));
    EXPECT(DSPARK_ERR_HANDLE, dspark_cache_attn(c, 0, 0, rows, 1, NULL, out));
    EXPECT(DSPARK_ERR_HANDLE, dspark_cache_seq_len(c, 0, 0, &len));
    EXPECT(DSPARK_ERR_HANDLE, dspark_cache_seq_rm(c, 0, 0, -1));
    EXPECT(DSPARK_ERR_HANDLE, dspark_cache_seq_cp(c, 0, 0));
    EXPECT(DSPARK_ERR_HANDLE, dspark_cache_seq_keep(c, 0));
    dspark_stats s;
    s.size = sizeof s;
    EXPECT(DSPARK_ERR_HANDLE, dspark_cache_stats(c, &s));
    size_t n;
    EXPECT(DSPARK_ERR_HANDLE, dspark_cache_save_size(c, &n));
    EXPECT(DSPARK_ERR_HANDLE, dspark_cache_save_mem(c, out, sizeof out, &n));
    EXPECT(DSPARK_ERR_HANDLE, dspark_cache_load_mem(c, out, sizeof out));
    EXPECT(DSPARK_ERR_HANDLE, dspark_cache_save_file(c, "/nonexistent/x"));
    EXPECT(DSPARK_ERR_HANDLE, dspark_cache_load_file(c, "/nonexistent/x"));
    EXPECT(DSPARK_ERR_HANDLE, dspark_cache_delete(c));
    /* A pointer that never was a cache. */
    int local = 0;
    EXPECT(DSPARK_ERR_HANDLE, dspark_cache_append((dspark_cache_t *)&local, 0, 0, rows, rows, 1));
    EXPECT(DSPARK_ERR_HANDLE, dspark_cache_delete((dspark_cache_t *)&local));
    /* NULL handles. */
    OK(dspark_cache_delete(NULL));
    EXPECT(DSPARK_ERR_NULL, dspark_cache_append(NULL, 0, 0, rows, rows, 1));
    EXPECT(DSPARK_ERR_NULL, dspark_cache_stats(NULL, &s));
    /* A new cache never reuses a deleted handle. */
    dspark_cache_t *c2 = make_cache("k4v4", 128, 64, 1, 2);
    CHECK(c2 != c, "handle reused");
    EXPECT(DSPARK_ERR_NULL, dspark_cache_stats(c2, NULL));
    s.size = 4;
    EXPECT(DSPARK_ERR_SIZE, dspark_cache_stats(c2, &s));
    /* A larger (newer) stats struct: our fields written, the rest zeroed. */
    struct { dspark_stats s; uint64_t future; } big;
    memset(&big, 0xff, sizeof big);
    big.s.size = sizeof big;
    OK(dspark_cache_stats(c2, &big.s));
    CHECK(big.future == 0 && big.s.size == sizeof big && big.s.attn_calls == 0, "stats of a larger struct");
    OK(dspark_cache_delete(c2));
}

/* Concurrent readers on one cache, and the thread-local error message. */
typedef struct worker {
    dspark_cache_t *c;
    const float *q;
    float *out;
    int status;
    char msg_at_start[64];
    char msg_after_error[128];
} worker;

static void *worker_main(void *arg) {
    worker *w = arg;
    snprintf(w->msg_at_start, sizeof w->msg_at_start, "%s", dspark_last_error());
    w->status = dspark_cache_attn(w->c, 1, 0, w->q, 4, NULL, w->out);
    uint32_t len;
    (void)dspark_cache_seq_len(w->c, 99, 0, &len);
    snprintf(w->msg_after_error, sizeof w->msg_after_error, "%s", dspark_last_error());
    return NULL;
}

static void test_threads(void) {
    dspark_cache_t *c = make_cache("k8v4", 0, 256, 1, 2);
    float *k = random_rows((size_t)200 * ROW), *q = random_rows((size_t)4 * N_HEAD * HEAD_DIM);
    OK(dspark_cache_append(c, 1, 0, k, k, 200));
    size_t n = (size_t)4 * N_HEAD * HEAD_DIM;
    float *want = malloc(n * sizeof *want);
    OK(dspark_cache_attn(c, 1, 0, q, 4, NULL, want));
    uint32_t len;
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_seq_len(c, 0, 7, &len)); /* main's own message */
    char mine[256];
    snprintf(mine, sizeof mine, "%s", dspark_last_error());
    worker w[4];
    pthread_t t[4];
    for (int i = 0; i < 4; i++) {
        memset(&w[i], 0, sizeof w[i]);
        w[i].c = c;
        w[i].q = q;
        w[i].out = malloc(n * sizeof(float));
        CHECK(pthread_create(&t[i], NULL, worker_main, &w[i]) == 0, "pthread_create");
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        CHECK(w[i].status == DSPARK_OK, "thread %d: %s", i, dspark_status_name(w[i].status));
        CHECK(memcmp(w[i].out, want, n * sizeof *want) == 0, "thread %d result differs", i);
        CHECK(w[i].msg_at_start[0] == 0, "thread %d saw another thread's error", i);
        CHECK(strstr(w[i].msg_after_error, "layer 99") != NULL, "thread %d message: %s", i,
              w[i].msg_after_error);
        free(w[i].out);
    }
    CHECK(strcmp(mine, dspark_last_error()) == 0, "main's message changed: %s", dspark_last_error());
    OK(dspark_cache_delete(c));
    free(k); free(q); free(want);
}

static void test_register(void) {
    dspark_config cfg;
    EXPECT(DSPARK_ERR_NULL, dspark_config_init(NULL));
    OK(dspark_config_init(&cfg));
    CHECK(cfg.size == sizeof cfg && cfg.window == 128, "config_init");
    CHECK(cfg.kv_budget_bytes == 0 && cfg.prefetch_depth == 2, "config_init: no budget, prefetch 2");
    struct ggml_backend_device *dev = NULL;
    EXPECT(DSPARK_ERR_NULL, dspark_register(&cfg, NULL));
    dspark_config bad = cfg;
    bad.format = "k9v9";
    EXPECT(DSPARK_ERR_FORMAT, dspark_register(&bad, &dev));
    bad.format = "K4V4";
    EXPECT(DSPARK_ERR_FORMAT, dspark_register(&bad, &dev));
    bad.format = "k4v4 ";
    EXPECT(DSPARK_ERR_FORMAT, dspark_register(&bad, &dev));
    CHECK(dev == NULL, "dev written on failure");
    bad = cfg;
    bad.size = 1;
    EXPECT(DSPARK_ERR_SIZE, dspark_register(&bad, &dev));
    cfg.format = "k4v3";
    cfg.window = 256;
    OK(dspark_register(&cfg, &dev));
    CHECK(dev != NULL, "no device");
    struct ggml_backend_device *dev2 = NULL, *dev3 = NULL;
    OK(dspark_register(NULL, &dev2));
    CHECK(dev2 != NULL && dev2 != dev, "another configuration must get its own device");
    OK(dspark_register(&cfg, &dev3));
    CHECK(dev3 == dev, "the same configuration must get the same device");
    /* A caller built before kv_budget_bytes existed passes the smaller struct: the budget
     * fields take their defaults, so it is the same configuration. */
    dspark_config old = cfg;
    old.size = offsetof(dspark_config, kv_budget_bytes);
    old.kv_budget_bytes = 12345; /* beyond its size: must not be read */
    OK(dspark_register(&old, &dev3));
    CHECK(dev3 == dev, "an old-size config must read as the defaults for the new fields");
    /* API version 3's struct ended with prefetch_depth: the attention fields take their
     * defaults (not the garbage in its padding). */
    old = cfg;
    old.size = offsetof(dspark_config, attn_budget_tokens);
    old.attn_budget_tokens = 777;
    OK(dspark_register(&old, &dev3));
    CHECK(dev3 == dev, "a version-3 config must read as the defaults for the version-4 fields");
    old.size = offsetof(dspark_config, attn_budget_tokens) - 8;
    EXPECT(DSPARK_ERR_SIZE, dspark_register(&old, &dev3));
    /* API version 4's struct ended with attn_dense_layers: no profile. */
    old = cfg;
    old.size = offsetof(dspark_config, profile);
    old.profile = "/nonexistent/profile.json"; /* beyond its size: must not be read */
    OK(dspark_register(&old, &dev3));
    CHECK(dev3 == dev, "a version-4 config must read as no profile");
    CHECK(cfg.profile == NULL, "config_init: no profile");
    dspark_config prof = cfg;
    prof.profile = "/nonexistent/profile.json";
    EXPECT(DSPARK_ERR_FORMAT, dspark_register(&prof, &dev3));
    CHECK(strstr(dspark_last_error(), "cannot read profile") != NULL, "profile error: %s", dspark_last_error());
    CHECK(cfg.attn_budget_tokens == 0 && cfg.attn_dense_layers == 0, "config_init: dense attention, no layer forced dense");
    dspark_config sel = cfg;
    sel.attn_budget_tokens = 1024;
    OK(dspark_register(&sel, &dev3));
    CHECK(dev3 != NULL && dev3 != dev, "an attention budget is another configuration: another device");
    dspark_config budget = cfg;
    budget.kv_budget_bytes = 64u << 20;
    budget.prefetch_depth = 0;
    OK(dspark_register(&budget, &dev3));
    CHECK(dev3 != NULL && dev3 != dev, "a budget is another configuration: another device");
    dspark_stats s;
    EXPECT(DSPARK_ERR_NULL, dspark_stats_get(NULL));
    s.size = 0;
    EXPECT(DSPARK_ERR_SIZE, dspark_stats_get(&s));
    s.size = sizeof s;
    OK(dspark_stats_get(&s));
    CHECK(s.kv_bytes == 0 && s.bits_per_elem == 0.0, "no llama.cpp context yet, but %llu bytes",
          (unsigned long long)s.kv_bytes);
    CHECK(s.kv_cold_bytes == 0 && s.cold_read_bytes == 0 && s.hidden_fraction == 1.0, "no cold tier in use yet");
    CHECK(s.attended_tokens == 0.0 && s.select_s == 0.0 && s.prefetch_hit_rate == 1.0, "no decode yet");
}

/* Finite values beyond the f16 range saturate to +-65504; non-finite ones are stored as 0,
 * in f16 pages and in compressed pages. */
static void test_saturation(void) {
    float k[ROW] = {0}, v[ROW] = {0}, q[N_HEAD * HEAD_DIM] = {0}, out[N_HEAD * HEAD_DIM];
    v[0] = 70000.0f;
    v[1] = -1e6f;
    v[2] = 65519.0f;
    v[3] = INFINITY;
    v[4] = NAN;
    v[5] = 1.0f;
    k[0] = 1e30f;
    dspark_cache_t *c = make_cache("f16", 128, 64, 1, 1);
    OK(dspark_cache_append(c, 0, 0, k, v, 1));
    OK(dspark_cache_attn(c, 0, 0, q, 1, NULL, out)); /* one token: out = its V row */
    CHECK(out[0] == 65504.0f && out[1] == -65504.0f && out[2] == 65504.0f, "f16 page: %g %g %g, want +-65504",
          out[0], out[1], out[2]);
    CHECK(out[3] == 0.0f && out[4] == 0.0f && out[5] == 1.0f, "f16 page: %g %g %g, want 0 0 1", out[3],
          out[4], out[5]);
    OK(dspark_cache_delete(c));

    /* Window 0: the page of positions 64..127 is compressed as soon as it is full. A mask
     * keeps position 64 only, so the output is its decoded V row. */
    c = make_cache("k4v4", 0, 256, 1, 1);
    float *rows = calloc((size_t)128 * ROW, sizeof *rows);
    memcpy(rows + (size_t)64 * ROW, v, sizeof v);
    OK(dspark_cache_append(c, 0, 0, rows, rows, 128));
    dspark_stats s;
    s.size = sizeof s;
    OK(dspark_cache_stats(c, &s));
    CHECK(s.pages_compressed == 2, "%llu compressed pages, want 2", (unsigned long long)s.pages_compressed);
    float mask[128];
    for (int i = 0; i < 128; i++) mask[i] = i == 64 ? 0.0f : -INFINITY;
    dspark_attn_params ap;
    OK(dspark_attn_params_init(&ap));
    ap.flags = 0;
    ap.mask = mask;
    OK(dspark_cache_attn(c, 0, 0, q, 1, &ap, out));
    int finite = 1;
    for (int i = 0; i < N_HEAD * HEAD_DIM; i++) finite &= isfinite(out[i]) != 0;
    CHECK(finite && out[0] > 50000.0f && out[1] < -50000.0f, "compressed page: %g %g, want about +-65504",
          out[0], out[1]);
    OK(dspark_cache_delete(c));
    free(rows);
}

/* "Only fields that fit are written": any size from sizeof(size_t) on is accepted. */
static void test_stats_sizes(void) {
    dspark_cache_t *c = make_cache("k4v4", 128, 256, 1, 2);
    float *k = random_rows((size_t)10 * ROW);
    OK(dspark_cache_append(c, 1, 0, k, k, 10));
    dspark_stats full;
    full.size = sizeof full;
    OK(dspark_cache_stats(c, &full));
    CHECK(full.kv_bytes > 0, "no bytes");
    size_t sizes[] = {sizeof(size_t), 12, 16, 20, 24, offsetof(dspark_stats, attn_calls)};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        for (int dev = 0; dev < 2; dev++) {
            dspark_stats s;
            memset(&s, 0xab, sizeof s);
            s.size = sizes[i];
            if (dev)
                OK(dspark_stats_get(&s));
            else
                OK(dspark_cache_stats(c, &s));
            unsigned char fresh[sizeof s];
            memset(fresh, 0xab, sizeof fresh);
            int kv_written = sizes[i] >= offsetof(dspark_stats, kv_bytes) + sizeof s.kv_bytes;
            if (!dev)
                CHECK(kv_written ? s.kv_bytes == full.kv_bytes : memcmp(&s.kv_bytes, fresh, 8) == 0,
                      "size %zu: kv_bytes %llu", sizes[i], (unsigned long long)s.kv_bytes);
            /* Bytes from the first field that does not fit whole on are untouched. */
            size_t first_cut = sizes[i] < sizeof s ? sizes[i] : sizeof s;
            size_t f = offsetof(dspark_stats, kv_bytes);
            while (f + 8 <= first_cut) f += 8;
            CHECK(memcmp((unsigned char *)&s + f, fresh, sizeof s - f) == 0,
                  "size %zu (%s): bytes from %zu on were written", sizes[i], dev ? "device" : "cache", f);
            CHECK(s.size == sizes[i], "size changed");
        }
    }
    dspark_stats s;
    s.size = sizeof(size_t) - 1;
    EXPECT(DSPARK_ERR_SIZE, dspark_cache_stats(c, &s));
    EXPECT(DSPARK_ERR_SIZE, dspark_stats_get(&s));
    OK(dspark_cache_delete(c));
    free(k);
}

/* Resident memory of the process in kB (Linux), or -1. */
static long rss_kb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return -1;
    char line[256];
    long kb = -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0) kb = strtol(line + 6, NULL, 10);
    fclose(f);
    return kb;
}

/* An empty cache costs what it holds, not what max_tokens could hold: 2^30 positions x 30
 * layers, in memory and in its save image. */
static void test_huge_empty(void) {
    long before = rss_kb();
    dspark_cache_t *c = make_cache("k4v4", 128, 1u << 30, 1, N_LAYER);
    long after = rss_kb();
    if (before >= 0)
        CHECK(after - before < 8 * 1024, "an empty 2^30-token cache took %ld kB", after - before);
    dspark_stats s;
    s.size = sizeof s;
    OK(dspark_cache_stats(c, &s));
    CHECK(s.kv_bytes == 0, "empty cache holds %llu bytes", (unsigned long long)s.kv_bytes);
    size_t size = 0;
    OK(dspark_cache_save_size(c, &size));
    CHECK(size < 1024, "the image of an empty cache is %zu bytes", size);
    printf("empty cache of 2^30 positions x %d layers: %ld kB resident, %zu-byte image\n", N_LAYER,
           before >= 0 ? after - before : -1L, size);
    /* Some tokens: the image grows by the pages, and round-trips. */
    float *k = random_rows((size_t)200 * ROW);
    for (int l = 0; l < N_LAYER; l += 10) OK(dspark_cache_append(c, (uint32_t)l, 0, k, k, 200));
    OK(dspark_cache_seq_rm(c, 0, 100, 150));
    OK(dspark_cache_save_size(c, &size));
    OK(dspark_cache_stats(c, &s));
    CHECK(size > s.kv_bytes && size < s.kv_bytes + 2048, "image %zu bytes for %llu held", size,
          (unsigned long long)s.kv_bytes);
    unsigned char *buf = malloc(size);
    OK(dspark_cache_save_mem(c, buf, size, NULL));
    dspark_cache_t *d = make_cache("k4v4", 128, 1u << 30, 1, N_LAYER);
    OK(dspark_cache_load_mem(d, buf, size));
    float *q = random_rows((size_t)2 * N_HEAD * HEAD_DIM);
    float a[2 * N_HEAD * HEAD_DIM], b[2 * N_HEAD * HEAD_DIM];
    OK(dspark_cache_attn(c, 10, 0, q, 2, NULL, a));
    OK(dspark_cache_attn(d, 10, 0, q, 2, NULL, b));
    CHECK(memcmp(a, b, sizeof a) == 0, "round trip of a 2^30-token cache differs");
    /* Whole-sequence edits cost what the sequence holds. */
    OK(dspark_cache_seq_cp(d, 0, 0));
    OK(dspark_cache_seq_rm(d, 0, 0, -1));
    OK(dspark_cache_stats(d, &s));
    CHECK(s.kv_bytes == 0, "%llu bytes after removing everything", (unsigned long long)s.kv_bytes);
    OK(dspark_cache_delete(c));
    OK(dspark_cache_delete(d));
    free(k);
    free(q);
    free(buf);
}

/* Position shifts: a sliding window in a cache sized for the window. */
static void test_seq_add(void) {
    const int T = 200, L = 2, NQ = 3, n = 100;
    dspark_cache_t *c = make_cache("f16", 64, 256, 2, L);
    float *k = random_rows((size_t)(T + 200) * ROW), *v = random_rows((size_t)(T + 200) * ROW);
    for (int l = 0; l < L; l++) OK(dspark_cache_append(c, (uint32_t)l, 0, k, v, (uint32_t)T));
    float *q = random_rows((size_t)NQ * N_HEAD * HEAD_DIM);
    ref_args ra = default_ref();
    /* Without a shift the stream does not fit: 200 + 150 > 256. */
    EXPECT(DSPARK_ERR_FULL, dspark_cache_append(c, 0, 0, k, v, 150));
    /* Keep the first 4 tokens, drop the next n, move the rest down. */
    OK(dspark_cache_seq_rm(c, 0, 4, 4 + n));
    OK(dspark_cache_seq_add(c, 0, 4 + n, -1, -n));
    uint32_t len = 0;
    OK(dspark_cache_seq_len(c, 1, 0, &len));
    CHECK(len == (uint32_t)(T - n), "len %u after the shift, want %d", len, T - n);
    /* Reference rows: 0..4, then 104..200, then 150 new ones. */
    float *rk = malloc((size_t)250 * ROW * sizeof *rk), *rv = malloc((size_t)250 * ROW * sizeof *rv);
    memcpy(rk, k, (size_t)4 * ROW * sizeof *rk);
    memcpy(rv, v, (size_t)4 * ROW * sizeof *rv);
    memcpy(rk + (size_t)4 * ROW, k + (size_t)(4 + n) * ROW, (size_t)(T - n - 4) * ROW * sizeof *rk);
    memcpy(rv + (size_t)4 * ROW, v + (size_t)(4 + n) * ROW, (size_t)(T - n - 4) * ROW * sizeof *rv);
    double e = attn_vs_ref(c, 1, 0, q, NQ, NULL, rk, rv, T - n, &ra, 1);
    CHECK(e < 1e-5, "after a shift rel err %g", e);
    for (int l = 0; l < L; l++) OK(dspark_cache_append(c, (uint32_t)l, 0, k + (size_t)T * ROW, v + (size_t)T * ROW, 150));
    memcpy(rk + (size_t)(T - n) * ROW, k + (size_t)T * ROW, (size_t)150 * ROW * sizeof *rk);
    memcpy(rv + (size_t)(T - n) * ROW, v + (size_t)T * ROW, (size_t)150 * ROW * sizeof *rv);
    e = attn_vs_ref(c, 0, 0, q, NQ, NULL, rk, rv, T - n + 150, &ra, 1);
    CHECK(e < 1e-5, "after a shift and appends rel err %g", e);

    /* A move up leaves a hole. */
    OK(dspark_cache_seq_rm(c, 0, 240, -1));
    OK(dspark_cache_seq_add(c, 0, 230, -1, 6)); /* 230..240 -> 236..246, hole 230..236 */
    OK(dspark_cache_seq_len(c, 0, 0, &len));
    CHECK(len == 246, "len %u after a move up", len);
    float *sk = malloc((size_t)246 * ROW * sizeof *sk), *sv = malloc((size_t)246 * ROW * sizeof *sv);
    memcpy(sk, rk, (size_t)230 * ROW * sizeof *sk);
    memcpy(sv, rv, (size_t)230 * ROW * sizeof *sv);
    memcpy(sk + (size_t)236 * ROW, rk + (size_t)230 * ROW, (size_t)10 * ROW * sizeof *sk);
    memcpy(sv + (size_t)236 * ROW, rv + (size_t)230 * ROW, (size_t)10 * ROW * sizeof *sv);
    memset(sk + (size_t)230 * ROW, 0, (size_t)6 * ROW * sizeof *sk);
    memset(sv + (size_t)230 * ROW, 0, (size_t)6 * ROW * sizeof *sv);
    unsigned char gone[246] = {0};
    for (int p = 230; p < 236; p++) gone[p] = 1;
    ref_args rh = ra;
    rh.gone = gone;
    e = attn_vs_ref(c, 0, 0, q, NQ, NULL, sk, sv, 246, &rh, 1);
    CHECK(e < 1e-5, "after a move up rel err %g", e);

    /* Errors change nothing. */
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_seq_add(c, 0, 0, -1, -1));   /* position 0 -> -1 */
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_seq_add(c, 0, 200, -1, 11)); /* 246 + 11 > 256 */
    EXPECT(DSPARK_ERR_ARG, dspark_cache_seq_add(c, 0, 10, 20, 5));     /* onto 20..25 */
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_seq_add(c, 2, 0, -1, 1));
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_seq_add(c, -2, 0, -1, 1));
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_seq_add(c, 0, -1, -1, 1));
    EXPECT(DSPARK_ERR_RANGE, dspark_cache_seq_add(c, 0, 257, -1, 1));
    EXPECT(DSPARK_ERR_HANDLE, dspark_cache_seq_add((dspark_cache_t *)&len, 0, 0, -1, 1));
    OK(dspark_cache_seq_add(c, 0, 10, 20, 0));
    OK(dspark_cache_seq_add(c, 0, 20, 10, -5));
    OK(dspark_cache_seq_add(c, 0, 246, -1, -5)); /* nothing at or past the end */
    /* All or nothing across layers: in sequence 1, layer 0 (30 tokens) could move 25..30 to
     * 30..35, layer 1 (50 tokens) cannot; the refusal changes neither. */
    OK(dspark_cache_append(c, 0, 1, k, v, 30));
    OK(dspark_cache_append(c, 1, 1, k, v, 50));
    EXPECT(DSPARK_ERR_ARG, dspark_cache_seq_add(c, 1, 25, 30, 5));
    OK(dspark_cache_seq_len(c, 0, 1, &len));
    CHECK(len == 30, "a refused seq_add changed layer 0 (len %u)", len);
    EXPECT(DSPARK_ERR_ARG, dspark_cache_seq_add(c, -1, 10, 20, 5)); /* sequence 0 collides */
    OK(dspark_cache_seq_len(c, 0, 0, &len));
    e = attn_vs_ref(c, 0, 0, q, NQ, NULL, sk, sv, 246, &rh, 1);
    CHECK(len == 246 && e < 1e-5, "a refused seq_add changed sequence 0 (len %u, rel err %g)", len, e);
    OK(dspark_cache_seq_add(c, 1, 20, -1, 5));
    OK(dspark_cache_seq_len(c, 1, 1, &len));
    CHECK(len == 55, "len %u after moving a tail up", len);
    OK(dspark_cache_delete(c));

    /* Compressed pages: rows move as stored; the result stays within the format's error. */
    c = make_cache("k4v4", 0, 512, 1, 1);
    OK(dspark_cache_append(c, 0, 0, k, v, 300));
    OK(dspark_cache_seq_rm(c, 0, 4, 4 + 90));
    OK(dspark_cache_seq_add(c, 0, 4 + 90, -1, -90));
    memcpy(rk, k, (size_t)4 * ROW * sizeof *rk);
    memcpy(rv, v, (size_t)4 * ROW * sizeof *rv);
    memcpy(rk + (size_t)4 * ROW, k + (size_t)94 * ROW, (size_t)206 * ROW * sizeof *rk);
    memcpy(rv + (size_t)4 * ROW, v + (size_t)94 * ROW, (size_t)206 * ROW * sizeof *rv);
    dspark_attn_params ap;
    OK(dspark_attn_params_init(&ap));
    ap.scale = 0.25f;
    ref_args rp = default_ref();
    rp.scale = 0.25f;
    e = attn_vs_ref(c, 0, 0, q, NQ, &ap, rk, rv, 210, &rp, 0);
    CHECK(e < 0.25, "k4v4 after a shift rel err %g", e);
    dspark_stats s;
    s.size = sizeof s;
    OK(dspark_cache_stats(c, &s));
    /* Pages 0 (sinks) and 3 (from the partly filled page 4: without a window it is not
     * compressed until full) are f16, K and V. */
    CHECK(s.pages_f16 == 4 && s.pages_compressed == 4, "k4v4 after a shift: %llu f16, %llu compressed pages",
          (unsigned long long)s.pages_f16, (unsigned long long)s.pages_compressed);
    OK(dspark_cache_delete(c));
    free(k); free(v); free(q); free(rk); free(rv); free(sk); free(sv);
}

/* CRC-32 (IEEE, reflected), as the save format uses. */
static uint32_t crc32_ieee(const unsigned char *p, size_t n) {
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int b = 0; b < 8; b++) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
    }
    return ~c;
}

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put32(unsigned char *p, uint32_t x) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(x >> (8 * i));
}

/* Recomputes the trailing CRC, so that only the payload checks can refuse the image. */
static void fix_crc(unsigned char *b, size_t n) { put32(b + n - 4, crc32_ieee(b, n - 4)); }

/* Where the fields of a saved image of 1 layer, 1 sequence are (file-format version 2). */
typedef struct image_map {
    size_t len, n_holes, hole0;    /* the lane */
    size_t n_pages[2];             /* K, V: page count */
    size_t page[2][8], tag[2][8];  /* offsets of each page's index and tag */
    size_t data[2][8], bytes[2][8];
} image_map;

static image_map map_image(const unsigned char *b, size_t n, size_t row_bytes) {
    image_map m;
    memset(&m, 0, sizeof m);
    size_t at = 64;
    m.len = at;
    m.n_holes = at + 4;
    m.hole0 = at + 8;
    at += 8 + 8 * get32(b + m.n_holes);
    for (int s = 0; s < 2; s++) {
        m.n_pages[s] = at;
        uint32_t np = get32(b + at);
        at += 4;
        for (uint32_t i = 0; i < np && i < 8; i++) {
            m.page[s][i] = at;
            m.tag[s][i] = at + 4;
            m.data[s][i] = at + 5;
            m.bytes[s][i] = b[at + 4] == 1 ? (size_t)N_HEAD_KV * 64 * HEAD_DIM * 2 : (size_t)N_HEAD_KV * 64 * row_bytes;
            at += 5 + m.bytes[s][i];
        }
    }
    CHECK(at + 4 == n, "image map: %zu + 4 != %zu", at, n);
    return m;
}

/* Payload checks after the CRC: mutate one field, recompute the CRC, expect a refusal that
 * leaves the target cache as it was. */
static void test_payload_checks(void) {
    /* 1 layer, window 0: page 0 f16 (sinks), pages 1 and 2 (full) compressed; a hole at
     * 70..80. */
    dspark_cache_t *a = make_cache("k4v4", 0, 256, 1, 1);
    float *k = random_rows((size_t)192 * ROW), *v = random_rows((size_t)192 * ROW);
    OK(dspark_cache_append(a, 0, 0, k, v, 192));
    OK(dspark_cache_seq_rm(a, 0, 70, 80));
    size_t n = 0;
    OK(dspark_cache_save_size(a, &n));
    unsigned char *img = malloc(n), *bad = malloc(n);
    OK(dspark_cache_save_mem(a, img, n, NULL));
    const size_t rb = 2 + 2 + 2 * 16; /* k4, head dim 64: scale, 2 multipliers, 2 x 16 code bytes */
    image_map m = map_image(img, n, rb);
    CHECK(get32(img + m.len) == 192 && get32(img + m.n_holes) == 1 && get32(img + m.n_pages[0]) == 3 &&
              img[m.tag[0][0]] == 1 && img[m.tag[0][1]] == 2 && img[m.tag[0][2]] == 2,
          "unexpected image layout");
    /* The target holds other content, and keeps it. */
    dspark_cache_t *d = make_cache("k4v4", 0, 256, 1, 1);
    OK(dspark_cache_append(d, 0, 0, v, k, 100));
    float *q = random_rows((size_t)2 * N_HEAD * HEAD_DIM);
    float before[2 * N_HEAD * HEAD_DIM], after[2 * N_HEAD * HEAD_DIM];
    OK(dspark_cache_attn(d, 0, 0, q, 2, NULL, before));
    /* The image itself, CRC recomputed, loads (the CRC code agrees with the library's). */
    memcpy(bad, img, n);
    fix_crc(bad, n);
    CHECK(memcmp(bad, img, n) == 0, "CRC-32 differs from the library's");

    size_t p1 = m.data[0][1], p0 = m.data[0][0], vp1 = m.data[1][1];
    struct { const char *what; size_t at; int byte; uint32_t word; } cases[] = {
        /* Packed row scales (bf16, high byte at +1): the 0x3b -> 0x7e, and friends. */
        {"K scale high byte 0x7e", p1 + 1, 0x7e, 0},
        {"V scale high byte 0x7e", vp1 + 5 * rb + 1, 0x7e, 0},
        {"scale +inf", p1 + 1, 0x7f, 0x80},
        {"scale negative", p1 + 1, -2, 0},
        {"scale NaN", p1 + 1, 0xff, 0xc0},
        {"multiplier -128", p1 + 2, 0x80, 0},
        {"multiplier -128, last row", m.data[0][2] + (N_HEAD_KV * 64 - 1) * rb + 3, 0x80, 0},
        /* f16 page values. */
        {"f16 +inf", p0 + 1, 0x7c, 0},
        {"f16 NaN", p0 + 2 * 777 + 1, 0x7e, 0},
        {"f16 -inf", m.data[1][0] + 1, 0xfc, 0},
        /* Lengths, holes, counts, indices, tags. */
        {"length above max_tokens", m.len, -1, 257},
        {"length below the pages", m.len, -1, 120},
        {"hole count huge", m.n_holes, -1, 0xffffffffu},
        {"hole count 2", m.n_holes, -1, 2},
        {"hole start after end", m.hole0, -1, 85},
        {"hole end beyond length", m.hole0 + 4, -1, 193},
        {"empty hole", m.hole0 + 4, -1, 70},
        {"page count 4", m.n_pages[0], -1, 4},
        {"page count huge", m.n_pages[0], -1, 0x7fffffffu},
        {"page index repeated", m.page[0][1], -1, 0},
        {"page index beyond length", m.page[0][2], -1, 3},
        {"page tag 0", m.tag[0][1], 0, 0},
        {"page tag 3", m.tag[0][1], 3, 0},
        {"page tag f16 for packed", m.tag[0][1], 1, 0},
        {"page tag packed for f16", m.tag[0][0], 2, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        memcpy(bad, img, n);
        if (cases[i].byte == -1) {
            put32(bad + cases[i].at, cases[i].word);
        } else if (cases[i].byte == -2) {
            bad[cases[i].at] |= 0x80;
        } else {
            bad[cases[i].at] = (unsigned char)cases[i].byte;
            if (cases[i].word) bad[cases[i].at - 1] = (unsigned char)cases[i].word;
        }
        fix_crc(bad, n);
        int st = dspark_cache_load_mem(d, bad, n);
        CHECK(st == DSPARK_ERR_CORRUPT, "%s: %s (%s)", cases[i].what, dspark_status_name(st), dspark_last_error());
    }
    /* Versions: 1 is no longer read, 4 is newer, 0 is not a version. */
    uint32_t versions[] = {1, 4, 0};
    int want[] = {DSPARK_ERR_VERSION, DSPARK_ERR_VERSION, DSPARK_ERR_CORRUPT};
    for (int i = 0; i < 3; i++) {
        memcpy(bad, img, n);
        put32(bad + 8, versions[i]);
        fix_crc(bad, n);
        EXPECT(want[i], dspark_cache_load_mem(d, bad, n));
    }
    OK(dspark_cache_attn(d, 0, 0, q, 2, NULL, after));
    CHECK(memcmp(before, after, sizeof before) == 0, "a refused load changed the cache");
    OK(dspark_cache_load_mem(d, img, n));
    OK(dspark_cache_attn(d, 0, 0, q, 2, NULL, after));
    int finite = 1;
    for (size_t i = 0; i < sizeof after / sizeof *after; i++) finite &= isfinite(after[i]) != 0;
    CHECK(finite, "the intact image gives non-finite attention");
    OK(dspark_cache_delete(a));
    OK(dspark_cache_delete(d));
    free(img); free(bad); free(k); free(v); free(q);
}

static void print_layout(void) {
#define SZ(T) printf("sizeof %s %zu\n", #T, sizeof(T))
#define OF(T, f) printf("offsetof %s.%s %zu\n", #T, #f, offsetof(T, f))
    SZ(dspark_config); OF(dspark_config, format); OF(dspark_config, window);
    OF(dspark_config, kv_budget_bytes); OF(dspark_config, prefetch_depth);
    OF(dspark_config, attn_budget_tokens); OF(dspark_config, attn_dense_layers);
    OF(dspark_config, profile);
    SZ(dspark_stats); OF(dspark_stats, kv_bytes); OF(dspark_stats, pages_f16);
    OF(dspark_stats, pages_compressed); OF(dspark_stats, cells); OF(dspark_stats, elems);
    OF(dspark_stats, bits_per_elem); OF(dspark_stats, compression_ratio); OF(dspark_stats, attn_calls);
    OF(dspark_stats, kv_cold_bytes); OF(dspark_stats, cold_read_bytes); OF(dspark_stats, cold_write_bytes);
    OF(dspark_stats, transfer_busy_s); OF(dspark_stats, compute_wait_s); OF(dspark_stats, hidden_fraction);
    OF(dspark_stats, attended_tokens); OF(dspark_stats, select_s); OF(dspark_stats, prefetch_hit_rate);
    SZ(dspark_cache_params); OF(dspark_cache_params, n_layer); OF(dspark_cache_params, n_head_kv);
    OF(dspark_cache_params, n_head); OF(dspark_cache_params, head_dim);
    OF(dspark_cache_params, max_tokens); OF(dspark_cache_params, n_seq_max);
    OF(dspark_cache_params, format); OF(dspark_cache_params, window); OF(dspark_cache_params, n_threads);
    OF(dspark_cache_params, kv_budget_bytes); OF(dspark_cache_params, profile);
    SZ(dspark_attn_params); OF(dspark_attn_params, scale); OF(dspark_attn_params, max_bias);
    OF(dspark_attn_params, softcap); OF(dspark_attn_params, flags); OF(dspark_attn_params, mask);
    OF(dspark_attn_params, mask_type); OF(dspark_attn_params, mask_stride);
    OF(dspark_attn_params, sinks); OF(dspark_attn_params, n_threads);
    SZ(dspark_mask_type);
#undef SZ
#undef OF
}

/* A cache with a memory budget spills compressed pages to disk, and attention and saves give
 * exactly what a cache without one gives. */
static void test_budget(void) {
    enum { T = 1024 };
    float *k = random_rows((size_t)T * ROW), *v = random_rows((size_t)T * ROW), *q = random_rows(N_HEAD * HEAD_DIM);
    float a[N_HEAD * HEAD_DIM], b[N_HEAD * HEAD_DIM];
    dspark_cache_params p;
    OK(dspark_cache_params_init(&p));
    CHECK(p.kv_budget_bytes == 0, "no budget by default");
    p.n_layer = 1; p.n_head_kv = N_HEAD_KV; p.n_head = N_HEAD; p.head_dim = HEAD_DIM;
    p.max_tokens = T; p.n_threads = 1;
    dspark_cache_t *plain = NULL, *tiered = NULL;
    OK(dspark_cache_new(&p, &plain));
    p.kv_budget_bytes = 1; /* everything that may go cold does */
    OK(dspark_cache_new(&p, &tiered));
    OK(dspark_cache_append(plain, 0, 0, k, v, T));
    OK(dspark_cache_append(tiered, 0, 0, k, v, T));
    dspark_stats sp, st;
    sp.size = st.size = sizeof(dspark_stats);
    OK(dspark_cache_stats(plain, &sp));
    OK(dspark_cache_stats(tiered, &st));
    CHECK(sp.kv_cold_bytes == 0 && st.kv_cold_bytes > 0 && st.kv_bytes < sp.kv_bytes && st.cold_write_bytes >= st.kv_cold_bytes,
          "budget: %llu bytes in RAM, %llu cold", (unsigned long long)st.kv_bytes, (unsigned long long)st.kv_cold_bytes);
    OK(dspark_cache_attn(plain, 0, 0, q, 1, NULL, a));
    OK(dspark_cache_attn(tiered, 0, 0, q, 1, NULL, b));
    CHECK(memcmp(a, b, sizeof a) == 0, "attention under a budget must equal attention without one");
    size_t na = 0, nb = 0;
    OK(dspark_cache_save_size(plain, &na));
    OK(dspark_cache_save_size(tiered, &nb));
    unsigned char *sa = malloc(na), *sb = malloc(nb);
    OK(dspark_cache_save_mem(plain, sa, na, NULL));
    OK(dspark_cache_save_mem(tiered, sb, nb, NULL));
    CHECK(na == nb && memcmp(sa, sb, na) == 0, "a cache under a budget must save the same bytes");
    OK(dspark_cache_stats(tiered, &st));
    CHECK(st.cold_read_bytes > 0, "attention and the save read cold pages back");
    free(sa); free(sb); free(k); free(v); free(q);
    OK(dspark_cache_delete(plain));
    OK(dspark_cache_delete(tiered));
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--layout") == 0) {
        print_layout();
        return 0;
    }
    if (argc != 2) {
        fprintf(stderr, "usage: %s TMPDIR | --layout\n", argv[0]);
        return 2;
    }
    test_version();
    test_create_errors();
    test_attention_f16();
    test_attention_packed("k8v8", 0.02, 8.5);
    test_attention_packed("k4v4", 0.25, 4.5);
    test_attention_packed("k4v2", 0.6, 3.5); /* K 4.5, V 2.5 */
    test_sequences();
    test_persistence(argv[1]);
    test_save_size();
    test_handles();
    test_threads();
    test_register();
    test_saturation();
    test_stats_sizes();
    test_huge_empty();
    test_seq_add();
    test_payload_checks();
    test_budget();
    printf("%d checks, %d failures\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
