/* The fused rational-quadratic spline of boltzgen's spline layers (see fused_spline.py).
 *
 * One call transforms every element of a [rows, n] block: n_lin linear dims (a spline on
 * [-tail, tail] with slope 1 at both ends and the identity outside) and then n_circ circular dims
 * (a spline of [-pi, pi] onto itself whose end slopes are equal). Each element's raw parameters are
 * read from its row of `params` ([rows, P], P = n_lin (3K - 1) + n_circ 3K): K bin widths and K bin
 * heights through a softmax, and the knot slopes through min_derivative + softplus(raw + offset),
 * exactly as SplineSettings in transforms.py, which stays the reference (and the CUDA path).
 *
 * rqs_forward writes the outputs and the per-row sum of log-slopes; rqs_backward recomputes the
 * forward pass and returns the vector-Jacobian products for the inputs and the raw parameters.
 * Arithmetic is in double whatever the storage (is_double selects float or double arrays).
 *
 * Elements are processed in lanes of W of one kind (linear or circular) in structure-of-arrays
 * form, every loop over the lanes branch-free, so that the compiler vectorizes them: the per-element
 * control flow of a scalar loop (bin search, slope choice, tails) cost more than the arithmetic.
 * Returns 0, or -1 when K is out of range.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef RQS_LIBMVEC
/* glibc's vector math (libmvec): declaring the simd variants lets the lane loops below vectorize. */
extern double log(double) __attribute__((simd("notinbranch")));
extern double exp(double) __attribute__((simd("notinbranch")));
#endif

/* Plain comparisons rather than fmax/fmin, whose NaN rules make them library calls that block
 * vectorization; NaN inputs are passed through separately (passes_through). */
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX_BINS 32
#define W 8
#define LANES for (int w = 0; w < W; w++)

typedef struct {
    int64_t K;
    double tail, min_w, min_h, min_d, offset;
} settings_t;

/* One lane block: W elements of one kind, their splines and the chosen bin of each. */
typedef struct {
    double x[W], xc[W];                          /* input, and input clamped into the domain */
    double raw[3 * MAX_BINS][W];                 /* raw parameters, one row per parameter */
    double sm[2][MAX_BINS][W];                   /* softmax of the widths (0) and heights (1) */
    double c[2][MAX_BINS + 1][W];                /* cumulative bin sizes */
    double k[2][MAX_BINS + 1][W];                /* knots: x (0) and y (1) */
    int64_t idx[W];                              /* the bin */
    double xk[W], wk[W], yk[W], hk[W], dk[W], dk1[W];
    double dr[2][W];                             /* d slope / d raw of the bin's two slopes (0 if fixed) */
    int64_t rrow[2][W];                          /* their raw rows (-1 if fixed) */
    double xi[W], out[W], ld[W];
} block_t;

static inline double load(const void *p, int64_t i, int is_double) {
    return is_double ? ((const double *)p)[i] : (double)((const float *)p)[i];
}

static inline void store(void *p, int64_t i, double v, int is_double) {
    if (is_double)
        ((double *)p)[i] = v;
    else
        ((float *)p)[i] = (float)v;
}

/* Loads `count` elements (rest: zeros) starting at element j0 of row r. */
static void load_block(block_t *b, const settings_t *st, int circular, int64_t count, const void *v, int64_t v_at,
                       const void *params, int64_t p_at, int is_double) {
    int64_t K = st->K, n_raw = circular ? 3 * K : 3 * K - 1;
    double bound = circular ? M_PI : st->tail;
    for (int w = 0; w < W; w++) {
        int ok = w < count;
        b->x[w] = ok ? load(v, v_at + w, is_double) : 0.0;
        for (int64_t i = 0; i < n_raw; i++) b->raw[i][w] = ok ? load(params, p_at + w * n_raw + i, is_double) : 0.0;
    }
    LANES b->xc[w] = MIN(MAX(b->x[w], -bound), bound);
}

/* Softmax rows [first, first + K) -> bin sizes -> cumulative sums -> knots on [-bound, bound]. */
static void sizes_and_knots(block_t *b, const settings_t *st, int which, int64_t first, double min_size,
                            double bound) {
    int64_t K = st->K;
    double m[W], s[W], scale[W];
    LANES m[w] = b->raw[first][w];
    for (int64_t i = 1; i < K; i++) LANES m[w] = MAX(m[w], b->raw[first + i][w]);
    LANES s[w] = 0.0;
    for (int64_t i = 0; i < K; i++) LANES {
        b->sm[which][i][w] = exp(b->raw[first + i][w] - m[w]);
        s[w] += b->sm[which][i][w];
    }
    LANES b->c[which][0][w] = 0.0;
    for (int64_t i = 0; i < K; i++) LANES {
        b->sm[which][i][w] /= s[w];
        b->c[which][i + 1][w] = b->c[which][i][w] + (min_size + (1.0 - K * min_size) * b->sm[which][i][w]);
    }
    LANES scale[w] = 2.0 * bound / b->c[which][K][w];
    for (int64_t i = 0; i <= K; i++) LANES b->k[which][i][w] = -bound + scale[w] * b->c[which][i][w];
    LANES {
        b->k[which][0][w] = -bound;
        b->k[which][K][w] = bound;
    }
}

