// The CPU kernels for x86-64 CPUs with AVX2 and FMA (chosen at load time by register_cpu.cpp).
//
// Like ATen's per-capability kernels: the translation unit defines CPU_CAPABILITY_AVX2, so at::vec::Vectorized uses
// 256-bit intrinsics, and everything it defines lives in namespaces named AVX2. Only the code after the target
// pragma is compiled for AVX2; the torch headers included before it keep the baseline target, so no inline function
// shared with other translation units is ever emitted with AVX2 instructions.
#include "capability.h"
#if FASTNAS_HAVE_AVX2_KERNELS

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "../common.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// What -mavx2 -mfma -mf16c would predefine: SLEEF's header declares its 256-bit functions only under these.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu_ops.h"
#pragma GCC pop_options

#endif
