// The drift of a tanh network with wide features (p > 9) on one block of data rows, as two
// XLA FFI custom calls on CPU (mfld/kernels.py registers and calls them; mfld/network.py
// scans them over the data blocks; docs/performance.md "Large d").
//
//   forward:  S_ij = tanh(w_i . x_j),  F_j = sum_i a_i S_ij                 S (N, b), F (b,)
//   backward: G_i += sum_j u_j S_ij,   H_i += sum_j u_j (1 - S_ij^2) x_j    in place
//
// These are the two GEMMs of the drift (inner dimension p forward, b backward) with what XLA
// runs as separate passes over the (N, b) block folded into them: tanh and the sum F in the
// forward GEMM's tile, while it is in registers; 1 - S^2 and G in the backward pass over a
// strip of S that is in L1. Each GEMM is the classic 6 x 16 register tile (6 particles, 16
// data rows or features, 12 accumulators) over a packed panel of x (forward) or u x
// (backward) that stays in L2.
//
// Determinism: particles are cut into chunks that depend on N only, each S, G, H element is
// computed by one chunk in a fixed order, and F adds the chunks' partial sums in chunk order:
// the results are bit-identical for any number of threads (XLA's intra-op pool).
//
// Requirements (checked): b a multiple of 16 (the caller pads the block with zero rows that
// carry u = 0), float32, contiguous row-major buffers.

#include <vector>

#include "tanh_common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MFLD_X86_VERSIONS 1
#endif