/* The slope at knot `knot` ([W]) of each lane, from its raw row (linear: 1 at both ends). */
static void slopes(block_t *b, const settings_t *st, int circular, const int64_t *knot, int e, double *d) {
    int64_t K = st->K, n_rows = circular ? K : K - 1;
    double r[W];
    LANES {
        int64_t row = circular ? (knot[w] == K ? 0 : knot[w]) : knot[w] - 1;
        b->rrow[e][w] = (row >= 0 && row < n_rows) ? 2 * K + row : -1;
        r[w] = 0.0;
    }
    for (int64_t i = 0; i < n_rows; i++) LANES {
        double value = b->raw[2 * K + i][w]; /* loaded in every lane: a blend, not a masked load */
        r[w] = b->rrow[e][w] == 2 * K + i ? value : r[w];
    }
    LANES {
        double a = r[w] + st->offset, ea = exp(-fabs(a));
        double sp = MAX(a, 0.0) + log(1.0 + ea), sg = (a >= 0.0 ? 1.0 : ea) / (1.0 + ea);
        int fixed = b->rrow[e][w] < 0;
        d[w] = fixed ? 1.0 : st->min_d + sp;
        b->dr[e][w] = fixed ? 0.0 : sg;
    }
}

/* The whole forward pass of a block: splines, bins, outputs and log-slopes (tails and NaN not applied). */
static void evaluate(block_t *b, const settings_t *st, int circular, int inverse) {
    int64_t K = st->K;
    double bound = circular ? M_PI : st->tail;
    sizes_and_knots(b, st, 0, 0, st->min_w, bound);
    sizes_and_knots(b, st, 1, K, st->min_h, bound);
    int from = inverse ? 1 : 0;
    LANES b->idx[w] = 0;
    for (int64_t i = 1; i < K; i++) LANES b->idx[w] += b->k[from][i][w] <= b->xc[w];
    LANES b->xk[w] = b->wk[w] = b->yk[w] = b->hk[w] = 0.0;
    for (int64_t i = 0; i < K; i++) LANES {
        double x0 = b->k[0][i][w], x1 = b->k[0][i + 1][w], y0 = b->k[1][i][w], y1 = b->k[1][i + 1][w];
        int here = b->idx[w] == i;
        b->xk[w] = here ? x0 : b->xk[w];
        b->wk[w] = here ? x1 - x0 : b->wk[w];
        b->yk[w] = here ? y0 : b->yk[w];
        b->hk[w] = here ? y1 - y0 : b->hk[w];
    }
    int64_t next[W];
    LANES next[w] = b->idx[w] + 1;
    slopes(b, st, circular, b->idx, 0, b->dk);
    slopes(b, st, circular, next, 1, b->dk1);
    if (inverse) {
        LANES {
            double s = b->hk[w] / b->wk[w], c = b->dk1[w] + b->dk[w] - 2.0 * s, t = b->xc[w] - b->yk[w];
            double a = b->hk[w] * (s - b->dk[w]) + t * c, bb = b->hk[w] * b->dk[w] - t * c, cc = -s * t;
            double disc = MAX(bb * bb - 4.0 * a * cc, 0.0);
            b->xi[w] = MIN(MAX((2.0 * cc) / (-bb - sqrt(disc)), 0.0), 1.0);
        }
    } else {
        LANES b->xi[w] = MIN(MAX((b->xc[w] - b->xk[w]) / b->wk[w], 0.0), 1.0);
    }
    double sign = inverse ? -1.0 : 1.0;
    LANES {
        double xi = b->xi[w], s = b->hk[w] / b->wk[w], c = b->dk1[w] + b->dk[w] - 2.0 * s;
        double q = xi * (1.0 - xi), den = s + c * q;
        double n2 = b->dk1[w] * xi * xi + 2.0 * s * q + b->dk[w] * (1.0 - xi) * (1.0 - xi);
        double forward = b->yk[w] + b->hk[w] * (s * xi * xi + b->dk[w] * q) / den, backward = b->xk[w] + xi * b->wk[w];
        b->out[w] = inverse ? backward : forward;
        b->ld[w] = sign * log(s * s * n2 / (den * den));
    }
}

