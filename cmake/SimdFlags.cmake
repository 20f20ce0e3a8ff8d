# The CPU kernels choose their SIMD path at run time: only the AVX2 translation unit
# is compiled with -mavx2 -mfma -mf16c, and it is called only when cpuid says so.
# Nothing else assumes more than the architecture's baseline (SSE2 / NEON).
if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
  set(SEMISPARSE_ARCH "x86_64")
  set(SEMISPARSE_AVX2_FLAGS -mavx2 -mfma -mf16c)
elseif(CMAKE_SYSTEM_PROCESSOR MATCHES "^(aarch64|arm64)$")
  set(SEMISPARSE_ARCH "aarch64")
else()
  set(SEMISPARSE_ARCH "${CMAKE_SYSTEM_PROCESSOR}")
endif()
