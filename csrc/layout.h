/* layout.h -- the private layout of a shmkv segment: header, index slots and pool entries,
 * and the helpers every C file shares. Never shown to cffi (it holds a pthread_mutex_t).
 * The prose that explains this layout is at the top of table.c. */
#ifndef SHMKV_LAYOUT_H
#define SHMKV_LAYOUT_H

#include <pthread.h>
#include <string.h>
#include "shmkv.h"

/* Bump on any change to the structures below or to their meaning. 4: the lock is a robust
 * mutex of the NORMAL type, not ERRORCHECK (see lock.c), and records its holder's PID
 * namespace beside it. */
#define SHMKV_FORMAT_VERSION 4

/* "shmkv" + format family; compared byte for byte, so endianness does not matter. */
#define SHMKV_MAGIC "SHMKVTB1"

/* The index and the pool start on their own cache lines, so that header writes do not
 * share a line with the first slots. */
#define SHMKV_ALIGN 64

/* SHMKV_DEBUG builds check the whole table after each mutation of tables up to this size. */
#define DEBUG_CHECK_MAX_SLOTS 4096

/* Default lock wait before SHMKV_ELOCKTIMEOUT: long enough for any real operation on a
 * loaded machine (the longest, clear() or a snapshot, walk the table once), short enough that
 * a stopped (SIGSTOP) holder shows up as an error rather than a hang. */
#define SHMKV_DEFAULT_LOCK_TIMEOUT_NS 5000000000LL

/* Values of shmkv_entry.link besides a free-list link. Free-list links are entry number + 1
 * (0 ends the list), so they are at most SHMKV_MAX_CAPACITY + 1 and never collide. */
#define LINK_USED 0xFFFFFFFFu  /* the entry holds a live key; the index refers to it */
#define LINK_BUSY 0xFFFFFFFEu  /* taken off the free list, not yet published (lock held) */

/* Values of shmkv_entry.referenced, CLOCK's bit (evicting tables only). */
#define REF_COLD 0u            /* not used since the hand last passed: the next victim */
#define REF_USED 1u            /* used since: the hand clears it and passes over */
#define REF_PINNED 2u          /* stored by the running set_many: never evicted (lock held) */

struct shmkv_header {
    /* --- Identity and geometry: written once by shmkv_init, read-only afterwards. --- */
    char magic[8];             /* SHMKV_MAGIC */
    uint32_t version;          /* SHMKV_FORMAT_VERSION */
    uint32_t header_size;      /* sizeof(struct shmkv_header) */
    uint64_t signature;        /* layout_signature(): version and every structure size */
    uint64_t total_size;       /* bytes of the segment this table needs */
    uint64_t capacity;         /* live entries allowed */
    uint64_t nentries;         /* pool entries: capacity + 1 */
    uint64_t nslots;           /* index slots, power of two */
    uint64_t key_size;
    uint64_t value_size;
    uint64_t entry_size;       /* pool stride */
    uint64_t index_offset;
    uint64_t entries_offset;
    uint64_t seed[2];          /* SipHash key, random per table */
    int64_t creator_pid;
    uint32_t flags;            /* SHMKV_EVICT or 0; other bits make the table incompatible */
    uint32_t ready;            /* 1 once everything above is written; stored last (release) */

    /* --- Mutable state: only changed with the lock held. --- */
    uint64_t count __attribute__((aligned(SHMKV_ALIGN)));  /* live entries == used slots */
    uint64_t high_water;       /* entries [high_water, nentries) were never handed out */
    uint64_t free_head;        /* entry number + 1 of the first free entry; 0 = none */
    uint64_t intent_old;       /* entry number + 1 being replaced by intent_new; 0 = none */
    uint64_t intent_new;
    uint64_t hits, misses, inserts, updates, deletes;
    uint64_t evictions, expirations, recoveries, lock_timeouts;
    uint64_t broken;           /* 1: a recovery could not make the table sound; see lock.c */
    uint64_t next_expiry;      /* 0, or at most the earliest deadline of any live entry */
    uint64_t clock_hand;       /* entry number where the next eviction sweep starts (a hint) */
    uint64_t purge_cursor;     /* entry number where the next partial purge resumes */
    uint64_t turn_min;         /* 0, or at most every deadline the purge's turn has passed */
    uint64_t reserved[5];      /* room for counters of later versions without a new layout */

