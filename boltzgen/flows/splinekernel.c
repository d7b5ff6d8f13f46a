/* The fused rational-quadratic spline of boltzgen's spline layers (see fused_spline.py).
 *
 * One call transforms every element of a [rows, n] block: n_lin linear dims (a spline on
 * [-tail, tail] with slope 1 at both ends and the identity outside) and then n_circ circular dims
 * (a spline of [-pi, pi] onto itself whose end slopes are equal). Each element's raw parameters are
 * read from its row of `params` ([rows, P], P = n_lin (3K - 1) + n_circ 3K): K bin widths and K bin
 * heights through a softmax, and the knot slopes through min_derivative + softplus(raw + offset),
 * exactly as SplineSettings in transforms.py, which stays the reference (and the CUDA path).
 *
 * rqs_forward writes the outputs and the per-row sum of log-slopes and, given a cache buffer
 * (rqs_cache_len elements of the storage type), the forward quantities the gradients need (the
 * softmaxes, the chosen bin, its knots and slopes, xi); rqs_backward reads them back and returns
 * the vector-Jacobian products for the inputs and the raw parameters without re-running the
 * forward pass (exp, log and the bin search were half of its time).
 *
 * The arithmetic is in the storage type (float or double; is_double selects), as the torch code
 * does: a float lane block is 16 wide, twice a double one, and float exp/log are cheaper.
 *
 * Elements are processed in lane blocks of W consecutive rows at one dim j, in structure-of-arrays
 * form, every loop over the lanes branch-free, so that the compiler vectorizes them: the per-element
 * control flow of a scalar loop (bin search, slope choice, tails) cost more than the arithmetic.
 * The lanes of a block share a dim, hence its kind (linear or circular) and parameter layout, so no
 * lane idles at a kind boundary and the per-row log-det sums stay in lanes.
 * Returns 0, or -1 when K is out of range.
 *
 * The file includes itself twice (RQS_REAL set to double, then float) to instantiate the body below
 * for both storage types from one source, which native_build compiles as a single file.
 */
#ifndef RQS_REAL
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef RQS_LIBMVEC
/* glibc's vector math (libmvec): declaring the simd variants lets the lane loops below vectorize
 * (exp is inline, see exp_neg_f64). */
extern double log(double) __attribute__((simd("notinbranch")));
extern float logf(float) __attribute__((simd("notinbranch")));
#endif

/* Plain comparisons rather than fmax/fmin, whose NaN rules make them library calls that block
 * vectorization; NaN inputs are passed through separately. */
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX_BINS 32
/* Cached per element: the two softmaxes (2K) and the RQS_BIN_FIELDS reals of bin_t. */
#define RQS_BIN_FIELDS 10
#define LANES for (int w = 0; w < W; w++)

typedef struct {
    int64_t K;
    double tail, min_w, min_h, min_d, offset;
} settings_t;

/* e^x for x <= 0 (NaN stays NaN), inline so that the lane loops need no library call (a vector
 * call spills every live register, and the softmaxes take 2K exps per element, most of the
 * kernel's time). Range reduction x = n ln2 + r, |r| <= ln2 / 2, then a polynomial in r and 2^n
 * from the exponent bits; inputs below the smallest normal result are raised to it (under 1e-37
 * beside the softmax's largest term, 1). Double: Taylor to r^12, under 2e-16 relative; float:
 * Cephes' expf polynomial, about 1 ulp. */
