// distserve::fp16_linear: FBGEMM's fp16 linear (the kernel of quantized::linear_dynamic_fp16) behind an
// op that torch.compile can trace. The packed weight is an opaque TorchScript object, which a graph
// cannot take as an argument, so layers hand theirs over once (keep_fp16_weight) and name it by an int
// key afterwards. Written in C++ so that inductor's C++ wrapper calls it without a trip through
// Python. Built at first use by shared/engine/quant.py.
#include <ATen/core/Tensor.h>
#include <ATen/native/quantized/PackedParams.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

namespace {

std::mutex mutex;
std::vector<c10::intrusive_ptr<LinearPackedParamsBase>> weights;  // by key; null once forgotten

int64_t keep_fp16_weight(const c10::intrusive_ptr<LinearPackedParamsBase>& weight) {
  std::lock_guard<std::mutex> lock(mutex);
  weights.push_back(weight);
  return static_cast<int64_t>(weights.size()) - 1;
}

void forget_fp16_weight(int64_t key) {
  std::lock_guard<std::mutex> lock(mutex);
  weights.at(key).reset();
}

at::Tensor fp16_linear(const at::Tensor& x, int64_t key, int64_t out_features) {
  c10::intrusive_ptr<LinearPackedParamsBase> weight;
  {
    std::lock_guard<std::mutex> lock(mutex);
    weight = weights.at(key);
  }
  TORCH_CHECK(weight, "distserve::fp16_linear: weight ", key, " was forgotten");
  at::Tensor y = weight->apply_dynamic(x);
  TORCH_CHECK(y.size(-1) == out_features, "distserve::fp16_linear: weight ", key, " has other out_features");
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distserve, m) {
  m.def("keep_fp16_weight(__torch__.torch.classes.quantized.LinearPackedParamsBase weight) -> int",
        &keep_fp16_weight);
  m.def("forget_fp16_weight(int key) -> ()", &forget_fp16_weight);
  m.def("fp16_linear(Tensor x, int key, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(distserve, CPU, m) {
  m.impl("fp16_linear", &fp16_linear);
}
