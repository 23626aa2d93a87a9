/* pmd_gil.h: release the GIL around a burst only when another thread could take it.
 *
 * A burst runs in C and releases the GIL so that other Python threads (another
 * queue's, the application's) run meanwhile. A release and take cost CPython
 * 3.11 some 400 instructions (drop_gil and take_gil: two mutexes and a
 * condition variable), over 10 a packet at burst 32. When the calling thread
 * is the only thread of the only interpreter, nobody is there to take it, so
 * pmd_gil_release keeps it.
 *
 * Only our own thread state and interpreter are dereferenced; the list heads
 * are read as plain pointers. A thread state created meanwhile (a C thread in
 * PyGILState_Ensure) waits for the GIL until this burst ends, as it would for
 * any C call, and the next burst sees it and releases. Needs the GIL held.
 *
 * The hand-off. With one queue per thread, thread B ends its burst while
 * thread A runs the few microseconds of Python between two of its bursts. CPython
 * makes B sleep on a condition variable and A wake it when it drops the GIL: a
 * futex sleep and wake-up that cost some 10 to 50 us here (a VM's idle vCPU),
 * longer than A held the GIL. So B first spins while the GIL is held by a pmd
 * thread that took it back at the end of a burst less than PMD_GIL_SPIN_NS ago
 * (it will release it at its next burst); a holder past that, or not a pmd
 * burst's, and B blocks as CPython would. The hint is the time of that take
 * (0 once released), shared by all of pmd's modules through the interpreter's
 * dict. Only timing depends on it: a stale or overwritten hint costs at most
 * one bounded spin. A process on one CPU never spins (the holder could not run).
 */
#ifndef PMD_GIL_H
#define PMD_GIL_H

#include <Python.h>
#include <stdint.h>
#include <sched.h>
#include <time.h>

#ifdef PMD_DEBUG
#define PMD_GIL_ALWAYS_KEPT 1
#else
#define PMD_GIL_ALWAYS_KEPT 0
#endif

/* Longest a burst spins for a GIL that a pmd thread took back this long ago. */
#define PMD_GIL_SPIN_NS 20000

typedef struct {
    uint64_t held_since;     /* CLOCK_MONOTONIC ns | 1 of the last take by a burst; 0 after its release */
    uint64_t spun_handed;    /* spins that ended with the holder releasing: a sleep avoided */
    uint64_t spun_out;       /* spins that reached PMD_GIL_SPIN_NS, then blocked */
    int spin;                /* the process could run on more than one CPU when pmd was imported */
} pmd_gil_hint_t;

/* Each module has its own statics; pmd_gil_init points them all at one. A
 * module's storage lives as long as the process (extension modules are never
 * unloaded), so a burst in a thread outliving the interpreter reads valid memory. */
static pmd_gil_hint_t pmd_gil_hint_storage;
static pmd_gil_hint_t *pmd_gil_hint = NULL;

#define PMD_GIL_HINT_KEY "pmd.gil_hint"

static inline uint64_t pmd_gil_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* The take reads the clock once a burst: only where that is the vDSO's tens of
 * nanoseconds, not a system call (a clock source without vDSO support). */
static inline int pmd_gil_clock_is_cheap(void)
{
    uint64_t t0 = pmd_gil_now(), t1 = t0;
    for (int i = 0; i < 64; i++)
        t1 = pmd_gil_now();
    return t1 - t0 < 64 * 250;
}

/* Once at module import, GIL held: 0, or -1 with an exception set. */
static inline int pmd_gil_init(void)
{
    PyObject *d = PyInterpreterState_GetDict(PyInterpreterState_Get());
    if (d == NULL)
        return 0;                               /* no dict: the bursts hand off as CPython does */
    PyObject *c = PyDict_GetItemString(d, PMD_GIL_HINT_KEY);
    if (c != NULL) {
        void *p = PyCapsule_GetPointer(c, PMD_GIL_HINT_KEY);
        if (p == NULL)
            return -1;
        pmd_gil_hint = (pmd_gil_hint_t *)p;
        return 0;
    }
    cpu_set_t cpus;
    pmd_gil_hint_storage.spin = sched_getaffinity(0, sizeof cpus, &cpus) == 0 && CPU_COUNT(&cpus) > 1
        && pmd_gil_clock_is_cheap();
    c = PyCapsule_New(&pmd_gil_hint_storage, PMD_GIL_HINT_KEY, NULL);
    if (c == NULL)
        return -1;
    int r = PyDict_SetItemString(d, PMD_GIL_HINT_KEY, c);
    Py_DECREF(c);
    if (r < 0)
        return -1;
    pmd_gil_hint = &pmd_gil_hint_storage;
    return 0;
}

