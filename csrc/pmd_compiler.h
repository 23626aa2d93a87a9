/* pmd_compiler.h: branch hints and layout checks shared by every header.
 *
 * Nothing here touches memory; it only tells the compiler what we know.
 */
#ifndef PMD_COMPILER_H
#define PMD_COMPILER_H

#include <assert.h>   /* static_assert (C11) */
#include <stddef.h>   /* offsetof */
#include <stdint.h>

#if defined(__GNUC__) || defined(__clang__)
#define pmd_likely(x)   __builtin_expect(!!(x), 1)
#define pmd_unlikely(x) __builtin_expect(!!(x), 0)
#define PMD_ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define pmd_likely(x)   (x)
#define pmd_unlikely(x) (x)
#define PMD_ALWAYS_INLINE static inline
#endif

/* Pin a struct layout: the device reads these bytes, not our C types. */
#define PMD_LAYOUT(type, size) \
    static_assert(sizeof(type) == (size), #type " must be " #size " bytes")
#define PMD_OFFSET(type, field, off) \
    static_assert(offsetof(type, field) == (off), #type "." #field " must be at " #off)

#endif /* PMD_COMPILER_H */
