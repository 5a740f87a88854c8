/* lock.c -- the table's lock: a process-shared, robust pthread mutex in the segment header.
 * A process that dies holding it (kill -9, a segfault, the OOM killer) hands it to the next
 * locker with EOWNERDEAD; that locker rebuilds the table (recover.c, called by table.c's
 * shmkv__lock()), marks the mutex consistent and carries on, so nobody waits forever on a
 * dead process. A named semaphore cannot do this: its count dies with its holder. This file
 * knows the mutex and who holds it, nothing of what it guards. */
#include <dlfcn.h>
#include <errno.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "layout.h"

/* pthread_mutex_clocklock (glibc 2.30) waits on CLOCK_MONOTONIC, which a wall-clock change
 * cannot stretch or cut short. A build against an older glibc's symbols (the manylinux2014
 * wheel is built against 2.17's) looks it up when it first waits, so that it waits on the
 * monotonic clock too wherever the running C library has the function; where it has not,
 * waits fall back to pthread_mutex_timedlock on the realtime clock. */
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 30))
#define HAVE_CLOCKLOCK 1
#endif

static int init_mutex(pthread_mutex_t *m)
{
    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);

    if (rc != 0)
        return SHMKV_ELOCK;
    rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (rc == 0)
        rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    /* NORMAL, not ERRORCHECK: an error-checking mutex compares the futex word's thread id
     * with the caller's, and a thread of another PID namespace may have the same id (see
     * PID NAMESPACES below). shmkv__mutex_lock() detects a relock by the same thread itself. */
    if (rc == 0)
        rc = pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_NORMAL);
    if (rc == 0)
        rc = pthread_mutex_init(m, &attr);
    pthread_mutexattr_destroy(&attr);
    return rc == 0 ? SHMKV_OK : SHMKV_ELOCK;
}

int shmkv__init_lock(struct shmkv_header *h)
{
    return init_mutex(&h->lock);
}

/* The type word the C library keeps in a mutex made by init_mutex(), or 0 where it is not
 * known (layout.h, MUTEX_TYPE_WORD). glibc trusts that word: a damaged one (say, with the
 * priority-inheritance bits set) makes it abort the process inside pthread_mutex_lock, so
 * shmkv_open() compares it with this and keeps the value in the handle, and every lock
 * compares it again. */
int shmkv__lock_kind(void)
{
#ifdef MUTEX_TYPE_WORD
    pthread_mutex_t m;
    int kind = 0;

    if (init_mutex(&m) == SHMKV_OK) {
        kind = *MUTEX_TYPE_WORD(&m);
        pthread_mutex_destroy(&m);
    }
    return kind;
#else
    return 0;
#endif
}

static int lock_kind_of(const struct shmkv_header *h)
{
#ifdef MUTEX_TYPE_WORD
    return __atomic_load_n(MUTEX_TYPE_WORD(&h->lock), __ATOMIC_RELAXED);
#else
    (void)h;
    return 0;
#endif
}

int shmkv__lock_sane(const struct shmkv_header *h)
{
    return lock_kind_of(h) == shmkv__lock_kind();
}

/* PID NAMESPACES
 * Processes of different PID namespaces that share an IPC namespace (containers of one pod)
 * share tables, and thread ids are per namespace: two containers' main processes are both
 * pid 1. The kernel's robust futex records the holder's thread id as the holder sees it, so
 * the futex word alone cannot tell "this thread holds it" from "thread 1 of another
 * namespace holds it". Hence a NORMAL mutex (the futex makes them wait for each other like
 * any two processes), and beside it the holder's PID namespace (the inode of
 * /proc/self/ns/pid) and process id, written after each lock and cleared before each unlock:
 *   - a relock by the same thread (it would wait for itself until the timeout) is reported at
 *     once as SHMKV_ELOCK, but only when the word's tid is ours, the recorded namespace is
 *     ours, and this thread holds some table lock at all (held_here): checked on the slow
 *     path only, after trylock failed;
 *   - shmkv_lock_holder() tells a lock timeout's message whose namespace the holder is in,
 *     so it never names an unrelated local process that happens to have the holder's tid.
 * A corner the kernel leaves: a robust futex's owner is identified by thread id alone. A
 * waiter that dies while glibc has the mutex as its pending robust-list operation makes the
 * kernel check whether the word's tid equals its own; if the holder is another namespace's
 * thread with the same id, the kernel marks the lock owner-dead although its holder lives,
 * and the next locker recovers a table that is being written. Avoiding it needs distinct
 * thread ids across the sharing namespaces (e.g. run the containers' workers, not their
 * pid-1 processes, on the table); nothing in user space can tell the two cases apart. */

