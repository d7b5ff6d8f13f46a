/* Fused CPU kernel of boltzgen.energies.torchff: energy and gradient of the bonded and non-bonded
 * terms of an OpenMM system, for a batch of configurations, in one pass over memory.
 *
 * Terms: bonds, angles, torsions, Coulomb + Lennard-Jones and OBC implicit solvent.
 * Compiled at first use by boltzgen/energies/native.py and called through ctypes. The functional
 * forms and the gradient formulas are those of the torch code in torchff.py (which stays the
 * reference and the CUDA path); tests check both against OpenMM.
 *
 * Layout: configurations are processed in blocks of BLOCK. A block is transposed to P[3 n_atoms][STRIDE]
 * (coordinate-major, configuration innermost), so that every term is a loop over contiguous
 * configurations that the compiler vectorizes; the gradient G has the same layout. Threads: see
 * ff_energy_grad_threads at the end.
 * Units: nm, kJ/mol, kJ/mol/nm.
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Configurations per block. A configuration's result can differ in the last bit with its place in a
 * block (vector lanes and the scalar remainder may round differently), so batches are only ever split
 * between threads at whole blocks, which keeps results independent of the split. */
#ifndef BLOCK
#define BLOCK 64
#endif
/* Row length of the transposed layout: longer than BLOCK so that the rows of different atoms do not
 * fall on the same address modulo 4 KiB, where loads wait on unrelated stores (4K aliasing). With
 * rows of exactly 64 doubles this cost 10% (measured side by side). */
#define STRIDE (BLOCK + 4)

#ifdef FF_LIBMVEC
/* glibc's vector math library (libmvec) has SIMD variants of these (glibc >= 2.35, within 4 ulp);
 * declaring them lets the angle and OBC loops vectorize. Built without FF_LIBMVEC where it is missing. */
extern double atan2(double, double) __attribute__((simd("notinbranch")));
extern double log(double) __attribute__((simd("notinbranch")));
extern double exp(double) __attribute__((simd("notinbranch")));
extern double tanh(double) __attribute__((simd("notinbranch")));
#endif

typedef struct {
    int64_t n_atoms;
    /* bond_idx is [2][n_bonds]; angle_idx [3][n_angles]; torsion_idx [4][n_torsions]; pair_idx [2][n_pairs]. */
    int64_t n_bonds;
    const int64_t *bond_idx;
    const double *bond_r0, *bond_k;
    int64_t n_angles;
    const int64_t *angle_idx;
    const double *angle_theta0, *angle_k;
    /* Torsion energy of quadruplet q: sum_m cos_coef[m][q] c^m - s' sum_m sin_coef[m][q] c^m, with
     * c = cos(phi) and s' = -sin(phi); n_cos >= 1 coefficients, n_sin >= 0. */
    int64_t n_torsions;
    const int64_t *torsion_idx;
    int64_t n_cos, n_sin;
    const double *cos_coef, *sin_coef;
    /* The pair list i < j shared by the two pair terms, each present when its pointers are not NULL.
     * Coulomb + Lennard-Jones: qq / r + c12 / r^12 - c6 / r^6. */
    int64_t n_pairs;
    const int64_t *pair_idx;
    const double *pair_qq, *pair_c12, *pair_c6;
    /* OBC (see torchff._gbsa_obc): per pair and order ([2][n_pairs]; order 0 has i at the centre) the
     * centre's offset radius rho and the other atom's scaled offset radius s; per atom rho/2, 1/rho,
     * 1/R, the self-term factor and the ACE factor; per pair the GB pair factor. */
    const double *obc_rho, *obc_scaled;
    const double *obc_half_rho, *obc_inv_rho, *obc_inv_radius, *obc_self, *obc_ace;
    const double *obc_pair_qq;
} ff_params;

#define OBC_ALPHA 1.0
#define OBC_BETA 0.8
#define OBC_GAMMA 4.85
/* Up to this many pairs (2 STRIDE doubles each: 1.1 MiB), the descreening derivatives are kept. */
#define OBC_CACHED_PAIRS 1024

/* The smallest positive normal double: floors of r^2 that keep coincident atoms finite (as in torchff). */
static const double TINY = 2.2250738585072014e-308;

static inline double floor_tiny(double v) { return v < TINY ? TINY : v; } /* NaN stays NaN */

