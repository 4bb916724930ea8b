# Toolchain file: cross-compile for 64-bit ARM Linux (Android phones' CPUs, Raspberry Pi 4/5, Graviton, ...)
# with Debian's gcc-aarch64-linux-gnu / g++-aarch64-linux-gnu.
#
#   cmake -S . -B build-arm64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake [-DCHATSPOT_ARM64_ARCH=armv8-a]
#   (the top-level CMakeLists.txt: llama.cpp's libraries and tools from the pinned sdist; `make native-arm64`)
#
# Where the compiler comes from:
# - CHATSPOT_ARM64_TOOLCHAIN (cache variable or environment) names a folder holding Debian's cross packages
#   unpacked with `dpkg -x` (what `make native-arm64` assembles under ~/.cache/chatspot-edge/arm64/, no root
#   needed): the compiler is ROOT/usr/bin/aarch64-linux-gnu-gcc and ROOT is the sysroot (the cross libc sits in
#   ROOT/usr/aarch64-linux-gnu). Its binutils need ROOT/usr/lib/x86_64-linux-gnu on LD_LIBRARY_PATH, which
#   `python -m chatspot_edge.arm64 setup` sets.
# - otherwise the system's /usr/bin/aarch64-linux-gnu-gcc (`apt-get install g++-aarch64-linux-gnu`).
#
# Instruction sets (ggml's CPU backend): CHATSPOT_ARM64_ARCH, default armv8.2-a+dotprod+fp16: every phone core
# since Cortex-A55 / A75 (2017) has the int8 dot product and FP16 arithmetic that ggml's quantized kernels use.
# armv8-a is the fallback for older cores (Cortex-A53 / A57 / A72: Raspberry Pi 3 and 4, budget phones).

set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

if(NOT DEFINED CHATSPOT_ARM64_TOOLCHAIN AND DEFINED ENV{CHATSPOT_ARM64_TOOLCHAIN})
  set(CHATSPOT_ARM64_TOOLCHAIN "$ENV{CHATSPOT_ARM64_TOOLCHAIN}")
endif()
set(CHATSPOT_ARM64_TOOLCHAIN "${CHATSPOT_ARM64_TOOLCHAIN}" CACHE PATH
    "folder of unpacked Debian cross packages (empty: the system's aarch64-linux-gnu-gcc)")
set(CHATSPOT_ARM64_ARCH "armv8.2-a+dotprod+fp16" CACHE STRING
    "-march for ggml's CPU kernels (armv8.2-a+dotprod+fp16 or the armv8-a fallback)")
# try_compile projects re-read this file: hand them the same choices
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES CHATSPOT_ARM64_TOOLCHAIN CHATSPOT_ARM64_ARCH)

if(CHATSPOT_ARM64_TOOLCHAIN)
  set(_cross "${CHATSPOT_ARM64_TOOLCHAIN}/usr/bin/aarch64-linux-gnu-")
  set(CMAKE_SYSROOT "${CHATSPOT_ARM64_TOOLCHAIN}")
  set(CMAKE_FIND_ROOT_PATH "${CHATSPOT_ARM64_TOOLCHAIN}/usr/aarch64-linux-gnu")
else()
  set(_cross "/usr/bin/aarch64-linux-gnu-")
  set(CMAKE_FIND_ROOT_PATH "/usr/aarch64-linux-gnu")
endif()
if(NOT EXISTS "${_cross}gcc")
  message(FATAL_ERROR "no aarch64 cross compiler at ${_cross}gcc: run `make native-arm64` (it unpacks Debian's "
                      "gcc-aarch64-linux-gnu into ~/.cache/chatspot-edge/arm64) or `apt-get install g++-aarch64-linux-gnu`")
endif()
set(CMAKE_C_COMPILER "${_cross}gcc")
set(CMAKE_CXX_COMPILER "${_cross}g++")
set(CMAKE_AR "${_cross}ar" CACHE FILEPATH "")
set(CMAKE_RANLIB "${_cross}ranlib" CACHE FILEPATH "")
set(CMAKE_STRIP "${_cross}strip" CACHE FILEPATH "")

# headers and libraries from the target only; programs (cmake's helpers) from the host
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# ggml: no probing of the build machine; the target's instruction sets spelled out
set(GGML_NATIVE OFF CACHE BOOL "" FORCE)
set(GGML_CPU_ARM_ARCH "${CHATSPOT_ARM64_ARCH}" CACHE STRING "" FORCE)