/* Lock holds of this thread, over all tables: a thread that holds none cannot be relocking. */
static __thread int held_here;

static uint64_t own_pidns;     /* 0 until first read; reset in a forked child */
static pid_t own_pid;          /* likewise: getpid() is a system call in glibc >= 2.25, and
                                * every lock records the holder's pid */

/* The inode of this process's PID namespace, read once (0 if /proc cannot say). */
uint64_t shmkv__pidns(void)
{
    uint64_t ns = __atomic_load_n(&own_pidns, __ATOMIC_RELAXED);
    struct stat st;

    if (ns == 0 && stat("/proc/self/ns/pid", &st) == 0) {
        ns = (uint64_t)st.st_ino;
        __atomic_store_n(&own_pidns, ns, __ATOMIC_RELAXED);
    }
    return ns;
}

/* A child may be in another PID namespace than its parent (after unshare(CLONE_NEWPID)). */
void shmkv__lock_after_fork(void)
{
    own_pidns = 0;
    own_pid = 0;
}

static pid_t cached_pid(void)
{
    pid_t pid = __atomic_load_n(&own_pid, __ATOMIC_RELAXED);

    if (pid == 0) {
        pid = getpid();
        __atomic_store_n(&own_pid, pid, __ATOMIC_RELAXED);
    }
    return pid;
}

#ifdef MUTEX_OWNER_WORD
static pid_t own_tid(void)
{
    return (pid_t)syscall(SYS_gettid);
}
#endif

/* Whether the lock's futex word names this very thread as its holder (see above). */
static int held_by_this_thread(const struct shmkv_header *h)
{
#ifdef MUTEX_OWNER_WORD
    uint32_t word = (uint32_t)__atomic_load_n(MUTEX_OWNER_WORD(&h->lock), __ATOMIC_RELAXED);
    uint64_t ns = shmkv__pidns();

    return held_here > 0 && (pid_t)(word & MUTEX_TID_MASK) == own_tid() && ns != 0 &&
           __atomic_load_n(&h->holder_pidns, __ATOMIC_RELAXED) == ns;
#else
    (void)h;
    return 0;
#endif
}

/* Waits are cut into slices of this length. Each unlock, and the kernel on an owner's death,
 * wakes one waiter; if that waiter is killed before it takes the lock, nobody wakes the others
 * (a lost wakeup), and a single long wait would sleep out its whole timeout beside a free
 * lock. Slicing bounds such a stall to one slice, for the price of a waiter waking up every
 * slice while the lock stays taken. */
#define WAIT_SLICE_NS 10000000LL

static void add_ns(struct timespec *ts, int64_t ns)
{
    ts->tv_sec += (time_t)(ns / 1000000000);
    ts->tv_nsec += (long)(ns % 1000000000);
    if (ts->tv_nsec >= 1000000000) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000;
    }
}

