# Locate the headers and core libraries of the torch that the build's Python sees,
# without going through Torch's CMake package (which probes for CUDA and cuDNN).
# The native libraries include only the LibTorch stable ABI headers and link to the
# unversioned sonames libtorch_cpu.so / libc10.so, which the process has already
# loaded when Python calls torch.ops.load_library, so one build serves torch 2.11-2.14.
find_package(Python3 COMPONENTS Interpreter REQUIRED)
execute_process(
  COMMAND ${Python3_EXECUTABLE} -c
    "import os, torch; d = os.path.dirname(torch.__file__); print(os.path.join(d, 'include')); print(os.path.join(d, 'lib')); print(torch.__version__)"
  OUTPUT_VARIABLE _torch_out
  RESULT_VARIABLE _torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "semisparse needs torch (>= 2.11) importable by ${Python3_EXECUTABLE} at build time. "
                      "Install it first (pip install torch) and build with --no-build-isolation.")
endif()
string(REPLACE "\n" ";" _torch_out "${_torch_out}")
list(GET _torch_out 0 SEMISPARSE_TORCH_INCLUDE)
list(GET _torch_out 1 _torch_lib)
set(SEMISPARSE_TORCH_LIBDIR ${_torch_lib})
list(GET _torch_out 2 SEMISPARSE_TORCH_VERSION)
find_library(_torch_cpu_lib torch_cpu PATHS ${_torch_lib} NO_DEFAULT_PATH REQUIRED)
find_library(_c10_lib c10 PATHS ${_torch_lib} NO_DEFAULT_PATH REQUIRED)
set(SEMISPARSE_TORCH_LIBS ${_torch_cpu_lib} ${_c10_lib})
message(STATUS "semisparse: torch ${SEMISPARSE_TORCH_VERSION} headers at ${SEMISPARSE_TORCH_INCLUDE}")
