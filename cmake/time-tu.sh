#!/usr/bin/env bash
# Compiler launcher (CMAKE_<LANG>_COMPILER_LAUNCHER) that runs the compile command and, when
# SEMISPARSE_TU_TIMES names a file, appends "<seconds> <source file>" to it: .ci/run prints
# the compile time of every translation unit (the CUDA ones are the slow ones).
start=$EPOCHREALTIME
"$@"
rc=$?
if [ -n "${SEMISPARSE_TU_TIMES:-}" ]; then
  src="?"
  for arg in "$@"; do
    case "$arg" in *.cu|*.cpp|*.cc|*.c) src=$arg ;; esac
  done
  case "$src" in */csrc/*) src="csrc/${src#*/csrc/}" ;; esac
  awk -v a="$start" -v b="$EPOCHREALTIME" -v s="$src" 'BEGIN { printf "%7.1f s  %s\n", b - a, s }' \
    >> "$SEMISPARSE_TU_TIMES"
fi
exit $rc
