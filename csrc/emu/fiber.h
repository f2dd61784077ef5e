// Fibers for the CUDA emulation: user-mode stacks and a context switch.
//
// On x86-64 the switch is hand-written (callee-saved registers, MXCSR and the x87 control word):
// a few nanoseconds, against a sigprocmask syscall per swapcontext. Elsewhere, or with
// QK_EMU_UCONTEXT defined, it falls back to ucontext.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

#if !defined(__x86_64__) || defined(QK_EMU_UCONTEXT)
#define QK_EMU_FIBER_UCONTEXT 1
#include <ucontext.h>
#endif

namespace qk_emu {

#ifndef QK_EMU_FIBER_UCONTEXT

struct FiberContext {
  void* sp = nullptr;
};

// switch_stack(&from_sp, to_sp): pushes the callee-saved state, stores the stack pointer into
// *from_sp, loads to_sp and pops the state saved there. Everything else is caller-saved under the
// System V ABI, so the compiler has already spilled it around this (opaque, never inlined) call.
[[gnu::naked, gnu::noinline]] inline void switch_stack(void** /*from_sp*/, void* /*to_sp*/) {
  asm(R"(
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
  )");
}

// Lays out a frame that switch_stack pops into a call of entry(): the saved registers, then
// entry as the return address, then a null return address for entry itself, which ends
// backtraces and unwinding there (entry never returns). MXCSR and the x87 control word get their
// power-on defaults: round to nearest, no flush-to-zero, like the GPU without -ftz.
inline void context_init(FiberContext& ctx, void* stack_lo, std::size_t size, void (*entry)()) {
  auto top = (reinterpret_cast<std::uintptr_t>(stack_lo) + size) & ~std::uintptr_t{15};
  auto* slot = reinterpret_cast<std::uint64_t*>(top);
  *--slot = 0;                                       // entry's return address
  *--slot = reinterpret_cast<std::uint64_t>(entry);  // popped by ret
  for (int i = 0; i < 6; ++i) *--slot = 0;           // rbp rbx r12 r13 r14 r15
  *--slot = std::uint64_t{0x037F} << 32 | 0x1F80;    // x87 control word, MXCSR
  ctx.sp = slot;
}

inline void context_switch(FiberContext& from, FiberContext& to) { switch_stack(&from.sp, to.sp); }

#else

struct FiberContext {
  ucontext_t uc;
};

inline void context_init(FiberContext& ctx, void* stack_lo, std::size_t size, void (*entry)()) {
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = stack_lo;
  ctx.uc.uc_stack.ss_size = size;
  ctx.uc.uc_link = nullptr;
  makecontext(&ctx.uc, entry, 0);
}

inline void context_switch(FiberContext& from, FiberContext& to) { swapcontext(&from.uc, &to.uc); }

#endif

// Fiber stacks of one OS thread: one mapping, each stack above a PROT_NONE guard page so that an
// overflow faults instead of corrupting the neighbour. Grown on demand, never shrunk; only
// touched pages cost memory. QK_EMU_STACK_KIB overrides the 64 KiB default.
class StackPool {
 public:
  StackPool() = default;
  StackPool(const StackPool&) = delete;
  StackPool& operator=(const StackPool&) = delete;
  ~StackPool() { release(); }

  static std::size_t stack_size() {
    static const std::size_t size = [] {
      const char* env = std::getenv("QK_EMU_STACK_KIB");
      const std::size_t kib = env != nullptr ? std::strtoul(env, nullptr, 10) : 0;
      return (kib >= 16 ? kib : 64) * 1024;
    }();
    return size;
  }

  // Makes room for n stacks; call only while no fiber of this pool is running.
  void reserve(std::size_t n) {
    if (n <= count_) return;
    release();
    page_ = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    stride_ = page_ + (stack_size() + page_ - 1) / page_ * page_;
    void* base = mmap(nullptr, n * stride_, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) throw std::bad_alloc();
    base_ = static_cast<char*>(base);
    count_ = n;
    for (std::size_t i = 0; i < n; ++i) mprotect(base_ + i * stride_, page_, PROT_NONE);
  }

  // The low end of stack i and its size. The stride is a multiple of the page size, so the tops
  // of all stacks would fall into the same cache sets: stagger them by a few cache lines.
  void* stack(std::size_t i) const { return base_ + i * stride_ + page_; }
  std::size_t usable(std::size_t i) const { return stride_ - page_ - (i * 192) % page_; }

 private:
  void release() {
    if (base_ != nullptr) munmap(base_, count_ * stride_);
    base_ = nullptr;
    count_ = 0;
  }

  char* base_ = nullptr;
  std::size_t count_ = 0;
  std::size_t stride_ = 0;
  std::size_t page_ = 0;
};

}  // namespace qk_emu
