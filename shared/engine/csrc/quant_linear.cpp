// distserve::q4_1_linear and distserve::q8_0_linear: y = x W^T with W stored in GGUF's block formats,
// dequantized in registers as it is read, so that a decode step reads the compressed bytes once.
//
// Blocks of 32 weights along a row (the input dimension), as GGUF stores them:
//   q4_1: 16 bytes of nibbles (byte j: weight j in its low nibble, weight j + 16 in its high one), a
//         scale d and a minimum m (fp16): w = m + d * q, q in 0..15;
//   q8_0: 32 signed bytes and a scale d (fp16): w = d * q.
// Activations and sums stay fp32, so a model whose weights were these blocks (the GGUF file) computes
// what its dequantized fp32 weights compute, up to rounding in the sums.
//
// One task per slice of output features (OpenMP through at::parallel_for). Each weight block is
// dequantized once into registers and multiplied with up to ROWS input rows at a time: a GEMM-class
// inner loop for batched decode, a GEMV at batch 1. Built with -march=native for the CPU it runs on
// (shared/engine/native.py): AVX-512 where the compiler targets it, else AVX2 + F16C + FMA, else scalar.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#ifndef DISTSERVE_NS
#define DISTSERVE_NS distserve
#endif

namespace {

constexpr int64_t QK = 32;    // weights per block
#if defined(__AVX512F__)
constexpr int64_t ROWS = 8;   // input rows multiplied by one dequantized block at a time (registers allowing)
#else
constexpr int64_t ROWS = 4;
#endif

inline float half_to_float(at::Half h) {
#if defined(__F16C__)
  return _cvtsh_ss(h.x);  // one instruction; c10's conversion is a dozen
#else
  return static_cast<float>(h);
#endif
}

// One output feature: out[r * ldo] = sum_k x[r * ldx + k] * w[k] for r < rows, w given by its blocks.
// `dequant(b, lo, hi)` writes block b's 32 weights as floats (lo: weights 0-15, hi: 16-31).
// Each row keeps independent accumulators (A of them) so that consecutive FMAs do not wait on each other's
// latency: with one accumulator a single row ran at a quarter of the FMA units' rate.
template <int64_t R, typename Dequant>
inline void dot_rows(const float* x, int64_t ldx, int64_t blocks, float* out, int64_t ldo, Dequant dequant) {
#if defined(__AVX512F__)
  constexpr int64_t A = R == 1 ? 4 : 2;  // lo and hi halves; a single row also alternates blocks
  __m512 acc[R][A];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t a = 0; a < A; ++a) acc[r][a] = _mm512_setzero_ps();
  // Blocks in steps of A / 2, each with its own pair of accumulators (indices known at compile time: a
  // runtime index would put the accumulators in memory).
  int64_t b = 0;
  for (; b + A / 2 <= blocks; b += A / 2) {
    for (int64_t j = 0; j < A / 2; ++j) {
      __m512 lo, hi;
      dequant(b + j, lo, hi);
      for (int64_t r = 0; r < R; ++r) {
        const float* xr = x + r * ldx + (b + j) * QK;
        acc[r][2 * j] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), acc[r][2 * j]);
        acc[r][2 * j + 1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), acc[r][2 * j + 1]);
      }
    }
  }
  for (; b < blocks; ++b) {  // an odd last block
    __m512 lo, hi;
    dequant(b, lo, hi);
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + b * QK;
      acc[r][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), acc[r][1]);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    __m512 sum = acc[r][0];
    for (int64_t a = 1; a < A; ++a) sum = _mm512_add_ps(sum, acc[r][a]);
    out[r * ldo] = _mm512_reduce_add_ps(sum);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc[R][4];  // one per quarter of a block
  for (int64_t r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256 w[4];  // weights 0-7, 8-15, 16-23, 24-31
    dequant(b, w);
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + b * QK;
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xr + 8 * i), acc[r][i]);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3]));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    out[r * ldo] = _mm_cvtss_f32(s);
  }