    /* The sequence that optimistic readers validate against (table.c, LOCKING): odd while
     * a writer holds the lock, bumped twice by every writer. On a line of its own, so that
     * readers polling it do not share a line with the counters writers update. */
    uint64_t seq __attribute__((aligned(SHMKV_ALIGN)));
    uint64_t reserved2[7];

    pthread_mutex_t lock __attribute__((aligned(SHMKV_ALIGN)));
    /* Who holds the lock, as its holder sees itself (lock.c, "PID NAMESPACES"): written by
     * each holder just after it takes the lock, zeroed just before it releases it, so 0 while
     * the lock is free (or held by a process that died before writing them). On the mutex's
     * cache line, which the holder writes anyway. Hints for messages and the same-thread
     * relock check only: nothing trusts them for safety. */
    uint64_t holder_pidns;     /* inode of the holder's /proc/self/ns/pid; 0 = not known */
    int64_t holder_pid;        /* the holder's process id in that namespace */
};

/* A pool entry. Followed by key bytes (key_size rounded up to 8) and value bytes (value_size
 * rounded up to 8), so that the value starts 8-aligned and a counter is one aligned store. */
struct shmkv_entry {
    uint32_t key_len;          /* <= key_size */
    uint32_t value_len;        /* <= value_size */
    uint64_t expires;          /* deadline on shmkv__now()'s clock, in ns; 0 = never */
    uint32_t seq;              /* reserved for optimistic readers: odd while being written */
    uint32_t link;             /* LINK_USED, LINK_BUSY, or next free entry + 1 */
    uint32_t referenced;       /* REF_*: CLOCK's bit, a hint that recovery never needs */
    uint32_t spare;            /* zero; keeps the key 8-aligned */
};

/* The per-process handle: a copy of the geometry validated at open, so that every bound used
 * by an operation comes from here, never re-read from the (possibly corrupted) segment. */
struct shmkv {
    /* Calls in flight and the closing flag (table.c, "THREADS AND CLOSE"): every entry point
     * adds one to inflight and then reads closing, shmkv_close() sets closing and then waits
     * for inflight to reach 0, both in seq_cst order, so that no call runs on an unmapped
     * segment. The handle itself lives until shmkv_free(). */
    uint32_t inflight;
    uint32_t closing;
    int observer;              /* shmkv_observe(): count no reads, timeouts or uses */
    int no_lock;               /* shmkv_forbid_lock(): shmkv__lock() fails, SHMKV_ENOLOCK */
    struct shmkv *prev, *next; /* table.c's list of live handles, for fork (registry_lock) */
    unsigned char *base;
    uint64_t size;
    struct shmkv_header *hdr;
    uint64_t *index;
    unsigned char *entries;
    uint64_t capacity, nentries, nslots, mask, entry_size, key_size, value_size, value_offset;
    uint64_t k0, k1;
    int64_t lock_timeout_ns;
    int lock_kind;             /* shmkv__lock_kind(), checked before every lock */
    int evict;                 /* SHMKV_EVICT was set at creation: keep CLOCK's bits */
    int writing;               /* this handle's lock holder bumped seq (lock held) */
    uint64_t pending_hits;     /* optimistic reads not yet added to the header's counters */
    uint64_t pending_misses;
    unsigned fork_generation;  /* table.c's fork_generation when the pending counts began */
    int debug_sound;           /* SHMKV_DEBUG: the table passed its check when locked */
};

#define ALIGN_UP(x, a) (((x) + ((a) - 1)) & ~((uint64_t)(a) - 1))

/* An index slot: low 32 bits entry number + 1 (0 = empty), high 32 bits the low 32 bits of
 * the key's hash, whose low bits are also the slot the key hashes to (its home). */
#define SLOT_ENTRY(s) ((uint32_t)(s))
#define SLOT_TAG(s) ((uint32_t)((s) >> 32))
#define MAKE_SLOT(hash, entry_no) (((uint64_t)(uint32_t)(hash) << 32) | ((uint64_t)(entry_no) + 1))

