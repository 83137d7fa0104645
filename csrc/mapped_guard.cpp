// moeprep._C: the guard over memory-mapped source shards.
//
// Source tensors are views of private memory maps. A shard cut short while it is mapped (another
// process truncating or rewriting it) turns the next read of a page past its new end into SIGBUS,
// which kills the process with no word of which file, and exit code 135. Mapped shards are
// registered here; a SIGBUS whose address lies in one prints one line naming the file and exits
// with code 2, as any other bad input does. A SIGBUS anywhere else goes to the handler that was
// there before (Python's faulthandler, or the default action).
//
// The handler may run at any moment in any thread, so it only reads a fixed table (no allocation,
// no locks) and calls write(2) and _exit(2), both async-signal-safe.
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>

#ifndef _WIN32
#include <signal.h>
#include <unistd.h>
#endif

namespace moeprep {
namespace {

constexpr int kSlots = 1024;        // shards mapped at once; more are read unguarded
constexpr size_t kLineBytes = 1024;  // the error line, path included (a longer one is cut)

struct Slot {
  std::atomic<uintptr_t> begin{0};  // 0: free
  uintptr_t end = 0;
  size_t length = 0;
  char line[kLineBytes];
};

Slot g_slots[kSlots];
std::mutex g_mutex;  // registration only; the handler never takes it

#ifndef _WIN32
struct sigaction g_previous;
bool g_installed = false;

void on_sigbus(int sig, siginfo_t* info, void* context) {
  const auto address = reinterpret_cast<uintptr_t>(info->si_addr);
  for (auto& slot : g_slots) {
    const uintptr_t begin = slot.begin.load(std::memory_order_acquire);
    if (begin != 0 && begin <= address && address < slot.end) {
      ssize_t ignored = write(STDERR_FILENO, slot.line, slot.length);
      (void)ignored;
      _exit(2);
    }
  }
  // Not a shard of ours: hand it to what was installed before.
  if (g_previous.sa_flags & SA_SIGINFO) {
    if (g_previous.sa_sigaction != nullptr) {
      g_previous.sa_sigaction(sig, info, context);
      return;
    }
  } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
    g_previous.sa_handler(sig);
    return;
  }
  signal(SIGBUS, SIG_DFL);  // returning re-runs the access, which now takes the default action
}

void install() {
  if (g_installed) return;
  struct sigaction action;
  std::memset(&action, 0, sizeof(action));
  action.sa_sigaction = &on_sigbus;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&action.sa_mask);
  sigaction(SIGBUS, &action, &g_previous);
  g_installed = true;
}
#endif

void guard_mapping(int64_t address, int64_t nbytes, const std::string& message) {
#ifndef _WIN32
  std::lock_guard<std::mutex> lock(g_mutex);
  install();
  for (auto& slot : g_slots) {
    if (slot.begin.load(std::memory_order_relaxed) != 0) continue;
    const std::string line = message.substr(0, kLineBytes - 1) + "\n";
    std::memcpy(slot.line, line.data(), line.size());
    slot.length = line.size();
    slot.end = static_cast<uintptr_t>(address) + static_cast<uintptr_t>(nbytes);
    slot.begin.store(static_cast<uintptr_t>(address), std::memory_order_release);
    return;
  }
#endif
}

void unguard_mapping(int64_t address) {
  std::lock_guard<std::mutex> lock(g_mutex);
  for (auto& slot : g_slots) {
    if (slot.begin.load(std::memory_order_relaxed) == static_cast<uintptr_t>(address)) {
      slot.begin.store(0, std::memory_order_release);
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moeprep, m) {
  m.def("guard_mapping(int address, int nbytes, str message) -> ()", &guard_mapping);
  m.def("unguard_mapping(int address) -> ()", &unguard_mapping);
}

}  // namespace moeprep
