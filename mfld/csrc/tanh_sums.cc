// The two particle sums of a tanh network's drift, for thin features (p <= 9), as XLA FFI
// custom calls on CPU (mfld/kernels.py registers and calls them; docs/performance.md).
//
//   forward:  F_j = sum_i a_i tanh(w_i . x_j)                      (m,)
//   backward: G_i = sum_j u_j tanh(w_i . x_j)                       (N,)
//             H_i = sum_j u_j (1 - tanh(w_i . x_j)^2) x_j           (p, N)
//
// Each pass evaluates z = w_i . x_j and tanh(z) in registers and accumulates at once: no
// (N, m) array is written, and tanh is evaluated once per pair and pass (the backward pass
// takes sigma' = 1 - t^2 from the same t). Particles are the vector lanes (8 floats): each
// group of 8 or 16 particles is transposed from w's (N, p) rows into registers, the last
// group padded with zero weights in a local buffer, so the caller passes w, a and receives
// H in their own layouts (no padded or transposed copy of the particles).
//
// Determinism: the work is cut into chunks that depend on the shapes only (never on the
// thread count), each output element is summed by one chunk in a fixed order, and the
// forward pass adds its per-range partial sums in range order. So the results are
// bit-identical for any number of threads; the threads are those of XLA's intra-op pool
// (the FFI ThreadPool context), so `--threads` / process pinning apply as to XLA's own ops.
//
// tanh and the parallel loop: tanh_common.h (shared with tanh_blocks.cc, the wide features).
//
// On x86-64 the loops are compiled twice (AVX2 + FMA and baseline) and the loader picks the
// one this CPU runs (GCC/Clang target_clones); elsewhere the compiler's default vector code.

#include <vector>

#include "tanh_common.h"

