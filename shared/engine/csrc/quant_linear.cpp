// distserve::q4_1_linear and distserve::q8_0_linear: y = x W^T with W stored in GGUF's block formats and
// read once per call in those bytes, as llama.cpp does.
//
// Blocks of 32 weights along a row (the input dimension), as GGUF stores them:
//   q4_1: 16 bytes of nibbles (byte j: weight j in its low nibble, weight j + 16 in its high one), a
//         scale d and a minimum m (fp16): w = m + d * q, q in 0..15;
//   q8_0: 32 signed bytes and a scale d (fp16): w = d * q.
// The activations are quantized the same way per block of 32 (xq = round(x / dx), dx = max |x| / 127,
// llama.cpp's q8_1), so that a block's dot product is one integer instruction over 32 byte pairs:
//   sum_k w_k x_k = d dx sum_k q_k xq_k (+ m dx sum_k xq_k for q4_1).
// That costs a little precision (perplexity and top-1 agreement in docs/performance.md) and buys speed at
// batch 1, where a float-activation version of this kernel (each weight widened to fp32 in registers)
// took 1.4-1.5x as long on the AVX2 EPYC; at 8-32 rows the two were level.
//
// One task per slice of output features (OpenMP through at::parallel_for). A tile of 4 output features
// and 2 input rows unpacks each weight block once and keeps 8 independent accumulators: a GEMM-class
// inner loop for batched decode, and at batch 1 four features' blocks in flight at once. Built with
// -march=native for the CPU it runs on (shared/engine/native.py): AVX-512 VNNI or AVX-VNNI (vpdpbusd)
// where the compiler targets them, else AVX2 (vpmaddubsw), else scalar.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifndef DISTSERVE_NS
#define DISTSERVE_NS distserve
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DOT_VNNI(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define DOT_VNNI(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#endif

namespace {

constexpr int64_t QK = 32;  // weights per block

inline float half_to_float(at::Half h) {
#if defined(__F16C__)
  return _cvtsh_ss(h.x);  // one instruction; c10's conversion is a dozen
#else
  return static_cast<float>(h);
#endif
}

// The activations quantized per block, as raw pointers: row r's block b at xq + r * K + b * 32, its
// scale dx = max |x| / 127 and dx * sum(xq) at dx / sx + r * blocks + b.
struct Rows {
  const int8_t* xq;
  const float* dx;
  const float* sx;
  int64_t K, blocks;
};

// One block of 32 activations: xq = round-half-even(x * 127 / max |x|) (what the tests' reference computes).
inline void quantize_block(const float* v, int8_t* xq, float* dx, float* sx) {
#if defined(__AVX2__)
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 x[4];
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    x[i] = _mm256_loadu_ps(v + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, x[i]));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  const float a = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  const __m256 inv = _mm256_set1_ps(a > 0.f ? 127.f / a : 0.f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(x[i], inv));  // rounds half to even
  // Sum before packing (int32 lanes), then pack 32 int32 to 32 int8 in order.
  const __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  const __m256i p16 = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
  const __m256i p8 = _mm256_packs_epi16(p16, p16b);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq),
                      _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
  const int32_t sum = _mm_cvtsi128_si32(s4);
#else
  float a = 0.f;
  for (int64_t k = 0; k < QK; ++k) a = std::max(a, std::fabs(v[k]));
  const float inv = a > 0.f ? 127.f / a : 0.f;
  int32_t sum = 0;
  for (int64_t k = 0; k < QK; ++k) {
    const int32_t qk = static_cast<int32_t>(std::nearbyint(v[k] * inv));
    xq[k] = static_cast<int8_t>(qk);
    sum += qk;
  }
#endif
  *dx = a / 127.f;
  *sx = *dx * static_cast<float>(sum);
}

// x [M, K] quantized into this thread's scratch buffers (no allocation per call once they have grown).
Rows quantize_rows(const at::Tensor& x) {
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> scales;
  const int64_t M = x.size(0), K = x.size(1), blocks = K / QK, n = M * blocks;
  xq.resize(M * K);
  scales.resize(2 * n);
  const float* xp = x.data_ptr<float>();
  int8_t* q = xq.data();
  float* dx = scales.data();
  float* sx = dx + n;
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) quantize_block(xp + i * QK, q + i * QK, dx + i, sx + i);
  });
  return Rows{q, dx, sx, K, blocks};
}

#if defined(__AVX2__)
// Eight int32 partial sums of 32 unsigned x signed byte products.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(DOT_VNNI)
  return DOT_VNNI(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));  // pairs fit int16: 2*127*127
