# CUTLASS headers come from the nvidia-cutlass wheel (pip install --no-deps
# nvidia-cutlass==4.2.0.0); nothing is vendored. The wheel is located without
# importing it (its import pulls cuda-python and friends). Override with
# -DCUTLASS_DIR=... or the CUTLASS_DIR environment variable (a folder that holds
# include/cutlass, or the wheel's cutlass_library/source).
set(_cutlass_hints)
if(DEFINED CUTLASS_DIR)
  list(APPEND _cutlass_hints ${CUTLASS_DIR})
endif()
if(DEFINED ENV{CUTLASS_DIR})
  list(APPEND _cutlass_hints $ENV{CUTLASS_DIR})
endif()
execute_process(
  COMMAND ${Python3_EXECUTABLE} -c
    "import importlib.util as u, os; s = u.find_spec('cutlass_library'); print(os.path.join(list(s.submodule_search_locations)[0], 'source') if s else '')"
  OUTPUT_VARIABLE _cutlass_py OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
if(_cutlass_py)
  list(APPEND _cutlass_hints ${_cutlass_py})
endif()
set(SEMISPARSE_CUTLASS_INCLUDE "")
foreach(_h IN LISTS _cutlass_hints)
  if(EXISTS "${_h}/include/cutlass/cutlass.h")
    set(SEMISPARSE_CUTLASS_INCLUDE "${_h}/include")
    if(EXISTS "${_h}/tools/util/include")
      list(APPEND SEMISPARSE_CUTLASS_INCLUDE "${_h}/tools/util/include")
    endif()
    break()
  endif()
endforeach()
if(SEMISPARSE_CUTLASS_INCLUDE)
  message(STATUS "semisparse: CUTLASS headers at ${SEMISPARSE_CUTLASS_INCLUDE}")
else()
  message(STATUS "semisparse: CUTLASS headers not found (pip install --no-deps nvidia-cutlass==4.2.0.0)")
endif()