namespace {

using namespace mfld_kernels;  // NOLINT: v8, vtanh, parallel_for, ffi

constexpr int kMR = 6;               // particles per register tile
constexpr int kNR = 16;              // data rows (forward) / features (backward) per tile
constexpr int64_t kMinChunk = 16 * kMR;  // particles per chunk (at least)
constexpr int64_t kMaxChunks = 64;       // chunks per call (at most)

// Particles per chunk: a multiple of kMR fixed by N alone.
int64_t chunk_size(int64_t n) {
  const int64_t strips = (n + kMR - 1) / kMR;
  const int64_t per = std::max<int64_t>(kMinChunk / kMR, (strips + kMaxChunks - 1) / kMaxChunks);
  return per * kMR;
}

// Row pointers of a strip of kMR particles starting at i: rows >= n point at a zero row.
MFLD_INLINE void strip_rows(const float* base, int64_t stride, int64_t n, int64_t i, const float* zero,
                            const float* (&rows)[kMR]) {
  for (int r = 0; r < kMR; ++r) rows[r] = i + r < n ? base + (i + r) * stride : zero;
}

// The broadcast of one float from memory to 8 lanes, the inner loops' other operand. GCC's
// generic vector code builds it lane by lane (5 instructions, and it spills accumulators);
// the AVX2 version of the kernels (below) issues the one-instruction vbroadcastss. (It is
// written as inline assembly because an intrinsic would need its target attribute on every
// function it is inlined into, including the shared templates.)
struct GenericBroadcast {
  static MFLD_INLINE v8 at(const float* p) { return splat(*p); }
};
#ifdef MFLD_X86_VERSIONS
struct Avx2Broadcast {
  static MFLD_INLINE v8 at(const float* p) {
    v8 v;
    asm("vbroadcastss %1, %t0" : "=x"(v) : "m"(*p));
    return v;
  }
};
#endif

#define MFLD_TILE_ZERO v8 c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, \
                          c30 = {}, c31 = {}, c40 = {}, c41 = {}, c50 = {}, c51 = {}
#define MFLD_TILE_STEP(b0, b1, t0, t1, t2, t3, t4, t5) \
  {                                                  \
    v8 t = B::at(t0); c00 += t * b0; c01 += t * b1;  \
    t = B::at(t1); c10 += t * b0; c11 += t * b1;     \
    t = B::at(t2); c20 += t * b0; c21 += t * b1;     \
    t = B::at(t3); c30 += t * b0; c31 += t * b1;     \
    t = B::at(t4); c40 += t * b0; c41 += t * b1;     \
    t = B::at(t5); c50 += t * b0; c51 += t * b1;     \
  }

#define MFLD_HALF_TILE_STEP(b0, t0, t1, t2, t3, t4, t5)                                    \
  {                                                                                        \
    c00 += B::at(t0) * b0; c10 += B::at(t1) * b0; c20 += B::at(t2) * b0;                   \
    c30 += B::at(t3) * b0; c40 += B::at(t4) * b0; c50 += B::at(t5) * b0;                   \
  }

// Forward over particles [i0, i1) (a multiple of kMR apart; rows >= n are zero): S rows and
// this chunk's F partial sums f_part (b,). xp: x packed as (b / 16) panels of (p, 16).
template <class B>
MFLD_INLINE void forward_chunk_impl(int64_t n, int64_t p, int64_t b, const float* w, const float* a,
                                    const float* xp, const float* zero_row, int64_t i0, int64_t i1,
                                    float* s, float* f_part) {
  for (int64_t j = 0; j < b; ++j) f_part[j] = 0.0f;
  for (int64_t i = i0; i < i1 && i < n; i += kMR) {
    const float* wr[kMR];
    strip_rows(w, p, n, i, zero_row, wr);
    float ar[kMR];
    for (int r = 0; r < kMR; ++r) ar[r] = i + r < n ? a[i + r] : 0.0f;
    for (int64_t q = 0; q < b / kNR; ++q) {
      const float* xq = xp + q * p * kNR;
      MFLD_TILE_ZERO;
      for (int64_t k = 0; k < p; ++k) {
        const v8 b0 = load(xq + k * kNR), b1 = load(xq + k * kNR + kLanes);
        MFLD_TILE_STEP(b0, b1, wr[0] + k, wr[1] + k, wr[2] + k, wr[3] + k, wr[4] + k, wr[5] + k)
      }
      const v8 c[kMR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
      v8 f0 = load(f_part + q * kNR), f1 = load(f_part + q * kNR + kLanes);
      for (int r = 0; r < kMR && i + r < n; ++r) {
        const v8 t0 = vtanh(c[r][0]), t1 = vtanh(c[r][1]);
        f0 += B::at(ar + r) * t0;
        f1 += B::at(ar + r) * t1;
        float* sr = s + (i + r) * b + q * kNR;
        store(sr, t0);
        store(sr + kLanes, t1);
      }
      store(f_part + q * kNR, f0);
      store(f_part + q * kNR + kLanes, f1);
    }
  }
}

// Backward over particles [i0, i1): G_i += sum_j u_j S_ij, H_i += sum_j (1 - S_ij^2) (u x)_j.
// up: u x packed as ceil(p / 16) panels of (b, 16), zero beyond p.
template <class B>
MFLD_INLINE void backward_chunk_impl(int64_t n, int64_t p, int64_t b, const float* s, const float* u,
                                     const float* up, int64_t i0, int64_t i1, float* g, float* h) {
  std::vector<float> ds_buf(static_cast<size_t>(kMR * b));
  float* ds = ds_buf.data();  // (kMR, b): 1 - S^2 of the strip
  const int64_t panels = (p + kNR - 1) / kNR;
  for (int64_t i = i0; i < i1 && i < n; i += kMR) {
    for (int r = 0; r < kMR; ++r) {
      if (i + r >= n) {
        for (int64_t j = 0; j < b; ++j) ds[r * b + j] = 0.0f;
        continue;
      }
      const float* sr = s + (i + r) * b;
      v8 gv = {};
      for (int64_t j = 0; j < b; j += kLanes) {
        const v8 sv = load(sr + j);
        gv += load(u + j) * sv;
        store(ds + r * b + j, 1.0f - sv * sv);
      }
      float gs = 0.0f;
      for (int l = 0; l < kLanes; ++l) gs += gv[l];
      g[i + r] += gs;
    }
    for (int64_t q = 0; q < panels; ++q) {
      const float* uq = up + q * b * kNR;
      const int64_t width = std::min<int64_t>(kNR, p - q * kNR);
      MFLD_TILE_ZERO;
      if (width > kLanes) {
        for (int64_t j = 0; j < b; ++j) {
          const v8 b0 = load(uq + j * kNR), b1 = load(uq + j * kNR + kLanes);
          const float* dj = ds + j;
          MFLD_TILE_STEP(b0, b1, dj, dj + b, dj + 2 * b, dj + 3 * b, dj + 4 * b, dj + 5 * b)
        }
      } else {  // a last panel of <= 8 features: half the tile (the other half would be zeros)
        for (int64_t j = 0; j < b; ++j) {
          const v8 b0 = load(uq + j * kNR);
          const float* dj = ds + j;
          MFLD_HALF_TILE_STEP(b0, dj, dj + b, dj + 2 * b, dj + 3 * b, dj + 4 * b, dj + 5 * b)
        }
      }
      const v8 c[kMR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
      for (int r = 0; r < kMR && i + r < n; ++r) {
        alignas(32) float t[kNR];
        store(t, c[r][0]);
        store(t + kLanes, c[r][1]);
        float* hr = h + (i + r) * p + q * kNR;
        for (int64_t l = 0; l < width; ++l) hr[l] += t[l];
      }
    }
  }
}

// One version per instruction set, chosen by the loader (GCC/Clang function multiversioning).
#ifdef MFLD_X86_VERSIONS
#define MFLD_VERSION(v) __attribute__((target(v)))
#define MFLD_BLOCK_VERSIONS(X) X("default", GenericBroadcast) X("arch=x86-64-v3", Avx2Broadcast)
#else
#define MFLD_VERSION(v)
#define MFLD_BLOCK_VERSIONS(X) X("", GenericBroadcast)
#endif

#define MFLD_DEFINE_CHUNKS(version, Broadcast)                                                      \
  MFLD_VERSION(version)                                                                             \
  void forward_chunk(int64_t n, int64_t p, int64_t b, const float* w, const float* a,              \
                     const float* xp, const float* zero_row, int64_t i0, int64_t i1, float* s,      \
                     float* f_part) {                                                               \
    forward_chunk_impl<Broadcast>(n, p, b, w, a, xp, zero_row, i0, i1, s, f_part);                 \
  }                                                                                                 \
  MFLD_VERSION(version)                                                                             \
  void backward_chunk(int64_t n, int64_t p, int64_t b, const float* s, const float* u,             \
                      const float* up, int64_t i0, int64_t i1, float* g, float* h) {                \
    backward_chunk_impl<Broadcast>(n, p, b, s, u, up, i0, i1, g, h);                               \
  }
MFLD_BLOCK_VERSIONS(MFLD_DEFINE_CHUNKS)
#undef MFLD_DEFINE_CHUNKS

ffi::Error check_rows(int64_t b) {
  if (b % kNR != 0) return ffi::Error::InvalidArgument("mfld tanh blocks: data rows must be a multiple of 16");
  return ffi::Error::Success();
}

// w (N, p), a (N,), x (b, p) -> F (b,), S (N, b)
ffi::Error BlockForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> a,
                            ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> f,
                            ffi::ResultBuffer<ffi::F32> s) {
  const int64_t n = w.dimensions()[0], p = w.dimensions()[1], b = x.dimensions()[0];
  if (auto e = check_rows(b); e.failure()) return e;
  const float* xs = x.typed_data();
  std::vector<float> packed(static_cast<size_t>(b * p));  // (b / 16) panels of (p, 16)
  for (int64_t q = 0; q < b / kNR; ++q)
    for (int64_t k = 0; k < p; ++k)
      for (int l = 0; l < kNR; ++l) packed[(q * p + k) * kNR + l] = xs[(q * kNR + l) * p + k];
  std::vector<float> zero(static_cast<size_t>(p), 0.0f);
  const int64_t per = chunk_size(n), n_chunks = (n + per - 1) / per;
  std::vector<float> partial(static_cast<size_t>(n_chunks * b));
  const float *wp = w.typed_data(), *ap = a.typed_data(), *xp = packed.data(), *zp = zero.data();
  float *sp = s->typed_data(), *part = partial.data();
  parallel_for(pool, n_chunks, [=](int64_t c) {
    forward_chunk(n, p, b, wp, ap, xp, zp, c * per, (c + 1) * per, sp, part + c * b);
  });
  float* out = f->typed_data();
  for (int64_t j = 0; j < b; ++j) {
    float acc = part[j];
    for (int64_t c = 1; c < n_chunks; ++c) acc += part[c * b + j];
    out[j] = acc;
  }
  return ffi::Error::Success();
}

// s (N, b), x (b, p), u (b,), g (N,), h (N, p) -> g + G, h + H (aliased to g, h by the caller)
ffi::Error BlockBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> s, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> g_in,
                             ffi::Buffer<ffi::F32> h_in, ffi::ResultBuffer<ffi::F32> g,
                             ffi::ResultBuffer<ffi::F32> h) {
  const int64_t n = s.dimensions()[0], b = s.dimensions()[1], p = x.dimensions()[1];
  if (auto e = check_rows(b); e.failure()) return e;
  float *gp = g->typed_data(), *hp = h->typed_data();
  if (gp != g_in.typed_data()) std::memcpy(gp, g_in.typed_data(), sizeof(float) * n);
  if (hp != h_in.typed_data()) std::memcpy(hp, h_in.typed_data(), sizeof(float) * n * p);
  const float *xs = x.typed_data(), *us = u.typed_data();
  const int64_t panels = (p + kNR - 1) / kNR;
  std::vector<float> packed(static_cast<size_t>(panels * b * kNR), 0.0f);  // panels of (b, 16)
  for (int64_t q = 0; q < panels; ++q)
    for (int64_t j = 0; j < b; ++j)
      for (int64_t l = 0; l < kNR && q * kNR + l < p; ++l)
        packed[(q * b + j) * kNR + l] = us[j] * xs[j * p + q * kNR + l];
  const int64_t per = chunk_size(n), n_chunks = (n + per - 1) / per;
  const float *sp = s.typed_data(), *pk = packed.data();
  parallel_for(pool, n_chunks, [=](int64_t c) {
    backward_chunk(n, p, b, sp, us, pk, c * per, (c + 1) * per, gp, hp);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MfldTanhBlockForward, BlockForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MfldTanhBlockBackward, BlockBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
