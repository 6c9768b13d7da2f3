// The CPU kernels for any x86-64 / other CPU: at::vec::Vectorized's portable implementation, which the compiler
// vectorises for the baseline instruction set.
#define CPU_CAPABILITY DEFAULT
#include "cpu_ops.h"
