/* layout.h -- the private layout of a shmkv segment (header, index, data area of blocks), the
 * per-process handle, and the declarations the C files share. Never shown to cffi (it holds a
 * pthread_mutex_t). The prose that explains the layout is at the top of table.c; each file
 * starts with the part of the design it implements:
 *   table.c    segment layout, invariants, operations, threads and close, format
 *   index.c    the hash index: probing, backward-shift deletion
 *   alloc.c    the data area's allocator: blocks, free lists, coalescing, compaction
 *   expiry.c   deadlines, the clock, the purge's turns
 *   evict.c    making room: expired entries first, then CLOCK
 *   recover.c  rebuilding a dead writer's table from its blocks
 *   check.c    the invariant check
 *   lock.c     the robust mutex and who holds it
 *   handle.c   geometry, creation, attachment, the handle's life */
#ifndef SHMKV_LAYOUT_H
#define SHMKV_LAYOUT_H

#include <pthread.h>
#include <string.h>
#include "shmkv.h"

/* Bump on any change to the structures below or to their meaning. 5: entries live in a data
 * area of variable-size blocks (alloc.c) instead of a pool of fixed-size entries. */
#define SHMKV_FORMAT_VERSION 5

/* "shmkv" + format family; compared byte for byte, so endianness does not matter. */
#define SHMKV_MAGIC "SHMKVTB1"

/* The index and the data area start on their own cache lines, so that header writes do not
 * share a line with the first slots. */
#define SHMKV_ALIGN 64

/* SHMKV_DEBUG builds check the whole table after each mutation of tables up to this size. */
#define DEBUG_CHECK_MAX_SLOTS 4096

/* Default lock wait before SHMKV_ELOCKTIMEOUT: long enough for any real operation on a
 * loaded machine (the longest, clear(), a snapshot or a compaction, walk the table once),
 * short enough that a stopped (SIGSTOP) holder shows up as an error rather than a hang. */
#define SHMKV_DEFAULT_LOCK_TIMEOUT_NS 5000000000LL

/* The data area is counted in units of 16 bytes: a block starts on a unit, an index slot
 * names a block by its unit number, and 32 bits of units address 64 GiB. */
#define UNIT 16u
#define MIN_BLOCK_UNITS 2u     /* a bare header: the smallest block, free or used */
#define MAX_DATA_UNITS 0xFFFFFFF0u

/* Block states (struct shmkv_block.state); any other value is damage. */
#define BLOCK_FREE ((uint32_t)SHMKV_BLOCK_FREE)  /* "FREE" in ASCII */
#define BLOCK_BUSY ((uint32_t)SHMKV_BLOCK_BUSY)  /* "BUSY": the running writer's, unpublished */
#define BLOCK_USED ((uint32_t)SHMKV_BLOCK_USED)  /* "USED": a live key; the index names it */

/* Values of shmkv_block.referenced, CLOCK's bit (evicting tables only). */
#define REF_COLD 0u            /* not used since the hand last passed: the next victim */
#define REF_USED 1u            /* used since: the hand clears it and passes over */
#define REF_PINNED 2u          /* kept by the running writer: never evicted (lock held) */

/* Free lists (alloc.c): exact lists for blocks of 2..63 units, then 8 lists per power of two. */
#define EXACT_BINS 64u
#define NBINS (EXACT_BINS + 26u * 8u)
#define BINMAP_WORDS ((NBINS + 63u) / 64u)

/* Two words inside the C library's pthread_mutex_t that lock.c reads (never writes):
 *   MUTEX_OWNER_WORD: the futex word of a robust mutex. Its low 30 bits are the holder's
 *     thread id in every C library, because the kernel's robust-list protocol reads them
 *     there (FUTEX_TID_MASK); only where the library keeps the word differs.
 *   MUTEX_TYPE_WORD: the type and flags the library keeps, which it trusts when it locks.
 * glibc and musl (the C libraries of manylinux and musllinux wheels) are known; musl has no
 * macro of its own, so it is "Linux, and neither glibc nor bionic". Elsewhere the core does
 * without them: a relock by the same thread times out instead of failing at once, and lock
 * timeouts cannot name the holder. */
#if defined(__GLIBC__)
#define MUTEX_OWNER_WORD(m) (&(m)->__data.__lock)
#define MUTEX_TYPE_WORD(m) (&(m)->__data.__kind)
#elif defined(__linux__) && !defined(__BIONIC__)
#define MUTEX_OWNER_WORD(m) (&(m)->__u.__vi[1])
#define MUTEX_TYPE_WORD(m) (&(m)->__u.__i[0])
#endif
#define MUTEX_TID_MASK 0x3fffffff

