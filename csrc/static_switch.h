// Compile-time specialisation from runtime values (the flash-attention pattern, csrc/flash_attn/src/static_switch.h).
#pragma once

#define FP16_SWITCH(IS_BF16, ...)                  \
    [&] {                                          \
        if (IS_BF16) {                             \
            using elem_t = __nv_bfloat16;          \
            return __VA_ARGS__();                  \
        } else {                                   \
            using elem_t = __half;                 \
            return __VA_ARGS__();                  \
        }                                          \
    }()

// Rounds head_dim up to a compiled bucket. 40, 80 and 160 are SD 1.x/2.x/SDXL head sizes and get exact buckets
// (no wasted work on the P.V side); the rest pad up to the next bucket with zero columns.
#define HEADDIM_SWITCH(HEADDIM, ...)                                            \
    [&] {                                                                       \
        if (HEADDIM <= 32) { constexpr static int kHeadDim = 32; return __VA_ARGS__(); }   \
        else if (HEADDIM <= 40) { constexpr static int kHeadDim = 40; return __VA_ARGS__(); }  \
        else if (HEADDIM <= 64) { constexpr static int kHeadDim = 64; return __VA_ARGS__(); }  \
        else if (HEADDIM <= 80) { constexpr static int kHeadDim = 80; return __VA_ARGS__(); }  \
        else if (HEADDIM <= 96) { constexpr static int kHeadDim = 96; return __VA_ARGS__(); }  \
        else if (HEADDIM <= 128) { constexpr static int kHeadDim = 128; return __VA_ARGS__(); } \
        else if (HEADDIM <= 160) { constexpr static int kHeadDim = 160; return __VA_ARGS__(); } \
        else if (HEADDIM <= 192) { constexpr static int kHeadDim = 192; return __VA_ARGS__(); } \
        else { constexpr static int kHeadDim = 256; return __VA_ARGS__(); }                     \
    }()