static void bonds(const ff_params *p, int64_t n, const double *P, double *G, double *E) {
    const int64_t *ii = p->bond_idx, *jj = p->bond_idx + p->n_bonds;
    for (int64_t t = 0; t < p->n_bonds; t++) {
        const double *pi = P + 3 * ii[t] * STRIDE, *pj = P + 3 * jj[t] * STRIDE;
        double *gi = G + 3 * ii[t] * STRIDE, *gj = G + 3 * jj[t] * STRIDE;
        const double r0 = p->bond_r0[t], k = p->bond_k[t];
#pragma omp simd
        for (int64_t c = 0; c < n; c++) {
            double dx = pj[c] - pi[c], dy = pj[STRIDE + c] - pi[STRIDE + c], dz = pj[2 * STRIDE + c] - pi[2 * STRIDE + c];
            double r2 = floor_tiny(dx * dx + dy * dy + dz * dz);
            double inv_r = 1.0 / sqrt(r2);
            double dr = r2 * inv_r - r0;
            double kdr = k * dr;
            E[c] += 0.5 * kdr * dr;
            double s = kdr * inv_r;
            gj[c] += s * dx; gj[STRIDE + c] += s * dy; gj[2 * STRIDE + c] += s * dz;
            gi[c] -= s * dx; gi[STRIDE + c] -= s * dy; gi[2 * STRIDE + c] -= s * dz;
        }
    }
}

static void angles(const ff_params *p, int64_t n, const double *P, double *G, double *E) {
    const int64_t na = p->n_angles;
    const int64_t *ii = p->angle_idx, *jj = p->angle_idx + na, *kk = p->angle_idx + 2 * na;
    double sin_part[BLOCK], cos_part[BLOCK], theta[BLOCK];
    for (int64_t t = 0; t < na; t++) {
        const double *pi = P + 3 * ii[t] * STRIDE, *pj = P + 3 * jj[t] * STRIDE, *pk = P + 3 * kk[t] * STRIDE;
        double *gi = G + 3 * ii[t] * STRIDE, *gj = G + 3 * jj[t] * STRIDE, *gk = G + 3 * kk[t] * STRIDE;
        const double t0 = p->angle_theta0[t], kf = p->angle_k[t];
        /* |a x b| and a.b first, then atan2 (a loop of its own: it vectorizes only with libmvec), then
         * the gradient. */
#pragma omp simd
        for (int64_t c = 0; c < n; c++) {
            double ax = pi[c] - pj[c], ay = pi[STRIDE + c] - pj[STRIDE + c], az = pi[2 * STRIDE + c] - pj[2 * STRIDE + c];
            double bx = pk[c] - pj[c], by = pk[STRIDE + c] - pj[STRIDE + c], bz = pk[2 * STRIDE + c] - pj[2 * STRIDE + c];
            double a2 = ax * ax + ay * ay + az * az, b2 = bx * bx + by * by + bz * bz, ab = ax * bx + ay * by + az * bz;
            double n2 = floor_tiny(a2 * b2 - ab * ab);
            sin_part[c] = sqrt(n2);
            cos_part[c] = ab;
        }
#pragma omp simd
        for (int64_t c = 0; c < n; c++) theta[c] = atan2(sin_part[c], cos_part[c]);
#pragma omp simd
        for (int64_t c = 0; c < n; c++) {
            double ax = pi[c] - pj[c], ay = pi[STRIDE + c] - pj[STRIDE + c], az = pi[2 * STRIDE + c] - pj[2 * STRIDE + c];
            double bx = pk[c] - pj[c], by = pk[STRIDE + c] - pj[STRIDE + c], bz = pk[2 * STRIDE + c] - pj[2 * STRIDE + c];
            double a2 = ax * ax + ay * ay + az * az, b2 = bx * bx + by * by + bz * bz, ab = cos_part[c];
            double dt = theta[c] - t0;
            double kdt = kf * dt;
            E[c] += 0.5 * kdt * dt;
            /* d theta/da = ((a.b)/|a|^2 a - b) / |a x b|, and symmetrically for b. */
            double s = kdt / sin_part[c];
            double sa = s * ab / a2, sb = s * ab / b2;
            double gix = sa * ax - s * bx, giy = sa * ay - s * by, giz = sa * az - s * bz;
            double gkx = sb * bx - s * ax, gky = sb * by - s * ay, gkz = sb * bz - s * az;
            gi[c] += gix; gi[STRIDE + c] += giy; gi[2 * STRIDE + c] += giz;
            gk[c] += gkx; gk[STRIDE + c] += gky; gk[2 * STRIDE + c] += gkz;
            gj[c] -= gix + gkx; gj[STRIDE + c] -= giy + gky; gj[2 * STRIDE + c] -= giz + gkz;
        }
    }
}

/* Per configuration c: p[c] = sum_m coef[m * stride] x[c]^m and dp[c] = p'(x[c]), by Horner's rule
 * (n_coef >= 1 coefficients). The loop over m is outside, so the loop over c vectorizes. */