static inline struct shmkv_entry *entry_at(const shmkv_t *t, uint64_t n)
{
    return (struct shmkv_entry *)(t->entries + n * t->entry_size);
}
static inline unsigned char *entry_key(struct shmkv_entry *e)
{
    return (unsigned char *)(e + 1);
}
static inline unsigned char *entry_value(const shmkv_t *t, struct shmkv_entry *e)
{
    return (unsigned char *)e + t->value_offset;
}
static inline uint64_t slot_load(const shmkv_t *t, uint64_t i)
{
    return __atomic_load_n(&t->index[i], __ATOMIC_ACQUIRE);
}
/* Fault injection, for the crash tests only. Once a test arms it (shmkv_testing_crash_after),
 * every crash point counts down, and the one that reaches zero ends the process on the spot
 * with _exit(SHMKV_FAULT_EXIT), lock held and all, as kill -9 would. Crash points stand before
 * every ordered store (STORE, slot_store), between the key and the value of a new entry, and
 * after the last store of an operation. Unarmed, a point costs one predictable branch. */
extern long shmkv__fault_countdown;
void shmkv__fault_hit(void);
#define FAULT_POINT()                                                                  \
    do {                                                                               \
        if (__builtin_expect(shmkv__fault_countdown > 0, 0))                           \
            shmkv__fault_hit();                                                        \
    } while (0)

/* The stores whose order makes a mutation crash-safe: release stores, so that the compiler
 * keeps them in program order, each one a crash point. */
#define STORE(lvalue, v)                                                               \
    do {                                                                               \
        FAULT_POINT();                                                                 \
        __atomic_store_n(&(lvalue), (v), __ATOMIC_RELEASE);                            \
    } while (0)

static inline void slot_store(shmkv_t *t, uint64_t i, uint64_t v)
{
    FAULT_POINT();
    __atomic_store_n(&t->index[i], v, __ATOMIC_RELEASE);
}

/* The clock of every deadline, in ns: CLOCK_BOOTTIME, which all processes of a machine share
 * and which wall-clock changes do not move. It is CLOCK_MONOTONIC plus the time the machine
 * spent suspended, so that a 30-minute session does not outlive a 2-hour suspend. Tests may
 * replace it (shmkv_testing_set_clock).
 * A segment does not outlive a reboot, so neither does any deadline; processes in different
 * time namespaces (a container may have its own) would disagree, and must not share a table. */
uint64_t shmkv__now(void);

/* Moves seq on by one: to odd before a writer's first store, to even after its last. The
 * fences keep the writer's stores inside the odd stretch for readers on other cores. */
static inline void locked_seq_bump(shmkv_t *t)
{
    uint64_t seq = __atomic_load_n(&t->hdr->seq, __ATOMIC_RELAXED);

    if (seq & 1) {             /* ending a stretch: its stores first */
        __atomic_store_n(&t->hdr->seq, seq + 1, __ATOMIC_RELEASE);
    } else {                   /* starting one: the odd value before any store */
        __atomic_store_n(&t->hdr->seq, seq + 1, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_RELEASE);
    }
}

/* siphash.c */
uint64_t shmkv_siphash13(const void *data, size_t len, uint64_t k0, uint64_t k1);

/* table.c: helpers shared with lock.c and check.c; the lock must be held. */
void locked_rebuild(shmkv_t *t);
int locked_find(const shmkv_t *t, uint64_t hash, const char *key, uint32_t klen,
                uint64_t *slot_out, struct shmkv_entry **entry_out);
int locked_check(shmkv_t *t, int *invariant);

/* lock.c */
#define LOCK_EVEN_BROKEN 1     /* shmkv__lock() flag: for stats and check, which only read */
#define LOCK_READ_ONLY 2       /* shmkv__lock() flag: the holder changes nothing that optimistic
                                * readers read, so it leaves seq alone */
int shmkv__lock(shmkv_t *t, int flags);
void shmkv__unlock(shmkv_t *t);
int shmkv__init_lock(struct shmkv_header *h);
int shmkv__lock_kind(void);
int shmkv__lock_sane(const struct shmkv_header *h);
uint64_t shmkv__pidns(void);
void shmkv__lock_after_fork(void);

#endif
