// The block scheduler of the CUDA emulation.
//
// A launch runs its blocks one after another on the calling OS thread. The threads of a block are
// fibers, resumed in ascending thread order; each runs until it blocks (a barrier, a warp
// collective) or exits. So threads really interleave: a missing __syncthreads() between a
// shared-memory write and another thread's read reads stale data here, as it may on the GPU.
// Errors (divergent barriers, bad warp masks, deadlocks) are C++ exceptions raised on the
// launching thread, naming the call sites.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <source_location>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "fiber.h"
#include "vector_types.h"

// The CUDA built-ins. All fibers of a block run on one OS thread, so these are thread-locals
// that the scheduler sets before it resumes a fiber.
inline constinit thread_local uint3 threadIdx{};
inline constinit thread_local uint3 blockIdx{};
inline constinit thread_local dim3 blockDim{};
inline constinit thread_local dim3 gridDim{};
constexpr int warpSize = 32;

namespace qk_emu {

// An error of an emulated kernel (or of its launch); the message names the call sites.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// "csrc/op/kernel.cu:42": the path from its last csrc/ on, so messages do not depend on where
// the checkout lives.
inline std::string where(std::string_view file, unsigned line) {
  if (auto pos = file.rfind("csrc/"); pos != std::string_view::npos) file.remove_prefix(pos);
  return std::string(file) + ":" + std::to_string(line);
}
inline std::string where(const std::source_location& loc) {
  return where(loc.file_name(), loc.line());
}

inline bool same_string(const char* a, const char* b) { return a == b || std::strcmp(a, b) == 0; }

inline bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         same_string(a.file_name(), b.file_name());
}

enum class State : unsigned char { kRunnable, kBarrier, kWarp, kExited };

struct Thread;

// Computes the result of a warp collective for every lane in mask, from the lanes' inputs.
// lanes[i] is null where lane i does not exist (the tail of a partial warp).
using WarpFn = void (*)(Thread* const* lanes, unsigned mask);

struct AsyncCopy {
  void* dst;
  const void* src;
  unsigned size;      // bytes written to dst
  unsigned src_size;  // bytes read from src; the rest of dst is zero-filled
  unsigned group;     // commit group; the fiber's current (open) group is Thread::cp_group
};

struct Thread {
  FiberContext ctx;
  uint3 idx;
  unsigned linear, lane, warp;
  State state;
  const char* op;  // what it waits in or last waited in, for messages
  std::source_location site;
  int barrier_result;
  alignas(16) unsigned char in[48];   // this lane's operands of a warp collective
  alignas(16) unsigned char out[16];  // and its result
  std::vector<AsyncCopy> copies;      // cp.async not yet completed
  unsigned cp_group;                  // the open commit group; committed groups are below it
};

struct WarpGroup {
  unsigned mask, arrived;
  WarpFn fn;
};

struct Warp {
  unsigned present;             // lanes that exist and have not exited
  std::vector<WarpGroup> open;  // collectives waiting for lanes; disjoint masks
  Thread* lanes[32];
};

enum class BarrierOp { kNone, kCount, kAnd, kOr };

class Scheduler;
inline constinit thread_local Scheduler* tls_active = nullptr;

class Scheduler {
 public:
  using Thunk = void (*)(void*);

  // Runs the whole grid; rethrows the first error of a fiber on the calling thread.
  void run(dim3 grid, dim3 block, std::size_t smem, Thunk thunk, void* arg,
           std::string launch_site);

  [[noreturn]] void fail(const std::string& what) const {
    throw Error("emulated kernel launched at " + launch_site_ + ", block (" +
                std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                std::to_string(blockIdx.z) + "): " + what);
  }

  Thread& current() { return *cur_; }
  unsigned char* dynamic_smem() { return smem_.get(); }

  int barrier(const char* op, BarrierOp reduce, int value, const std::source_location& site);
  void warp_collective(const char* op, WarpFn fn, unsigned mask, const std::source_location& site);
  void complete_copies(Thread& t, unsigned limit);

 private:
  void run_block();
  void on_exit(Thread& t);
  std::string describe() const;
  static void fiber_main();

  StackPool stacks_;
  std::vector<Thread> threads_;
  std::vector<Warp> warps_;
  FiberContext sched_ctx_;
  Thread* cur_ = nullptr;
  Thunk thunk_ = nullptr;
  void* arg_ = nullptr;
  std::exception_ptr error_;
  std::string launch_site_;

  struct AlignedFree {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  std::unique_ptr<unsigned char[], AlignedFree> smem_;
  std::size_t smem_capacity_ = 0;
  std::size_t smem_size_ = 0;