static int before(const struct timespec *a, const struct timespec *b)
{
    return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

typedef int (*clocklock_fn)(pthread_mutex_t *, clockid_t, const struct timespec *);

static clocklock_fn find_clocklock(void)
{
#ifdef HAVE_CLOCKLOCK
    return pthread_mutex_clocklock;
#else
    static clocklock_fn found;
    static int looked;

    if (!__atomic_load_n(&looked, __ATOMIC_ACQUIRE)) {
        __atomic_store_n(&found, (clocklock_fn)dlsym(RTLD_DEFAULT, "pthread_mutex_clocklock"),
                         __ATOMIC_RELAXED);
        __atomic_store_n(&looked, 1, __ATOMIC_RELEASE);
    }
    return __atomic_load_n(&found, __ATOMIC_RELAXED);
#endif
}

int shmkv_testing_lock_clock(void)
{
    return find_clocklock() != NULL ? CLOCK_MONOTONIC : CLOCK_REALTIME;
}

static int timed_lock(pthread_mutex_t *m, int64_t timeout_ns)
{
    struct timespec deadline, slice;
    const clocklock_fn clocklock = find_clocklock();
    const clockid_t clock = clocklock != NULL ? CLOCK_MONOTONIC : CLOCK_REALTIME;
    int rc;

    if (clock_gettime(clock, &deadline) != 0)
        return EINVAL;
    slice = deadline;
    add_ns(&deadline, timeout_ns);
    do {
        add_ns(&slice, WAIT_SLICE_NS);
        if (!before(&slice, &deadline))
            slice = deadline;
        rc = clocklock != NULL ? clocklock(m, clock, &slice) : pthread_mutex_timedlock(m, &slice);
    } while (rc == ETIMEDOUT && before(&slice, &deadline));
    return rc;
}

/* Takes the table's mutex. SHMKV_OK: held. LOCK_OWNER_DIED: held, but its last holder died
 * with it: the caller repairs the table and then calls shmkv__mutex_consistent().
 * SHMKV_ELOCKTIMEOUT: still held by another process after the handle's timeout.
 * SHMKV_ENOLOCK: the handle may not lock (shmkv_forbid_lock()). SHMKV_EBROKEN: the mutex
 * was left unrecoverable. SHMKV_ELOCK: any other failure, such as this thread holding the
 * lock already or a lock word that corruption made nonsense. */
int shmkv__mutex_lock(shmkv_t *t)
{
    pthread_mutex_t *m = &t->hdr->lock;
    int rc;

    if (t->no_lock)
        return SHMKV_ENOLOCK;
    if (lock_kind_of(t->hdr) != t->lock_kind)
        return SHMKV_ELOCK;
    rc = pthread_mutex_trylock(m);

    /* The uncontended path costs one atomic exchange; clocks are read only to wait. */
    if (rc == EBUSY) {
        if (held_by_this_thread(t->hdr))
            return SHMKV_ELOCK;
        rc = timed_lock(m, t->lock_timeout_ns);
    }
    switch (rc) {
    case 0:
    case EOWNERDEAD:
        break;
    case ETIMEDOUT:
        if (!t->observer)
            __atomic_fetch_add(&t->hdr->lock_timeouts, 1, __ATOMIC_RELAXED);
        return SHMKV_ELOCKTIMEOUT;
    case ENOTRECOVERABLE:
        return SHMKV_EBROKEN;
    default:
        return SHMKV_ELOCK;
    }
    held_here++;
    __atomic_store_n(&t->hdr->holder_pidns, shmkv__pidns(), __ATOMIC_RELAXED);
    __atomic_store_n(&t->hdr->holder_pid, (int64_t)cached_pid(), __ATOMIC_RELAXED);
    return rc == 0 ? SHMKV_OK : LOCK_OWNER_DIED;
}

/* After a dead owner's table is repaired: SHMKV_OK, or SHMKV_EBROKEN with the lock released. */
int shmkv__mutex_consistent(shmkv_t *t)
{
    if (pthread_mutex_consistent(&t->hdr->lock) == 0)
        return SHMKV_OK;
    shmkv__mutex_unlock(t);
    return SHMKV_EBROKEN;
}

void shmkv__mutex_unlock(shmkv_t *t)
{
    __atomic_store_n(&t->hdr->holder_pidns, (uint64_t)0, __ATOMIC_RELAXED);
    __atomic_store_n(&t->hdr->holder_pid, (int64_t)0, __ATOMIC_RELAXED);
    held_here--;
    pthread_mutex_unlock(&t->hdr->lock);
}
