# CUTLASS headers come from the nvidia-cutlass wheel (pip install --no-deps
# nvidia-cutlass==4.2.0.0); nothing is vendored. The wheel is located without
# importing it (its import pulls cuda-python and friends). Override with
# -DCUTLASS_DIR=... or the CUTLASS_DIR environment variable (a folder that holds
# include/cutlass, or the wheel's cutlass_library/source). When none is found (an
# isolated build environment, say) and SEMISPARSE_FETCH_CUTLASS is ON, the wheel is
# fetched with `pip download --no-deps` into the build folder and unpacked there (with the
# build's Python, else a pip on PATH: an isolated build environment may have no pip). A
# build without CUTLASS still works -- the CUTLASS 2:4 GEMM entry points then say "built
# without CUTLASS" and sparse24_mm takes its other kernels -- unless
# SEMISPARSE_REQUIRE_CUTLASS is ON (or the environment variable of that name is 1): then
# it fails here. CI sets it.
option(SEMISPARSE_FETCH_CUTLASS "pip download the nvidia-cutlass wheel when its headers are not found" ON)
if(DEFINED ENV{SEMISPARSE_REQUIRE_CUTLASS} AND "$ENV{SEMISPARSE_REQUIRE_CUTLASS}" STREQUAL "1")
  set(_cutlass_required_default ON)
else()
  set(_cutlass_required_default OFF)
endif()
option(SEMISPARSE_REQUIRE_CUTLASS "fail the configure step when the CUTLASS headers cannot be found" ${_cutlass_required_default})
set(SEMISPARSE_CUTLASS_VERSION "4.2.0.0")
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
set(_cutlass_fetched "${CMAKE_BINARY_DIR}/_cutlass/cutlass_library/source")
list(APPEND _cutlass_hints ${_cutlass_fetched})
if(SEMISPARSE_FETCH_CUTLASS AND NOT _cutlass_py AND NOT DEFINED CUTLASS_DIR AND NOT DEFINED ENV{CUTLASS_DIR}
   AND NOT EXISTS "${_cutlass_fetched}/include/cutlass/cutlass.h")
  message(STATUS "semisparse: fetching nvidia-cutlass==${SEMISPARSE_CUTLASS_VERSION} (headers only, --no-deps)")
  execute_process(
    COMMAND ${Python3_EXECUTABLE} -m pip download --no-deps --quiet --disable-pip-version-check
            -d "${CMAKE_BINARY_DIR}/_cutlass_dl" "nvidia-cutlass==${SEMISPARSE_CUTLASS_VERSION}"
    RESULT_VARIABLE _dl_rc OUTPUT_QUIET ERROR_QUIET)
  if(NOT _dl_rc EQUAL 0)
    find_program(_semisparse_pip NAMES pip3 pip)
    if(_semisparse_pip)
      execute_process(
        COMMAND ${_semisparse_pip} download --no-deps --quiet --disable-pip-version-check
                -d "${CMAKE_BINARY_DIR}/_cutlass_dl" "nvidia-cutlass==${SEMISPARSE_CUTLASS_VERSION}"
        RESULT_VARIABLE _dl_rc OUTPUT_QUIET ERROR_QUIET)
    endif()
  endif()
  file(GLOB _cutlass_whl "${CMAKE_BINARY_DIR}/_cutlass_dl/nvidia_cutlass-*.whl")
  if(_dl_rc EQUAL 0 AND _cutlass_whl)
    list(GET _cutlass_whl 0 _cutlass_whl)
    file(MAKE_DIRECTORY "${CMAKE_BINARY_DIR}/_cutlass")
    execute_process(COMMAND ${CMAKE_COMMAND} -E tar xf "${_cutlass_whl}"
                    WORKING_DIRECTORY "${CMAKE_BINARY_DIR}/_cutlass" RESULT_VARIABLE _x_rc)
  else()
    message(STATUS "semisparse: could not download nvidia-cutlass (offline?); set CUTLASS_DIR")
  endif()
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
elseif(SEMISPARSE_REQUIRE_CUTLASS)
  message(FATAL_ERROR "semisparse: CUTLASS headers not found and SEMISPARSE_REQUIRE_CUTLASS is on: "
                      "pip install --no-deps nvidia-cutlass==${SEMISPARSE_CUTLASS_VERSION}, or set CUTLASS_DIR")
else()
  message(STATUS "semisparse: CUTLASS headers not found (pip install --no-deps nvidia-cutlass==4.2.0.0)")
endif()
