#pragma once
// Host switch for programmatic dependent launch (see launch.cuh). On by default; turning it off
// gives ordinary launches (same results, for timing comparisons and as an escape hatch).

namespace quamba {

void set_programmatic_launch(bool enabled);
bool programmatic_launch_enabled();

}  // namespace quamba