static inline double exp_neg_f64(double x) {
    const double shift = 6755399441055744.0; /* 1.5 2^52: adding it rounds to an integer */
    x = x < -708.0 ? -708.0 : x;
    double t = x * 1.4426950408889634 + shift, n = t - shift;
    double r = x - n * 0.6931471803691238 - n * 1.9082149292705877e-10;
    double p = 1.0 / 479001600.0;
    static const double inv_fact[12] = {1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
                                        1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0};
    for (int i = 0; i < 12; i++) p = p * r + inv_fact[i];
    n = n == n ? n : 0.0; /* NaN: no integer conversion of it; p carries the NaN */
    int64_t bits = ((int64_t)n + 1023) << 52;
    double scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float exp_neg_f32(float x) {
    const float shift = 12582912.0f; /* 1.5 2^23 */
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.44269504f + shift, n = t - shift;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    n = n == n ? n : 0.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static int64_t param_offset(int64_t j, int64_t n_lin, int64_t K) {
    return j < n_lin ? j * (3 * K - 1) : n_lin * (3 * K - 1) + (j - n_lin) * 3 * K;
}

static int check(const settings_t *st) { return st->K < 2 || st->K > MAX_BINS ? -1 : 0; }

#define RQS_REAL double
#define W 8
#define FN(name) name##_f64
#define EXP_NEG exp_neg_f64
#define LOG log
#define SQRT sqrt
#define FABS fabs
#include __FILE__
#undef RQS_REAL
#undef W
#undef FN
#undef EXP_NEG
#undef LOG
#undef SQRT
#undef FABS

#define RQS_REAL float
#define W 16
#define FN(name) name##_f32
#define EXP_NEG exp_neg_f32
#define LOG logf
#define SQRT sqrtf
#define FABS fabsf
#include __FILE__

/* Reals in the cache of a [rows, n] call with K bins (the float lane blocks are wider). */
int64_t rqs_cache_len(int64_t rows, int64_t n, int64_t K, int is_double) {
    int64_t lanes = is_double ? 8 : 16;
    return (rows + lanes - 1) / lanes * n * (2 * K + RQS_BIN_FIELDS) * lanes;
}

int rqs_forward(int64_t rows, int64_t n, int64_t n_lin, int64_t P, const settings_t *st, int inverse, int is_double,
                const void *v, const void *params, void *out, void *logdet, void *cache) {
    if (check(st)) return -1;
    if (is_double)
        forward_f64(rows, n, n_lin, P, st, inverse, v, params, out, logdet, cache);
    else
        forward_f32(rows, n, n_lin, P, st, inverse, v, params, out, logdet, cache);
    return 0;
}

int rqs_backward(int64_t rows, int64_t n, int64_t n_lin, int64_t P, const settings_t *st, int inverse,
                 int is_double, const void *v, const void *cache, const void *grad_out, const void *grad_logdet,
                 void *grad_v, void *grad_params) {
    if (check(st)) return -1;
    if (is_double)
        backward_f64(rows, n, n_lin, P, st, inverse, v, cache, grad_out, grad_logdet, grad_v, grad_params);
    else
        backward_f32(rows, n, n_lin, P, st, inverse, v, cache, grad_out, grad_logdet, grad_v, grad_params);
    return 0;
}

#else /* RQS_REAL: the body, instantiated once per storage type */

#define real RQS_REAL
#define R(x) ((real)(x))

/* The chosen bin of each lane and what the gradients need of it (cached between the passes).
 * Indices are kept as reals so that every lane array has the width of the arithmetic. */
typedef struct {
    real idx[W];                                 /* the bin */
    real xk[W], wk[W], yk[W], hk[W], dk[W], dk1[W];
    real dr[2][W];                               /* d slope / d raw of the bin's two slopes (0 if fixed) */
    real xi[W];
} FN(bin_t);

/* One lane block: W rows at one dim, their splines and the chosen bin of each. */
typedef struct {
    real x[W], xc[W];                            /* input, and input clamped into the domain */
    real raw[3 * MAX_BINS][W];                   /* raw parameters, one row per parameter */
    real sm[2][MAX_BINS][W];                     /* softmax of the widths (0) and heights (1) */
    real c[2][MAX_BINS + 1][W];                  /* cumulative bin sizes */
    real k[2][MAX_BINS + 1][W];                  /* knots: x (0) and y (1) */
    real rrow[2][W];                             /* raw rows of the bin's two slopes (-1 if fixed) */
    FN(bin_t) bin;
    real out[W], ld[W];
} FN(block_t);

_Static_assert(sizeof(FN(bin_t)) == RQS_BIN_FIELDS * W * sizeof(real), "bin_t is RQS_BIN_FIELDS lane rows");

/* Loads the block of rows [r0, r0 + count) (other lanes: zeros) at dim j: inputs and raw parameters. */
static void FN(load_block)(FN(block_t) *b, int64_t n_raw, real bound, int64_t count, const real *v, int64_t n,
                           const real *params, int64_t P) {
    for (int w = 0; w < count; w++) {
        b->x[w] = v[w * n];
        for (int64_t i = 0; i < n_raw; i++) b->raw[i][w] = params[w * P + i];
    }
    for (int w = (int)count; w < W; w++) {
        b->x[w] = R(0);
        for (int64_t i = 0; i < n_raw; i++) b->raw[i][w] = R(0);
    }
    LANES b->xc[w] = MIN(MAX(b->x[w], -bound), bound);
}

/* Cumulative bin sizes from the softmax (shared by both passes, so that they agree bit for bit). */
static void FN(cumulate)(FN(block_t) *b, int64_t K, int which, real min_size) {
    real share = R(1) - (real)K * min_size;
    LANES b->c[which][0][w] = R(0);
    for (int64_t i = 0; i < K; i++) LANES b->c[which][i + 1][w] = b->c[which][i][w] + (min_size + share * b->sm[which][i][w]);
}

/* Softmax rows [first, first + K) -> bin sizes -> cumulative sums -> knots on [-bound, bound]. */
static void FN(sizes_and_knots)(FN(block_t) *b, int64_t K, int which, int64_t first, real min_size, real bound) {
    real m[W], s[W], scale[W];
    LANES m[w] = b->raw[first][w];
    for (int64_t i = 1; i < K; i++) LANES m[w] = MAX(m[w], b->raw[first + i][w]);
    LANES s[w] = R(0);
    for (int64_t i = 0; i < K; i++) LANES {
        b->sm[which][i][w] = EXP_NEG(b->raw[first + i][w] - m[w]);
        s[w] += b->sm[which][i][w];
    }
    LANES s[w] = R(1) / s[w];
    for (int64_t i = 0; i < K; i++) LANES b->sm[which][i][w] *= s[w];
    FN(cumulate)(b, K, which, min_size);
    LANES scale[w] = R(2) * bound / b->c[which][K][w];
    for (int64_t i = 0; i <= K; i++) LANES b->k[which][i][w] = -bound + scale[w] * b->c[which][i][w];
    LANES {
        b->k[which][0][w] = -bound;
        b->k[which][K][w] = bound;
    }
}

/* The raw rows of the slopes at the bin's two knots (linear: fixed slope 1 at both ends). */
static void FN(slope_rows)(FN(block_t) *b, int64_t K, int circular) {
    int64_t n_rows = circular ? K : K - 1;
    real k = (real)K, first = (real)(2 * K), last = (real)n_rows;
    for (int e = 0; e < 2; e++) LANES {
        real knot = b->bin.idx[w] + (real)e;
        real row = circular ? (knot == k ? R(0) : knot) : knot - R(1);
        b->rrow[e][w] = (row >= R(0) && row < last) ? first + row : R(-1);
    }
}

/* The slope at knot e (0: the bin's left, 1: its right) of each lane, and d slope / d raw. */
static void FN(slopes)(FN(block_t) *b, const settings_t *st, int circular, int e, real *d) {
    int64_t K = st->K, n_rows = circular ? K : K - 1;
    real r[W], offset = (real)st->offset, min_d = (real)st->min_d;
    LANES r[w] = R(0);
    for (int64_t i = 0; i < n_rows; i++) LANES {
        real value = b->raw[2 * K + i][w]; /* loaded in every lane: a blend, not a masked load */
        r[w] = b->rrow[e][w] == (real)(2 * K + i) ? value : r[w];
    }
    LANES {
        real a = r[w] + offset, ea = EXP_NEG(-FABS(a));
        real sp = MAX(a, R(0)) + LOG(R(1) + ea), sg = (a >= R(0) ? R(1) : ea) / (R(1) + ea);
        int fixed = b->rrow[e][w] < R(0);
        d[w] = fixed ? R(1) : min_d + sp;
        b->bin.dr[e][w] = fixed ? R(0) : sg;
    }
}

/* The bin of each lane and its knots, widths and heights. */
static void FN(choose_bin)(FN(block_t) *b, int64_t K, int inverse) {
    int from = inverse ? 1 : 0;
    FN(bin_t) *q = &b->bin;
    LANES q->idx[w] = R(0);
    for (int64_t i = 1; i < K; i++) LANES q->idx[w] += b->k[from][i][w] <= b->xc[w] ? R(1) : R(0);
    LANES q->xk[w] = q->wk[w] = q->yk[w] = q->hk[w] = R(0);
    for (int64_t i = 0; i < K; i++) LANES {
        real x0 = b->k[0][i][w], x1 = b->k[0][i + 1][w], y0 = b->k[1][i][w], y1 = b->k[1][i + 1][w];
        int here = q->idx[w] == (real)i;
        q->xk[w] = here ? x0 : q->xk[w];
        q->wk[w] = here ? x1 - x0 : q->wk[w];
        q->yk[w] = here ? y0 : q->yk[w];
        q->hk[w] = here ? y1 - y0 : q->hk[w];
    }
}

/* The whole forward pass of a block: splines, bins, outputs and log-slopes (tails and NaN not applied). */
static void FN(evaluate)(FN(block_t) *b, const settings_t *st, int circular, int inverse) {
    int64_t K = st->K;
    real bound = circular ? (real)M_PI : (real)st->tail;
    FN(bin_t) *q = &b->bin;
    FN(sizes_and_knots)(b, K, 0, 0, (real)st->min_w, bound);
    FN(sizes_and_knots)(b, K, 1, K, (real)st->min_h, bound);
    FN(choose_bin)(b, K, inverse);
    FN(slope_rows)(b, K, circular);
    FN(slopes)(b, st, circular, 0, q->dk);
    FN(slopes)(b, st, circular, 1, q->dk1);
    if (inverse) {
        LANES {
            real s = q->hk[w] / q->wk[w], c = q->dk1[w] + q->dk[w] - R(2) * s, t = b->xc[w] - q->yk[w];
            real a = q->hk[w] * (s - q->dk[w]) + t * c, bb = q->hk[w] * q->dk[w] - t * c, cc = -s * t;
            real disc = MAX(bb * bb - R(4) * a * cc, R(0));
            q->xi[w] = MIN(MAX((R(2) * cc) / (-bb - SQRT(disc)), R(0)), R(1));
        }
    } else {
        LANES q->xi[w] = MIN(MAX((b->xc[w] - q->xk[w]) / q->wk[w], R(0)), R(1));
    }
    real sign = inverse ? R(-1) : R(1);
    LANES {
        real xi = q->xi[w], s = q->hk[w] / q->wk[w], c = q->dk1[w] + q->dk[w] - R(2) * s;
        real qq = xi * (R(1) - xi), den = s + c * qq;
        real n2 = q->dk1[w] * xi * xi + R(2) * s * qq + q->dk[w] * (R(1) - xi) * (R(1) - xi);
        real forward = q->yk[w] + q->hk[w] * (s * xi * xi + q->dk[w] * qq) / den, backward = q->xk[w] + xi * q->wk[w];
        b->out[w] = inverse ? backward : forward;
        b->ld[w] = sign * LOG(s * s * n2 / (den * den));
    }
}

static __thread FN(block_t) FN(scratch);

/* Rows [r0, r0 + W) at a time, dim by dim; see rqs_forward. */
static void FN(forward)(int64_t rows, int64_t n, int64_t n_lin, int64_t P, const settings_t *st, int inverse,
                        const real *v, const real *params, real *out, real *logdet, real *cache) {
    int64_t K = st->K, per_block = (2 * K + RQS_BIN_FIELDS) * W;
    FN(block_t) *b = &FN(scratch);
    real tail = (real)st->tail;
    for (int64_t r0 = 0; r0 < rows; r0 += W) {
        int64_t count = rows - r0 < W ? rows - r0 : W;
        real total[W];
        LANES total[w] = R(0);
        for (int64_t j = 0; j < n; j++) {
            int circular = j >= n_lin;
            real bound = circular ? (real)M_PI : tail;
            FN(load_block)(b, circular ? 3 * K : 3 * K - 1, bound, count, v + r0 * n + j, n,
                           params + r0 * P + param_offset(j, n_lin, K), P);
            FN(evaluate)(b, st, circular, inverse);
            LANES {
                real x = b->x[w];
                int nan = x != x, through = nan || (!circular && FABS(x) > tail);
                b->out[w] = through ? x : b->out[w];
                total[w] += through ? (nan ? x : R(0)) : b->ld[w];
            }
            for (int w = 0; w < count; w++) out[(r0 + w) * n + j] = b->out[w];
            if (cache) {
                real *at = cache + (r0 / W * n + j) * per_block;
                memcpy(at, b->sm[0], sizeof(real) * K * W);
                memcpy(at + K * W, b->sm[1], sizeof(real) * K * W);
                memcpy(at + 2 * K * W, &b->bin, sizeof b->bin);
            }
        }
        for (int w = 0; w < count; w++) logdet[r0 + w] = total[w];
    }
}

/* Gradients at fixed xi of y - yk (seed gy) and of the forward log-slope (seed gl), lane by lane. */
static void FN(rq_vjp)(const FN(bin_t) *q, const real *gy, const real *gl, FN(bin_t) *g) {
    LANES {
        real xi = q->xi[w], hk = q->hk[w], wk = q->wk[w], dk = q->dk[w], dk1 = q->dk1[w];
        real s = hk / wk, qq = xi * (R(1) - xi), c = dk1 + dk - R(2) * s;
        real A = s * xi * xi + dk * qq, den = s + c * qq;
        real n2 = dk1 * xi * xi + R(2) * s * qq + dk * (R(1) - xi) * (R(1) - xi);
        real gA = gy[w] * hk / den, gden = -gy[w] * hk * A / (den * den) - R(2) * gl[w] / den, gn2 = gl[w] / n2;
        real gc = gden * qq;
        real gs = R(2) * gl[w] / s + gA * xi * xi + gden + gn2 * R(2) * qq - R(2) * gc;
        real gq = gA * dk + gden * c + gn2 * R(2) * s;
        g->xi[w] += gA * R(2) * s * xi + gn2 * (R(2) * dk1 * xi - R(2) * dk * (R(1) - xi)) + gq * (R(1) - R(2) * xi);
        g->yk[w] += gy[w];
        g->hk[w] += gy[w] * A / den + gs / wk;
        g->wk[w] += -gs * hk / (wk * wk);
        g->dk[w] += gA * qq + gn2 * (R(1) - xi) * (R(1) - xi) + gc;
        g->dk1[w] += gn2 * xi * xi + gc;
    }
}

/* d(out, ld)/d(bin quantities and input) for upstream (go, gl): fills g (xk in gxk) and gx. */
static void FN(bin_grads)(const FN(block_t) *b, int inverse, const real *go, const real *gl, FN(bin_t) *g,
                          real *gxk, real *gx) {
    const FN(bin_t) *q = &b->bin;
    real zero[W] = {0}, seed[W];
    memset(g, 0, sizeof *g);
    if (inverse) {
        /* xi solves y(xi) = x: implicit differentiation, dxi = (dx - dy/dtheta dtheta) / (dy/dxi). */
        LANES seed[w] = -gl[w];
        FN(rq_vjp)(q, zero, seed, g);
        LANES {
            real xi = q->xi[w], s = q->hk[w] / q->wk[w], qq = xi * (R(1) - xi), c = q->dk1[w] + q->dk[w] - R(2) * s;
            real den = s + c * qq, n2 = q->dk1[w] * xi * xi + R(2) * s * qq + q->dk[w] * (R(1) - xi) * (R(1) - xi);
            real gxi = g->xi[w] + go[w] * q->wk[w], slope = q->wk[w] * s * s * n2 / (den * den);
            gxk[w] = go[w];
            g->wk[w] += go[w] * xi;
            gx[w] = gxi / slope;
            seed[w] = -gxi / slope;
        }
        FN(rq_vjp)(q, seed, zero, g);
    } else {
        FN(rq_vjp)(q, go, gl, g);
        LANES {
            real t = (b->xc[w] - q->xk[w]) / q->wk[w], gt = (t >= R(0) && t <= R(1)) ? g->xi[w] : R(0);
            gxk[w] = -gt / q->wk[w];
            g->wk[w] -= gt * t / q->wk[w];
            gx[w] = gt / q->wk[w];
        }
    }
}

/* Gradients of the raw parameters ([rows][W], into graw) from those of the bin quantities. */
static void FN(param_grads)(const FN(block_t) *b, const settings_t *st, int circular, const FN(bin_t) *g,
                            const real *gxk, real graw[][W]) {
    int64_t K = st->K, n_rows = circular ? K : K - 1;
    const FN(bin_t) *q = &b->bin;
    real bound = circular ? (real)M_PI : (real)st->tail, mins[2] = {(real)st->min_w, (real)st->min_h};
    for (int which = 0; which < 2; which++) {
        real gk[MAX_BINS + 1][W], gc[MAX_BINS + 1][W], gcK[W], acc[W], dot[W], share = R(1) - (real)K * mins[which];
        real lo[W], len[W]; /* copied first: selecting the source arrays per lane blocked vectorization */
        LANES {
            len[w] = which ? g->hk[w] : g->wk[w];
            lo[w] = (which ? g->yk[w] : gxk[w]) - len[w];
        }
        for (int64_t i = 0; i <= K; i++) {
            real here = (real)i, before = (real)(i - 1);
            LANES gk[i][w] = (q->idx[w] == here ? lo[w] : R(0)) + (q->idx[w] == before ? len[w] : R(0));
        }
        /* k[i] = -bound + 2 bound c[i] / c[K] for 0 < i < K; the end knots are constants. */
        LANES gcK[w] = R(0);
        for (int64_t i = 1; i < K; i++) LANES {
            real cK = b->c[which][K][w], gf = R(2) * bound * gk[i][w];
            gc[i][w] = gf / cK;
            gcK[w] -= gf * b->c[which][i][w] / (cK * cK);
        }
        LANES {
            gc[K][w] = gcK[w];
            acc[w] = R(0);
            dot[w] = R(0);
        }
        /* c[i] sums the sizes before i: a size's gradient sums gc from its index on; then the softmax. */
        for (int64_t i = K; i >= 1; i--) LANES {
            acc[w] += gc[i][w];
            graw[which * K + i - 1][w] = share * acc[w];
            dot[w] += b->sm[which][i - 1][w] * graw[which * K + i - 1][w];
        }
        for (int64_t i = 0; i < K; i++) LANES graw[which * K + i][w] = b->sm[which][i][w] * (graw[which * K + i][w] - dot[w]);
    }
    for (int64_t i = 0; i < n_rows; i++) LANES {
        real row = (real)(2 * K + i);
        graw[2 * K + i][w] = (b->rrow[0][w] == row ? g->dk[w] * q->dr[0][w] : R(0))
                             + (b->rrow[1][w] == row ? g->dk1[w] * q->dr[1][w] : R(0));
    }
}

/* Restores what the gradients need of block (r0, j) from the cache, and the inputs from v. */
static void FN(restore)(FN(block_t) *b, const settings_t *st, int circular, const real *at, int64_t count,
                        const real *v, int64_t n) {
    int64_t K = st->K;
    real bound = circular ? (real)M_PI : (real)st->tail;
    memcpy(b->sm[0], at, sizeof(real) * K * W);
    memcpy(b->sm[1], at + K * W, sizeof(real) * K * W);
    memcpy(&b->bin, at + 2 * K * W, sizeof b->bin);
    FN(cumulate)(b, K, 0, (real)st->min_w);
    FN(cumulate)(b, K, 1, (real)st->min_h);
    FN(slope_rows)(b, K, circular);
    for (int w = 0; w < W; w++) b->x[w] = w < count ? v[w * n] : R(0);
    LANES b->xc[w] = MIN(MAX(b->x[w], -bound), bound);
}

/* Rows [r0, r0 + W) at a time, dim by dim, from the forward pass's cache; see rqs_backward. */
static void FN(backward)(int64_t rows, int64_t n, int64_t n_lin, int64_t P, const settings_t *st, int inverse,
                         const real *v, const real *cache, const real *grad_out, const real *grad_logdet,
                         real *grad_v, real *grad_params) {
    int64_t K = st->K, per_block = (2 * K + RQS_BIN_FIELDS) * W;
    FN(block_t) *b = &FN(scratch);
    static __thread real graw[3 * MAX_BINS][W];
    for (int64_t r0 = 0; r0 < rows; r0 += W) {
        int64_t count = rows - r0 < W ? rows - r0 : W;
        real gl[W], go[W], gx[W], gxk[W];
        for (int w = 0; w < W; w++) gl[w] = w < count ? grad_logdet[r0 + w] : R(0);
        for (int64_t j = 0; j < n; j++) {
            int circular = j >= n_lin;
            int64_t at = r0 * P + param_offset(j, n_lin, K), n_raw = circular ? 3 * K : 3 * K - 1;
            real bound = circular ? (real)M_PI : (real)st->tail;
            FN(restore)(b, st, circular, cache + (r0 / W * n + j) * per_block, count, v + r0 * n + j, n);
            for (int w = 0; w < W; w++) go[w] = w < count ? grad_out[(r0 + w) * n + j] : R(0);
            FN(bin_t) g;
            FN(bin_grads)(b, inverse, go, gl, &g, gxk, gx);
            FN(param_grads)(b, st, circular, &g, gxk, graw);
            real keep[W];
            LANES {
                real x = b->x[w];
                int nan = x != x, through = nan || (!circular && FABS(x) > (real)st->tail);
                int inside = x >= -bound && x <= bound; /* a clamped input has no gradient */
                gx[w] = through ? (nan ? x : go[w]) : (inside ? gx[w] : R(0));
                keep[w] = through ? R(0) : R(1);
            }
            for (int64_t i = 0; i < n_raw; i++) LANES graw[i][w] *= keep[w];
            for (int w = 0; w < count; w++) {
                grad_v[(r0 + w) * n + j] = gx[w];
                real *gp = grad_params + at + w * P;
                for (int64_t i = 0; i < n_raw; i++) gp[i] = graw[i][w];
            }
        }
    }
}

#undef R
#undef real
#endif /* RQS_REAL */
