/* 16-float vectors shared by the project's C kernels (GCC / clang vector extensions, so the
   compiler picks the ISA from -march=native): unaligned loads and stores, and the lane sum. */
#ifndef MOH_COMPILE_VEC_H
#define MOH_COMPILE_VEC_H

typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));
#define VW 16

static inline vf load(const float *p) { return *(const vfu *)p; }
static inline void store(float *p, vf v) { *(vfu *)p = v; }

/* Sum of the 16 lanes as a halving tree (about 10 instructions; a lane-by-lane loop is a chain of
   15 dependent adds, which cost a third of the MoE++ input half's time at d = 384). */
static inline float hsum(vf v) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
    typedef float v8 __attribute__((vector_size(32)));
    typedef float v4 __attribute__((vector_size(16)));
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
#else
    float s = 0.0f;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
#endif
}

#endif