#endif
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// The weight blocks of one output feature. `unpack(b)` puts block b's 32 weights in a register as bytes,
// `dot(w, xq)` is their 8 int32 partial sums of products with a block of quantized activations, `scale(b)`
// and `min(b)` are the block's d and m (m = 0 for q8_0).
struct Q4_1 {
  const uint8_t* qs;  // [blocks, 16]
  const at::Half* d;  // [blocks]
  const at::Half* m;
  static constexpr bool has_min = true;
#if defined(__AVX2__)
  // The 32 nibbles as bytes in weight order (the low nibbles are weights 0-15, the high ones 16-31).
  inline __m256i unpack(int64_t b) const {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * b));
    const __m128i low = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low), _mm_and_si128(raw, low));
  }
  static constexpr bool signed_weights = false;
  static inline __m256i dot(__m256i w, __m256i x, __m256i) { return dot_u8s8(w, x); }
#endif
  inline int32_t dot_scalar(int64_t b, const int8_t* xq) const {
    int32_t s = 0;
    for (int64_t j = 0; j < 16; ++j) s += (qs[16 * b + j] & 15) * xq[j] + (qs[16 * b + j] >> 4) * xq[j + 16];
    return s;
  }
  inline float scale(int64_t b) const { return half_to_float(d[b]); }
  inline float min(int64_t b) const { return half_to_float(m[b]); }
  inline void prefetch(int64_t) const {}  // measured: the hardware's prefetch alone is faster
};

struct Q8_0 {
  const int8_t* qs;  // [blocks, 32]
  const at::Half* d;
  static constexpr bool has_min = false;
#if defined(__AVX2__)
  inline __m256i unpack(int64_t b) const { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + QK * b)); }
  // signed x signed as unsigned x signed: |x| (once per activation block) * (w with x's sign)
  static constexpr bool signed_weights = true;
  static inline __m256i dot(__m256i w, __m256i x, __m256i abs_x) { return dot_u8s8(abs_x, _mm256_sign_epi8(w, x)); }
#endif
  inline int32_t dot_scalar(int64_t b, const int8_t* xq) const {
    int32_t s = 0;
    for (int64_t k = 0; k < QK; ++k) s += qs[QK * b + k] * xq[k];
    return s;
  }
  inline float scale(int64_t b) const { return half_to_float(d[b]); }
  inline float min(int64_t) const { return 0.f; }
  // 8 blocks ahead: the LM head's 30 MB read 1.5x faster than with the hardware's prefetch alone
  inline void prefetch(int64_t b) const { _mm_prefetch(reinterpret_cast<const char*>(qs + QK * b), _MM_HINT_T0); }
};

// out[r * ldo + f] for the R rows from `row` and the F output features of `w`: every weight block is unpacked
// once per tile and multiplied with R activation blocks; the F x R accumulators are independent, so the FMAs
// do not wait on one another's latency.
template <int F, int R, typename W>
inline void tile(const Rows& x, int64_t row, const W (&w)[F], float* out, int64_t ldo) {
  float mins[F][R] = {};
#if defined(__AVX2__)
  __m256 acc[F][R];
  for (int f = 0; f < F; ++f)
    for (int r = 0; r < R; ++r) acc[f][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < x.blocks; ++b) {
    __m256i wb[F];
    float dw[F];
    for (int f = 0; f < F; ++f) {
      w[f].prefetch(b + 8);
      wb[f] = w[f].unpack(b);
      dw[f] = w[f].scale(b);
    }
    for (int r = 0; r < R; ++r) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.xq + (row + r) * x.K + b * QK));
      const __m256i abs_x = W::signed_weights ? _mm256_abs_epi8(xv) : xv;
      const float dx = x.dx[(row + r) * x.blocks + b];
      for (int f = 0; f < F; ++f)
        acc[f][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(W::dot(wb[f], xv, abs_x)), _mm256_set1_ps(dw[f] * dx),
                                    acc[f][r]);
    }
    if constexpr (W::has_min) {
      for (int f = 0; f < F; ++f) {
        const float m = w[f].min(b);
        for (int r = 0; r < R; ++r) mins[f][r] += m * x.sx[(row + r) * x.blocks + b];
      }
    }
  }
  for (int f = 0; f < F; ++f)
    for (int r = 0; r < R; ++r) out[r * ldo + f] = hsum(acc[f][r]) + mins[f][r];