  unsigned exited_ = 0;
  unsigned arrived_ = 0;  // at the barrier
  const char* barrier_op_ = nullptr;
  std::source_location barrier_site_;
  int barrier_acc_ = 0;
};

inline Scheduler& active() {
  if (tls_active == nullptr) throw Error("device function called outside an emulated kernel");
  return *tls_active;
}

inline void Scheduler::run(dim3 grid, dim3 block, std::size_t smem, Thunk thunk, void* arg,
                           std::string launch_site) {
  if (tls_active != nullptr) fail("kernel launch from inside an emulated kernel");
  launch_site_ = std::move(launch_site);
  const std::uint64_t nthreads = std::uint64_t{block.x} * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535) {
    throw Error("kernel launched at " + launch_site_ + ": invalid configuration argument (grid " +
                std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" +
                std::to_string(grid.z) + ", block " + std::to_string(block.x) + "x" +
                std::to_string(block.y) + "x" + std::to_string(block.z) + ")");
  }
  const unsigned n = static_cast<unsigned>(nthreads);
  stacks_.reserve(n);
  threads_.resize(n);
  warps_.resize((n + 31) / 32);
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = threads_[i];
    t.idx = {i % block.x, i / block.x % block.y, i / (block.x * block.y)};
    t.linear = i;
    t.lane = i % 32;
    t.warp = i / 32;
    warps_[t.warp].lanes[t.lane] = &t;
  }
  for (unsigned i = n; i < warps_.size() * 32; ++i) warps_.back().lanes[i % 32] = nullptr;
  if (smem > smem_capacity_) {
    smem_.reset(static_cast<unsigned char*>(std::aligned_alloc(128, (smem + 127) / 128 * 128)));
    if (!smem_) throw std::bad_alloc();
    smem_capacity_ = smem;
  }
  smem_size_ = smem;
  thunk_ = thunk;
  arg_ = arg;
  gridDim = grid;
  blockDim = block;

  tls_active = this;
  struct Deactivate {
    ~Deactivate() { tls_active = nullptr; }
  } deactivate;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        run_block();
      }
    }
  }
}

inline void Scheduler::run_block() {
  // Uninitialised shared memory reads as NaN (and -1 as an integer).
  if (smem_size_ != 0) std::memset(smem_.get(), 0xFF, smem_size_);
  const unsigned n = static_cast<unsigned>(threads_.size());
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = threads_[i];
    t.state = State::kRunnable;
    t.op = "";
    t.copies.clear();
    t.cp_group = 0;
    context_init(t.ctx, stacks_.stack(i), stacks_.usable(i), &Scheduler::fiber_main);
  }
  for (Warp& w : warps_) {
    w.open.clear();
    w.present = 0;
    for (unsigned l = 0; l < 32; ++l) w.present |= w.lanes[l] != nullptr ? 1u << l : 0u;
  }
  exited_ = 0;
  arrived_ = 0;
  error_ = nullptr;

  while (exited_ < n) {
    bool ran = false;
    for (Thread& t : threads_) {
      if (t.state != State::kRunnable) continue;
      cur_ = &t;
      threadIdx = t.idx;
      context_switch(sched_ctx_, t.ctx);
      ran = true;
      if (error_) std::rethrow_exception(error_);
    }
    if (!ran) fail("deadlock: " + describe());
  }
}

// Every fiber starts here; kernel exceptions are carried back to the scheduler's stack.
inline void Scheduler::fiber_main() {
  Scheduler& s = *tls_active;
  Thread& t = *s.cur_;
  try {
    s.thunk_(s.arg_);
    s.on_exit(t);
  } catch (...) {
    if (!s.error_) s.error_ = std::current_exception();
  }
  t.state = State::kExited;
  context_switch(t.ctx, s.sched_ctx_);
  std::abort();  // an exited fiber is never resumed
}

inline void Scheduler::on_exit(Thread& t) {
  complete_copies(t, ~0u);
  t.state = State::kExited;
  ++exited_;
  Warp& w = warps_[t.warp];
  w.present &= ~(1u << t.lane);
  if (arrived_ > 0) {
    fail("thread " + std::to_string(t.linear) + " exited while other threads wait in " +
         barrier_op_ + " at " + where(barrier_site_) + "; " + describe());
  }
  for (const WarpGroup& g : w.open) {
    if (g.mask & (1u << t.lane)) {
      fail("lane " + std::to_string(t.lane) + " of warp " + std::to_string(t.warp) +
           " exited while its warp waits for it in a collective; " + describe());
    }
  }
}

inline int Scheduler::barrier(const char* op, BarrierOp reduce, int value,
                              const std::source_location& site) {
  Thread& t = *cur_;
  if (exited_ > 0) {
    fail(std::string(op) + " at " + where(site) + " reached after some threads of the block " +
         "exited; " + describe());
  }
  if (arrived_ == 0) {
    barrier_op_ = op;
    barrier_site_ = site;
    barrier_acc_ = reduce == BarrierOp::kAnd ? 1 : 0;
  } else if (!same_site(site, barrier_site_) || !same_string(op, barrier_op_)) {
    fail("divergent " + std::string(op) + ": thread " + std::to_string(t.linear) + " reached " +
         op + " at " + where(site) + " while other threads wait in " + barrier_op_ + " at " +
         where(barrier_site_) + "; " + describe());
  }
  t.state = State::kBarrier;
  t.op = op;
  t.site = site;
  switch (reduce) {
    case BarrierOp::kNone:
      break;
    case BarrierOp::kCount:
      barrier_acc_ += value != 0;
      break;
    case BarrierOp::kAnd:
      barrier_acc_ &= value != 0;
      break;
    case BarrierOp::kOr:
      barrier_acc_ |= value != 0;
      break;
  }
  if (++arrived_ == threads_.size()) {
    arrived_ = 0;
    for (Thread& other : threads_) {
      other.state = State::kRunnable;
      other.barrier_result = barrier_acc_;
    }
  }
  // Even the releasing thread yields, so that every phase runs in ascending thread order.
  context_switch(t.ctx, sched_ctx_);
  return t.barrier_result;
}

