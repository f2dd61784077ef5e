// CUDA's built-in vector types for the emulation, with the GPU's sizes and alignments (the
// 16-byte ones matter: kernels move data as uint4/float4 and rely on 16-byte alignment).
#pragma once

#define QK_EMU_VEC2(T, name, align) \
  struct alignas(align) name {      \
    T x, y;                         \
  };                                \
  inline name make_##name(T x, T y) { return {x, y}; }
#define QK_EMU_VEC3(T, name) \
  struct name {              \
    T x, y, z;               \
  };                         \
  inline name make_##name(T x, T y, T z) { return {x, y, z}; }
#define QK_EMU_VEC4(T, name, align) \
  struct alignas(align) name {      \
    T x, y, z, w;                   \
  };                                \
  inline name make_##name(T x, T y, T z, T w) { return {x, y, z, w}; }

QK_EMU_VEC2(float, float2, 8)
QK_EMU_VEC3(float, float3)
QK_EMU_VEC4(float, float4, 16)
QK_EMU_VEC2(int, int2, 8)
QK_EMU_VEC3(int, int3)
QK_EMU_VEC4(int, int4, 16)
QK_EMU_VEC2(unsigned int, uint2, 8)
QK_EMU_VEC4(unsigned int, uint4, 16)
QK_EMU_VEC2(double, double2, 16)
QK_EMU_VEC2(short, short2, 4)
QK_EMU_VEC4(short, short4, 8)
QK_EMU_VEC2(unsigned short, ushort2, 4)
QK_EMU_VEC4(unsigned short, ushort4, 8)
QK_EMU_VEC4(signed char, char4, 4)
QK_EMU_VEC4(unsigned char, uchar4, 4)
QK_EMU_VEC2(long long, longlong2, 16)
QK_EMU_VEC2(unsigned long long, ulonglong2, 16)

#undef QK_EMU_VEC2
#undef QK_EMU_VEC3
#undef QK_EMU_VEC4

struct uint3 {
  unsigned int x, y, z;
};
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return {x, y, z}; }

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}  // NOLINT: implicit, as in CUDA
  constexpr operator uint3() const { return {x, y, z}; }
};