static void horner(const double *coef, int64_t stride, int64_t n_coef, int64_t n, const double *restrict x,
                   double *restrict p, double *restrict dp) {
    const double top = coef[(n_coef - 1) * stride];
    for (int64_t c = 0; c < n; c++) {
        p[c] = top;
        dp[c] = 0.0;
    }
    for (int64_t m = n_coef - 2; m >= 0; m--) {
        const double a = coef[m * stride];
#pragma omp simd
        for (int64_t c = 0; c < n; c++) {
            dp[c] = dp[c] * x[c] + p[c];
            p[c] = p[c] * x[c] + a;
        }
    }
}

static void torsions(const ff_params *p, int64_t n, const double *P, double *G, double *E) {
    const int64_t nt = p->n_torsions;
    const int64_t *i0 = p->torsion_idx, *i1 = i0 + nt, *i2 = i0 + 2 * nt, *i3 = i0 + 3 * nt;
    /* Pass 1 computes cos(phi) and -sin(phi) and keeps what pass 2 needs for the gradient: a = f x g,
     * b = h x g, |g|, (f.g)/|g|^2, (h.g)/|g|^2, 1/|a|^2 and 1/|b|^2 (cheaper than recomputing them). */
    double cos_phi[BLOCK], neg_sin[BLOCK], e[BLOCK], de[BLOCK], s[BLOCK], ds[BLOCK];
    double A[3][BLOCK], Bv[3][BLOCK], gn[BLOCK], fg[BLOCK], hg[BLOCK], ia2[BLOCK], ib2[BLOCK];
    for (int64_t t = 0; t < nt; t++) {
        const double *p0 = P + 3 * i0[t] * STRIDE, *p1 = P + 3 * i1[t] * STRIDE;
        const double *p2 = P + 3 * i2[t] * STRIDE, *p3 = P + 3 * i3[t] * STRIDE;
        double *g0 = G + 3 * i0[t] * STRIDE, *g1 = G + 3 * i1[t] * STRIDE;
        double *g2 = G + 3 * i2[t] * STRIDE, *g3 = G + 3 * i3[t] * STRIDE;
#pragma omp simd
        for (int64_t c = 0; c < n; c++) {
            double fx = p0[c] - p1[c], fy = p0[STRIDE + c] - p1[STRIDE + c], fz = p0[2 * STRIDE + c] - p1[2 * STRIDE + c];
            double gx = p1[c] - p2[c], gy = p1[STRIDE + c] - p2[STRIDE + c], gz = p1[2 * STRIDE + c] - p2[2 * STRIDE + c];
            double hx = p3[c] - p2[c], hy = p3[STRIDE + c] - p2[STRIDE + c], hz = p3[2 * STRIDE + c] - p2[2 * STRIDE + c];
            double ax = fy * gz - fz * gy, ay = fz * gx - fx * gz, az = fx * gy - fy * gx; /* f x g */
            double bx = hy * gz - hz * gy, by = hz * gx - hx * gz, bz = hx * gy - hy * gx; /* h x g */
            double a2 = ax * ax + ay * ay + az * az, b2 = bx * bx + by * by + bz * bz;
            double gsq = gx * gx + gy * gy + gz * gz, g_norm = sqrt(gsq), inv_g2 = 1.0 / gsq;
            /* IUPAC sign (OpenMM's): cos(phi) = a.b / (|a||b|), -sin(phi) = |g| f.b / (|a||b|). */
            double inv_ab = 1.0 / sqrt(floor_tiny(a2 * b2));
            cos_phi[c] = (ax * bx + ay * by + az * bz) * inv_ab;
            neg_sin[c] = (fx * bx + fy * by + fz * bz) * inv_ab * g_norm;
            A[0][c] = ax; A[1][c] = ay; A[2][c] = az;
            Bv[0][c] = bx; Bv[1][c] = by; Bv[2][c] = bz;
            gn[c] = g_norm;
            fg[c] = (fx * gx + fy * gy + fz * gz) * inv_g2;
            hg[c] = (hx * gx + hy * gy + hz * gz) * inv_g2;
            ia2[c] = 1.0 / a2;
            ib2[c] = 1.0 / b2;
        }
        /* The polynomials in cos(phi): energy A(cos) - (-sin) B(cos). */
        horner(p->cos_coef + t, nt, p->n_cos, n, cos_phi, e, de);
        if (p->n_sin > 0) horner(p->sin_coef + t, nt, p->n_sin, n, cos_phi, s, ds);
        /* Pass 2: energy, dU/dphi and the gradient. */
        /* e becomes the energy and de dU/dphi, in loops of their own: with the sine part inside the
         * gradient loop, both variants were computed and blended. */
        if (p->n_sin > 0) {
#pragma omp simd
            for (int64_t c = 0; c < n; c++) {
                e[c] -= neg_sin[c] * s[c];
                /* d/dphi [sin B(cos)] = cos B(cos) - sin^2 B'(cos) */
                de[c] = neg_sin[c] * de[c] + (cos_phi[c] * s[c] - neg_sin[c] * neg_sin[c] * ds[c]);
            }
        } else {
#pragma omp simd
            for (int64_t c = 0; c < n; c++) de[c] *= neg_sin[c];
        }
#pragma omp simd
        for (int64_t c = 0; c < n; c++) {
            E[c] += e[c];
            /* Blondel & Karplus (1996) gradient of phi, free of the 1/sin(phi) singularity. */
            double de_dphi = de[c] * gn[c];
            double ca = de_dphi * ia2[c], cd = de_dphi * ib2[c];
            double fg_ca = fg[c] * ca, hg_cd = hg[c] * cd;
            double ax = A[0][c], ay = A[1][c], az = A[2][c], bx = Bv[0][c], by = Bv[1][c], bz = Bv[2][c];
            double gax = ax * ca, gay = ay * ca, gaz = az * ca; /* -dU/dp0 */
            double gdx = bx * cd, gdy = by * cd, gdz = bz * cd; /* dU/dp3 */
            /* dU/dp1 = (1 + fg) ga - hg gd and dU/dp2 = (hg - 1) gd - fg ga (the four sum to zero). */
            g0[c] -= gax; g0[STRIDE + c] -= gay; g0[2 * STRIDE + c] -= gaz;
            g3[c] += gdx; g3[STRIDE + c] += gdy; g3[2 * STRIDE + c] += gdz;
            g1[c] += gax + fg_ca * ax - hg_cd * bx;
            g1[STRIDE + c] += gay + fg_ca * ay - hg_cd * by;
            g1[2 * STRIDE + c] += gaz + fg_ca * az - hg_cd * bz;
            g2[c] += (hg_cd - cd) * bx - fg_ca * ax;
            g2[STRIDE + c] += (hg_cd - cd) * by - fg_ca * ay;
            g2[2 * STRIDE + c] += (hg_cd - cd) * bz - fg_ca * az;
        }
    }
}