inline void Scheduler::warp_collective(const char* op, WarpFn fn, unsigned mask,
                                       const std::source_location& site) {
  Thread& t = *cur_;
  Warp& w = warps_[t.warp];
  const unsigned bit = 1u << t.lane;
  auto error = [&](const std::string& what) {
    char masks[64];
    std::snprintf(masks, sizeof masks, " (mask 0x%08x, lanes present 0x%08x)", mask, w.present);
    fail(std::string(op) + " at " + where(site) + " in thread " + std::to_string(t.linear) + ": " +
         what + masks);
  };
  if (!(mask & bit)) error("the mask does not name the calling lane");
  if (mask & ~w.present) error("the mask names lanes that have exited or do not exist");
  WarpGroup* group = nullptr;
  for (WarpGroup& g : w.open) {
    if (!(g.mask & mask)) continue;
    if (g.mask != mask || g.fn != fn) {
      error("lanes of the mask wait in a different collective or with another mask; " + describe());
    }
    group = &g;
  }
  if (group == nullptr) group = &w.open.emplace_back(WarpGroup{mask, 0, fn});
  group->arrived |= bit;
  t.state = State::kWarp;
  t.op = op;
  t.site = site;
  if (group->arrived == mask) {
    fn(w.lanes, mask);
    for (unsigned m = mask; m != 0; m &= m - 1) {
      w.lanes[__builtin_ctz(m)]->state = State::kRunnable;
    }
    *group = w.open.back();
    w.open.pop_back();
  }
  context_switch(t.ctx, sched_ctx_);
}

// Completes the thread's cp.async copies of the commit groups before `limit`.
inline void Scheduler::complete_copies(Thread& t, unsigned limit) {
  std::size_t kept = 0;
  for (const AsyncCopy& c : t.copies) {
    if (c.group < limit) {
      std::memcpy(c.dst, c.src, c.src_size);
      std::memset(static_cast<unsigned char*>(c.dst) + c.src_size, 0, c.size - c.src_size);
    } else {
      t.copies[kept++] = c;
    }
  }
  t.copies.resize(kept);
}

// "block state: threads 0-63 wait in __syncthreads() at csrc/x.cu:10; threads 64-127 exited"
inline std::string Scheduler::describe() const {
  auto same = [](const Thread& a, const Thread& b) {
    if (a.state != b.state) return false;
    if (a.state == State::kExited || a.state == State::kRunnable) return true;
    return same_string(a.op, b.op) && same_site(a.site, b.site);
  };
  std::vector<std::vector<const Thread*>> groups;
  for (const Thread& t : threads_) {
    auto it = std::find_if(groups.begin(), groups.end(), [&](auto& g) { return same(*g[0], t); });
    if (it == groups.end()) {
      groups.push_back({&t});
    } else {
      it->push_back(&t);
    }
  }
  std::string out = "block state: ";
  for (const auto& g : groups) {
    if (&g != &groups.front()) out += "; ";
    out += g.size() == 1 ? "thread " : "threads ";
    for (std::size_t i = 0; i < g.size();) {
      std::size_t j = i;
      while (j + 1 < g.size() && g[j + 1]->linear == g[j]->linear + 1) ++j;
      out += (i > 0 ? "," : "") + std::to_string(g[i]->linear);
      if (j > i) out += "-" + std::to_string(g[j]->linear);
      i = j + 1;
    }
    switch (g[0]->state) {
      case State::kExited:
        out += " exited";
        break;
      case State::kRunnable:
        out += " running";
        break;
      default:
        out += " wait in " + std::string(g[0]->op) + " at " + where(g[0]->site);
    }
  }
  return out;
}

inline Scheduler& thread_scheduler() {
  thread_local Scheduler scheduler;
  return scheduler;
}

// Dynamic shared memory limits set through qk::set_max_dynamic_smem, per kernel.
inline std::size_t max_dynamic_smem(const void* kernel, std::size_t set = 0) {
  static std::mutex mutex;
  static std::unordered_map<const void*, std::size_t> limits;
  std::lock_guard lock(mutex);
  if (set != 0) limits[kernel] = set;
  auto it = limits.find(kernel);
  return it != limits.end() ? it->second : 48 * 1024;
}

}  // namespace qk_emu
