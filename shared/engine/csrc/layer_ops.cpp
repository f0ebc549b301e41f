// distserve::rms_norm and distserve::rope_: the small per-layer ops of an eager decode step, each one pass
// over its rows. torch's versions cost 15-40 us a call at batch 1 (several ATen ops each, and F.rms_norm
// wakes the thread pool), 61 + 30 calls a step; these take a few. Rows run in one thread up to a few
// thousand elements' worth, in parallel beyond (prefill). float32 only: other dtypes keep torch's ops
// (shared/engine/layer_ops.py). Built at first use by shared/engine/native.py, for the CPU it runs on.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t GRAIN = 16384;  // elements a task is worth: below this, no thread wakes

int64_t rows_per_task(int64_t width) { return std::max<int64_t>(1, GRAIN / std::max<int64_t>(1, width)); }

// y = x / sqrt(mean(x^2) + eps) * weight, per row of x [T, H].
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "x must be a 2-D float32 tensor");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x_in.size(1) && weight.scalar_type() == at::kFloat &&
                  weight.is_contiguous(), "weight must be float32 [hidden]");
  const at::Tensor x = x_in.contiguous();
  const int64_t T = x.size(0), H = x.size(1);
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, rows_per_task(H), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* row = xp + t * H;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < H; ++i) sum += row[i] * row[i];
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(H) + e);
      float* out = yp + t * H;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) out[i] = row[i] * inv * w[i];
    }
  });
  return y;
}

// Rotate-half RoPE in place on x [T, heads, D] (rows may be strided, as a view into the fused QKV
// projection; each head's D values contiguous): x = x * cos + swap_halves(x) * sin, with cos and sin
// [T, 1, D] (sin signed, as shared/engine/model.py's RotaryEmbedding builds it).
void rope_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.stride(2) == 1 && x.stride(1) == x.size(2),
              "x must be float32 [T, heads, D] with contiguous heads");
  const int64_t T = x.size(0), heads = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK(D % 2 == 0, "the head dimension must be even");
  for (const at::Tensor* table : {&cos, &sin})
    TORCH_CHECK(table->scalar_type() == at::kFloat && table->is_contiguous() && table->numel() == T * D,
                "cos and sin must be contiguous float32 [T, 1, D]");
  float* xp = x.data_ptr<float>();
  const int64_t row_stride = x.stride(0);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, T, rows_per_task(heads * D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + t * D;
      const float* s = sp + t * D;
      for (int64_t h = 0; h < heads; ++h) {
        float* v = xp + t * row_stride + h * D;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float lo = v[i], hi = v[i + half];
          v[i] = lo * c[i] + hi * s[i];
          v[i + half] = hi * c[i + half] + lo * s[i + half];
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
}

TORCH_LIBRARY_IMPL(distserve, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rope_", &rope_);
}