static void nonbonded(const ff_params *p, int64_t n, const double *P, double *G, double *E) {
    const int64_t *ii = p->pair_idx, *jj = p->pair_idx + p->n_pairs;
    for (int64_t t = 0; t < p->n_pairs; t++) {
        const double *pi = P + 3 * ii[t] * STRIDE, *pj = P + 3 * jj[t] * STRIDE;
        double *gi = G + 3 * ii[t] * STRIDE, *gj = G + 3 * jj[t] * STRIDE;
        const double qq = p->pair_qq[t], c12 = p->pair_c12[t], c6 = p->pair_c6[t];
#pragma omp simd
        for (int64_t c = 0; c < n; c++) {
            double dx = pj[c] - pi[c], dy = pj[STRIDE + c] - pi[STRIDE + c], dz = pj[2 * STRIDE + c] - pi[2 * STRIDE + c];
            double inv_r = 1.0 / sqrt(dx * dx + dy * dy + dz * dz);
            double inv_r2 = inv_r * inv_r;
            double inv_r6 = inv_r2 * inv_r2 * inv_r2;
            double lj12 = c12 * inv_r6, lj = lj12 - c6, coul = qq * inv_r;
            E[c] += coul + lj * inv_r6;
            /* h = -(1/r) dU/dr; dU/dp_i = h d with d = p_j - p_i. */
            double h = (coul + 6.0 * (lj + lj12) * inv_r6) * inv_r2;
            gi[c] += h * dx; gi[STRIDE + c] += h * dy; gi[2 * STRIDE + c] += h * dz;
            gj[c] -= h * dx; gj[STRIDE + c] -= h * dy; gj[2 * STRIDE + c] -= h * dz;
        }
    }
}

/* OBC descreening of a centre with offset radius rho by a sphere of scaled radius s at distance r:
 * the torchff "term" (twice the OBC integral, plus the buried-atom correction) and dterm2 = -2 dterm/dr,
 * each as a + b log(l/u). This returns l/u and the parts a: term = *term_a + inv_r/2 log(l/u) and
 * dterm2 = *dterm2_a + inv_r2 log(l/u). */
