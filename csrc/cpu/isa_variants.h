// Runtime choice of the instruction set for a CPU kernel's inner loops.
//
// LAFS_ISA_VARIANTS(ret, name, (params), (args)) defines the template `name<T>(params)`, which
// calls `name_body<T>(args)` compiled for AVX-512 (LAFS_AVX512: with its 256-bit forms and FMA for them,
// which GCC's "avx512f" alone leaves out), for AVX2 + FMA, or for the build's default, whichever this
// CPU has (checked once).  `name_body` is the caller's always-inline template.
// The variants may round differently (FMA contraction), never run to run on one machine.
#pragma once

#define LAFS_INLINE inline __attribute__((always_inline))
#define LAFS_INLINE_LAMBDA __attribute__((always_inline))  // after a lambda's parameter list

namespace lafs_isa {
#if defined(__x86_64__) || defined(__i386__)
enum class Isa { avx512, avx2, base };
#define LAFS_AVX512 "avx512f,avx512vl,fma"

inline Isa detect_isa() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")) {
    return Isa::avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
  return Isa::base;
}

inline const Isa kIsa = detect_isa();

// name(params) calls name_body compiled for the CPU's instruction set.
#define LAFS_ISA_VARIANTS(ret, name, params, args)                                                  \
  template <typename T>                                                                             \
  __attribute__((target(LAFS_AVX512))) ret name##_avx512 params { return name##_body<T> args; }     \
  template <typename T>                                                                             \
  __attribute__((target("avx2,fma"))) ret name##_avx2 params { return name##_body<T> args; }        \
  template <typename T>                                                                             \
  ret name##_base params { return name##_body<T> args; }                                            \
  template <typename T>                                                                             \
  ret name params {                                                                                 \
    switch (lafs_isa::kIsa) {                                                                       \
      case lafs_isa::Isa::avx512: return name##_avx512<T> args;                                     \
      case lafs_isa::Isa::avx2: return name##_avx2<T> args;                                         \
      default: return name##_base<T> args;                                                          \
    }                                                                                               \
  }
#else
// Other architectures: the build's own vector flags.
#define LAFS_ISA_VARIANTS(ret, name, params, args)                                                  \
  template <typename T>                                                                             \
  ret name params { return name##_body<T> args; }
#endif
}  // namespace lafs_isa
