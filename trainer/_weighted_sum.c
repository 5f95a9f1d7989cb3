/* The merge's weighted sum, out = Σ_k w_k · x_k over flat fp32 tensors, in one pass.
 *
 * Each output element is summed in registers from the K inputs and written once, so memory
 * sees K reads and one write: the floor for this operation. torch can only add one input at a
 * time, which either re-reads and rewrites the output per input or, blocked, keeps it in a
 * cache too small for a block on every core and pays a dispatch per block and input
 * (benchmarks/merge.py measured 0.7-0.85 of copy bandwidth that way; this pass is above 1).
 *
 * On x86-64 the output goes out with non-temporal stores: the result is 100s of MB, nobody
 * reads it before it leaves the cache, and an ordinary store would first read every output
 * line from memory (read-for-ownership), one more model size of traffic.
 *
 * Bits: products are rounded, then summed in input order (no FMA contraction: built with
 * -ffp-contract=off), so the result is the same on every machine, instruction set and thread
 * count. Threads: `threads` parts, each a contiguous, cache-line-aligned share of every
 * tensor; the GIL is released while they run.
 *
 * Built by setup.py as the top-level module _tributary_weighted_sum, not inside `trainer`: a
 * job sent with `tributary submit` imports `trainer` from its uploaded copy of the sources,
 * which has no build output, and still finds this module where Tributary is installed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__FAST_MATH__) || (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__)
#error "build without -ffast-math: it would fold the NaN check away and reorder the sums"
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#endif
/* One clone per instruction set, picked at load time (an ifunc: glibc only). */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef CLONES
#define CLONES
#endif

/* The helpers below are always inlined into each clone, so the vector ABI of a standalone
 * default-target copy (what -Wpsabi warns about) never applies. */
#pragma GCC diagnostic ignored "-Wpsabi"

enum { LANE = 16 };  /* floats per cache line */
typedef float lane __attribute__((vector_size(LANE * sizeof(float))));