static inline double obc_descreen(double r, double r2, double inv_r, double inv_r2, double rho, double s,
                                  double *term_a, double *dterm2_a) {
    double upper = r + s, lower = r - s;
    /* Buried atom (rho < s - r): 2 (1/rho + 1/(r - s)); 0 otherwise, as min(r - s, -rho) is then -rho. */
    double m = lower > -rho ? -rho : lower;
    double buried = 1.0 / m + 1.0 / rho;
    /* l = max(|r - s|, rho) capped at u: l == u exactly where the sphere does not reach, zeroing the term. */
    double l = fabs(lower);
    l = l < rho ? rho : l;
    l = l > upper ? upper : l;
    double inv_l = 1.0 / l, inv_u = 1.0 / upper;
    double t = inv_l - inv_u;
    double dl2 = (inv_u + inv_l) * t; /* 1/l^2 - 1/u^2 */
    double rest = 0.5 * dl2 * (s * s - r2);
    *term_a = t + 0.5 * inv_r * rest + 2.0 * buried;
    *dterm2_a = dl2 + inv_r2 * rest;
    return l / upper;
}

/* Both orders of the descreening of the pair (pi, pj) in configurations 0 .. n-1, each [n]: i's
 * term and dterm2 (by j's sphere), j's (by i's), and 1/r. The logarithms have a loop of their own:
 * a vector log call inside the main loop made the compiler spill every live register around it
 * (10% of the OBC kernel, measured side by side). */
static void obc_descreen_pair(const double *pi, const double *pj, int64_t n, double rho_i, double s_j, double rho_j,
                              double s_i, double *restrict term_i, double *restrict dterm2_i,
                              double *restrict term_j, double *restrict dterm2_j, double *restrict inv_r_out) {
    double log_i[BLOCK], log_j[BLOCK];
#pragma omp simd
    for (int64_t c = 0; c < n; c++) {
        double dx = pj[c] - pi[c], dy = pj[STRIDE + c] - pi[STRIDE + c], dz = pj[2 * STRIDE + c] - pi[2 * STRIDE + c];
        double r2 = dx * dx + dy * dy + dz * dz, inv_r = 1.0 / sqrt(r2);
        double r = r2 * inv_r, inv_r2 = inv_r * inv_r;
        log_i[c] = obc_descreen(r, r2, inv_r, inv_r2, rho_i, s_j, &term_i[c], &dterm2_i[c]);
        log_j[c] = obc_descreen(r, r2, inv_r, inv_r2, rho_j, s_i, &term_j[c], &dterm2_j[c]);
        inv_r_out[c] = inv_r;
    }
#pragma omp simd
    for (int64_t c = 0; c < n; c++) {
        log_i[c] = log(log_i[c]);
        log_j[c] = log(log_j[c]);
    }
#pragma omp simd
    for (int64_t c = 0; c < n; c++) {
        double half_inv_r = 0.5 * inv_r_out[c], inv_r2 = inv_r_out[c] * inv_r_out[c];
        term_i[c] += half_inv_r * log_i[c];
        dterm2_i[c] += inv_r2 * log_i[c];
        term_j[c] += half_inv_r * log_j[c];
        dterm2_j[c] += inv_r2 * log_j[c];
    }
}

/* OBC energy and gradient; scratch is [4][n_atoms][STRIDE]; dcache, when not NULL, is [n_pairs][2][STRIDE]
 * and keeps pass 1's descreening derivatives for the gradient pass. */
