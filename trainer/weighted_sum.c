/* The merge's weighted sum in one pass over memory: out[t] = sum_j w[j] * in[j][t], fp32.
 *
 * Built at first use by trainer/native.py (with the machine's C compiler) and called through
 * ctypes. Why C: torch adds one input at a time over a block, so every added input reads and
 * writes the block again, and each of the K operations per block pays a fork/join of torch's
 * threads. Here each thread owns a contiguous share of the chunks of all the tensors and sums
 * a chunk in a buffer that stays in its own L2 cache while the K inputs stream past: memory
 * sees each input read once and the output written once, with no synchronisation until the
 * end.
 *
 * The result does not depend on the thread count or the vector width: every element is
 * w[0]*x0 + w[1]*x1 + ... in that order, in fp32, with no fused multiply-add (the build passes
 * -ffp-contract=off), so the same inputs give the same bits on every machine.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

/* Elements summed at a time: 512 KB of fp32, half of a 1 MB L2 (measured on this project's
 * machines, benchmarks/merge.py: 64 K elements 0.05-0.1 of copy bandwidth slower, 256 K
 * elements, a whole L2, slower again; 4 K elements switch between the K inputs so often that
 * the prefetchers never settle, 0.3 of copy bandwidth at K = 16). */
#define CHUNK (1 << 17)
#define MAX_THREADS 256
#define LANES 8

typedef struct {
    float *const *out;        /* one output per tensor */
    const float *const *in;   /* input j's tensor t at in[j * tensors + t] */
    const float *w;
    const int64_t *sizes;
    int64_t tensors, k;
    int64_t first, last;      /* this thread's chunks, counted over all tensors in order */
    int checksum;
    double sum;               /* sum of the outputs written (NaN or Inf if any is) */
} job_t;

/* One chunk of one tensor: acc = w0*x0 + ... + w[k-1]*x[k-1], then copied out whole with
 * memcpy (the C library's copy writes whole cache lines without reading them first). */
__attribute__((target_clones("avx512f", "avx2", "default")))
static double sum_chunk(float *restrict out, const float *const *in, int64_t stride,
                        const float *w, int64_t k, int64_t off, int64_t m, int checksum) {
    static __thread float acc[CHUNK] __attribute__((aligned(64)));
    const float *x = in[0] + off;
    float w0 = w[0];
    for (int64_t i = 0; i < m; i++) acc[i] = w0 * x[i];
    for (int64_t j = 1; j < k; j++) {
        const float *y = in[j * stride] + off;
        float wj = w[j];
        for (int64_t i = 0; i < m; i++) acc[i] += wj * y[i];
    }
    memcpy(out + off, acc, (size_t)m * sizeof(float));
    if (!checksum) return 0.0;
    /* Eight independent partial sums, so the loop vectorises without reordering any sum. */
    double lanes[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= m; i += LANES)
        for (int l = 0; l < LANES; l++) lanes[l] += acc[i + l];
    for (; i < m; i++) lanes[0] += acc[i];
    double total = 0.0;
    for (int l = 0; l < LANES; l++) total += lanes[l];
    return total;
}

static void *run_job(void *arg) {
    job_t *job = arg;
    int64_t chunk = 0;  /* the index of the next chunk over all tensors */
    for (int64_t t = 0; t < job->tensors && chunk < job->last; t++) {
        int64_t n = job->sizes[t], chunks = (n + CHUNK - 1) / CHUNK;
        if (chunk + chunks <= job->first) { chunk += chunks; continue; }
        for (int64_t c = 0; c < chunks; c++, chunk++) {
            if (chunk < job->first || chunk >= job->last) continue;
            int64_t off = c * CHUNK, m = n - off < CHUNK ? n - off : CHUNK;
            job->sum += sum_chunk(job->out[t], job->in + t, job->tensors, job->w, job->k, off,
                                  m, job->checksum);
        }
    }
    return NULL;
}

/* Splits the chunks of all tensors into `threads` contiguous shares (the calling thread takes
 * the first). *sum receives the sum of every output element when `checksum` is
 * set (NaN or Inf in any input makes it non-finite), else 0. */
void tributary_weighted_sum(float *const *out, const float *const *in, const float *w,
                            const int64_t *sizes, int64_t tensors, int64_t k, int64_t threads,
                            int checksum, double *sum) {
    int64_t total = 0;
    for (int64_t t = 0; t < tensors; t++) total += (sizes[t] + CHUNK - 1) / CHUNK;
    if (threads > total) threads = total;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    job_t jobs[MAX_THREADS];
    for (int64_t p = 0; p < threads; p++)
        jobs[p] = (job_t){out, in, w, sizes, tensors, k, total * p / threads,
                          total * (p + 1) / threads, checksum, 0.0};
    for (int64_t p = 1; p < threads; p++) {
        started[p] = pthread_create(&ids[p], NULL, run_job, &jobs[p]) == 0;
        if (!started[p]) run_job(&jobs[p]);  /* no thread to be had: its share runs here */
    }
    run_job(&jobs[0]);
    *sum = 0.0;
    for (int64_t p = 0; p < threads; p++) {
        if (started[p]) pthread_join(ids[p], NULL);
        *sum += jobs[p].sum;
    }
}