static int64_t param_offset(int64_t j, int64_t n_lin, int64_t K) {
    return j < n_lin ? j * (3 * K - 1) : n_lin * (3 * K - 1) + (j - n_lin) * 3 * K;
}

static int check(const settings_t *st) { return st->K < 2 || st->K > MAX_BINS ? -1 : 0; }

/* Elements in the lane block that starts at element j: at most W, all of one kind. */
static inline int64_t block_count(int64_t j, int64_t n, int64_t n_lin) {
    int64_t end = j >= n_lin ? n : n_lin;
    return end - j < W ? end - j : W;
}

/* Whether the element keeps its input: NaN, or a linear element in the identity tails. */
static inline int passes_through(double x, int circular, double tail) {
    return isnan(x) || (!circular && fabs(x) > tail);
}

int rqs_forward(int64_t rows, int64_t n, int64_t n_lin, int64_t P, const settings_t *st, int inverse, int is_double,
                const void *v, const void *params, void *out, void *logdet) {
    if (check(st)) return -1;
    static __thread block_t b;
    for (int64_t r = 0; r < rows; r++) {
        double total = 0.0;
        for (int64_t j = 0, count; j < n; j += count) {
            int circular = j >= n_lin;
            count = block_count(j, n, n_lin);
            load_block(&b, st, circular, count, v, r * n + j, params, r * P + param_offset(j, n_lin, st->K), is_double);
            evaluate(&b, st, circular, inverse);
            for (int w = 0; w < count; w++) {
                int through = passes_through(b.x[w], circular, st->tail);
                store(out, r * n + j + w, through ? b.x[w] : b.out[w], is_double);
                total += through ? (isnan(b.x[w]) ? b.x[w] : 0.0) : b.ld[w];
            }
        }
        store(logdet, r, total, is_double);
    }
    return 0;
}

/* Gradients at fixed xi of y - yk (seed gy) and of the forward log-slope (seed gl), lane by lane. */
typedef struct {
    double xi[W], wk[W], yk[W], hk[W], dk[W], dk1[W];
} grads_t;

static void rq_vjp(const block_t *b, const double *gy, const double *gl, grads_t *g) {
    LANES {
        double xi = b->xi[w], hk = b->hk[w], wk = b->wk[w], dk = b->dk[w], dk1 = b->dk1[w];
        double s = hk / wk, q = xi * (1.0 - xi), c = dk1 + dk - 2.0 * s;
        double A = s * xi * xi + dk * q, den = s + c * q;
        double n2 = dk1 * xi * xi + 2.0 * s * q + dk * (1.0 - xi) * (1.0 - xi);
        double gA = gy[w] * hk / den, gden = -gy[w] * hk * A / (den * den) - 2.0 * gl[w] / den, gn2 = gl[w] / n2;
        double gc = gden * q;
        double gs = 2.0 * gl[w] / s + gA * xi * xi + gden + gn2 * 2.0 * q - 2.0 * gc;
        double gq = gA * dk + gden * c + gn2 * 2.0 * s;
        g->xi[w] += gA * 2.0 * s * xi + gn2 * (2.0 * dk1 * xi - 2.0 * dk * (1.0 - xi)) + gq * (1.0 - 2.0 * xi);
        g->yk[w] += gy[w];
        g->hk[w] += gy[w] * A / den + gs / wk;
        g->wk[w] += -gs * hk / (wk * wk);
        g->dk[w] += gA * q + gn2 * (1.0 - xi) * (1.0 - xi) + gc;
        g->dk1[w] += gn2 * xi * xi + gc;
    }
}

/* d(out, ld)/d(bin quantities and input) for upstream (go, gl): fills g (xk in gxk) and gx. */
static void bin_grads(const block_t *b, int inverse, const double *go, const double *gl, grads_t *g, double *gxk,
                      double *gx) {
    double zero[W] = {0}, seed[W];
    memset(g, 0, sizeof *g);
    if (inverse) {
        /* xi solves y(xi) = x: implicit differentiation, dxi = (dx - dy/dtheta dtheta) / (dy/dxi). */
        LANES seed[w] = -gl[w];
        rq_vjp(b, zero, seed, g);
        LANES {
            double xi = b->xi[w], s = b->hk[w] / b->wk[w], q = xi * (1.0 - xi), c = b->dk1[w] + b->dk[w] - 2.0 * s;
            double den = s + c * q, n2 = b->dk1[w] * xi * xi + 2.0 * s * q + b->dk[w] * (1.0 - xi) * (1.0 - xi);
            double gxi = g->xi[w] + go[w] * b->wk[w], slope = b->wk[w] * s * s * n2 / (den * den);
            gxk[w] = go[w];
            g->wk[w] += go[w] * xi;
            gx[w] = gxi / slope;
            seed[w] = -gxi / slope;
        }
        rq_vjp(b, seed, zero, g);
    } else {
        rq_vjp(b, go, gl, g);
        LANES {
            double t = (b->xc[w] - b->xk[w]) / b->wk[w], gt = (t >= 0.0 && t <= 1.0) ? g->xi[w] : 0.0;
            gxk[w] = -gt / b->wk[w];
            g->wk[w] -= gt * t / b->wk[w];
            gx[w] = gt / b->wk[w];
        }
    }
}