static void gbsa_obc(const ff_params *p, int64_t n, const double *P, double *G, double *E, double *scratch,
                     double *dcache) {
    const int64_t na = p->n_atoms, np = p->n_pairs;
    const int64_t *ii = p->pair_idx, *jj = p->pair_idx + np;
    /* T: sum of descreening terms, later -2 dU/dterm; B: Born radius; K: dB/dterm; D: -2 dU/dB. */
    double *T = scratch, *B = scratch + na * STRIDE, *K = scratch + 2 * na * STRIDE, *D = scratch + 3 * na * STRIDE;
    memset(T, 0, sizeof(double) * na * STRIDE);
    /* One pair's descreening, both orders; dterm2 is [2][STRIDE] as a row of dcache. */
    double term_i[BLOCK], term_j[BLOCK], dterm2[2 * STRIDE], inv_r[BLOCK];
    for (int64_t t = 0; t < np; t++) {
        const double *pi = P + 3 * ii[t] * STRIDE, *pj = P + 3 * jj[t] * STRIDE;
        double *ti = T + ii[t] * STRIDE, *tj = T + jj[t] * STRIDE;
        /* The derivatives go to the cache when there is one. */
        double *dc = dcache != NULL ? dcache + 2 * t * STRIDE : dterm2;
        obc_descreen_pair(pi, pj, n, p->obc_rho[t], p->obc_scaled[t], p->obc_rho[np + t], p->obc_scaled[np + t],
                          term_i, dc, term_j, dc + STRIDE, inv_r);
#pragma omp simd
        for (int64_t c = 0; c < n; c++) {
            ti[c] += term_i[c];
            tj[c] += term_j[c];
        }
    }
    for (int64_t a = 0; a < na; a++) {
        double *ta = T + a * STRIDE, *ba = B + a * STRIDE, *ka = K + a * STRIDE, *da = D + a * STRIDE;
        const double half_rho = p->obc_half_rho[a], inv_rho = p->obc_inv_rho[a], inv_radius = p->obc_inv_radius[a];
        const double self = p->obc_self[a], ace = p->obc_ace[a];
#pragma omp simd
        for (int64_t c = 0; c < n; c++) {
            double psi = half_rho * ta[c];
            double th = tanh(psi * (OBC_ALPHA + psi * (-OBC_BETA + OBC_GAMMA * psi)));
            double inv_born = inv_rho - th * inv_radius, born = 1.0 / inv_born;
            /* ACE non-polar term; OpenMM skips atoms whose Born radius came out non-positive. */
            double ib = inv_born < 0.0 ? 0.0 : inv_born, ib3 = ib * ib * ib;
            double ace_e = ace * ib3 * ib3, self_e = self * inv_born;
            E[c] += ace_e + self_e;
            ba[c] = born;
            da[c] = (self_e + 6.0 * ace_e) * 2.0 * inv_born;
            /* dB/dterm = B^2 (1 - th^2) dpsi_poly/dpsi / R * rho / 2 */
            ka[c] = born * born * (1.0 - th * th) * (OBC_ALPHA + psi * (-2.0 * OBC_BETA + 3.0 * OBC_GAMMA * psi)) *
                    inv_radius * half_rho;
        }
    }
    /* GB pair energy qq / f with f^2 = r^2 + B_i B_j exp(-r^2 / (4 B_i B_j)); its r-gradient, and -2 dU/dB. */
    double ratio[BLOCK], expo[BLOCK];
    for (int64_t t = 0; t < np; t++) {
        const double *pi = P + 3 * ii[t] * STRIDE, *pj = P + 3 * jj[t] * STRIDE;
        double *gi = G + 3 * ii[t] * STRIDE, *gj = G + 3 * jj[t] * STRIDE;
        const double *bi = B + ii[t] * STRIDE, *bj = B + jj[t] * STRIDE;
        double *di = D + ii[t] * STRIDE, *dj = D + jj[t] * STRIDE;
        const double qq = p->obc_pair_qq[t];
        /* r^2 / (B_i B_j) and its exponential first, the exp in a loop of its own (as the logs above). */
#pragma omp simd
        for (int64_t c = 0; c < n; c++) {
            double dx = pj[c] - pi[c], dy = pj[STRIDE + c] - pi[STRIDE + c], dz = pj[2 * STRIDE + c] - pi[2 * STRIDE + c];
            ratio[c] = (dx * dx + dy * dy + dz * dz) / (bi[c] * bj[c]);
        }
#pragma omp simd
        for (int64_t c = 0; c < n; c++) expo[c] = exp(-0.25 * ratio[c]);
#pragma omp simd
        for (int64_t c = 0; c < n; c++) {
            double dx = pj[c] - pi[c], dy = pj[STRIDE + c] - pi[STRIDE + c], dz = pj[2 * STRIDE + c] - pi[2 * STRIDE + c];
            double r2 = dx * dx + dy * dy + dz * dz;
            double bb = bi[c] * bj[c], dd4 = ratio[c], ex = expo[c];
            double inv_f = 1.0 / sqrt(r2 + bb * ex);
            double pair = qq * inv_f;
            E[c] += pair;
            double cf = pair * inv_f * inv_f, cfe = ex * cf;
            double dbb = cfe + 0.25 * cfe * dd4; /* -2 dU/d(B_i B_j) */
            double bj_c = bj[c], bi_c = bi[c];
            di[c] += bj_c * dbb;
            dj[c] += bi_c * dbb;
            double h = cf - 0.25 * cfe; /* -(1/r) dU/dr of the pair term */
            gi[c] += h * dx; gi[STRIDE + c] += h * dy; gi[2 * STRIDE + c] += h * dz;
            gj[c] -= h * dx; gj[STRIDE + c] -= h * dy; gj[2 * STRIDE + c] -= h * dz;
        }
    }
    for (int64_t k = 0; k < na * STRIDE; k++) T[k] = D[k] * K[k]; /* -2 dU/dterm */
    /* The descreening r-gradient: T dterm2 = (-2 dU/dterm)(-2 dterm/dr) = 4 dU/dr, both orders summed. */
    for (int64_t t = 0; t < np; t++) {
        const double *pi = P + 3 * ii[t] * STRIDE, *pj = P + 3 * jj[t] * STRIDE;
        double *gi = G + 3 * ii[t] * STRIDE, *gj = G + 3 * jj[t] * STRIDE;
        const double *ti = T + ii[t] * STRIDE, *tj = T + jj[t] * STRIDE;
        const double *dc = dcache != NULL ? dcache + 2 * t * STRIDE : dterm2;
        if (dcache == NULL)
            obc_descreen_pair(pi, pj, n, p->obc_rho[t], p->obc_scaled[t], p->obc_rho[np + t], p->obc_scaled[np + t],
                              term_i, dterm2, term_j, dterm2 + STRIDE, inv_r);
#pragma omp simd
        for (int64_t c = 0; c < n; c++) {
            double dx = pj[c] - pi[c], dy = pj[STRIDE + c] - pi[STRIDE + c], dz = pj[2 * STRIDE + c] - pi[2 * STRIDE + c];
            double h = -0.25 * (dc[c] * ti[c] + dc[STRIDE + c] * tj[c]) / sqrt(dx * dx + dy * dy + dz * dz);
            gi[c] += h * dx; gi[STRIDE + c] += h * dy; gi[2 * STRIDE + c] += h * dz;
            gj[c] -= h * dx; gj[STRIDE + c] -= h * dy; gj[2 * STRIDE + c] -= h * dz;
        }
    }
}

