// The CHECK macro of the host simulations in tests/host_sim/: counts every check, prints the
// first 30 failures (file:line and a printf-style message) and counts them; each program
// ends by printing its "... PASSED (0 failures)" line from `failures` and exits non-zero
// when any check failed.
#pragma once

#include <cstdio>

static int failures = 0;
static long checks = 0;

#define CHECK(cond, ...)                                 \
  do {                                                   \
    ++checks;                                            \
    if (!(cond)) {                                       \
      if (failures < 30) {                               \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);                        \
        std::printf("\n");                               \
      }                                                  \
      ++failures;                                        \
    }                                                    \
  } while (0)