#else
  float acc[R] = {};
  float w[QK];
  for (int64_t b = 0; b < blocks; ++b) {
    dequant(b, w);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < QK; ++k) acc[r] += w[k] * x[r * ldx + b * QK + k];
  }
  for (int64_t r = 0; r < R; ++r) out[r * ldo] = acc[r];
#endif
}

// The dequantizers of one output feature's blocks, in each instruction set's register shape.
struct Q4_1 {
  const uint8_t* qs;  // [blocks, 16]
  const at::Half* d;  // [blocks]
  const at::Half* m;
#if defined(__AVX512F__)
  inline void operator()(int64_t b, __m512& lo, __m512& hi) const {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * b)));
    const __m512 scale = _mm512_set1_ps(half_to_float(d[b])), min = _mm512_set1_ps(half_to_float(m[b]));
    lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15))), scale, min);
    hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), scale, min);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  inline void operator()(int64_t b, __m256 (&w)[4]) const {
    const __m256 scale = _mm256_set1_ps(half_to_float(d[b])), min = _mm256_set1_ps(half_to_float(m[b]));
    const __m256i nibble = _mm256_set1_epi32(15);
    for (int half = 0; half < 2; ++half) {  // bytes 0-7 hold weights 0-7 and 16-23; bytes 8-15: 8-15, 24-31
      const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 16 * b + 8 * half)));
      w[half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(bytes, nibble)), scale, min);
      w[half + 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4)), scale, min);
    }
  }
#else
  inline void operator()(int64_t b, float (&w)[QK]) const {
    const float scale = half_to_float(d[b]), min = half_to_float(m[b]);
    for (int64_t j = 0; j < 16; ++j) {
      w[j] = min + scale * float(qs[16 * b + j] & 15);
      w[j + 16] = min + scale * float(qs[16 * b + j] >> 4);
    }
  }
#endif
};

struct Q8_0 {
  const int8_t* qs;  // [blocks, 32]
  const at::Half* d;
#if defined(__AVX512F__)
  inline void operator()(int64_t b, __m512& lo, __m512& hi) const {
    const __m512 scale = _mm512_set1_ps(half_to_float(d[b]));
    const __m128i* q = reinterpret_cast<const __m128i*>(qs + QK * b);
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))), scale);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))), scale);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  inline void operator()(int64_t b, __m256 (&w)[4]) const {
    const __m256 scale = _mm256_set1_ps(half_to_float(d[b]));
    for (int i = 0; i < 4; ++i) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + QK * b + 8 * i));
      w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), scale);
    }
  }
#else
  inline void operator()(int64_t b, float (&w)[QK]) const {
    const float scale = half_to_float(d[b]);
    for (int64_t k = 0; k < QK; ++k) w[k] = scale * float(qs[QK * b + k]);
  }
#endif
};

// y [M, N] = x [M, K] W^T, W as `make(n)`'s dequantizer for output feature n.
template <typename Make>
at::Tensor run(const at::Tensor& x_in, int64_t n_out, Make make) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "x must be a 2-D float32 tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), blocks = K / QK;
  TORCH_CHECK(K % QK == 0, "the input dimension must be a multiple of ", QK);
  at::Tensor y = at::empty({M, n_out}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Enough output features per task to amortize it, few enough to spread them over the threads.
  const int64_t grain = std::max<int64_t>(1, 16 / std::max<int64_t>(1, M));
  at::parallel_for(0, n_out, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const auto dequant = make(n);
      int64_t r = 0;
      for (; r + ROWS <= M; r += ROWS) dot_rows<ROWS>(xp + r * K, K, blocks, yp + r * n_out + n, n_out, dequant);
      for (; r < M; ++r) dot_rows<1>(xp + r * K, K, blocks, yp + r * n_out + n, n_out, dequant);
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
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
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