namespace {

using namespace mfld_kernels;  // NOLINT: v8, vtanh, parallel_for, ffi

constexpr int kMaxFeatures = 9;                // mfld.kernels.MAX_FEATURES (the dispatch below)
// Particle vectors per inner iteration: two hide tanh's latency while the weights and
// accumulators fit the 16 vector registers (p <= 5 forward, p <= 4 backward), else one.
constexpr int fwd_unroll(int p) { return p <= 5 ? 2 : 1; }
constexpr int bwd_unroll(int p) { return p <= 4 ? 2 : 1; }
constexpr int kGroup = 2 * kLanes;             // chunk and range boundaries are multiples
constexpr int kDataBlock = 32;                 // forward: data rows per chunk
constexpr int64_t kMinRange = 1 << 16;         // forward: particles per range (at least)
constexpr int64_t kMaxRanges = 64;             // forward: ranges (at most)
constexpr int64_t kBackwardChunk = 256;        // backward: particles per chunk

// Weights (and output weights) of particles [i, i + U * 8) into registers, one vector per
// feature: a transpose of the (N, p) rows through a small buffer; particles >= n read as zero
// (a zero output weight adds nothing to F; their G and H are not stored).
template <int P, int U>
MFLD_INLINE void load_particles(const float* w, const float* a, int64_t n, int64_t i, v8 (&wv)[U][P],
                                v8 (&av)[U]) {
  alignas(32) float wb[P][U * kLanes];
  alignas(32) float ab[U * kLanes];
  for (int l = 0; l < U * kLanes; ++l) {
    const bool real = i + l < n;
    for (int k = 0; k < P; ++k) wb[k][l] = real ? w[(i + l) * P + k] : 0.0f;
    ab[l] = real && a != nullptr ? a[i + l] : 0.0f;
  }
  for (int u = 0; u < U; ++u) {
    for (int k = 0; k < P; ++k) wv[u][k] = load(&wb[k][u * kLanes]);
    av[u] = load(&ab[u * kLanes]);
  }
}

// F_part[j] for j in [j0, j1) over particles [i0, min(i1, n)) (i0, i1 multiples of kGroup).
template <int P>
MFLD_INLINE void forward_chunk_p(int64_t n, const float* w, const float* a, const float* x,
                                 int64_t i0, int64_t i1, int64_t j0, int64_t j1, float* out) {
  constexpr int kUnroll = fwd_unroll(P);
  v8 acc[kDataBlock];
  for (int64_t j = 0; j < j1 - j0; ++j) acc[j] = (v8){};
  for (int64_t i = i0; i < std::min(i1, n); i += kUnroll * kLanes) {
    v8 wv[kUnroll][P], av[kUnroll];
    load_particles<P, kUnroll>(w, a, n, i, wv, av);
    for (int64_t j = j0; j < j1; ++j) {
      const float* xj = x + j * P;
      v8 s = acc[j - j0];
      for (int u = 0; u < kUnroll; ++u) {
        v8 z = wv[u][0] * xj[0];
        for (int k = 1; k < P; ++k) z += wv[u][k] * xj[k];
        s += av[u] * vtanh(z);
      }
      acc[j - j0] = s;
    }
  }
  for (int64_t j = j0; j < j1; ++j) {
    float s = 0.0f;
    for (int l = 0; l < kLanes; ++l) s += acc[j - j0][l];
    out[j] = s;
  }
}

// G[i], H[i, k] for particles [i0, min(i1, n)) (i0 a multiple of kGroup) over all m data rows.
template <int P>
MFLD_INLINE void backward_chunk_p(int64_t n, int64_t m, const float* w, const float* x,
                                  const float* u, const float* ux, int64_t i0, int64_t i1,
                                  float* g_out, float* h_out) {
  constexpr int kUnroll = bwd_unroll(P);
  for (int64_t i = i0; i < std::min(i1, n); i += kUnroll * kLanes) {
    v8 wv[kUnroll][P], g[kUnroll], h[kUnroll][P], unused[kUnroll];
    load_particles<P, kUnroll>(w, nullptr, n, i, wv, unused);
    for (int v = 0; v < kUnroll; ++v) {
      for (int k = 0; k < P; ++k) h[v][k] = (v8){};
      g[v] = (v8){};
    }
    for (int64_t j = 0; j < m; ++j) {
      const float* xj = x + j * P;
      const float* uxj = ux + j * P;
      const float uj = u[j];
      for (int v = 0; v < kUnroll; ++v) {
        v8 z = wv[v][0] * xj[0];
        for (int k = 1; k < P; ++k) z += wv[v][k] * xj[k];
        const v8 t = vtanh(z);
        g[v] += uj * t;
        const v8 s = 1.0f - t * t;
        for (int k = 0; k < P; ++k) h[v][k] += s * uxj[k];
      }
    }
    alignas(32) float gb[kUnroll * kLanes];
    alignas(32) float hb[P][kUnroll * kLanes];
    for (int v = 0; v < kUnroll; ++v) {
      store(&gb[v * kLanes], g[v]);
      for (int k = 0; k < P; ++k) store(&hb[k][v * kLanes], h[v][k]);
    }
    for (int l = 0; l < kUnroll * kLanes && i + l < n; ++l) {
      g_out[i + l] = gb[l];
      for (int k = 0; k < P; ++k) h_out[(i + l) * P + k] = hb[k][l];
    }
  }
}

#define MFLD_DISPATCH_P(p, CALL)           \
  switch (p) {                             \
    case 1: CALL(1); break;                \
    case 2: CALL(2); break;                \
    case 3: CALL(3); break;                \
    case 4: CALL(4); break;                \
    case 5: CALL(5); break;                \
    case 6: CALL(6); break;                \
    case 7: CALL(7); break;                \
    case 8: CALL(8); break;                \
    case 9: CALL(9); break;                \
    default: break;                        \
  }

MFLD_CLONES void forward_chunk(int64_t p, int64_t n, const float* w, const float* a,
                               const float* x, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                               float* out) {
#define MFLD_FWD(P) forward_chunk_p<P>(n, w, a, x, i0, i1, j0, j1, out)
  MFLD_DISPATCH_P(p, MFLD_FWD)
#undef MFLD_FWD
}

MFLD_CLONES void backward_chunk(int64_t p, int64_t n, int64_t m, const float* w,
                                const float* x, const float* u, const float* ux, int64_t i0,
                                int64_t i1, float* g_out, float* h_out) {
#define MFLD_BWD(P) backward_chunk_p<P>(n, m, w, x, u, ux, i0, i1, g_out, h_out)
  MFLD_DISPATCH_P(p, MFLD_BWD)
#undef MFLD_BWD
}

ffi::Error check_p(int64_t p) {
  if (p < 1 || p > kMaxFeatures) return ffi::Error::InvalidArgument("mfld tanh sums: p must be in 1..9");
  return ffi::Error::Success();
}

// w (N, p), a (N,), x (m, p) -> F (m,)
ffi::Error TanhForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w,
                           ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> x,
                           ffi::ResultBuffer<ffi::F32> f) {
  const int64_t n = w.dimensions()[0], p = w.dimensions()[1], m = x.dimensions()[0];
  if (auto e = check_p(p); e.failure()) return e;
  const int64_t groups = (n + kGroup - 1) / kGroup;
  const int64_t per_range =
      std::max<int64_t>(kMinRange / kGroup, (groups + kMaxRanges - 1) / kMaxRanges) * kGroup;
  const int64_t n_ranges = std::max<int64_t>(1, (n + per_range - 1) / per_range);
  const int64_t n_blocks = (m + kDataBlock - 1) / kDataBlock;
  std::vector<float> partial(static_cast<size_t>(n_ranges * m));
  const float *wp = w.typed_data(), *ap = a.typed_data(), *xp = x.typed_data();
  float* part = partial.data();
  parallel_for(pool, n_ranges * n_blocks, [=](int64_t c) {
    const int64_t r = c / n_blocks, b = c % n_blocks;
    const int64_t i0 = r * per_range, i1 = i0 + per_range;
    const int64_t j0 = b * kDataBlock, j1 = std::min(m, j0 + kDataBlock);
    forward_chunk(p, n, wp, ap, xp, i0, i1, j0, j1, part + r * m);
  });
  float* out = f->typed_data();
  for (int64_t j = 0; j < m; ++j) {
    float s = part[j];
    for (int64_t r = 1; r < n_ranges; ++r) s += part[r * m + j];
    out[j] = s;
  }
  return ffi::Error::Success();
}

// w (N, p), x (m, p), u (m,) -> G (N,), H (N, p)
ffi::Error TanhBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w,
                            ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                            ffi::ResultBuffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> h) {
  const int64_t n = w.dimensions()[0], p = w.dimensions()[1], m = x.dimensions()[0];
  if (auto e = check_p(p); e.failure()) return e;
  const float *wp = w.typed_data(), *xp = x.typed_data(), *up = u.typed_data();
  std::vector<float> ux(static_cast<size_t>(m * p));  // u_j x_j, once per call
  for (int64_t j = 0; j < m; ++j)
    for (int64_t k = 0; k < p; ++k) ux[j * p + k] = up[j] * xp[j * p + k];
  const float* uxp = ux.data();
  float *gp = g->typed_data(), *hp = h->typed_data();
  const int64_t n_chunks = (n + kBackwardChunk - 1) / kBackwardChunk;
  parallel_for(pool, n_chunks, [=](int64_t c) {
    const int64_t i0 = c * kBackwardChunk;
    backward_chunk(p, n, m, wp, xp, up, uxp, i0, i0 + kBackwardChunk, gp, hp);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MfldTanhForward, TanhForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MfldTanhBackward, TanhBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
