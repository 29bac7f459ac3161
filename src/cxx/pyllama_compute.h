/* One long-lived thread runs every multi-threaded graph computation of the process
 * (llama_decode, llama_encode, the mtmd projector), whichever Python thread asked for it.
 *
 * Why: llama.cpp's CPU backend is built with OpenMP, and libgomp gives every thread that starts
 * a parallel region its own team of worker threads, kept alive for the thread's lifetime.  Calls
 * from a second Python thread (a thread pool, the server's driver, a Stream consumed elsewhere)
 * add a second team; once a process has more OpenMP threads than CPUs, libgomp stops spinning at
 * its barriers ("throttled" waits) and every barrier in the graph becomes a futex sleep.  On a
 * 2-core machine with n_threads=2 that made decode from any thread but the first ~3x slower.
 * Running the computation on one thread keeps one team, however many Python threads call.
 *
 * Single-threaded computations (n_threads == n_threads_batch == 1: no OpenMP region) run on the
 * caller's thread as before: the hand-off (two futex wake-ups, tens of microseconds) buys nothing
 * there, and contexts with one thread each keep running in parallel.
 *
 * The caller blocks (GIL released) until its job is done; jobs run one at a time in arrival
 * order of the `turn` mutex.  A C++ exception thrown by the job is carried back and rethrown in
 * the caller (Cython's `except +` turns it into a Python exception there), and so is the
 * thread-local "last llama.cpp error" that the log callback records on the compute thread.
 * After fork() the child gets a fresh compute thread (the parent's does not exist there); the old
 * one's state is leaked on purpose: its mutexes may have been held at the fork.
 *
 * Header-only and `static`, like pyllama_support.h: only _core.cpp includes it. */
#ifndef PYLLAMA_COMPUTE_H
#define PYLLAMA_COMPUTE_H

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#ifndef _WIN32
#include <unistd.h>
#endif

#include "llama.h"
#include "pyllama_support.h"

typedef int32_t (*pyllama_compute_fn)(void * arg);

struct pyllama_compute_job {
    pyllama_compute_fn fn;
    void * arg;
    int32_t rc;
    bool done;
    std::exception_ptr error;
    char last_error[1024];
};

struct pyllama_compute_worker {
    std::mutex turn;                  // held by the caller whose job is queued or running
    std::mutex mtx;                   // guards `job` and its `done`
    std::condition_variable cv_job;   // a job was posted
    std::condition_variable cv_done;  // the job is done
    pyllama_compute_job * job = nullptr;
    long pid = 0;
};

static pyllama_compute_worker * pyllama_compute_worker_ptr = nullptr;
static std::mutex pyllama_compute_create_mtx;
static std::atomic<unsigned long long> pyllama_compute_jobs_run(0);   // jobs the compute thread ran (tests)

static long pyllama_compute_getpid() {
#ifdef _WIN32
    return 1;
#else
    return (long) getpid();
#endif
}

static void pyllama_compute_loop(pyllama_compute_worker * w) {
    for (;;) {
        pyllama_compute_job * job;
        {
            std::unique_lock<std::mutex> lk(w->mtx);
            w->cv_job.wait(lk, [w] { return w->job != nullptr; });
            job = w->job;
            w->job = nullptr;
        }
        pyllama_clear_last_error();
        try {
            job->rc = job->fn(job->arg);
        } catch (...) {
            job->error = std::current_exception();
        }
        const char * err = pyllama_get_last_error();
        strncpy(job->last_error, err, sizeof(job->last_error) - 1);
        job->last_error[sizeof(job->last_error) - 1] = 0;
        pyllama_compute_jobs_run++;
        {
            std::lock_guard<std::mutex> lk(w->mtx);
            job->done = true;
        }
        w->cv_done.notify_all();
    }
}

static pyllama_compute_worker * pyllama_compute_get() {
    // The creation lock itself may have been held by another thread at a fork: a child that
    // finds it so would deadlock here, but that needs a fork during the first multi-threaded
    // decode of the process, and pyllama refuses multi-threaded decode in such children anyway.
    std::lock_guard<std::mutex> lk(pyllama_compute_create_mtx);
    long pid = pyllama_compute_getpid();
    if (pyllama_compute_worker_ptr == nullptr || pyllama_compute_worker_ptr->pid != pid) {
        pyllama_compute_worker * w = new pyllama_compute_worker();   // never freed: lives as long as the process
        w->pid = pid;
        std::thread(pyllama_compute_loop, w).detach();
        pyllama_compute_worker_ptr = w;
    }
    return pyllama_compute_worker_ptr;
}

/* Run fn(arg) on the compute thread and wait for it; returns fn's result. */
static int32_t pyllama_compute_run(pyllama_compute_fn fn, void * arg) {
    pyllama_compute_worker * w = pyllama_compute_get();
    std::lock_guard<std::mutex> my_turn(w->turn);
    pyllama_compute_job job;
    job.fn = fn;
    job.arg = arg;
    job.rc = 0;
    job.done = false;
    job.last_error[0] = 0;
    {
        std::unique_lock<std::mutex> lk(w->mtx);
        w->job = &job;
        w->cv_job.notify_one();
        w->cv_done.wait(lk, [&job] { return job.done; });
    }
    if (job.last_error[0] != 0) {
        pyllama_set_last_error(job.last_error);
    }
    if (job.error) {
        std::rethrow_exception(job.error);
    }
    return job.rc;
}

static unsigned long long pyllama_compute_jobs() { return pyllama_compute_jobs_run.load(); }

/* llama_decode / llama_encode, on the compute thread when the context computes with several
 * threads (see above), else right here. */
struct pyllama_eval_args {
    llama_context * ctx;
    llama_batch batch;
    int encode;
};

static int32_t pyllama_eval_job(void * p) {
    pyllama_eval_args * a = (pyllama_eval_args *) p;
    return a->encode ? llama_encode(a->ctx, a->batch) : llama_decode(a->ctx, a->batch);
}

/* PYLLAMA_COMPUTE_THREAD=0 in the environment turns the compute thread off (every computation
 * on its caller's thread, as before 2026-12-06): for benchmarks/thread_bench.py's comparison,
 * and a way out should a backend ever need its caller's thread. */
static bool pyllama_compute_thread_enabled() {
    static const bool enabled = [] {
        const char * v = getenv("PYLLAMA_COMPUTE_THREAD");
        return v == nullptr || strcmp(v, "0") != 0;
    }();
    return enabled;
}

static bool pyllama_compute_wanted(llama_context * ctx) {
    return pyllama_compute_thread_enabled() && (llama_n_threads(ctx) > 1 || llama_n_threads_batch(ctx) > 1);
}

static int32_t pyllama_eval(llama_context * ctx, llama_batch batch, int encode) {
    pyllama_eval_args a = { ctx, batch, encode };
    if (!pyllama_compute_wanted(ctx)) {
        return pyllama_eval_job(&a);
    }
    return pyllama_compute_run(pyllama_eval_job, &a);
}

#endif  // PYLLAMA_COMPUTE_H