/* Evaluates the blocks of configurations (blocks of BLOCK, counted from x) that it takes from *next,
 * a counter the threads of a job share, until none is left; see ff_energy_grad for the rest. */
static int evaluate_blocks(const ff_params *p, int64_t n_conf, double scale, const double *x, double *energy,
                           double *grad, atomic_llong *next) {
    const int64_t dim = 3 * p->n_atoms;
    double *P = malloc(sizeof(double) * dim * STRIDE);
    double *G = malloc(sizeof(double) * dim * STRIDE);
    double *scratch = p->obc_rho != NULL ? calloc(4 * p->n_atoms * STRIDE, sizeof(double)) : NULL;
    /* The descreening derivatives of pass 1, kept for the gradient pass where they fit in cache
     * (small molecules); larger ones recompute them and keep memory bounded. */
    const int cache_obc = p->obc_rho != NULL && p->n_pairs <= OBC_CACHED_PAIRS;
    /* NULL also where the allocation fails: then the gradient pass recomputes them. */
    double *dcache = cache_obc ? malloc(sizeof(double) * 2 * p->n_pairs * STRIDE) : NULL;
    if (P == NULL || G == NULL || (p->obc_rho != NULL && scratch == NULL)) {
        free(P);
        free(G);
        free(scratch);
        free(dcache);
        return -1;
    }
    double E[BLOCK];
    for (int64_t start; (start = BLOCK * atomic_fetch_add(next, 1)) < n_conf;) {
        const int64_t n = n_conf - start < BLOCK ? n_conf - start : BLOCK;
        const double *xb = x + start * dim;
        for (int64_t c = 0; c < n; c++)
            for (int64_t k = 0; k < dim; k++) P[k * STRIDE + c] = xb[c * dim + k];
        memset(G, 0, sizeof(double) * dim * STRIDE);
        memset(E, 0, sizeof(E));
        if (p->n_bonds) bonds(p, n, P, G, E);
        if (p->n_angles) angles(p, n, P, G, E);
        if (p->n_torsions) torsions(p, n, P, G, E);
        if (p->n_pairs && p->pair_qq != NULL) nonbonded(p, n, P, G, E);
        if (p->n_pairs && p->obc_rho != NULL) gbsa_obc(p, n, P, G, E, scratch, dcache);
        for (int64_t c = 0; c < n; c++) energy[start + c] = scale * E[c];
        if (grad != NULL) {
            double *gb = grad + start * dim;
            for (int64_t c = 0; c < n; c++)
                for (int64_t k = 0; k < dim; k++) gb[c * dim + k] = scale * G[k * STRIDE + c];
        }
    }
    free(P);
    free(G);
    free(scratch);
    free(dcache);
    return 0;
}

