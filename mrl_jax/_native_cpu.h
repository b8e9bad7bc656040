/* What the native extensions ask of the CPU they run on. */
#ifndef MRL_JAX_NATIVE_CPU_H_
#define MRL_JAX_NATIVE_CPU_H_

/* Each extension compiles its kernels twice, with AVX2 + FMA on x86-64 GCC
 * or Clang and for the baseline instruction set, and picks at run time. */
#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_AVX2_VERSION 1
#endif

/* 1 if the AVX2 + FMA version may run: the CPU has both and the caller did
 * not force the baseline version (tests). */
static inline int mrl_cpu_runs_avx2(int force_generic) {
#ifdef HAVE_AVX2_VERSION
  __builtin_cpu_init();
  return !force_generic && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  (void)force_generic;
  return 0;
#endif
}

#endif /* MRL_JAX_NATIVE_CPU_H_ */
