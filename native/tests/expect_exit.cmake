# cmake -DEXE=qd_infer -DSTATUS=N -DPATTERN=REGEX -DSCRATCH=DIR -DARGS="a|b|c" -P expect_exit.cmake
#
# Runs EXE with ARGS ('|'-separated) and checks the exit status and the message: stderr (stdout when stderr is
# empty) must match PATTERN, and an error must be a single line. @SCRATCH@ in ARGS and PATTERN is replaced by
# a fresh folder holding empty/, images/scene.png (never decoded: every case fails before that) and a model.pt2
# that is not a package.
cmake_policy(VERSION 3.20)  # @VAR@ in quoted strings is literal text, not a variable reference
file(REMOVE_RECURSE "${SCRATCH}")
file(MAKE_DIRECTORY "${SCRATCH}/empty" "${SCRATCH}/images")
file(WRITE "${SCRATCH}/model.pt2" "not a zip archive\n")
file(WRITE "${SCRATCH}/images/scene.png" "not a PNG either\n")

string(REPLACE "@SCRATCH@" "${SCRATCH}" ARGS "${ARGS}")
string(REPLACE "|" ";" ARGS "${ARGS}")
string(REPLACE "@SCRATCH@" "${SCRATCH}" PATTERN "${PATTERN}")

execute_process(COMMAND "${EXE}" ${ARGS} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
string(STRIP "${out}" out)
string(STRIP "${err}" err)
set(message "${err}")
if(message STREQUAL "")
  set(message "${out}")
endif()

if(NOT "${status}" STREQUAL "${STATUS}")
  message(FATAL_ERROR "exit status ${status}, expected ${STATUS}\nstdout: ${out}\nstderr: ${err}")
endif()
if(NOT message MATCHES "${PATTERN}")
  message(FATAL_ERROR "output does not match '${PATTERN}':\n${message}")
endif()
if(message MATCHES "^qd_infer: error:" AND message MATCHES "\n")
  message(FATAL_ERROR "expected one error line, got:\n${message}")
endif()
