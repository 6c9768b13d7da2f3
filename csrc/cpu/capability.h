// Which per-capability CPU kernel translation units this compiler builds. The AVX2 one relies on GCC's
// `#pragma GCC target` (x86-64 only); elsewhere only the portable kernels exist.
#pragma once

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define FASTNAS_HAVE_AVX2_KERNELS 1
#else
#define FASTNAS_HAVE_AVX2_KERNELS 0
#endif