/* Gradients of the raw parameters ([rows][W], into graw) from those of the bin quantities. */
static void param_grads(const block_t *b, const settings_t *st, int circular, const grads_t *g, const double *gxk,
                        double graw[][W]) {
    int64_t K = st->K, n_rows = circular ? K : K - 1;
    double bound = circular ? M_PI : st->tail, mins[2] = {st->min_w, st->min_h};
    for (int which = 0; which < 2; which++) {
        const double *g_lo = which ? g->yk : gxk, *g_len = which ? g->hk : g->wk;
        double gk[MAX_BINS + 1][W], gc[MAX_BINS + 1][W], gcK[W], acc[W], dot[W];
        for (int64_t i = 0; i <= K; i++) LANES {
            gk[i][w] = (b->idx[w] == i ? g_lo[w] - g_len[w] : 0.0) + (b->idx[w] + 1 == i ? g_len[w] : 0.0);
        }
        /* k[i] = -bound + 2 bound c[i] / c[K] for 0 < i < K; the end knots are constants. */
        LANES gcK[w] = 0.0;
        for (int64_t i = 1; i < K; i++) LANES {
            double cK = b->c[which][K][w], gf = 2.0 * bound * gk[i][w];
            gc[i][w] = gf / cK;
            gcK[w] -= gf * b->c[which][i][w] / (cK * cK);
        }
        LANES {
            gc[K][w] = gcK[w];
            acc[w] = 0.0;
            dot[w] = 0.0;
        }
        /* c[i] sums the sizes before i: a size's gradient sums gc from its index on; then the softmax. */
        for (int64_t i = K; i >= 1; i--) LANES {
            acc[w] += gc[i][w];
            graw[which * K + i - 1][w] = (1.0 - K * mins[which]) * acc[w];
            dot[w] += b->sm[which][i - 1][w] * graw[which * K + i - 1][w];
        }
        for (int64_t i = 0; i < K; i++) LANES graw[which * K + i][w] = b->sm[which][i][w] * (graw[which * K + i][w] - dot[w]);
    }
    for (int64_t i = 0; i < n_rows; i++) LANES {
        graw[2 * K + i][w] = (b->rrow[0][w] == 2 * K + i ? g->dk[w] * b->dr[0][w] : 0.0)
                             + (b->rrow[1][w] == 2 * K + i ? g->dk1[w] * b->dr[1][w] : 0.0);
    }
}

int rqs_backward(int64_t rows, int64_t n, int64_t n_lin, int64_t P, const settings_t *st, int inverse,
                 int is_double, const void *v, const void *params, const void *grad_out, const void *grad_logdet,
                 void *grad_v, void *grad_params) {
    if (check(st)) return -1;
    int64_t K = st->K;
    static __thread block_t b;
    static __thread double graw[3 * MAX_BINS][W];
    for (int64_t r = 0; r < rows; r++) {
        double gl[W], go[W], gx[W], gxk[W];
        LANES gl[w] = load(grad_logdet, r, is_double);
        for (int64_t j = 0, count; j < n; j += count) {
            int circular = j >= n_lin;
            count = block_count(j, n, n_lin);
            int64_t at = r * P + param_offset(j, n_lin, K), n_raw = circular ? 3 * K : 3 * K - 1;
            double bound = circular ? M_PI : st->tail;
            load_block(&b, st, circular, count, v, r * n + j, params, at, is_double);
            LANES go[w] = w < count ? load(grad_out, r * n + j + w, is_double) : 0.0;
            evaluate(&b, st, circular, inverse);
            grads_t g;
            bin_grads(&b, inverse, go, gl, &g, gxk, gx);
            param_grads(&b, st, circular, &g, gxk, graw);
            for (int w = 0; w < count; w++) {
                int through = passes_through(b.x[w], circular, st->tail);
                int inside = b.x[w] >= -bound && b.x[w] <= bound; /* a clamped input has no gradient */
                store(grad_v, r * n + j + w, through ? (isnan(b.x[w]) ? b.x[w] : go[w]) : (inside ? gx[w] : 0.0),
                      is_double);
                for (int64_t i = 0; i < n_raw; i++)
                    store(grad_params, at + w * n_raw + i, through ? 0.0 : graw[i][w], is_double);
            }
        }
    }
    return 0;
}
