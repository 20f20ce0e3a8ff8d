# CUDA architectures for libsemisparse_cuda. sm_90a (Hopper with wgmma/sparse
# wgmma) needs the "a" suffix; CMake spells it 90a.
if(NOT DEFINED SEMISPARSE_CUDA_ARCHS)
  set(SEMISPARSE_CUDA_ARCHS "80;90a" CACHE STRING "CUDA architectures for libsemisparse_cuda")
endif()
