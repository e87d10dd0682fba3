#!/usr/bin/env bash
# tests/test_no_fma.sh: fused multiply-adds only where a kernel asks for them by
# name. The library is ISO C (no contraction) and its elementwise loops are
# meant to round every product; a compiler once vectorised RoPE's loop over
# heads into vfmaddsub anyway (docs/architecture.md, "Determinism"). Lists the
# functions of $BUILD's objects that contain an FMA instruction and fails on any
# outside the allowed ones: the fp32 GEMM micro-kernel, attention's rows4, the
# reference GEMM's fused chain (its fmaf is the oracle of the micro-kernel), and
# the quantised dot products, which fuse where llama.cpp's x86 kernels do
# (core/dtype.c's vec_dots and kernels/quant_avx512.c's tiles), and the AMX-INT8
# Q8_0 tiles (rows, Q8_0_R8) and their VNNI twins with their plain-C twin (one fused add per block, by name), and
# llama.cpp's order for published models where its code or compiler fuses:
# rope_turn_fma (RoPE), expf_ggml (ggml_v_expf) and its AVX-512 twin inlined in
# softmax_row_ggml and swiglu_forward_ggml, vec_dot_ggml (_ref, _avx512, _batch)
# scores16_ggml (16 of those dots at once) and cached_row_ggml (f32 dots), and rate_loop_seconds, the FMA and VDPBF16PS timing loops of the
# bf16 rate probe (gemm_avx512_bf16.c).
set -u
cd "$(dirname "$0")/.."
. tests/lib.sh no_fma
BUILD=${BUILD:-build}
allowed='^(ukernel|rows4|gemm_ref_fma_chain|rope_turn_fma|expf_ggml|vec_dot_ggml(_ref|_avx512|_batch)?|softmax_row_ggml|swiglu_forward_ggml(\._omp_fn\.[0-9]+)?|cached_row_ggml|(q4_0|q8_0|k_affine|q6_K|f16|bf16)_vec_dot|q8_0_dot_strided|q6_K_dot_strided|(q4_0|q8_0|q8_0_r8|q4_K|q4_K_r4|q5_K|q5_K_r4|q6_K|q6_K_r4|f16|bf16)_tile|(q4_0|q8_0)_pairs_tile|qk_amx_q8_0(_r8)?_tile|scores16_ggml|qk_avx512_q8_0(_r8)?_blocked_tile|qmatmul_q8_0_blocked_ref|rate_loop_seconds)$'
objs=$(ls "$BUILD"/src/*/*.o 2>/dev/null)
if [ -z "$objs" ]; then bad objects "no object files in $BUILD/src (build first)"; finish; fi
if ! command -v objdump >/dev/null; then bad objdump "objdump not found (binutils)"; finish; fi
found=$(for o in $objs; do
    objdump -d --no-show-raw-insn "$o" | awk -v o="$(basename "$o")" '
        /^[0-9a-f]+ <.*>:$/ { fn = substr($2, 2, length($2) - 3)  # a clone (-O3: rows4.constprop.0) is its function
                              gsub(/\.(constprop|isra|part|cold)(\.[0-9]+)?/, "", fn) }
        /\tv?f(n)?m(add|sub)/ { n[fn]++ }
        END { for (f in n) print o ":" f ":" n[f] }'
done)
stray=$(echo "$found" | awk -F: -v a="$allowed" 'NF == 3 && $2 !~ a')
if [ -n "$stray" ]; then
    bad "fma only in ukernel, rows4, gemm_ref_fma_chain, the llama.cpp-order kernels and the quantised dots" "FMA instructions in: $(echo $stray)"
else
    ok "fma only in ukernel, rows4, gemm_ref_fma_chain, the llama.cpp-order kernels and the quantised dots ($(echo "$found" | awk -F: 'NF == 3 { printf "%s%s %s", s, $2, $3; s = ", " }'))"
fi
finish
