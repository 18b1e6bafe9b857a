// The parts of libgomp the engine calls directly, so Swift kernels share oneDNN's OpenMP
// thread pool instead of competing with its spinning threads.
#include <stddef.h>
void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned int flags);
int omp_get_thread_num(void);
int omp_get_num_threads(void);
int omp_get_max_threads(void);

static inline long diffuse_atomic_fetch_add(long *p, long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
