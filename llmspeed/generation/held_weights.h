// The tensors of fused_decode.py's snapshots, held in C++ between steps under a handle (hold, release), and the
// check before each step that the model still has them (held_current).
// Included by decode_cpu.cpp alone: its definitions sit in that one translation unit's anonymous namespace.
#pragma once

#include <torch/extension.h>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

// The tensors of one model snapshot (fused_snapshot.py's Snapshot), held here so that a decode step does not
// convert a list of some 900 Python tensors into C++ on every call, with the data pointers and dtypes of
// the model tensors they were read from: a moved or cast parameter shows up as a changed pointer or dtype.
struct Held {
  std::vector<at::Tensor> weights, lm_head, lora, sources, versioned;
  std::vector<at::Tensor> mirrors;  // (16-bit source, its fp32 copy) pairs, flat: compared value by value
  std::vector<std::pair<const void*, at::ScalarType>> layout;  // of sources, when held
  std::vector<int64_t> versions;  // of versioned, when held
  std::vector<int64_t> slot_ends;  // versioned is slot by slot: slot s's tensors end at slot_ends[s]
};

std::mutex held_mutex;
std::unordered_map<int64_t, std::shared_ptr<const Held>> held_sets;
int64_t next_handle = 1;

std::shared_ptr<const Held> held(int64_t handle) {
  std::lock_guard<std::mutex> lock(held_mutex);
  auto it = held_sets.find(handle);
  TORCH_CHECK(it != held_sets.end(), "fused decode: no held weights with handle ", handle, " (released?)");
  return it->second;
}

}  // namespace

// Hold a snapshot's tensors (weights: PER_LAYER per layer; lm_head: weight, scale, zero; lora: empty or 14
// per layer; sources: the model tensors to watch; versioned: the tensors the lora stacks were copied from, whose
// in-place changes must be seen, slot by slot, slot s's ending at slot_ends[s]; mirrors: pairs of a contiguous bf16
// or fp16 model tensor and the fp32 copy of it the step reads, flat); returns the handle decode_step takes.
int64_t hold(std::vector<at::Tensor> weights, std::vector<at::Tensor> lm_head, std::vector<at::Tensor> lora,
             std::vector<at::Tensor> sources, std::vector<at::Tensor> versioned, std::vector<int64_t> slot_ends,
             std::vector<at::Tensor> mirrors) {
  TORCH_CHECK(mirrors.size() % 2 == 0, "fused decode: mirrors must be (source, copy) pairs");
  for (size_t i = 0; i < mirrors.size(); i += 2) {
    const at::Tensor &src = mirrors[i], &copy = mirrors[i + 1];
    TORCH_CHECK((src.scalar_type() == at::kBFloat16 || src.scalar_type() == at::kHalf) && src.is_contiguous() &&
                    copy.scalar_type() == at::kFloat && copy.is_contiguous() && copy.numel() == src.numel(),
                "fused decode: a mirror must be a contiguous bf16/fp16 tensor and its contiguous fp32 copy");
  }
  int64_t last = 0;
  for (int64_t end : slot_ends) {
    TORCH_CHECK(end >= last, "fused decode: slot_ends must not decrease");
    last = end;
  }
  TORCH_CHECK(last == (int64_t)versioned.size(), "fused decode: slot_ends must end at the ", versioned.size(),
              " versioned tensors, not ", last);
  auto set = std::make_shared<Held>();
  set->slot_ends = std::move(slot_ends);
  for (const auto& t : sources) set->layout.emplace_back(t.const_data_ptr(), t.scalar_type());
  for (const auto& t : versioned) set->versions.push_back(t._version());
  set->versioned = std::move(versioned);
  set->weights = std::move(weights);
  set->lm_head = std::move(lm_head);
  set->lora = std::move(lora);
  set->sources = std::move(sources);
  set->mirrors = std::move(mirrors);
  std::lock_guard<std::mutex> lock(held_mutex);
  held_sets.emplace(next_handle, std::move(set));
  return next_handle++;
}

// Drop a held snapshot (a step already running keeps its own reference until it returns).
void release(int64_t handle) {
  std::lock_guard<std::mutex> lock(held_mutex);
  held_sets.erase(handle);
}

// Whether each 16-bit source of a mirror pair still holds the values of its fp32 copy (exact: both widen exactly).
// A write through .data (param.data.copy_(...), param.data.mul_(...)) changes neither its pointer nor its
// version; these are a model's norms and biases, some 35 thousand values for a 135M model.
template <typename T>
bool same_values(const at::Tensor& src, const at::Tensor& copy) {
  const T* s = src.const_data_ptr<T>();
  const float* c = copy.const_data_ptr<float>();
  bool same = true;
  for (int64_t i = 0, n = src.numel(); i < n; ++i) {
    const float v = static_cast<float>(s[i]);
    same &= v == c[i] || (v != v && c[i] != c[i]);  // NaN where the copy has NaN
  }
  return same;
}

// bf16 widens to fp32 by a shift: compare the bits (NaNs included), in a loop the compiler vectorizes
template <>
bool same_values<at::BFloat16>(const at::Tensor& src, const at::Tensor& copy) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src.const_data_ptr<at::BFloat16>());
  const uint32_t* c = reinterpret_cast<const uint32_t*>(copy.const_data_ptr<float>());
  uint32_t differ = 0;
  for (int64_t i = 0, n = src.numel(); i < n; ++i) differ |= (static_cast<uint32_t>(s[i]) << 16) ^ c[i];
  return differ == 0;
}

bool mirrors_current(const Held& set) {
  for (size_t i = 0; i < set.mirrors.size(); i += 2) {
    const at::Tensor &src = set.mirrors[i], &copy = set.mirrors[i + 1];
    if (!(src.scalar_type() == at::kBFloat16 ? same_values<at::BFloat16>(src, copy) : same_values<at::Half>(src, copy)))
      return false;
  }
  return true;
}

// Whether every watched model tensor still has the data pointer and dtype it had when held, and every versioned
// tensor of the adapter slots a step reads (slots) its version: a few hundred LoRA tensors an adapter, read here
// in one loop, where the CPU overlaps their cache misses, instead of one Python attribute read each after the
// step's weights have pushed them out of the cache. Slots no row reads are not checked: their stacks may be
// stale until a step reads them, and that step sees it. Then whether the mirrors' sources hold their copies' values.
bool held_current(int64_t handle, std::vector<int64_t> slots) {
  const auto set = held(handle);
  const int64_t S = set->slot_ends.size();
  for (int64_t s : slots) {
    TORCH_CHECK(s >= 0 && s < S, "fused decode: adapter slot ", s, " is not one of the ", S, " held");
    for (int64_t i = s ? set->slot_ends[s - 1] : 0; i < set->slot_ends[s]; ++i)
      if (set->versioned[i]._version() != set->versions[i]) return false;
  }
  // const_data_ptr(): the pointer without data_ptr()'s mutable-access path (its copy-on-write checks); this runs
  // before every step, over every source tensor
  for (size_t i = 0; i < set->sources.size(); ++i) {
    const at::Tensor& t = set->sources[i];
    if (t.const_data_ptr() != set->layout[i].first || t.scalar_type() != set->layout[i].second) return false;
  }
  return mirrors_current(*set);  // after the pointers: a moved or cast source is not read
}
