/* handle.c -- a table's geometry, its creation in a fresh segment, and each process's handle
 * on it: attachment with every check of a foreign or damaged header, and the handle's life
 * across threads, fork and close.
 *
 * SEGMENT LAYOUT (table.c has the whole picture)
 *
 *   0              index_offset            data_offset                          total_size
 *   +--------------+-----------------------+-------------------------------------+
 *   | header       | index: nslots x u64   | data area: blocks of 16-byte units  |
 *   +--------------+-----------------------+-------------------------------------+
 *
 * Without a memory cap the data area holds capacity + 1 entries of the largest size, so that
 * capacity keys of the largest size always fit and a replace still has room for its new copy
 * (compaction gathers that room wherever it lies). With a cap, the data area is what the cap
 * leaves after the header and the index; the smallest cap leaves room for capacity bare block
 * headers and two entries of the largest size: a replace holds its old and its new copy at
 * once, so that an evicting table can take any single write.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <sched.h>
#include <unistd.h>

#include "layout.h"

/* ------------------------------------------------------------------------------------------
 * Fault injection (see layout.h)
 * ---------------------------------------------------------------------------------------- */

long shmkv__fault_countdown;

void shmkv__fault_hit(void)
{
    if (--shmkv__fault_countdown == 0)
        _exit(SHMKV_FAULT_EXIT);
}

void shmkv_testing_crash_after(int64_t points)
{
    shmkv__fault_countdown = points > 0 ? (long)points : 0;
}

/* ------------------------------------------------------------------------------------------
 * Geometry and creation
 * ---------------------------------------------------------------------------------------- */

int shmkv_layout(uint64_t capacity, uint64_t key_size, uint64_t value_size, uint64_t memory,
                 struct shmkv_geometry *g)
{
    uint64_t want, nslots = 8, data;

    if (g == NULL || capacity < 1 || capacity > SHMKV_MAX_CAPACITY || key_size < 1 ||
        key_size > SHMKV_MAX_KEY_SIZE || value_size < 1 || value_size > SHMKV_MAX_VALUE_SIZE)
        return SHMKV_EARG;
    /* Load factor at most 2/3 keeps linear-probing chains short; > capacity keeps one empty. */
    want = capacity + capacity / 2 + 1;
    while (nslots < want)
        nslots <<= 1;
    memset(g, 0, sizeof *g);
    g->capacity = capacity;
    g->nslots = nslots;
    g->key_size = key_size;
    g->value_size = value_size;
    g->memory = memory;
    g->max_entry = entry_units(key_size, value_size) * UNIT;
    g->header_size = sizeof(struct shmkv_header);
    g->index_offset = ALIGN_UP(g->header_size, SHMKV_ALIGN);
    g->data_offset = ALIGN_UP(g->index_offset + nslots * sizeof(uint64_t), SHMKV_ALIGN);
    /* At most 2^31 entries of at most 2^30 + 2^20 + 48 bytes: no uint64_t overflow. */
    g->min_memory = g->data_offset + capacity * MIN_BLOCK_UNITS * UNIT + 2 * g->max_entry;
    if (memory == 0)
        data = (capacity + 1) * g->max_entry;
    else if (memory < g->min_memory)
        return SHMKV_EARG;
    else
        data = (memory - g->data_offset) & ~(uint64_t)(UNIT - 1);
    if (data > (uint64_t)MAX_DATA_UNITS * UNIT)
        return SHMKV_EARG;
    g->data_size = data;
    g->total_size = g->data_offset + data;
    if (g->total_size > (uint64_t)SIZE_MAX)
        return SHMKV_EARG;
    return SHMKV_OK;
}