/* scale times the energy (kJ/mol) of configurations x[n_conf][3 n_atoms] (nm) into energy[n_conf] and,
 * when grad is not NULL, scale times dU/dx (kJ/mol/nm) into grad[n_conf][3 n_atoms]; both are
 * overwritten. scale = 1/kT gives reduced units at no extra pass. Returns 0, or -1 when scratch
 * memory could not be allocated. One thread. */
int ff_energy_grad(const ff_params *p, int64_t n_conf, double scale, const double *x, double *energy, double *grad) {
    atomic_llong next = 0;
    return evaluate_blocks(p, n_conf, scale, x, energy, grad, &next);
}

/* ------------------------------------------------------------------ threads
 * The threads of a job take blocks from a shared counter until none is left, so a thread that starts
 * late (waking a sleeping thread takes tens of microseconds here) or runs on a busy core does less,
 * and no bit depends on who took which block. The pool lives here, not in Python: one call, and no
 * interpreter lock to pass between threads (a Python thread pool cost 0.1 ms per call, measured
 * side by side). */
#define MAX_THREADS 256

typedef struct {
    const ff_params *p;
    int64_t n_conf;
    double scale;
    const double *x;
    double *energy, *grad;
    int n_threads;
    atomic_llong next_block;
} ff_job;

static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_cond = PTHREAD_COND_INITIALIZER;
static atomic_uint generation; /* bumped for every job */
static atomic_int remaining;   /* workers that have not finished with the job */
static atomic_int failures;
static int n_workers;          /* started; workers 1 .. n_threads - 1 take part in a job */
static unsigned first_generation[MAX_THREADS]; /* generation when worker k was started */
static ff_job job;

static int run_share(ff_job *j) {
    return evaluate_blocks(j->p, j->n_conf, j->scale, j->x, j->energy, j->grad, &j->next_block);
}

static void *worker_main(void *arg) {
    const int k = (int)(intptr_t)arg;
    unsigned seen = first_generation[k]; /* not generation: the job may be posted before this runs */
    for (;;) {
        pthread_mutex_lock(&wake_lock);
        while (atomic_load(&generation) == seen) pthread_cond_wait(&wake_cond, &wake_lock);
        seen = atomic_load(&generation);
        pthread_mutex_unlock(&wake_lock);
        /* Every worker acknowledges every job, so none is still reading this job when the next is set. */
        if (k < job.n_threads && run_share(&job) != 0) atomic_fetch_add(&failures, 1);
        atomic_fetch_sub_explicit(&remaining, 1, memory_order_release);
    }
    return NULL;
}

/* In a forked child the workers do not exist: start afresh. */
static void forget_workers(void) {
    n_workers = 0;
    pthread_mutex_init(&call_lock, NULL);
    pthread_mutex_init(&wake_lock, NULL);
    pthread_cond_init(&wake_cond, NULL);
}

/* ff_energy_grad over n_threads threads: the caller and n_threads - 1 workers (fewer where workers
 * cannot be started). Returns as ff_energy_grad. */
int ff_energy_grad_threads(const ff_params *p, int64_t n_conf, double scale, const double *x, double *energy,
                           double *grad, int n_threads) {
    const int64_t n_blocks = (n_conf + BLOCK - 1) / BLOCK;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads > n_blocks) n_threads = (int)n_blocks;
    if (n_threads <= 1) return ff_energy_grad(p, n_conf, scale, x, energy, grad);
    pthread_mutex_lock(&call_lock);
    static int atfork_registered;
    if (!atfork_registered) atfork_registered = pthread_atfork(NULL, NULL, forget_workers) == 0;
    while (n_workers < n_threads - 1) {
        pthread_t thread;
        first_generation[n_workers + 1] = atomic_load(&generation);
        if (pthread_create(&thread, NULL, worker_main, (void *)(intptr_t)(n_workers + 1)) != 0) break;
        pthread_detach(thread);
        n_workers++;
    }
    if (n_threads > n_workers + 1) n_threads = n_workers + 1;
    job = (ff_job){p, n_conf, scale, x, energy, grad, n_threads, 0};
    atomic_store(&failures, 0);
    atomic_store(&remaining, n_workers);
    pthread_mutex_lock(&wake_lock);
    atomic_fetch_add_explicit(&generation, 1, memory_order_release);
    pthread_cond_broadcast(&wake_cond);
    pthread_mutex_unlock(&wake_lock);
    int status = run_share(&job);
    /* Every block is taken: the workers finish their last one about now. */
    while (atomic_load_explicit(&remaining, memory_order_acquire) > 0) sched_yield();
    if (atomic_load(&failures) > 0) status = -1;
    pthread_mutex_unlock(&call_lock);
    return status;
}