struct shmkv_header {
    /* --- Identity and geometry: written once by shmkv_init, read-only afterwards. --- */
    char magic[8];             /* SHMKV_MAGIC */
    uint32_t version;          /* SHMKV_FORMAT_VERSION */
    uint32_t header_size;      /* sizeof(struct shmkv_header) */
    uint64_t signature;        /* layout_signature(): version and every structure size */
    uint64_t total_size;       /* bytes of the segment this table needs */
    uint64_t capacity;         /* live keys allowed */
    uint64_t memory;           /* the memory cap asked for at creation; 0 = sized for capacity */
    uint64_t nslots;           /* index slots, power of two */
    uint64_t key_size;
    uint64_t value_size;
    uint64_t index_offset;
    uint64_t data_offset;
    uint64_t data_units;       /* size of the data area in units */
    uint64_t seed[2];          /* SipHash key, random per table */
    int64_t creator_pid;
    uint32_t flags;            /* SHMKV_EVICT or 0; other bits make the table incompatible */
    uint32_t ready;            /* 1 once everything above is written; stored last (release) */

    /* --- Mutable state: only changed with the lock held. --- */
    uint64_t count __attribute__((aligned(SHMKV_ALIGN)));  /* live entries == used slots */
    uint64_t free_units;       /* units in FREE blocks (derived: recovery recounts it) */
    uint64_t stored_bytes;     /* key and value bytes of the USED blocks (derived) */
    uint64_t intent_old;       /* unit + 1 of the block a replace supersedes; 0 = none */
    uint64_t intent_new;       /* unit + 1 of the block replacing it */
    uint64_t move_from;        /* unit + 1 of a block being slid down by compaction; 0 = none */
    uint64_t move_to;          /* unit + 1 where it goes */
    uint64_t move_units;       /* its size */
    uint64_t move_done;        /* units copied so far */
    uint64_t clearing;         /* 1 while clear() runs: recovery finishes it */
    uint64_t hits, misses, inserts, updates, deletes;
    uint64_t evictions, expirations, recoveries, lock_timeouts;
    uint64_t compactions, moved_bytes;
    uint64_t broken;           /* 1: a recovery could not make the table sound; see lock.c */
    uint64_t next_expiry;      /* 0, or at most the earliest deadline of any live entry */
    uint64_t clock_hand;       /* unit of the block where the next eviction sweep starts */
    uint64_t purge_cursor;     /* unit of the block where the next partial purge resumes */
    uint64_t turn_min;         /* 0, or at most every deadline the purge's turn has passed */
    uint64_t reserved[4];      /* room for counters of later versions without a new layout */
    /* Free lists (derived): first block + 1 of each bin, and a bit per non-empty bin. */
    uint64_t binmap[BINMAP_WORDS];
    uint32_t bins[NBINS];

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

/* A block of the data area (alloc.c). A USED block holds an entry: this header, the key,
 * padding to 8 bytes, the value (8-aligned, so a counter is one aligned store). A FREE block
 * keeps its free-list links where an entry keeps its deadline. */
struct shmkv_block {
    uint32_t size;             /* units, header included: the next block starts there */
    uint32_t prev_size;        /* units of the block before; 0 for the first (derived) */
    /* state and referenced share one aligned 8-byte word, which lock-free readers
     * compare-and-swap as a whole (table.c, mark_used). */
    uint32_t state;            /* BLOCK_FREE, BLOCK_BUSY or BLOCK_USED */
    uint32_t referenced;       /* REF_*: CLOCK's bit, a hint that recovery never needs */
    uint32_t key_len;          /* <= key_size */
    uint32_t value_len;        /* <= value_size */
    union {
        uint64_t expires;      /* USED: deadline on shmkv__now()'s clock, in ns; 0 = never */
        struct {
            uint32_t next, prev;  /* FREE: neighbours in its bin's list, unit + 1; 0 = none */
        } free;
    } u;
};

_Static_assert(offsetof(struct shmkv_block, state) % 8 == 0 &&
                   offsetof(struct shmkv_block, referenced) ==
                       offsetof(struct shmkv_block, state) + 4,
               "mark_used() swaps state and referenced as one aligned 8-byte word");

/* The per-process handle: a copy of the geometry validated at open, so that every bound used
 * by an operation comes from here, never re-read from the (possibly corrupted) segment. */
struct shmkv {
    /* Calls in flight and the closing flag (handle.c, "THREADS AND CLOSE"). */
    uint32_t inflight;
    uint32_t closing;
    int observer;              /* shmkv_observe(): count no reads, timeouts or uses */
    int no_lock;               /* shmkv_forbid_lock(): shmkv__lock() fails, SHMKV_ENOLOCK */
    struct shmkv *prev, *next; /* handle.c's list of live handles, for fork (registry_lock) */
    unsigned char *base;
    uint64_t size;
    struct shmkv_header *hdr;
    uint64_t *index;
    unsigned char *data;
    uint64_t capacity, nslots, mask, key_size, value_size, data_units, memory;
    uint64_t k0, k1;
    int64_t lock_timeout_ns;
    int lock_kind;             /* shmkv__lock_kind(), checked before every lock */
    int evict;                 /* SHMKV_EVICT was set at creation: keep CLOCK's bits */
    int writing;               /* this handle's lock holder bumped seq (lock held) */
    uint64_t pending_hits;     /* optimistic reads not yet added to the header's counters */
    uint64_t pending_misses;
    unsigned fork_generation;  /* handle.c's fork_generation when the pending counts began */
    int debug_sound;           /* SHMKV_DEBUG: the table passed its check when locked */
};

#define ALIGN_UP(x, a) (((x) + ((a) - 1)) & ~((uint64_t)(a) - 1))

/* An index slot: low 32 bits the block's unit + 1 (0 = empty), high 32 bits the low 32 bits
 * of the key's hash, whose low bits are also the slot the key hashes to (its home). */
#define SLOT_UNIT(s) ((uint32_t)(s))
#define SLOT_TAG(s) ((uint32_t)((s) >> 32))
#define MAKE_SLOT(hash, unit) (((uint64_t)(uint32_t)(hash) << 32) | ((uint64_t)(unit) + 1))

static inline struct shmkv_block *block_at(const shmkv_t *t, uint64_t unit)
{
    return (struct shmkv_block *)(t->data + unit * UNIT);
}
static inline uint64_t unit_of(const shmkv_t *t, const struct shmkv_block *b)
{
    return (uint64_t)((const unsigned char *)b - t->data) / UNIT;
}
static inline unsigned char *block_key(struct shmkv_block *b)
{
    return (unsigned char *)(b + 1);
}
static inline uint64_t value_offset(uint64_t klen)
{
    return sizeof(struct shmkv_block) + ALIGN_UP(klen, 8);
}
static inline unsigned char *block_value(struct shmkv_block *b)
{
    return (unsigned char *)b + value_offset(b->key_len);
}
/* Units a block holding this key and value needs. */
static inline uint64_t entry_units(uint64_t klen, uint64_t vlen)
{
    return (value_offset(klen) + vlen + UNIT - 1) / UNIT;
}
/* Whether an entry of these lengths in block b lies inside the data area. */
static inline int block_fits(const shmkv_t *t, const struct shmkv_block *b, uint64_t klen,
                             uint64_t vlen)
{
    return entry_units(klen, vlen) <= t->data_units - unit_of(t, b);
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

/* handle.c: calls in flight and close (THREADS AND CLOSE there), pending read counts. */
static inline int enter(shmkv_t *t)
{
    if (t == NULL)
        return SHMKV_ECLOSED;
    __atomic_fetch_add(&t->inflight, 1, __ATOMIC_SEQ_CST);
    if (__builtin_expect(__atomic_load_n(&t->closing, __ATOMIC_SEQ_CST) != 0, 0)) {
        __atomic_fetch_sub(&t->inflight, 1, __ATOMIC_RELEASE);
        return SHMKV_ECLOSED;
    }
    return SHMKV_OK;
}

static inline void leave(shmkv_t **entered)
{
    if (*entered != NULL)
        __atomic_fetch_sub(&(*entered)->inflight, 1, __ATOMIC_RELEASE);
}

/* The first statement of every entry point that takes a handle: returns SHMKV_ECLOSED for a
 * NULL or closing handle; otherwise the call counts as in flight until it returns, on
 * whatever path (the cleanup attribute runs leave() after the return value is computed). */
#define ENTER(t)                                                                       \
    shmkv_t *entered_ __attribute__((cleanup(leave))) = NULL;                          \
    do {                                                                               \
        int enter_rc_ = enter(t);                                                      \
        if (enter_rc_ != SHMKV_OK)                                                     \
            return enter_rc_;                                                          \
        entered_ = (t);                                                                \
    } while (0)

/* Reads a handle counts before adding them to the header's hits and misses, so that readers
 * in several processes do not all write one cache line. */
#define PENDING_FLUSH 1024
void handle_forget_if_forked(shmkv_t *t);
void handle_flush_pending(shmkv_t *t);

/* siphash.c */
uint64_t shmkv_siphash13(const void *data, size_t len, uint64_t k0, uint64_t k1);

static inline uint64_t hash_key(const shmkv_t *t, const char *key, uint32_t klen)
{
    return shmkv_siphash13(key, klen, t->k0, t->k1);
}

/* index.c (the lock held, except where said) */
int index_entry(const shmkv_t *t, uint64_t slot, struct shmkv_block **out);
int index_find(const shmkv_t *t, uint64_t hash, const char *key, uint32_t klen,
               uint64_t *slot_out, struct shmkv_block **block_out);
int index_unlink(shmkv_t *t, uint64_t slot);
int index_slot_of(const shmkv_t *t, const struct shmkv_block *b, uint64_t *slot_out);

/* alloc.c (the lock held) */
struct alloc_stats {
    uint64_t free_blocks, largest_free;
};
int alloc_take(shmkv_t *t, uint64_t units, struct shmkv_block **out);
uint64_t alloc_release(shmkv_t *t, struct shmkv_block *b);
int alloc_compact(shmkv_t *t, uint64_t units);
int alloc_fits(const shmkv_t *t, uint64_t units);
int alloc_valid_block(const shmkv_t *t, uint64_t unit, uint64_t *size_out);
void alloc_finish_move(shmkv_t *t);
void alloc_rebuild_free(shmkv_t *t);
int alloc_check(const shmkv_t *t, int *invariant);
void alloc_stats(const shmkv_t *t, struct alloc_stats *out);
void alloc_reset(shmkv_t *t);
int locked_remove(shmkv_t *t, uint64_t slot, struct shmkv_block *b);
int locked_remove_block(shmkv_t *t, struct shmkv_block *b);

/* expiry.c */
uint64_t shmkv__now(void);
void locked_note_deadline(shmkv_t *t, uint64_t d);
int64_t locked_purge_steps(shmkv_t *t, uint64_t now, uint64_t steps);
static inline uint64_t min_deadline(uint64_t a, uint64_t b)
{
    return a == 0 || (b != 0 && b < a) ? b : a;
}

/* evict.c */
struct op;
int locked_reclaim(shmkv_t *t, struct op *op, uint64_t keys, uint64_t units);
int locked_make_room(shmkv_t *t, struct op *op, uint64_t keys, uint64_t units);

/* recover.c */
void locked_rebuild(shmkv_t *t);

/* check.c */
int locked_check(shmkv_t *t, int *invariant);

/* lock.c: the mutex alone; table.c's lock_table() adds recovery and seq. */
#define LOCK_OWNER_DIED 1      /* shmkv__mutex_lock(): held, but its last holder died */
int shmkv__mutex_lock(shmkv_t *t);
int shmkv__mutex_consistent(shmkv_t *t);
void shmkv__mutex_unlock(shmkv_t *t);
int shmkv__init_lock(struct shmkv_header *h);
int shmkv__lock_kind(void);
int shmkv__lock_sane(const struct shmkv_header *h);
uint64_t shmkv__pidns(void);
void shmkv__lock_after_fork(void);

/* table.c: taking the table's lock (recovery, broken tables, seq) */
#define LOCK_EVEN_BROKEN 1     /* shmkv__lock() flag: for stats and check, which only read */
#define LOCK_READ_ONLY 2       /* shmkv__lock() flag: the holder changes nothing that optimistic
                                * readers read, so it leaves seq alone */
int shmkv__lock(shmkv_t *t, int flags);
void shmkv__unlock(shmkv_t *t);

/* The operation state that the steps of one operation share (table.c). */
struct op {
    uint64_t hash;
    uint64_t slot;             /* the key's slot, or the empty slot where it would go */
    struct shmkv_block *e;     /* the key's block, if found; the stored one after a store */
    uint64_t now;              /* 0 until op_now() first reads the clock */
    int evicted;               /* an insert evicted a live entry to make room */
    uint32_t referenced;       /* CLOCK's bit for an entry this op inserts */
};
uint64_t op_now(struct op *op);
int op_expired(struct op *op, const struct shmkv_block *b);
int op_expiry_due(const shmkv_t *t, struct op *op);

#endif
