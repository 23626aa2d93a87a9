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
 */
#ifndef PMD_GIL_H
#define PMD_GIL_H

#include <Python.h>

#ifdef PMD_DEBUG
#define PMD_GIL_ALWAYS_KEPT 1
#else
#define PMD_GIL_ALWAYS_KEPT 0
#endif

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
    return pmd_gil_alone() ? NULL : PyEval_SaveThread();
}

static inline void pmd_gil_take(PyThreadState *ts)
{
    if (ts != NULL)
        PyEval_RestoreThread(ts);
}

#endif /* PMD_GIL_H */
