# The CPU kernels choose their SIMD path at run time: only the AVX2 translation unit
# (-mavx2 -mfma -mf16c) and the AVX-512 BF16 one (-mavx512f -mavx512bw -mavx512bf16) get
# those flags, and each is called only when cpuid says so.
# Nothing else assumes more than the architecture's baseline (SSE2 / NEON).
if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
  set(SEMISPARSE_ARCH "x86_64")
  set(SEMISPARSE_AVX2_FLAGS -mavx2 -mfma -mf16c)
  set(SEMISPARSE_AVX512BF16_FLAGS -mavx512f -mavx512bw -mavx512bf16 -mavx2 -mfma -mf16c)
elseif(CMAKE_SYSTEM_PROCESSOR MATCHES "^(aarch64|arm64)$")
  set(SEMISPARSE_ARCH "aarch64")
else()
  set(SEMISPARSE_ARCH "${CMAKE_SYSTEM_PROCESSOR}")
endif()