static inline __attribute__((always_inline)) lane load(const float *p)
{
    lane v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Store one cache line; `stream` bypasses the cache (p is 64-byte aligned then). */
static inline __attribute__((always_inline)) void store(float *p, lane v, int stream)
{
#if defined(__x86_64__)
    if (stream) {
        union { lane v; __m128 q[4]; } parts = { v };
        for (int j = 0; j < 4; j++)
            _mm_stream_ps(p + 4 * j, parts.q[j]);
        return;
    }
#endif
    (void)stream;
    memcpy(p, &v, sizeof v);
}

static inline __attribute__((always_inline)) float one(const float *const *x, const float *w, int k, Py_ssize_t i)
{
    float s = w[0] * x[0][i];
    for (int j = 1; j < k; j++)
        s += w[j] * x[j][i];
    return s;
}

/* out[0:n] = Σ w_j x_j[0:n]; returns 1 when an output is NaN or Inf (s·0 is NaN exactly then). */
CLONES static int span(float *out, const float *const *x, const float *w, int k, Py_ssize_t n,
                       int stream)
{
    float odd = 0.0f;
    lane check = {0};
    Py_ssize_t i = 0;
    for (; stream && i < n && (uintptr_t)(out + i) % sizeof(lane) != 0; i++) {
        out[i] = one(x, w, k, i);  /* up to the first whole line: streamed stores need it */
        odd += out[i] * 0.0f;
    }
    for (; i + LANE <= n; i += LANE) {
        lane s = w[0] * load(x[0] + i);
        for (int j = 1; j < k; j++)
            s += w[j] * load(x[j] + i);
        check += s * 0.0f;
        store(out + i, s, stream);
    }
    for (; i < n; i++) {
        out[i] = one(x, w, k, i);
        odd += out[i] * 0.0f;
    }
    for (int j = 0; j < LANE; j++)
        odd += check[j];
    return odd != odd;
}

typedef struct {
    float **outs;           /* tensors' outputs */
    const float **ins;      /* tensors × k inputs, tensor-major */
    const Py_ssize_t *lengths;
    Py_ssize_t tensors;
    const float *weights;
    int k, part, parts, stream;
    Py_ssize_t bad;         /* first tensor whose output (in this part) is not finite, or -1 */
} Job;

static void *run(void *arg)
{
    Job *job = arg;
    job->bad = -1;
    for (Py_ssize_t t = 0; t < job->tensors; t++) {
        Py_ssize_t n = job->lengths[t];
        /* Shares are whole cache lines: where the output starts on a line (torch allocates
         * so), no two threads write into one line. */
        Py_ssize_t share = ((n + job->parts - 1) / job->parts + LANE - 1) / LANE * LANE;
        Py_ssize_t lo = share * job->part, hi = lo + share < n ? lo + share : n;
        if (lo >= hi)
            continue;
        const float *x[job->k];
        for (int j = 0; j < job->k; j++)
            x[j] = job->ins[t * job->k + j] + lo;
        if (span(job->outs[t] + lo, x, job->weights, job->k, hi - lo, job->stream)
            && job->bad < 0)
            job->bad = t;
    }
#if defined(__x86_64__)
    if (job->stream)
        _mm_sfence();  /* the streamed lines are visible before the caller reads them */
#endif
    return NULL;
}

/* Runs `parts` jobs, the last ones on new threads; returns the first bad tensor or -1. */
static Py_ssize_t run_parts(Job *jobs, int parts)
{
    pthread_t threads[parts];
    int started[parts];
    for (int p = 1; p < parts; p++)
        started[p] = pthread_create(&threads[p], NULL, run, &jobs[p]) == 0;
    run(&jobs[0]);
    for (int p = 1; p < parts; p++) {
        if (started[p])
            pthread_join(threads[p], NULL);
        else
            run(&jobs[p]);  /* no thread to be had: do its share here */
    }
    Py_ssize_t bad = -1;
    for (int p = 0; p < parts; p++)
        if (jobs[p].bad >= 0 && (bad < 0 || jobs[p].bad < bad))
            bad = jobs[p].bad;
    return bad;
}

static int addresses(PyObject *seq, Py_ssize_t count, void **into, const char *what)
{
    if (PySequence_Fast_GET_SIZE(seq) != count) {
        PyErr_Format(PyExc_ValueError, "weighted_sum: %zd %s, expected %zd",
                     PySequence_Fast_GET_SIZE(seq), what, count);
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        into[i] = PyLong_AsVoidPtr(PySequence_Fast_GET_ITEM(seq, i));
        if (into[i] == NULL && PyErr_Occurred())
            return -1;
    }
    return 0;
}

static PyObject *weighted_sum(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"outs", "ins", "lengths", "weights", "threads", "stream", NULL};
    PyObject *outs_arg, *ins_arg, *lengths_arg, *weights_arg;
    int threads = 1, stream = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|$ip", names, &outs_arg, &ins_arg,
                                     &lengths_arg, &weights_arg, &threads, &stream))
        return NULL;
    PyObject *outs_seq = NULL, *ins_seq = NULL, *lengths_seq = NULL, *weights_seq = NULL;
    PyObject *result = NULL;
    void **outs = NULL, **ins = NULL;
    Py_ssize_t *lengths = NULL;
    float *weights = NULL;
    Job *jobs = NULL;
    if (!(outs_seq = PySequence_Fast(outs_arg, "outs must be a sequence"))
        || !(ins_seq = PySequence_Fast(ins_arg, "ins must be a sequence"))
        || !(lengths_seq = PySequence_Fast(lengths_arg, "lengths must be a sequence"))
        || !(weights_seq = PySequence_Fast(weights_arg, "weights must be a sequence")))
        goto done;
    Py_ssize_t tensors = PySequence_Fast_GET_SIZE(outs_seq);
    Py_ssize_t k = PySequence_Fast_GET_SIZE(weights_seq);
    if (k < 1 || k > 4096 || threads < 1 || threads > 1024) {
        PyErr_Format(PyExc_ValueError,
                     "weighted_sum: need 1-4096 inputs and 1-1024 threads, got %zd and %d",
                     k, threads);
        goto done;
    }
    outs = calloc(tensors + 1, sizeof *outs);
    ins = calloc(tensors * k + 1, sizeof *ins);
    lengths = calloc(tensors + 1, sizeof *lengths);
    weights = calloc(k, sizeof *weights);
    jobs = calloc(threads, sizeof *jobs);
    if (!outs || !ins || !lengths || !weights || !jobs) {
        PyErr_NoMemory();
        goto done;
    }
    if (addresses(outs_seq, tensors, outs, "outputs") < 0
        || addresses(ins_seq, tensors * k, ins, "inputs (tensors × weights)") < 0)
        goto done;
    if (PySequence_Fast_GET_SIZE(lengths_seq) != tensors) {
        PyErr_SetString(PyExc_ValueError, "weighted_sum: one length per output");
        goto done;
    }
    for (Py_ssize_t t = 0; t < tensors; t++) {
        lengths[t] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(lengths_seq, t));
        if (lengths[t] < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "weighted_sum: negative length");
            goto done;
        }
        int null = lengths[t] > 0 && outs[t] == NULL;  /* an empty tensor may have none */
        for (Py_ssize_t j = 0; j < k; j++)
            null |= lengths[t] > 0 && ins[t * k + j] == NULL;
        if (null) {
            PyErr_Format(PyExc_ValueError, "weighted_sum: null address for tensor %zd", t);
            goto done;
        }
    }
    for (Py_ssize_t j = 0; j < k; j++) {
        weights[j] = (float)PyFloat_AsDouble(PySequence_Fast_GET_ITEM(weights_seq, j));
        if (PyErr_Occurred())
            goto done;
    }
    for (int p = 0; p < threads; p++)
        jobs[p] = (Job){(float **)outs, (const float **)ins, lengths, tensors, weights,
                        (int)k, p, threads, stream, -1};
    Py_ssize_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = run_parts(jobs, threads);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(bad);
done:
    free(outs);
    free(ins);
    free(lengths);
    free(weights);
    free(jobs);
    Py_XDECREF(outs_seq);
    Py_XDECREF(ins_seq);
    Py_XDECREF(lengths_seq);
    Py_XDECREF(weights_seq);
    return result;
}

static PyMethodDef methods[] = {
    {"weighted_sum", (PyCFunction)(void (*)(void))weighted_sum, METH_VARARGS | METH_KEYWORDS,
     "weighted_sum(outs, ins, lengths, weights, *, threads=1, stream=True) -> int\n\n"
     "outs[t][:lengths[t]] = sum_j weights[j] * ins[t*K + j][:lengths[t]] for fp32 buffers\n"
     "given by address (the caller keeps them alive, contiguous and of that length).\n"
     "Returns the index of the first tensor with a NaN or Inf output, or -1."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tributary_weighted_sum",
    "The merge's weighted sum in one pass over memory (see trainer/merge.py).", -1, methods,
};

/* API: what trainer/merge.py expects; an installed build of another API is not used. */
PyMODINIT_FUNC PyInit__tributary_weighted_sum(void)
{
    PyObject *created = PyModule_Create(&module);
    if (created && PyModule_AddIntConstant(created, "API", 1) < 0)
        Py_CLEAR(created);
    return created;
}