/* Folds everything two builds must agree on to share a segment into one number. */
static uint64_t layout_signature(void)
{
    const uint64_t parts[] = {
        SHMKV_FORMAT_VERSION,
        sizeof(struct shmkv_header),
        sizeof(struct shmkv_block),
        sizeof(pthread_mutex_t),
        offsetof(struct shmkv_header, count),
        offsetof(struct shmkv_header, lock),
        (uint64_t)__BYTE_ORDER__,
        /* glibc and musl both make 40-byte mutexes on x86_64 but lay them out differently. */
#ifdef __GLIBC__
        UINT64_C(0x676c696263),
#else
        UINT64_C(0x6f74686572),
#endif
        (uint64_t)shmkv__lock_kind(),
    };
    return shmkv_siphash13(parts, sizeof parts, UINT64_C(0x73686d6b76736967), 0);
}

/* The handle's copy of the geometry, from a validated layout. */
static void handle_geometry(shmkv_t *t, void *base, const struct shmkv_geometry *g)
{
    t->base = base;
    t->hdr = base;
    t->index = (uint64_t *)((unsigned char *)base + g->index_offset);
    t->data = (unsigned char *)base + g->data_offset;
    t->capacity = g->capacity;
    t->nslots = g->nslots;
    t->mask = g->nslots - 1;
    t->key_size = g->key_size;
    t->value_size = g->value_size;
    t->data_units = g->data_size / UNIT;
    t->memory = g->memory;
}

int shmkv_init(void *base, uint64_t size, uint64_t capacity, uint64_t key_size,
               uint64_t value_size, uint64_t memory, uint32_t flags,
               const unsigned char *seed16, int64_t creator_pid)
{
    struct shmkv_geometry g;
    struct shmkv_header *h = base;
    shmkv_t t;
    int rc = shmkv_layout(capacity, key_size, value_size, memory, &g);

    if (rc != SHMKV_OK)
        return rc;
    if (base == NULL || seed16 == NULL || size < g.total_size || (flags & ~SHMKV_EVICT) ||
        ((uintptr_t)base & (SHMKV_ALIGN - 1)) != 0)
        return SHMKV_EARG;
    /* The index and the data area of a fresh segment are zero already (ftruncate); only the
     * header and the first block's are written, so that an unreserved table touches no page
     * it does not use. */
    memset(h, 0, sizeof *h);
    memcpy(h->magic, SHMKV_MAGIC, sizeof h->magic);
    h->version = SHMKV_FORMAT_VERSION;
    h->header_size = sizeof *h;
    h->signature = layout_signature();
    h->total_size = g.total_size;
    h->capacity = g.capacity;
    h->memory = g.memory;
    h->nslots = g.nslots;
    h->key_size = g.key_size;
    h->value_size = g.value_size;
    h->index_offset = g.index_offset;
    h->data_offset = g.data_offset;
    h->data_units = g.data_size / UNIT;
    memcpy(h->seed, seed16, sizeof h->seed);
    h->creator_pid = creator_pid;
    h->flags = flags;
    memset(&t, 0, sizeof t);
    handle_geometry(&t, base, &g);
    alloc_reset(&t);
    rc = shmkv__init_lock(h);
    if (rc != SHMKV_OK)
        return rc;
    STORE(h->ready, 1u);
    return SHMKV_OK;
}

/* Bumped in every child a fork makes (pthread_atfork, set up by the first shmkv_open), so
 * that a child does not count again the reads its parent had pending when it forked. */
static unsigned fork_generation;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

/* Every live handle of the process (open to free), so that a forked child can reset what
 * the parent's other threads left in them: a child has one thread, so no call is in flight
 * in it, whatever the parent's count said when it forked. */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static shmkv_t *registry;

static void before_fork(void)
{
    pthread_mutex_lock(&registry_lock);
}

static void after_fork_in_parent(void)
{
    pthread_mutex_unlock(&registry_lock);
}

static void after_fork_in_child(void)
{
    shmkv_t *t;

    fork_generation++;
    shmkv__lock_after_fork();
    for (t = registry; t != NULL; t = t->next) {
        t->inflight = 0;
        if (t->closing == 1)   /* a close another thread of the parent had under way */
            t->closing = 2;
    }
    pthread_mutex_unlock(&registry_lock);
}

