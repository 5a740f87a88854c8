/* lock.c -- the table's lock: a process-shared, robust pthread mutex in the segment header.
 * A process that dies holding it (kill -9, a segfault, the OOM killer) hands it to the next
 * locker with EOWNERDEAD; that locker rebuilds the table, marks the mutex consistent, counts a
 * recovery and carries on, so nobody waits forever on a dead process. A named semaphore
 * cannot do this: its count dies with its holder. */
#include <errno.h>
#include <time.h>

#include "layout.h"

/* pthread_mutex_clocklock (glibc 2.30) waits on CLOCK_MONOTONIC, which a wall-clock change
 * cannot stretch or cut short; older C libraries fall back to the realtime clock. */
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
    /* Error-checking: a thread that locks twice gets an error instead of hanging itself. */
    if (rc == 0)
        rc = pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
    if (rc == 0)
        rc = pthread_mutex_init(m, &attr);
    pthread_mutexattr_destroy(&attr);
    return rc == 0 ? SHMKV_OK : SHMKV_ELOCK;
}

int shmkv__init_lock(struct shmkv_header *h)
{
    return init_mutex(&h->lock);
}

/* The type word glibc keeps in a mutex made by init_mutex(), or 0 elsewhere. glibc trusts that
 * word: a damaged one (say, with the priority-inheritance bits set) makes it abort the process
 * inside pthread_mutex_lock, so shmkv_open() compares it with this and keeps the value in the
 * handle, and every lock compares it again. */
int shmkv__lock_kind(void)
{
#ifdef __GLIBC__
    pthread_mutex_t m;
    int kind = 0;

    if (init_mutex(&m) == SHMKV_OK) {
        kind = m.__data.__kind;
        pthread_mutex_destroy(&m);
    }
    return kind;
#else
    return 0;
#endif
}

static int lock_kind_of(const struct shmkv_header *h)
{
#ifdef __GLIBC__
    return __atomic_load_n(&h->lock.__data.__kind, __ATOMIC_RELAXED);
#else
    (void)h;
    return 0;
#endif
}

int shmkv__lock_sane(const struct shmkv_header *h)
{
    return lock_kind_of(h) == shmkv__lock_kind();
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

static int timed_lock(pthread_mutex_t *m, int64_t timeout_ns)
{
    struct timespec deadline, slice;
#ifdef HAVE_CLOCKLOCK
    const clockid_t clock = CLOCK_MONOTONIC;
#else
    const clockid_t clock = CLOCK_REALTIME;
#endif
    int rc;

    if (clock_gettime(clock, &deadline) != 0)
        return EINVAL;
    slice = deadline;
    add_ns(&deadline, timeout_ns);
    do {
        add_ns(&slice, WAIT_SLICE_NS);
        if (!before(&slice, &deadline))
            slice = deadline;
#ifdef HAVE_CLOCKLOCK
        rc = pthread_mutex_clocklock(m, clock, &slice);
#else
        rc = pthread_mutex_timedlock(m, &slice);
#endif
    } while (rc == ETIMEDOUT && before(&slice, &deadline));
    return rc;
}

/* A dead owner's table is rebuilt from its pool (table.c, RECOVERY), then verified. If the
 * rebuilt table still fails its check, the damage is not a crash's: only corruption can do
 * that, and no rebuild will undo it. The table is then marked broken, once and for all, and
 * every operation but stats and check fails with SHMKV_EBROKEN instead of working on it. */
static void locked_recover(shmkv_t *t)
{
    int invariant;

    locked_rebuild(t);
    t->hdr->recoveries++;
    if (locked_check(t, &invariant) == SHMKV_ECHECK) {
        __atomic_store_n(&t->hdr->broken, (uint64_t)1, __ATOMIC_RELEASE);
        /* seq odd for good: lock-free readers give up on it and meet the lock, which tells
         * them the table is broken; no writer gets far enough to even it again. */
        locked_seq_bump(t);
    }
}

/* Takes the table's lock. 0: held (after repairing the table if its last owner died).
 * SHMKV_ELOCKTIMEOUT: still held by another process after the handle's timeout.
 * SHMKV_EBROKEN: the mutex was left unrecoverable, or the table is marked broken (unless
 * flags has LOCK_EVEN_BROKEN). SHMKV_ELOCK: any other failure, such as this thread holding
 * the lock already or a lock word that corruption made nonsense. */
int shmkv__lock(shmkv_t *t, int flags)
{
    pthread_mutex_t *m = &t->hdr->lock;
    int rc;

    if (lock_kind_of(t->hdr) != t->lock_kind)
        return SHMKV_ELOCK;
    rc = pthread_mutex_trylock(m);

    /* The uncontended path costs one atomic exchange; clocks are read only to wait. */
    if (rc == EBUSY)
        rc = timed_lock(m, t->lock_timeout_ns);
    switch (rc) {
    case 0:
        break;
    case EOWNERDEAD:
        locked_recover(t);
        if (pthread_mutex_consistent(m) != 0) {
            pthread_mutex_unlock(m);
            return SHMKV_EBROKEN;
        }
        break;
    case ETIMEDOUT:
        __atomic_fetch_add(&t->hdr->lock_timeouts, 1, __ATOMIC_RELAXED);
        return SHMKV_ELOCKTIMEOUT;
    case ENOTRECOVERABLE:
        return SHMKV_EBROKEN;
    default:
        return SHMKV_ELOCK;
    }
    if (__atomic_load_n(&t->hdr->broken, __ATOMIC_ACQUIRE) && !(flags & LOCK_EVEN_BROKEN)) {
        pthread_mutex_unlock(m);
        return SHMKV_EBROKEN;
    }
#ifdef SHMKV_DEBUG
    {
        int invariant;

        t->debug_sound = t->nslots <= DEBUG_CHECK_MAX_SLOTS &&
                         locked_check(t, &invariant) == SHMKV_OK;
    }
#endif
    t->writing = !(flags & LOCK_READ_ONLY);
    if (t->writing)
        locked_seq_bump(t);
    return SHMKV_OK;
}

void shmkv__unlock(shmkv_t *t)
{
    if (t->writing) {
        t->writing = 0;
        locked_seq_bump(t);
    }
    pthread_mutex_unlock(&t->hdr->lock);
}
