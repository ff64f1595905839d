#include <atomic>

#include "launch.h"

namespace quamba {
namespace {
std::atomic<bool> g_programmatic_launch{true};
}  // namespace

void set_programmatic_launch(bool enabled) {
  g_programmatic_launch.store(enabled, std::memory_order_relaxed);
}

bool programmatic_launch_enabled() {
  return g_programmatic_launch.load(std::memory_order_relaxed);
}

}  // namespace quamba