static void register_atfork(void)
{
    pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
}

/* Pending counts a handle inherited through fork are its parent's, counted there. */
void handle_forget_if_forked(shmkv_t *t)
{
    if (__builtin_expect(t->fork_generation != fork_generation, 0)) {
        t->pending_hits = t->pending_misses = 0;
        t->fork_generation = fork_generation;
    }
}

/* Says in `why` what makes the segment unusable; returns SHMKV_EINCOMPATIBLE. */
static int incompatible(char *why, uint32_t whycap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int incompatible(char *why, uint32_t whycap, const char *fmt, ...)
{
    va_list ap;

    if (why != NULL && whycap > 0) {
        va_start(ap, fmt);
        vsnprintf(why, whycap, fmt, ap);
        va_end(ap);
    }
    return SHMKV_EINCOMPATIBLE;
}

int shmkv_open(void *base, uint64_t size, shmkv_t **out, char *why, uint32_t whycap)
{
    static const char zero[8];
    const struct shmkv_header *h = base;
    struct shmkv_geometry g;
    shmkv_t *t;
    uint32_t ready;

    /* Slots and counters are 8-byte atomics; a mapping is page-aligned anyway. */
    if (base == NULL || out == NULL || ((uintptr_t)base & (SHMKV_ALIGN - 1)) != 0)
        return SHMKV_EARG;
    if (size < sizeof h->magic)
        return incompatible(why, whycap, "segment is %llu bytes, too small for a table",
                            (unsigned long long)size);
    /* A creator writes the whole header and then the ready flag: all zeros means "being
     * created", a foreign magic means "not ours". */
    if (memcmp(h->magic, zero, sizeof zero) == 0 && size >= sizeof *h && h->ready == 0)
        return SHMKV_ENOTREADY;
    if (memcmp(h->magic, SHMKV_MAGIC, sizeof h->magic) != 0)
        return incompatible(why, whycap, "no shmkv magic at the start of the segment");
    if (size < sizeof *h)
        return incompatible(why, whycap,
                            "truncated: segment is %llu bytes, a table header needs %zu",
                            (unsigned long long)size, sizeof *h);
    ready = __atomic_load_n(&h->ready, __ATOMIC_ACQUIRE);
    if (ready == 0)
        return SHMKV_ENOTREADY;
    if (ready != 1)
        return incompatible(why, whycap, "inconsistent header: ready flag is %u", ready);
    if (h->version != SHMKV_FORMAT_VERSION)
        return incompatible(why, whycap, "format version %u, this build reads version %d",
                            h->version, SHMKV_FORMAT_VERSION);
    if (h->header_size != sizeof *h || h->signature != layout_signature())
        return incompatible(why, whycap,
                            "layout signature differs: made by another build of shmkv "
                            "(header size %u, here %zu)", h->header_size, sizeof *h);
    if (shmkv_layout(h->capacity, h->key_size, h->value_size, h->memory, &g) != SHMKV_OK ||
        g.nslots != h->nslots || g.index_offset != h->index_offset ||
        g.data_offset != h->data_offset || g.data_size / UNIT != h->data_units ||
        g.total_size != h->total_size)
        return incompatible(why, whycap,
                            "inconsistent header: geometry does not follow from capacity %llu "
                            "and sizes (total %llu)", (unsigned long long)h->capacity,
                            (unsigned long long)h->total_size);
    if (size < g.total_size)
        return incompatible(why, whycap,
                            "truncated: segment is %llu bytes, the table needs %llu",
                            (unsigned long long)size, (unsigned long long)g.total_size);
    if (h->flags & ~(uint32_t)SHMKV_EVICT)
        return incompatible(why, whycap, "table flags %#x: made by a newer build of shmkv",
                            h->flags);
    if (!shmkv__lock_sane(h))
        return incompatible(why, whycap, "inconsistent header: the lock's type word is damaged");

    t = calloc(1, sizeof *t);
    if (t == NULL)
        return SHMKV_ENOMEM;
    t->base = base;
    t->size = size;
    t->hdr = base;
    handle_geometry(t, base, &g);
    t->k0 = h->seed[0];
    t->k1 = h->seed[1];
    t->lock_timeout_ns = SHMKV_DEFAULT_LOCK_TIMEOUT_NS;
    t->lock_kind = shmkv__lock_kind();
    t->evict = (h->flags & SHMKV_EVICT) != 0;
    pthread_once(&atfork_once, register_atfork);
    t->fork_generation = fork_generation;
    pthread_mutex_lock(&registry_lock);
    t->next = registry;
    if (registry != NULL)
        registry->prev = t;
    registry = t;
    pthread_mutex_unlock(&registry_lock);
    *out = t;
    return SHMKV_OK;
}

/* ------------------------------------------------------------------------------------------
 * THREADS AND CLOSE
 * A handle is shared by the threads of its process, and the C calls run without the GIL, so
 * one thread may close the table while another is inside a call. Unmapping the segment then
 * would crash that call, or kill the process with the lock held in memory that is gone, so
 * the kernel never marks the robust mutex owner-dead and every other process times out for
 * ever. So every entry point is bracketed by ENTER (below): it adds one to the handle's
 * inflight count and then reads its closing flag; shmkv_close() sets closing and then waits
 * for inflight to drain. Both sides use seq_cst (Dekker's pattern): either the call sees
 * closing and returns SHMKV_ECLOSED without touching the segment, or close sees the call and
 * waits for it. Calls are bounded (lock waits time out), so close waits at most about one
 * lock timeout. The handle's memory outlives close, since another thread may hold its pointer
 * and call in later (it gets SHMKV_ECLOSED): shmkv_free() releases it, when Python finalizes
 * the handle's cdata (ffi.gc). The cost is two atomic read-modify-writes per call on a line
 * the call reads anyway: about 12 ns a call measured alone, and below the VM's noise in an
 * A/B of the benchmark suite's workloads (bench/RESULTS.md, 2026-12-01).
 * ---------------------------------------------------------------------------------------- */

void handle_flush_pending(shmkv_t *t)
{
    handle_forget_if_forked(t);
    if (t->observer) {
        t->pending_hits = t->pending_misses = 0;
        return;
    }
    uint64_t hits = __atomic_exchange_n(&t->pending_hits, 0, __ATOMIC_RELAXED);
    uint64_t misses = __atomic_exchange_n(&t->pending_misses, 0, __ATOMIC_RELAXED);

    if (hits != 0)
        __atomic_fetch_add(&t->hdr->hits, hits, __ATOMIC_RELAXED);
    if (misses != 0)
        __atomic_fetch_add(&t->hdr->misses, misses, __ATOMIC_RELAXED);
}

/* closing: 0 open; 1 a closer is draining the calls and flushing; 2 closed. */
void shmkv_close(shmkv_t *t)
{
    struct timespec pause = {0, 100000};
    uint32_t open = 0;
    unsigned spins = 0;

    if (t == NULL)
        return;
    if (__atomic_compare_exchange_n(&t->closing, &open, 1, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST)) {
        while (__atomic_load_n(&t->inflight, __ATOMIC_SEQ_CST) != 0) {
            if (spins++ < 64)
                sched_yield();
            else
                nanosleep(&pause, NULL);
        }
        handle_flush_pending(t);      /* the last touch of the segment */
        __atomic_store_n(&t->closing, 2, __ATOMIC_RELEASE);
        return;
    }
    /* Another thread is closing: return only once it is done with the segment. */
    while (__atomic_load_n(&t->closing, __ATOMIC_ACQUIRE) != 2) {
        if (spins++ < 64)
            sched_yield();
        else
            nanosleep(&pause, NULL);
    }
}

void shmkv_free(shmkv_t *t)
{
    if (t == NULL)
        return;
    pthread_mutex_lock(&registry_lock);
    if (t->prev != NULL)
        t->prev->next = t->next;
    else if (registry == t)
        registry = t->next;
    if (t->next != NULL)
        t->next->prev = t->prev;
    pthread_mutex_unlock(&registry_lock);
    free(t);
}

int shmkv_observe(shmkv_t *t)
{
    ENTER(t);
    t->observer = 1;
    t->pending_hits = t->pending_misses = 0;
    return SHMKV_OK;
}

int shmkv_forbid_lock(shmkv_t *t)
{
    ENTER(t);
    t->no_lock = 1;
    return SHMKV_OK;
}

void shmkv_set_lock_timeout(shmkv_t *t, int64_t nanoseconds)
{
    if (t != NULL)
        t->lock_timeout_ns = nanoseconds > 0 ? nanoseconds : SHMKV_DEFAULT_LOCK_TIMEOUT_NS;
}


/* ------------------------------------------------------------------------------------------
 * For tests that damage a segment on purpose: where a field lies, so that they need not
 * copy this build's layout.
 * ---------------------------------------------------------------------------------------- */

int64_t shmkv_testing_offset(const char *field)
{
#define FIELD(s, f) {#f, offsetof(struct s, f)}
    static const struct {
        const char *name;
        size_t offset;
    } fields[] = {
        FIELD(shmkv_header, magic), FIELD(shmkv_header, version),
        FIELD(shmkv_header, header_size), FIELD(shmkv_header, signature),
        FIELD(shmkv_header, total_size), FIELD(shmkv_header, capacity),
        FIELD(shmkv_header, memory), FIELD(shmkv_header, nslots),
        FIELD(shmkv_header, key_size), FIELD(shmkv_header, value_size),
        FIELD(shmkv_header, index_offset), FIELD(shmkv_header, data_offset),
        FIELD(shmkv_header, data_units), FIELD(shmkv_header, seed),
        FIELD(shmkv_header, flags), FIELD(shmkv_header, ready), FIELD(shmkv_header, count),
        FIELD(shmkv_header, free_units), FIELD(shmkv_header, stored_bytes),
        FIELD(shmkv_header, intent_old), FIELD(shmkv_header, intent_new),
        FIELD(shmkv_header, move_from), FIELD(shmkv_header, move_to),
        FIELD(shmkv_header, move_units), FIELD(shmkv_header, move_done),
        FIELD(shmkv_header, clearing), FIELD(shmkv_header, broken),
        FIELD(shmkv_header, next_expiry), FIELD(shmkv_header, clock_hand),
        FIELD(shmkv_header, purge_cursor), FIELD(shmkv_header, turn_min),
        FIELD(shmkv_header, binmap), FIELD(shmkv_header, bins), FIELD(shmkv_header, seq),
        FIELD(shmkv_header, lock),
        {"block.size", offsetof(struct shmkv_block, size)},
        {"block.prev_size", offsetof(struct shmkv_block, prev_size)},
        {"block.state", offsetof(struct shmkv_block, state)},
        {"block.referenced", offsetof(struct shmkv_block, referenced)},
        {"block.key_len", offsetof(struct shmkv_block, key_len)},
        {"block.value_len", offsetof(struct shmkv_block, value_len)},
        {"block.expires", offsetof(struct shmkv_block, u)},
        {"block.next", offsetof(struct shmkv_block, u.free.next)},
        {"block.prev", offsetof(struct shmkv_block, u.free.prev)},
        {"block.key", sizeof(struct shmkv_block)},
    };
#undef FIELD
    size_t i;

    for (i = 0; field != NULL && i < sizeof fields / sizeof fields[0]; i++)
        if (strcmp(fields[i].name, field) == 0)
            return (int64_t)fields[i].offset;
    return SHMKV_EARG;
}