#else
  float acc[F][R] = {};
  for (int64_t b = 0; b < x.blocks; ++b) {
    for (int f = 0; f < F; ++f) {
      const float d = w[f].scale(b), m = w[f].min(b);
      for (int r = 0; r < R; ++r) {
        const int64_t i = (row + r) * x.blocks + b;
        acc[f][r] += d * x.dx[i] * static_cast<float>(w[f].dot_scalar(b, x.xq + (row + r) * x.K + b * QK));
        mins[f][r] += m * x.sx[i];
      }
    }
  }
  for (int f = 0; f < F; ++f)
    for (int r = 0; r < R; ++r) out[r * ldo + f] = acc[f][r] + mins[f][r];
#endif
}

constexpr int FEATURES = 4;  // output features per tile
constexpr int ROWS = 2;      // input rows per tile (4 x 2 accumulators, 4 weight blocks: 13 of 16 registers)

template <int F, typename W>
inline void tile_rows(const Rows& x, int64_t M, const W (&w)[F], float* out, int64_t ldo) {
  int64_t r = 0;
  for (; r + ROWS <= M; r += ROWS) tile<F, ROWS>(x, r, w, out + r * ldo, ldo);
  for (; r < M; ++r) tile<F, 1>(x, r, w, out + r * ldo, ldo);
}

// y [M, N] = x [M, K] W^T, W as `make(n)`'s blocks for output feature n.
template <typename Make>
at::Tensor run(const at::Tensor& x_in, int64_t n_out, Make make) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "x must be a 2-D float32 tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), blocks = K / QK;
  TORCH_CHECK(K % QK == 0, "the input dimension must be a multiple of ", QK);
  const Rows rows = quantize_rows(x);
  at::Tensor y = at::empty({M, n_out}, x.options());
  float* yp = y.data_ptr<float>();
  using W = decltype(make(0));
  const int64_t tiles = (n_out + FEATURES - 1) / FEATURES;
  // Enough tiles per task to amortize it, few enough to spread them over the threads.
  const int64_t grain = std::max<int64_t>(1, 16 / std::max<int64_t>(1, M));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t * FEATURES;
      if (n + FEATURES <= n_out) {
        const W w[FEATURES] = {make(n), make(n + 1), make(n + 2), make(n + 3)};
        tile_rows<FEATURES>(rows, M, w, yp + n, n_out);
      } else {
        for (int64_t f = n; f < n_out; ++f) {
          const W w[1] = {make(f)};
          tile_rows<1>(rows, M, w, yp + f, n_out);
        }
      }
    }
  });
  return y;
}

void check_blocks(const at::Tensor& qs, const at::Tensor& d, int64_t bytes_per_block) {
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && d.dim() == 2 && d.is_contiguous(), "blocks must be contiguous 2-D");
  TORCH_CHECK(d.scalar_type() == at::kHalf, "scales must be float16");
  TORCH_CHECK(qs.size(0) == d.size(0) && qs.size(1) == d.size(1) * bytes_per_block, "blocks and scales disagree");
}

// qs [N, K / 2] uint8, d and m [N, K / 32] float16.
at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m) {
  check_blocks(qs, d, 16);
  TORCH_CHECK(m.sizes() == d.sizes() && m.is_contiguous() && m.scalar_type() == at::kHalf, "minimums like scales");
  TORCH_CHECK(qs.scalar_type() == at::kByte && x.size(1) == 2 * qs.size(1), "x and the weight disagree");
  const int64_t blocks = d.size(1);
  const uint8_t* q = qs.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = m.data_ptr<at::Half>();
  return run(x, qs.size(0), [&](int64_t n) { return Q4_1{q + n * blocks * 16, dp + n * blocks, mp + n * blocks}; });
}

// qs [N, K] int8, d [N, K / 32] float16.
at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d) {
  check_blocks(qs, d, QK);
  TORCH_CHECK(qs.scalar_type() == at::kChar && x.size(1) == qs.size(1), "x and the weight disagree");
  const int64_t blocks = d.size(1);
  const int8_t* q = qs.data_ptr<int8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  return run(x, qs.size(0), [&](int64_t n) { return Q8_0{q + n * blocks * QK, dp + n * blocks}; });
}

std::string isa() {
#if defined(DOT_VNNI)
  return "vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(DISTSERVE_NS, m) {
  m.def("q4_1_linear(Tensor x, Tensor qs, Tensor d, Tensor m) -> Tensor");
  m.def("q8_0_linear(Tensor x, Tensor qs, Tensor d) -> Tensor");
  m.def("quant_linear_isa() -> str", isa);
}

TORCH_LIBRARY_IMPL(DISTSERVE_NS, CPU, m) {
  m.impl("q4_1_linear", q4_1_linear);
  m.impl("q8_0_linear", q8_0_linear);
}