static inline void pmd_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline int pmd_gil_alone(void)
{
    /* The debug build traces lines (CYTHON_TRACE_NOGIL), and Cython's trace
     * calls between release and take assume the GIL is held: keep it. */
    if (PMD_GIL_ALWAYS_KEPT)
        return 1;
    PyThreadState *ts = PyThreadState_Get();
    PyInterpreterState *in = PyThreadState_GetInterpreter(ts);
    return PyInterpreterState_Head() == in && PyInterpreterState_Next(in) == NULL
        && PyInterpreterState_ThreadHead(in) == ts && PyThreadState_Next(ts) == NULL;
}

/* Release the GIL unless this thread is alone; give the result to pmd_gil_take. */
static inline PyThreadState *pmd_gil_release(void)
{
    if (pmd_gil_alone())
        return NULL;
    pmd_gil_hint_t *h = pmd_gil_hint;
    uint64_t mine = h != NULL ? __atomic_load_n(&h->held_since, __ATOMIC_RELAXED) : 0;
    PyThreadState *ts = PyEval_SaveThread();
    /* Cleared after the drop, so that a spinner sees it only once the GIL is free;
     * only if no other burst has taken the GIL and stamped it meanwhile. */
    if (mine != 0)
        __atomic_compare_exchange_n(&h->held_since, &mine, 0, 0, __ATOMIC_RELEASE, __ATOMIC_RELAXED);
    return ts;
}

/* Spin while the take stamped `since` still holds the GIL, up to PMD_GIL_SPIN_NS after it. */
__attribute__((noinline, unused)) static void pmd_gil_await_handoff(pmd_gil_hint_t *h, uint64_t since)
{
    uint64_t now = pmd_gil_now();
    if ((int64_t)(now - since) >= PMD_GIL_SPIN_NS)
        return;                       /* held a while: not between two bursts */
    do {
        pmd_cpu_relax();
        if (__atomic_load_n(&h->held_since, __ATOMIC_ACQUIRE) != since) {
            __atomic_fetch_add(&h->spun_handed, 1, __ATOMIC_RELAXED);
            return;
        }
        now = pmd_gil_now();
    } while ((int64_t)(now - since) < PMD_GIL_SPIN_NS);
    __atomic_fetch_add(&h->spun_out, 1, __ATOMIC_RELAXED);
}

static inline void pmd_gil_take(PyThreadState *ts)
{
    if (ts == NULL)
        return;
    pmd_gil_hint_t *h = pmd_gil_hint;
    if (h == NULL || !h->spin) {
        PyEval_RestoreThread(ts);
        return;
    }
    uint64_t since = __atomic_load_n(&h->held_since, __ATOMIC_ACQUIRE);
    if (since != 0)
        pmd_gil_await_handoff(h, since);
    PyEval_RestoreThread(ts);
    __atomic_store_n(&h->held_since, pmd_gil_now() | 1, __ATOMIC_RELAXED);
}

/* The hand-off counters (pmd.driver._queue.gil_handoffs). */
static inline uint64_t pmd_gil_spun_handed(void)
{
    return pmd_gil_hint != NULL ? __atomic_load_n(&pmd_gil_hint->spun_handed, __ATOMIC_RELAXED) : 0;
}

static inline uint64_t pmd_gil_spun_out(void)
{
    return pmd_gil_hint != NULL ? __atomic_load_n(&pmd_gil_hint->spun_out, __ATOMIC_RELAXED) : 0;
}

#endif /* PMD_GIL_H */
