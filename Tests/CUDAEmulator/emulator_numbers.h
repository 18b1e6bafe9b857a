// The GPU's number formats in software, for both halves of the CUDA emulator: the kernel
// modules (emulator_runtime.h: the kernels' cvt instructions) and the emulated libraries
// (cuda_emulator.cpp: cuBLASLt and cuDNN operands and results).
#pragma once
#include <cmath>
#include <cstring>

static inline float emu_bits_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned emu_float_bits(float f) { unsigned u; memcpy(&u, &f, 4); return u; }

// IEEE half <-> float, round to nearest even (what cvt.rn.f16.f32 does), subnormals included.
static inline float emu_half_to_float(unsigned short h) {
    const unsigned sign = (unsigned)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return emu_bits_float(sign | 0x7f800000u | (man << 13));
    if (exp == 0) return (sign ? -1.0f : 1.0f) * ldexpf((float)man, -24);
    return emu_bits_float(sign | ((exp + 112) << 23) | (man << 13));
}
static inline unsigned short emu_float_to_half(float f) {
    const unsigned u = emu_float_bits(f), sign = (u >> 16) & 0x8000u;
    const unsigned a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // rounds to infinity
    if (a < 0x38800000u) {                                           // subnormal or zero
        const float m = ldexpf(emu_bits_float(a), 24);               // exact: value in units of 2^-24
        return (unsigned short)(sign | (unsigned)nearbyintf(m));
    }
    const unsigned r = a + 0xfffu + ((a >> 13) & 1u);
    return (unsigned short)(sign | ((r - 0x38000000u) >> 13));
}

// bfloat16: round to nearest even, every NaN the quiet NaN 0x7FC0 (as the kernels' fromfloat).
static inline float emu_bf16_to_float(unsigned short h) { return emu_bits_float((unsigned)h << 16); }
static inline unsigned short emu_float_to_bf16(float f) {
    const unsigned u = emu_float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// E4M3 (finite, saturating at 448, no infinities; NaN 0x7f), round to nearest even.
static inline unsigned char emu_float_to_e4m3(float f) {
    const unsigned char sign = std::signbit(f) ? 0x80 : 0;
    if (std::isnan(f)) return 0x7f;
    float a = fabsf(f);
    if (a >= 448.0f) return sign | 0x7e;
    if (a < ldexpf(1.0f, -6)) return sign | (unsigned char)nearbyintf(a * 512.0f);  // subnormals: 2^-9 units
    int e;
    const float m = frexpf(a, &e);           // a = m * 2^e, m in [0.5, 1)
    int q = (int)nearbyintf(m * 16.0f);      // 1 implicit + 3 mantissa bits
    if (q == 16) { q = 8; ++e; }
    const int biased = e - 1 + 7;
    if (biased > 15 || (biased == 15 && q - 8 == 7)) return sign | 0x7e;
    return sign | (unsigned char)(biased << 3) | (unsigned char)(q - 8);
}
static inline float emu_e4m3_to_float(unsigned char b) {
    const int sign = b & 0x80 ? -1 : 1, exp = (b >> 3) & 15, man = b & 7;
    if (exp == 15 && man == 7) return NAN;
    return sign * (exp == 0 ? ldexpf((float)man, -9) : ldexpf(1.0f + man / 8.0f, exp - 7));
}

// TF32: a float rounded to 10 mantissa bits (nearest, ties away, as the tensor cores' conversion).
static inline float emu_tf32(float v) {
    unsigned u = emu_float_bits(v);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
    return emu_bits_float(u);
}
