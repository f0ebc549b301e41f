// distserve::paged_decode_attention: decode attention (one query token per sequence) read straight from
// the paged KV cache. The generic path gathers each sequence's blocks into a contiguous copy per layer
// and then runs SDPA, so every K/V byte is read, written and read again, and SDPA pays per (sequence,
// head) for tiny matmuls. Here each (sequence, KV head) task walks its block table once for K and once
// for V, with the query heads that share the KV head (grouped-query attention) handled together.
// Built at first use by shared/engine/native.py, for the CPU it runs on.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// exp(x) for x <= 0 (softmax after subtracting the max), written so that loops over it vectorize (std::exp
// does not without -ffast-math): 2^n * 2^f with a degree-6 polynomial for 2^f, f in [-0.5, 0.5]; relative
// error about 2e-7, below float rounding of the sums it feeds.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);  // below this exp underflows to 0 in float anyway
  const float t = x * 1.4426950408889634f;  // log2(e)
  const float n = std::nearbyint(t);
  const float f = t - n;
  float p = 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// D is the head dimension, a compile-time constant for the common sizes so that the loops vectorize
// fully; 0 means "given at run time".
template <typename scalar_t, int64_t D>
void attend(const at::Tensor& q, const at::Tensor& cache, int64_t layer, const at::Tensor& tables,
            const at::Tensor& context_lens, double scale, at::Tensor& out) {
  // cache: [blocks, layers, 2 (K, V), block_size, kv_heads, head_dim]
  const int64_t num_blocks = cache.size(0), num_layers = cache.size(1), block_size = cache.size(3);
  const int64_t kv_heads = cache.size(4), head_dim = D ? D : cache.size(5);
  const int64_t batch = q.size(0), heads = q.size(1), group = heads / kv_heads;
  const int64_t max_blocks = tables.size(1), q_stride = q.stride(0);
  const int64_t token_stride = kv_heads * head_dim;       // next token in a block
  const int64_t kv_stride = block_size * token_stride;    // K -> V
  const int64_t block_stride = num_layers * 2 * kv_stride;  // next block
  const scalar_t* base = cache.data_ptr<scalar_t>() + layer * 2 * kv_stride;
  const scalar_t* q_data = q.data_ptr<scalar_t>();
  const int64_t* table_data = tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();

  // A task is one sequence's KV heads [h0, h1): all of them (its blocks then stream contiguously) unless the
  // batch is too small to keep every thread busy, then one head each.
  const int64_t chunks = batch < 2 * at::get_num_threads() ? kv_heads : 1;
  const int64_t heads_per_chunk = kv_heads / chunks;
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, acc, scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, h0 = task % chunks * heads_per_chunk, h1 = h0 + heads_per_chunk;
      const int64_t rows = heads_per_chunk * group;  // query heads of this task, row r = (h - h0) * group + g
      const int64_t len = std::min(lens[b], max_blocks * block_size);
      const int64_t* table = table_data + b * max_blocks;
      for (int64_t i = 0; i < (len + block_size - 1) / block_size; ++i)
        TORCH_CHECK(table[i] >= 0 && table[i] < num_blocks, "paged_decode_attention: block id out of range");
      const scalar_t* q_rows = q_data + b * q_stride + h0 * group * head_dim;
      qf.resize(rows * head_dim);
      for (int64_t i = 0; i < rows * head_dim; ++i) qf[i] = static_cast<float>(q_rows[i]) * float(scale);
      acc.assign(rows * head_dim, 0.f);
      scores.resize(rows * len);

      // Token t's K (half = k_base) or V (half = v_base) row for all KV heads.
      const scalar_t* const k_base = base;
      const scalar_t* const v_base = base + kv_stride;
      auto token = [&](const scalar_t* half, int64_t t) {
        return half + table[t / block_size] * block_stride + (t % block_size) * token_stride;
      };
      // At a block's first token, ask for the sequence's next block: its stream starts early.
      auto prefetch_next_block = [&](const scalar_t* half, int64_t t) {
        if (t % block_size != 0 || t + block_size >= len) return;
        const char* next = reinterpret_cast<const char*>(half + table[t / block_size + 1] * block_stride);
        for (int64_t byte = 0; byte < kv_stride * int64_t(sizeof(scalar_t)); byte += 64)
          __builtin_prefetch(next + byte);
      };
      // fn(r, x) for every query row r of these heads, x being token t's K or V row of r's KV head.
      auto each_row = [&](const scalar_t* half, int64_t t, auto&& fn) {
        prefetch_next_block(half, t);
        const scalar_t* x_token = token(half, t);
        for (int64_t h = h0; h < h1; ++h)
          for (int64_t g = 0; g < group; ++g) fn((h - h0) * group + g, x_token + h * head_dim);
      };

      for (int64_t t = 0; t < len; ++t) {  // scores = q . K
        each_row(k_base, t, [&](int64_t r, const scalar_t* k) {
          const float* qr = qf.data() + r * head_dim;
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t d = 0; d < head_dim; ++d) sum += qr[d] * static_cast<float>(k[d]);
          scores[r * len + t] = sum;
        });
      }
      for (int64_t r = 0; r < rows; ++r) {  // softmax over the context
        float* s = scores.data() + r * len;
        float max = -std::numeric_limits<float>::infinity(), sum = 0.f;
        for (int64_t t = 0; t < len; ++t) max = std::max(max, s[t]);
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) sum += (s[t] = exp_nonpositive(s[t] - max));
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
      }
      for (int64_t t = 0; t < len; ++t) {  // out = p . V
        each_row(v_base, t, [&](int64_t r, const scalar_t* v) {
          const float p = scores[r * len + t];
          float* a = acc.data() + r * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * static_cast<float>(v[d]);
        });
      }
      scalar_t* o = out_data + b * heads * head_dim + h0 * group * head_dim;
      for (int64_t i = 0; i < rows * head_dim; ++i) o[i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& cache, int64_t layer,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 6, "paged_decode_attention: q [B, H, D], cache [N, L, 2, bs, KVH, D]");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && cache.is_contiguous(),
              "paged_decode_attention: q's heads and the cache must be contiguous");
  TORCH_CHECK(q.scalar_type() == cache.scalar_type(), "paged_decode_attention: q and cache dtypes differ");
  TORCH_CHECK(q.size(2) == cache.size(5) && q.size(1) % cache.size(4) == 0,
              "paged_decode_attention: head shapes of q and cache disagree");
  TORCH_CHECK(layer >= 0 && layer < cache.size(1), "paged_decode_attention: layer out of range");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "paged_decode_attention: block tables and context lengths must be int64");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) && context_lens.numel() == q.size(0),
              "paged_decode_attention: one block table row and one context length per sequence");
  at::Tensor tables = block_tables.contiguous(), lens = context_lens.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    switch (q.size(2)) {
      case 64: attend<scalar_t, 64>(q, cache, layer, tables, lens, scale, out); break;
      case 128: attend<scalar_t, 128>(q, cache, layer, tables, lens, scale, out); break;
      default: attend<scalar_t, 0>(q, cache, layer, tables, lens, scale, out);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distserve, m) {
  m.def("paged_decode_attention(Tensor q, Tensor cache, int layer, Tensor block_tables, Tensor context_lens, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(distserve, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
