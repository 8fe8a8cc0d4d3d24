// A team of torch's intra-op threads held for the whole of one decode step.
//
// A decode step of a few rows opens about five parallel regions a layer (the GEMV groups and attention), each
// an OpenMP fork and join (docs/kernels.md has their cost and what a team saves). In a team, one thread runs
// the step and hands each parallel loop to the others, which wait spinning between loops, as llama.cpp's
// thread pool does. A loop is split statically, one contiguous share a thread; each row (or attention range)
// is computed by the same code whichever thread takes it, so the results are bit for bit those of
// at::parallel_for.
//
// team_for(total, grain, f) runs f over [0, total) on the team of the calling thread, or through
// at::parallel_for where there is none. Included by paged_attention.h (attention over the paged cache) and
// decode_cpu.cpp (the GEMV groups, and Team::lead around the step).
#pragma once

#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#ifdef __SSE2__
#include <immintrin.h>
#endif

namespace llmspeed_team {

inline void relax() {
#ifdef __SSE2__
  _mm_pause();
#endif
}

// Whether torch runs at::parallel_for on OpenMP, whose team gives each of T indices its own thread when it has
// T threads (a team relies on that; on other backends the step keeps a region per loop).
constexpr bool available() { return AT_PARALLEL_OPENMP; }

class Team {
 public:
  // Run lead() on one thread while the other threads of a size-T team take the loops it hands out; returns
  // when lead() has returned and every thread has left. If torch gives fewer threads than T, lead() runs
  // alone and its loops run on its own thread. An exception from lead() or a loop is rethrown here.
  template <typename Lead>
  static void lead(int64_t T, const Lead& lead_fn) {
    Team team(T);
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      if (begin == 0) {
        team.solo_ = end - begin != 1;  // one thread holds several indices: the team is smaller than T
        current() = &team;
        try {
          lead_fn();
        } catch (...) {
          team.keep(std::current_exception());
        }
        current() = nullptr;
        team.stop_.store(true, std::memory_order_release);
      } else {
        team.work(begin);
      }
    });
    if (team.error_) std::rethrow_exception(team.error_);
  }

  // f(lo, hi) over [0, total), each thread of the team its static share; returns when all shares are done.
  template <typename F>
  void run(int64_t total, const F& f) {
    if (solo_) {
      if (total > 0) f(0, total);
      return;
    }
    ctx_ = &f;
    call_ = [](const void* ctx, int64_t lo, int64_t hi) { (*static_cast<const F*>(ctx))(lo, hi); };
    total_ = total;
    remaining_.store(T_ - 1, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    share(0);
    while (remaining_.load(std::memory_order_acquire) > 0) relax();
    if (error_) std::rethrow_exception(error_);
  }

  // The team of the calling thread (the one running lead()), or nullptr.
  static Team*& current() {
    static thread_local Team* team = nullptr;
    return team;
  }

 private:
  explicit Team(int64_t T) : T_(T) {}

  void share(int64_t t) {
    const int64_t lo = total_ * t / T_, hi = total_ * (t + 1) / T_;
    if (lo >= hi) return;
    try {
      call_(ctx_, lo, hi);
    } catch (...) {
      keep(std::current_exception());
    }
  }

  void work(int64_t t) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t now;
      while ((now = generation_.load(std::memory_order_acquire)) == seen) {
        if (stop_.load(std::memory_order_acquire)) return;
        relax();
      }
      seen = now;
      share(t);
      remaining_.fetch_sub(1, std::memory_order_release);
    }
  }

  void keep(std::exception_ptr e) {
    std::lock_guard<std::mutex> lock(error_mutex_);
    if (!error_) error_ = e;
  }

  const int64_t T_;
  bool solo_ = false;
  const void* ctx_ = nullptr;
  void (*call_)(const void*, int64_t, int64_t) = nullptr;
  int64_t total_ = 0;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> remaining_{0};
  std::atomic<bool> stop_{false};
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

// f(lo, hi) over [0, total): on the calling thread's team when it leads one, else at::parallel_for(0, total, grain, f).
template <typename F>
void team_for(int64_t total, int64_t grain, const F& f) {
  if (Team* team = Team::current()) {
    team->run(total, f);
  } else {
    at::parallel_for(0, total, grain, f);
  }
}

}  // namespace llmspeed_team
