# The pinned llama-cpp-python sdist: fetched through pip, verified by sha256, unpacked, all cached outside the clone.
#
# The pin is cmake/llama-cpp-python.txt (a pip requirements line with its hash), the one place that names it.
# Two ways to use this file:
#   include(cmake/LlamaSource.cmake)         then  chatspot_llama_source(<out-var>)
#       sets <out-var> to the unpacked llama.cpp source tree (vendor/llama.cpp of the sdist).
#   cmake [-DCHATSPOT_PYTHON=python3] [-DCHATSPOT_CACHE_DIR=DIR] -P cmake/LlamaSource.cmake
#       fetches and verifies the sdist and prints its path (what `make setup` builds the wheel from).
# Inputs (all optional):
#   LLAMA_SDIST          a .tar.gz already on disk (verified against the pin all the same); else it is fetched
#   CHATSPOT_CACHE_DIR   default $XDG_CACHE_HOME/chatspot-edge or ~/.cache/chatspot-edge
#   CHATSPOT_PYTHON      the Python whose pip fetches the sdist (default: python3 on PATH)
# Nothing but this sdist is downloaded: llama.cpp's own build fetches nothing (LLAMA_CURL / LLAMA_OPENSSL off).

set(_CHATSPOT_LLAMA_PIN "${CMAKE_CURRENT_LIST_DIR}/llama-cpp-python.txt")

function(chatspot_llama_pin out_version out_sha256)
    file(STRINGS "${_CHATSPOT_LLAMA_PIN}" _lines REGEX "^llama-cpp-python==")
    if (NOT _lines MATCHES "^llama-cpp-python==([^ ]+) +--hash=sha256:([0-9a-f]+)")
        message(FATAL_ERROR "${_CHATSPOT_LLAMA_PIN}: expected 'llama-cpp-python==X --hash=sha256:H'")
    endif()
    set(${out_version} "${CMAKE_MATCH_1}" PARENT_SCOPE)
    set(${out_sha256} "${CMAKE_MATCH_2}" PARENT_SCOPE)
endfunction()

function(_chatspot_cache_dir out)
    if (CHATSPOT_CACHE_DIR)
        set(dir "${CHATSPOT_CACHE_DIR}")
    elseif (DEFINED ENV{CHATSPOT_CACHE_DIR})
        set(dir "$ENV{CHATSPOT_CACHE_DIR}")
    elseif (DEFINED ENV{XDG_CACHE_HOME})
        set(dir "$ENV{XDG_CACHE_HOME}/chatspot-edge")
    else()
        set(dir "$ENV{HOME}/.cache/chatspot-edge")
    endif()
    set(${out} "${dir}" PARENT_SCOPE)
endfunction()

function(_chatspot_verify file sha256)
    file(SHA256 "${file}" actual)
    if (NOT actual STREQUAL sha256)
        message(FATAL_ERROR "${file}: sha256 ${actual}, the pin (${_CHATSPOT_LLAMA_PIN}) says ${sha256}")
    endif()
endfunction()

# The verified sdist (.tar.gz): LLAMA_SDIST if given, else the cached copy, else fetched with pip.
function(chatspot_llama_sdist out)
    chatspot_llama_pin(version sha256)
    if (LLAMA_SDIST)
        _chatspot_verify("${LLAMA_SDIST}" "${sha256}")
        set(${out} "${LLAMA_SDIST}" PARENT_SCOPE)
        return()
    endif()
    _chatspot_cache_dir(cache)
    set(sdist "${cache}/sdist/llama_cpp_python-${version}.tar.gz")
    if (NOT EXISTS "${sdist}")
        if (NOT CHATSPOT_PYTHON)
            find_program(CHATSPOT_PYTHON NAMES python3 python REQUIRED)
        endif()
        set(tmp "${cache}/sdist/.download-${sha256}")
        file(REMOVE_RECURSE "${tmp}")
        message(STATUS "fetching llama-cpp-python ${version} (sdist) with pip")
        # --no-binary :all: : the source distribution, never a wheel; --require-hashes: pip checks the pin.
        execute_process(
            COMMAND "${CHATSPOT_PYTHON}" -m pip download --quiet --no-deps --no-binary :all:
                    --require-hashes -r "${_CHATSPOT_LLAMA_PIN}" -d "${tmp}"
            RESULT_VARIABLE rc)
        file(GLOB got "${tmp}/llama_cpp_python-${version}.tar.gz")
        if (NOT rc EQUAL 0 OR NOT got)
            message(FATAL_ERROR "pip could not fetch llama-cpp-python ${version} (exit ${rc})")
        endif()
        _chatspot_verify("${got}" "${sha256}")
        file(RENAME "${got}" "${sdist}")
        file(REMOVE_RECURSE "${tmp}")
    endif()
    _chatspot_verify("${sdist}" "${sha256}")
    set(${out} "${sdist}" PARENT_SCOPE)
endfunction()

# The unpacked llama.cpp tree of the verified sdist (unpacked once per hash, next to the cached sdist).
function(chatspot_llama_source out)
    chatspot_llama_pin(version sha256)
    chatspot_llama_sdist(sdist)
    _chatspot_cache_dir(cache)
    string(SUBSTRING "${sha256}" 0 16 short)
    set(root "${cache}/src/llama-cpp-python-${version}-${short}")
    set(tree "${root}/llama_cpp_python-${version}/vendor/llama.cpp")
    if (NOT EXISTS "${tree}/CMakeLists.txt")
        # unpack beside, then rename: a build running at the same time never sees a half-unpacked tree
        string(RANDOM LENGTH 8 tag)
        set(tmp "${root}.tmp-${tag}")
        file(ARCHIVE_EXTRACT INPUT "${sdist}" DESTINATION "${tmp}")
        if (NOT EXISTS "${tmp}/llama_cpp_python-${version}/vendor/llama.cpp/CMakeLists.txt")
            message(FATAL_ERROR "${sdist}: no vendor/llama.cpp inside")
        endif()
        if (NOT EXISTS "${tree}/CMakeLists.txt")
            file(REMOVE_RECURSE "${root}")
            file(RENAME "${tmp}" "${root}" RESULT renamed)
        endif()
        file(REMOVE_RECURSE "${tmp}")  # left only when another build unpacked it first
        if (NOT EXISTS "${tree}/CMakeLists.txt")
            message(FATAL_ERROR "could not unpack ${sdist} to ${root}")
        endif()
    endif()
    set(${out} "${tree}" PARENT_SCOPE)
endfunction()

if (CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
    chatspot_llama_sdist(_sdist)
    execute_process(COMMAND "${CMAKE_COMMAND}" -E echo "${_sdist}")
endif()
