/* table.c -- the shmkv hash table: a fixed-size table in one shared-memory segment, mapped by
 * several processes at different addresses, and every operation on it, each complete in one
 * call under the table's process-shared robust mutex.
 *
 * SEGMENT LAYOUT
 *
 *   0                     index_offset              entries_offset                 total_size
 *   +---------------------+-------------------------+------------------------------+
 *   | header              | index                   | pool                         |
 *   | identity, geometry, | nslots x u64 slots,     | nentries x entry_size bytes  |
 *   | seed, ready, state, | nslots a power of two   | entry 0, entry 1, ...        |
 *   | counters, lock      | > 1.5 x capacity        |                              |
 *   +---------------------+-------------------------+------------------------------+
 *   (each region starts on a 64-byte line; struct shmkv_header in layout.h lists the fields)
 *
 *   slot (u64):   | low 32 bits of hash(key) : 32 | entry number + 1 : 32 |     0 = empty
 *   entry:        | key_len u32 | value_len u32 | expires u64 | seq u32 | link u32 |
 *                 | referenced u32 | spare u32 |       (32 bytes, struct shmkv_entry)
 *                 | key bytes, key_size rounded up to 8 | value bytes, value_size rounded up to 8 |
 *
 * Offsets only, never pointers: each process maps the segment at its own address, and every
 * position is an entry number or a slot number, turned into an address through the handle.
 * The pool holds capacity + 1 entries: replacing a value writes a new entry beside the old one
 * (see RECOVERY), so a table holding `capacity` keys still needs one spare to overwrite a key.
 * Since the low 32 bits of the hash pick the home slot, nslots is at most 2^32, and capacity
 * at most SHMKV_MAX_CAPACITY. Per entry, a table costs entry_size plus 12 to 24 bytes of index.
 *
 * The index is probed linearly from a key's home slot (hash & (nslots - 1)) to the first empty
 * slot. Deletion shifts the rest of the probe chain back (backward-shift deletion) instead of
 * leaving tombstones, so chains stay as short after a million deletes as after none. The slot
 * carries 32 bits of the hash, so a probe compares keys only when those bits match. The hash
 * is SipHash-1-3 keyed with the table's random seed: colliding keys cannot be chosen from
 * outside.
 *
 * SLOT STATES: empty (0) -> used (tag | entry + 1) -> empty, by deletion or clear. A used slot
 * may also move one or more places towards its home during a backward shift.
 *
 * ENTRY STATES (the link field):
 *   never used (number >= high_water) --alloc--> BUSY --publish--> USED --free--> on free list
 *   on free list --alloc--> BUSY;  any --clear--> never used (high_water = 0)
 * BUSY exists only while the lock is held: an entry being written, not yet in the index.
 * A USED entry whose deadline (expires) has passed is expired: absent to every operation,
 * though it still holds its slot and entry until something reclaims it (see EXPIRY).
 *
 * INVARIANTS (check.c verifies each by number; shmkv_invariant_text() has the same words)
 *   1. The header matches this build: magic, format version, layout signature, and a geometry
 *      that shmkv_layout() recomputes from capacity, key_size and value_size.
 *   2. count <= capacity, high_water <= nentries, clock_hand < nentries and
 *      purge_cursor <= high_water.
 *   3. Every used slot names an entry below high_water whose link is USED and whose key and
 *      value lengths are within key_size and value_size.
 *   4. A used slot's tag is the low 32 bits of the hash of its entry's key.
 *   5. Every used slot is found by looking up its own key: no empty slot between its home and
 *      it, and no equal key earlier in the chain (no key is stored twice).
 *   6. No entry is named by two slots.
 *   7. The used slots, the USED entries below high_water and count are the same number.
 *   8. The free list holds only entries below high_water that are not USED or BUSY, has no
 *      cycle, and free + count == high_water: no entry is leaked.
 *   9. No intent is recorded and no entry is pinned while the lock is free, and seq is odd
 *      exactly while a writer holds it.
 *  10. At least one slot is empty (nslots > capacity), so every probe terminates.
 *  11. next_expiry is at or below the deadline of every USED entry that has one (and so is
 *      not 0 if any has one), and so is turn_min for those below purge_cursor: no expired
 *      entry escapes the purge that next_expiry starts, and a turn's end sets it right.
 *
 * EXPIRY
 * A deadline is an absolute time in ns on CLOCK_BOOTTIME (shmkv__now), which every process
 * of the machine reads alike and wall-clock changes do not move; 0 means never. Lookups
 * compare it with the clock, read once per operation and only when a deadline is involved,
 * so tables without TTLs never read the clock. Reclaiming is lazy: a write that meets its
 * key expired removes it, and the purge reclaims the rest. The purge walks the pool in turns
 * (locked_purge_steps): len() and purge_expired() take a whole turn at once, an insert into
 * a full table only as many entries as it needs to find room. Every purge waits for
 * next_expiry, a lower bound of all deadlines kept in the header, to say that something may
 * have expired; the end of a turn sets it to the earliest deadline the turn saw. So tables
 * without deadlines never walk, and a full table with a trickle of expiring keys walks its
 * pool about once per turn, not once per insert. Reads never reclaim (they are to go
 * lock-free). Every reclaim counts one expiration.
 *
 * EVICTION (tables created with SHMKV_EVICT)
 * CLOCK over the pool: reads, overwrites, counter increments and touches set an entry's
 * referenced bit (a store only when it changes); a new key starts without it. An insert into
 * a full table first takes a bounded look for expired room (PURGE_ROUND_EVICTING entries of
 * the purge's turn); if that finds none, the hand (clock_hand) walks the pool from where it
 * stopped, clearing bits, and takes the first entry that has expired or has no bit: expired
 * and cold keys go first, keys used since the hand's last visit get another turn. The walk
 * is bounded by two turns. set_many pins the entries of its keys (REF_PINNED) until it ends,
 * so a batch never evicts its own keys. An eviction is a delete, and as crash-safe.
 *
 * LOCKING
 * Every write runs under the robust, process-shared pthread mutex in the header (lock.c).
 * Hashing and argument checks happen before taking it. Functions named locked_* expect the
 * lock held, except that optimistic readers run the lookup (locked_lookup for OPTIMISTIC,
 * copy_value), which only reads, bounds every walk and checks every length and entry number
 * it reads, and leaves high_water, which writes dirty, unread.
 * A get reads optimistically, without the lock: it reads seq (even), looks the key up,
 * copies the value out, and reads seq again; if seq moved, a writer ran and the read starts
 * over. Every writer makes seq odd after taking the lock and even before releasing it
 * (locked_seq_bump), so readers neither block each other nor writers, and never return a
 * torn value. After OPTIMISTIC_TRIES failed tries a reader takes the lock like a writer: a
 * writer that died left seq odd, and the lock's recovery evens it; a table found broken
 * keeps seq odd for good, so that its readers meet the lock and its error. Readers count hits
 * and misses in their handle and add them to the header now and then (PENDING_FLUSH), so
 * that they write no shared line; a forked child forgets the counts its parent had pending. Other reads (get_many, iteration, ttl, stats) take the lock
 * but leave seq alone (LOCK_READ_ONLY). Lock waits time out (SHMKV_ELOCKTIMEOUT) instead of hanging
 * behind a stopped process; shmkv_lock_owner() and shmkv_lock_holder() tell who holds it
 * (lock.c, PID NAMESPACES: the mutex is NORMAL, not error-checking, so that processes of
 * different PID namespaces with equal thread ids wait for each other). glibc trusts the
 * mutex's type word, so it is compared with a freshly made mutex's before every lock.
 * Whoever takes the lock and finds seq odd on a table that is not broken mends it (lock.c,
 * locked_mend_seq): only damage, such as a flipped bit, makes it odd while the lock is free,
 * and a writer that bumped it to even would then write with readers trusting it.
 *
 * RECOVERY
 * The pool is the source of truth; the index, the free list and count can be derived from it.
 * Every mutation orders its stores (release stores, so the compiler keeps the order) so that
 * a process killed at any instruction leaves each key with its old or its new value:
 *   insert:  take an entry (BUSY), write key and value, mark it USED, publish it in a slot;
 *   replace: take an entry, write it, record intent (old, new), mark new USED, swap the slot
 *            in one aligned 8-byte store, free the old entry, clear the intent;
 *   delete:  shift the chain back over the slot, then free the entry;
 *   counter: one aligned 8-byte store into the value; a new deadline (touch) likewise;
 *   expiry reclaim and eviction: a delete;
 *   clear:   high_water = 0 first, then empty the index and the free list.
 * next_expiry is lowered before an entry with an earlier deadline becomes live, so a crash
 * leaves it too low at worst, which costs one needless walk.
 * A locker that gets EOWNERDEAD calls locked_rebuild(): if an intent names two USED entries,
 * the old one is dropped (the replace rolls forward); then the index, the free list and count
 * are rebuilt from the USED entries below high_water, and BUSY entries return to the free
 * list; next_expiry is recomputed and pins left by a dead set_many become plain referenced
 * bits. The rebuild is idempotent, so a recoverer killed mid-rebuild is recovered in turn.
 * The rebuilt table is then checked (lock.c): a crash cannot leave damage that the rebuild
 * does not mend, so a failed check means corruption, and the table is marked broken for good
 * (every operation but stats and check fails with SHMKV_EBROKEN) rather than used.
 * The crash tests kill a process at every one of these stores in turn: each STORE and
 * slot_store is a crash point of the fault injection described in layout.h.
 *
 * FORMAT
 * Version 4 (SHMKV_FORMAT_VERSION): the lock is a robust process-shared mutex of the NORMAL
 * type (version 3's was ERRORCHECK), followed on its cache line by the holder's PID namespace
 * and pid; a version-3 build and a version-4 build refuse each other's tables.
 * The header starts with the magic "SHMKVTB1", the format version and a layout signature that
 * folds in the version and the sizes of the header, the entry and pthread_mutex_t, so two
 * builds that would disagree about the layout refuse to share a table. The ready flag is
 * written last (a release store) and read first, so an attacher never sees half a header.
 * Every length and entry number read from the segment is bounds-checked against the handle's
 * copy of the geometry before use: a corrupted segment yields SHMKV_ECORRUPT, not a crash.
 *
 * REJECTED ALTERNATIVES
 *   - Tombstones: a delete-heavy workload fills the index with them and every miss scans it.
 *   - Robin Hood insertion: moves many slots per insert, widening the crash window; linear
 *     probing at load <= 2/3 already keeps chains short.
 *   - Pointers or a separate allocator inside the segment: every process maps it elsewhere,
 *     and fixed-size entries make the free list the whole allocator.
 *   - Overwriting values in place: a crash halfway would leave a torn value.
 *   - An LRU list threaded through the entries: every read would write two neighbours'
 *     links, under the lock, and a crash could cut the list; CLOCK's bit is a hint that
 *     needs no repair. Sampling a few random keys, as Redis does, needs no hand but evicts
 *     worse at small sample sizes and is harder to test deterministically.
 *   - A heap or timer wheel of deadlines: exact and incremental, but more shared state to
 *     keep crash-safe. The purge's turns cost one walk of the pool per turn, shared by the
 *     inserts of that turn (measured in bench/), and purge_expired() lets a master take
 *     them off the request path.
 *   - Walking the whole pool whenever an insert needs expired room: a full table with keys
 *     expiring one by one (sessions beside per-minute counters) walked it on every insert.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <sched.h>
#include <unistd.h>

#include "layout.h"


#ifdef SHMKV_DEBUG
/* Debug builds verify every invariant after every mutation and abort if the mutation broke a
 * table that was sound when the lock was taken (lock.c notes that in t->debug_sound). A table
 * that was damaged before, as the corruption tests make them, is not our code's doing. The
 * check walks the whole table, so tables of more than DEBUG_CHECK_MAX_SLOTS index slots are
 * left out: the suite's big tables would take minutes, and small ones cover every path. */
#define DEBUG_CHECK(t)                                                                 \
    do {                                                                               \
        int inv_ = 0;                                                                  \
        if ((t)->debug_sound && locked_check((t), &inv_) == SHMKV_ECHECK)               \
            abort();                                                                   \
    } while (0)
#else
#define DEBUG_CHECK(t) ((void)0)
#endif

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
 * Codes and texts
 * ---------------------------------------------------------------------------------------- */

int shmkv_abi(void)
{
    return SHMKV_ABI;
}

const char *shmkv_strerror(int code)
{
    switch (code) {
    case SHMKV_OK: return "success";
    case SHMKV_ENOTFOUND: return "no such key";
    case SHMKV_EKEYSIZE: return "key longer than the table's key_size";
    case SHMKV_EVALUESIZE: return "value longer than the table's value_size";
    case SHMKV_EFULL: return "table is full";
    case SHMKV_EINCOMPATIBLE: return "not a shmkv table of a compatible layout";
    case SHMKV_ECORRUPT: return "table is corrupted";
    case SHMKV_ENOTCOUNTER: return "value is not an 8-byte counter";
    case SHMKV_EOVERFLOW: return "counter would overflow a signed 64-bit integer";
    case SHMKV_ECLOSED: return "table is closed";
    case SHMKV_ELOCKTIMEOUT: return "timed out waiting for the table's lock";
    case SHMKV_EBROKEN: return "the table's lock can no longer be used";
    case SHMKV_ELOCK: return "the table's lock failed";
    case SHMKV_EARG: return "invalid argument";
    case SHMKV_ENOTREADY: return "table is not initialised yet";
    case SHMKV_EBUFSIZE: return "output buffer too small";
    case SHMKV_ECHECK: return "table failed its invariant check";
    case SHMKV_ENOMEM: return "out of memory";
    case SHMKV_ENOLOCK: return "this handle may not take the table's lock";
    default: return "unknown error";
    }
}

const char *shmkv_invariant_text(int invariant)
{
    static const char *const texts[] = {
        "no invariant",
        "header matches this build (magic, version, signature, geometry)",
        "count <= capacity and high_water <= nentries",
        "every used slot names a USED entry below high_water with lengths in range",
        "a slot's tag is the low 32 bits of its key's hash",
        "every used slot is found by looking up its own key (no hole, no duplicate key)",
        "no entry is named by two slots",
        "used slots, USED entries and count agree",
        "the free list is sound and free + count == high_water (nothing leaked)",
        "no intent, pin or odd seq while no writer holds the lock",
        "at least one index slot is empty",
        "next_expiry (and turn_min, below the purge cursor) is at or below every live deadline",
    };
    if (invariant < 0 || invariant >= (int)(sizeof texts / sizeof texts[0]))
        return "unknown invariant";
    return texts[invariant];
}

/* ------------------------------------------------------------------------------------------
 * Geometry, creation and attachment
 * ---------------------------------------------------------------------------------------- */

int shmkv_layout(uint64_t capacity, uint64_t key_size, uint64_t value_size,
                 struct shmkv_geometry *g)
{
    uint64_t want, nslots = 8;

    if (g == NULL || capacity < 1 || capacity > SHMKV_MAX_CAPACITY || key_size < 1 ||
        key_size > SHMKV_MAX_KEY_SIZE || value_size < 1 || value_size > SHMKV_MAX_VALUE_SIZE)
        return SHMKV_EARG;
    /* Load factor at most 2/3 keeps linear-probing chains short; > capacity keeps one empty. */
    want = capacity + capacity / 2 + 1;
    while (nslots < want)
        nslots <<= 1;
    memset(g, 0, sizeof *g);
    g->capacity = capacity;
    g->nentries = capacity + 1;
    g->nslots = nslots;
    g->key_size = key_size;
    g->value_size = value_size;
    g->entry_size = sizeof(struct shmkv_entry) + ALIGN_UP(key_size, 8) + ALIGN_UP(value_size, 8);
    g->header_size = sizeof(struct shmkv_header);
    g->index_offset = ALIGN_UP(g->header_size, SHMKV_ALIGN);
    g->entries_offset = ALIGN_UP(g->index_offset + nslots * sizeof(uint64_t), SHMKV_ALIGN);
    /* At most 2^31 entries of at most 2^30 + 2^20 + 40 bytes: no uint64_t overflow. */
    g->total_size = g->entries_offset + g->nentries * g->entry_size;
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
        sizeof(struct shmkv_entry),
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

int shmkv_init(void *base, uint64_t size, uint64_t capacity, uint64_t key_size,
               uint64_t value_size, uint32_t flags, const unsigned char *seed16,
               int64_t creator_pid)
{
    struct shmkv_geometry g;
    struct shmkv_header *h = base;
    int rc = shmkv_layout(capacity, key_size, value_size, &g);

    if (rc != SHMKV_OK)
        return rc;
    if (base == NULL || seed16 == NULL || size < g.total_size || (flags & ~SHMKV_EVICT) ||
        ((uintptr_t)base & (SHMKV_ALIGN - 1)) != 0)
        return SHMKV_EARG;
    /* The index and pool of a fresh segment are zero already (ftruncate); only the header
     * is written, so that an unreserved table touches no page it does not use. */
    memset(h, 0, sizeof *h);
    memcpy(h->magic, SHMKV_MAGIC, sizeof h->magic);
    h->version = SHMKV_FORMAT_VERSION;
    h->header_size = sizeof *h;
    h->signature = layout_signature();
    h->total_size = g.total_size;
    h->capacity = g.capacity;
    h->nentries = g.nentries;
    h->nslots = g.nslots;
    h->key_size = g.key_size;
    h->value_size = g.value_size;
    h->entry_size = g.entry_size;
    h->index_offset = g.index_offset;
    h->entries_offset = g.entries_offset;
    memcpy(h->seed, seed16, sizeof h->seed);
    h->creator_pid = creator_pid;
    h->flags = flags;
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
static void forget_if_forked(shmkv_t *t)
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
    if (shmkv_layout(h->capacity, h->key_size, h->value_size, &g) != SHMKV_OK ||
        g.nentries != h->nentries || g.nslots != h->nslots || g.entry_size != h->entry_size ||
        g.index_offset != h->index_offset || g.entries_offset != h->entries_offset ||
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
    t->index = (uint64_t *)((unsigned char *)base + g.index_offset);
    t->entries = (unsigned char *)base + g.entries_offset;
    t->capacity = g.capacity;
    t->nentries = g.nentries;
    t->nslots = g.nslots;
    t->mask = g.nslots - 1;
    t->entry_size = g.entry_size;
    t->key_size = g.key_size;
    t->value_size = g.value_size;
    t->value_offset = sizeof(struct shmkv_entry) + ALIGN_UP(g.key_size, 8);
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

static void flush_pending(shmkv_t *t)
{
    forget_if_forked(t);
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
        flush_pending(t);      /* the last touch of the segment */
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
 * The clock of deadlines
 * ---------------------------------------------------------------------------------------- */

static uint64_t fake_now;      /* shmkv_testing_set_clock(); 0 = the real clock */

void shmkv_testing_set_clock(uint64_t now_ns)
{
    __atomic_store_n(&fake_now, now_ns, __ATOMIC_RELAXED);
}

uint64_t shmkv__now(void)
{
    uint64_t fake = __atomic_load_n(&fake_now, __ATOMIC_RELAXED);
    struct timespec ts;

    if (__builtin_expect(fake != 0, 0))
        return fake;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    return (uint64_t)ts.tv_sec * UINT64_C(1000000000) + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------------------------------
 * Lock-held primitives
 * ---------------------------------------------------------------------------------------- */

static inline uint64_t hash_key(const shmkv_t *t, const char *key, uint32_t klen)
{
    return shmkv_siphash13(key, klen, t->k0, t->k1);
}

/* The entry a used slot names, after checking everything about it that a later read relies
 * on. SHMKV_ECORRUPT if the slot or the entry cannot be right. limit is the number of
 * entries a slot may name: high_water with the lock held, nentries for an optimistic reader,
 * which must not read high_water: it shares a line with what every write changes, and a
 * reader that reads it pays a cache miss for each write of another process. An entry the
 * sequence check vouches for lies below high_water anyway (invariant 3); above, a damaged
 * slot still only reaches memory of the table. */
static int slot_entry(const shmkv_t *t, uint64_t slot, uint64_t limit,
                      struct shmkv_entry **out)
{
    uint32_t n1 = SLOT_ENTRY(slot);
    struct shmkv_entry *e;

    if (n1 == 0 || n1 > t->nentries || n1 > limit)
        return SHMKV_ECORRUPT;
    e = entry_at(t, n1 - 1);
    if (e->link != LINK_USED || e->key_len > t->key_size || e->value_len > t->value_size)
        return SHMKV_ECORRUPT;
    *out = e;
    return SHMKV_OK;
}

/* Looks key up. 0: *slot_out and *entry_out name it. SHMKV_ENOTFOUND: *slot_out is the empty
 * slot that ended the probe, where an insert of this key belongs. SHMKV_ECORRUPT: the index
 * or an entry on the way is damaged. The walk is bounded by nslots, whatever the segment says.
 * Expired entries are found like any other: deciding what they mean is the caller's part. */
static int find_below(const shmkv_t *t, uint64_t hash, const char *key, uint32_t klen,
                      uint64_t limit, uint64_t *slot_out, struct shmkv_entry **entry_out)
{
    uint32_t tag = (uint32_t)hash;
    uint64_t i = hash & t->mask;
    uint64_t probes;

    for (probes = 0; probes < t->nslots; probes++, i = (i + 1) & t->mask) {
        uint64_t s = slot_load(t, i);
        struct shmkv_entry *e;
        int rc;

        if (s == 0) {
            *slot_out = i;
            return SHMKV_ENOTFOUND;
        }
        if (SLOT_TAG(s) != tag)
            continue;
        rc = slot_entry(t, s, limit, &e);
        if (rc != SHMKV_OK)
            return rc;
        if (e->key_len == klen && (klen == 0 || memcmp(entry_key(e), key, klen) == 0)) {
            *slot_out = i;
            *entry_out = e;
            return SHMKV_OK;
        }
    }
    return SHMKV_ECORRUPT;
}

int locked_find(const shmkv_t *t, uint64_t hash, const char *key, uint32_t klen,
                uint64_t *slot_out, struct shmkv_entry **entry_out)
{
    return find_below(t, hash, key, klen, t->hdr->high_water, slot_out, entry_out);
}

static inline uint64_t entry_number(const shmkv_t *t, const struct shmkv_entry *e)
{
    return (uint64_t)((const unsigned char *)e - t->entries) / t->entry_size;
}

/* Takes an entry off the free list, or else from the never-used tail, and marks it BUSY
 * before the list head or high_water moves past it, so a crash in between only leaves an
 * entry that the rebuild returns to the free list. */
static int locked_alloc(shmkv_t *t, struct shmkv_entry **out)
{
    struct shmkv_header *h = t->hdr;
    uint64_t head = h->free_head, hw = h->high_water;
    struct shmkv_entry *e;

    if (head != 0) {
        uint32_t next;

        /* Free entries all lie below high_water: one above it may still look USED. */
        if (head > t->nentries || head > hw)
            return SHMKV_ECORRUPT;
        e = entry_at(t, head - 1);
        next = e->link;
        if (next > t->nentries || next > hw)
            return SHMKV_ECORRUPT;
        STORE(e->link, LINK_BUSY);
        STORE(h->free_head, (uint64_t)next);
    } else {
        /* Callers keep count < nentries, so an exhausted pool means a damaged one. */
        if (hw >= t->nentries)
            return SHMKV_ECORRUPT;
        e = entry_at(t, hw);
        STORE(e->link, LINK_BUSY);
        STORE(h->high_water, hw + 1);
    }
    *out = e;
    return SHMKV_OK;
}

/* Returns an entry to the free list. The entry stops being USED before the head names it. */
static void locked_free(shmkv_t *t, struct shmkv_entry *e)
{
    struct shmkv_header *h = t->hdr;

    STORE(e->link, (uint32_t)h->free_head);
    STORE(h->free_head, entry_number(t, e) + 1);
}

static inline uint64_t min_deadline(uint64_t a, uint64_t b)
{
    return a == 0 || (b != 0 && b < a) ? b : a;
}

/* Keeps next_expiry and turn_min at or below every live deadline (invariant 11). Called
 * before an entry with deadline d becomes live, so a crash can only leave them lower than
 * they need be, which costs a purge that finds nothing and sets them right. */
static void locked_note_deadline(shmkv_t *t, uint64_t d)
{
    struct shmkv_header *h = t->hdr;

    if (d == 0)
        return;
    if (min_deadline(h->next_expiry, d) != h->next_expiry)
        STORE(h->next_expiry, d);
    h->turn_min = min_deadline(h->turn_min, d);
}

/* CLOCK's bit. Only evicting tables keep it, and it is written only when it changes, so a
 * key read over and over does not dirty its cache line each time. A compare-and-swap, since
 * a lock-free reader may get here after a writer reused the entry and pinned it: a pin must
 * never be overwritten. */
static inline void mark_used(const shmkv_t *t, struct shmkv_entry *e)
{
    uint32_t cold = REF_COLD;

    if (t->evict && __atomic_load_n(&e->referenced, __ATOMIC_RELAXED) == REF_COLD)
        __atomic_compare_exchange_n(&e->referenced, &cold, REF_USED, 0, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED);
}

static void fill_entry(const shmkv_t *t, struct shmkv_entry *e, const char *key, uint32_t klen,
                       const char *value, uint32_t vlen, uint64_t expires, uint32_t referenced)
{
    e->key_len = klen;
    e->value_len = vlen;
    e->expires = expires;
    e->referenced = referenced;
    e->spare = 0;
    if (klen > 0)
        memcpy(entry_key(e), key, klen);
    FAULT_POINT();
    if (vlen > 0)
        memcpy(entry_value(t, e), value, vlen);
}

/* Empties slot i by backward-shift deletion: each later slot of the chain whose home is not
 * between i and itself moves back into the hole, until an empty slot ends the chain. */
static int locked_unlink_slot(shmkv_t *t, uint64_t i)
{
    uint64_t j = i, steps;

    for (steps = 0; steps < t->nslots; steps++) {
        uint64_t s, home;

        j = (j + 1) & t->mask;
        s = slot_load(t, j);
        if (s == 0) {
            slot_store(t, i, 0);
            return SHMKV_OK;
        }
        home = SLOT_TAG(s) & t->mask;
        if (((j - home) & t->mask) >= ((j - i) & t->mask)) {
            slot_store(t, i, s);
            i = j;
        }
    }
    return SHMKV_ECORRUPT;
}

/* Removes the key in `slot` (entry e). The caller counts it: a delete, an expiration or an
 * eviction. */
static int locked_remove(shmkv_t *t, uint64_t slot, struct shmkv_entry *e)
{
    struct shmkv_header *h = t->hdr;
    int rc = locked_unlink_slot(t, slot);

    if (rc != SHMKV_OK)
        return rc;
    locked_free(t, e);
    STORE(h->count, h->count - 1);
    return SHMKV_OK;
}

/* Removes the live entry e, found in the index through its own key: the walks over the pool
 * (purge, eviction) know entries, not slots. */
static int locked_remove_entry(shmkv_t *t, struct shmkv_entry *e)
{
    uint32_t klen = e->key_len;
    uint64_t slot;
    struct shmkv_entry *found = NULL;
    int rc;

    if (klen > t->key_size)
        return SHMKV_ECORRUPT;
    rc = locked_find(t, hash_key(t, (const char *)entry_key(e), klen),
                     (const char *)entry_key(e), klen, &slot, &found);
    if (rc != SHMKV_OK || found != e)
        return rc == SHMKV_OK || rc == SHMKV_ENOTFOUND ? SHMKV_ECORRUPT : rc;
    return locked_remove(t, slot, e);
}

/* The purge walks the pool in turns, from entry 0 to high_water, reclaiming every entry
 * whose deadline is at or before now; a turn may be spread over many calls, each taking up to
 * `steps` entries from purge_cursor on. turn_min gathers the deadlines the turn passes (and
 * those noted meanwhile), so that when the turn ends it is the earliest deadline left and
 * becomes next_expiry. An insert into a full table thus pays for the entries it walks, not
 * for a whole pool per expired key. Returns the number reclaimed, or a negative code. */
static int64_t locked_purge_steps(shmkv_t *t, uint64_t now, uint64_t steps)
{
    struct shmkv_header *h = t->hdr;
    uint64_t hw = h->high_water, cursor = h->purge_cursor, turn_min = h->turn_min;
    int64_t purged = 0;

    if (hw > t->nentries)
        return SHMKV_ECORRUPT;
    if (cursor > hw) {         /* a hint out of range: start the turn again */
        cursor = 0;
        turn_min = 0;
    }
    for (; steps > 0 && cursor < hw; steps--, cursor++) {
        struct shmkv_entry *e = entry_at(t, cursor);
        uint64_t d = e->expires;
        int rc;

        if (e->link != LINK_USED || d == 0)
            continue;
        if (d > now) {
            turn_min = min_deadline(turn_min, d);
            continue;
        }
        rc = locked_remove_entry(t, e);
        if (rc != SHMKV_OK)
            return rc;
        h->expirations++;
        purged++;
    }
    h->turn_min = turn_min;
    h->purge_cursor = cursor;
    if (cursor == hw) {        /* the turn is complete */
        STORE(h->next_expiry, turn_min);
        h->purge_cursor = 0;
        h->turn_min = 0;
    }
    return purged;
}

/* One whole turn, from the start: every expired entry reclaimed, next_expiry exact. */
static int64_t locked_purge(shmkv_t *t, uint64_t now)
{
    t->hdr->purge_cursor = 0;
    t->hdr->turn_min = 0;
    return locked_purge_steps(t, now, UINT64_MAX);
}

/* Takes the lock of an open table: SHMKV_ECLOSED for a closed one (NULL handle). */
static int lock_table(shmkv_t *t, int flags)
{
    return t == NULL ? SHMKV_ECLOSED : shmkv__lock(t, flags);
}

/* ------------------------------------------------------------------------------------------
 * Operations on one key. An op carries what the steps of one operation share: begin_op()
 * checks the arguments, hashes the key before taking the lock, takes it and looks the key up
 * (locked_lookup); the operation does its locked_* steps; end_op() runs the debug check and
 * unlocks. The clock is read at most once per op, and only if a deadline is involved.
 * ---------------------------------------------------------------------------------------- */

struct op {
    uint64_t hash;
    uint64_t slot;             /* the key's slot, or the empty slot where it would go */
    struct shmkv_entry *e;     /* the key's entry, if found; the stored one after a store */
    uint64_t now;              /* 0 until op_now() first reads the clock */
    int evicted;               /* an insert evicted a live entry to make room */
    uint32_t referenced;       /* CLOCK's bit for an entry this op inserts */
};

static void op_start(struct op *op, uint64_t hash)
{
    op->hash = hash;
    op->e = NULL;
    op->now = 0;
    op->evicted = 0;
    op->referenced = REF_COLD;
}

static uint64_t op_now(struct op *op)
{
    if (op->now == 0)
        op->now = shmkv__now();
    return op->now;
}

/* The deadline ttl_ns from now: 0 (never) for 0, saturating rather than wrapping around. */
static uint64_t op_deadline(struct op *op, uint64_t ttl_ns)
{
    uint64_t d;

    if (ttl_ns == 0)
        return 0;
    return __builtin_add_overflow(op_now(op), ttl_ns, &d) ? UINT64_MAX : d;
}

/* Whether next_expiry says that some entry may have expired: the clock is read only if some
 * entry has a deadline at all. */
static int op_expiry_due(const shmkv_t *t, struct op *op)
{
    uint64_t next = t->hdr->next_expiry;

    return next != 0 && next <= op_now(op);
}

static int op_expired(struct op *op, const struct shmkv_entry *e)
{
    uint64_t d = __atomic_load_n(&e->expires, __ATOMIC_RELAXED);

    return d != 0 && d <= op_now(op);
}

enum { FOR_READ, FOR_WRITE, OPTIMISTIC };  /* locked_lookup()'s and begin_op()'s `write` */

/* Looks key up as an operation sees it: an expired entry is absent. A writer (FOR_WRITE)
 * reclaims the expired entry it meets, so that *slot is where the key would be inserted;
 * a reader leaves it be. Returns 0, SHMKV_ENOTFOUND or SHMKV_ECORRUPT, as locked_find. */
static int locked_lookup(shmkv_t *t, struct op *op, const char *key, uint32_t klen, int write)
{
    uint64_t limit = write == OPTIMISTIC ? t->nentries : t->hdr->high_water;
    int rc = find_below(t, op->hash, key, klen, limit, &op->slot, &op->e);

    if (rc != SHMKV_OK || !op_expired(op, op->e))
        return rc;
    if (write != FOR_WRITE)
        return SHMKV_ENOTFOUND;
    rc = locked_remove(t, op->slot, op->e);
    if (rc != SHMKV_OK)
        return rc;
    t->hdr->expirations++;
    op->e = NULL;
    rc = locked_find(t, op->hash, key, klen, &op->slot, &op->e);
    return rc == SHMKV_OK ? SHMKV_ECORRUPT : rc;  /* a key stored twice */
}

/* CLOCK: the hand walks the pool; a used entry with its bit set loses the bit and is passed
 * over, the first one without it is evicted, unless it has expired: then it is reclaimed as
 * such. Two turns at most: the first clears every bit it passes. Entries pinned by the
 * running set_many are passed over as they are. */
static int locked_evict(shmkv_t *t, struct op *op)
{
    struct shmkv_header *h = t->hdr;
    uint64_t hw = h->high_water, hand = h->clock_hand, steps;

    if (hw == 0 || hw > t->nentries)
        return SHMKV_ECORRUPT;
    if (hand >= hw)
        hand = 0;
    for (steps = 0; steps <= 2 * hw; steps++) {
        struct shmkv_entry *e = entry_at(t, hand);
        uint32_t ref = __atomic_load_n(&e->referenced, __ATOMIC_RELAXED);
        int expired, rc;

        hand = hand + 1 < hw ? hand + 1 : 0;
        if (e->link != LINK_USED || ref == REF_PINNED)
            continue;
        expired = op_expired(op, e);
        if (ref != REF_COLD && !expired) {
            __atomic_store_n(&e->referenced, REF_COLD, __ATOMIC_RELAXED);
            continue;
        }
        h->clock_hand = hand;
        rc = locked_remove_entry(t, e);
        if (rc == SHMKV_OK && expired)
            h->expirations++;
        else if (rc == SHMKV_OK) {
            h->evictions++;
            op->evicted = 1;
        }
        return rc;
    }
    return SHMKV_ECORRUPT;
}

/* Entries a table that must not evict walks per round looking for expired room, and the
 * bounded look an evicting table takes before it evicts: a cache is full all the time, and
 * each insert should cost it a few cache lines, not a walk of the pool. */
#define PURGE_ROUND 4096
#define PURGE_ROUND_EVICTING 64

/* Reclaims expired room until `room` more keys fit, if next_expiry says some entry may have
 * expired. A table that must not evict walks on (two turns at most, since op's now stands
 * still) until the keys fit or it knows that nothing more has expired; an evicting table
 * takes one bounded look. */
static int locked_reclaim(shmkv_t *t, struct op *op, uint64_t room)
{
    uint64_t rounds;

    for (rounds = 0; t->hdr->count + room > t->capacity && op_expiry_due(t, op); rounds++) {
        int64_t purged;

        if (rounds > 2 * (t->nentries / PURGE_ROUND + 1))
            return SHMKV_ECORRUPT;
        purged = locked_purge_steps(t, op->now, t->evict ? PURGE_ROUND_EVICTING : PURGE_ROUND);
        if (purged < 0)
            return (int)purged;
        if (t->evict)
            break;
    }
    return SHMKV_OK;
}

/* Makes room for one more key in a full table: expired room first, then, in an evicting
 * table, one entry chosen by CLOCK. SHMKV_EFULL if neither frees any. */
static int locked_make_room(shmkv_t *t, struct op *op)
{
    int rc = locked_reclaim(t, op, 1);

    if (rc != SHMKV_OK || t->hdr->count < t->capacity)
        return rc;
    return t->evict ? locked_evict(t, op) : SHMKV_EFULL;
}

/* Inserts an absent key into the empty slot that locked_lookup() returned for it, making
 * room first if the table is full. SHMKV_EFULL if it cannot; nothing visible changes then. */
static int locked_insert(shmkv_t *t, struct op *op, const char *key, uint32_t klen,
                         const char *value, uint32_t vlen, uint64_t expires)
{
    struct shmkv_header *h = t->hdr;
    struct shmkv_entry *e;
    int rc;

    if (h->count >= t->capacity) {
        rc = locked_make_room(t, op);
        if (rc != SHMKV_OK)
            return rc;
        /* Removals shift slots back: the key's empty slot may have moved. */
        rc = locked_find(t, op->hash, key, klen, &op->slot, &e);
        if (rc != SHMKV_ENOTFOUND)
            return rc == SHMKV_OK ? SHMKV_ECORRUPT : rc;
    }
    rc = locked_alloc(t, &e);
    if (rc != SHMKV_OK)
        return rc;
    locked_note_deadline(t, expires);
    fill_entry(t, e, key, klen, value, vlen, expires, op->referenced);
    STORE(e->link, LINK_USED);
    slot_store(t, op->slot, MAKE_SLOT(op->hash, entry_number(t, e)));
    STORE(h->count, h->count + 1);
    h->inserts++;
    op->e = e;
    return SHMKV_OK;
}

/* Replaces the value of the key in op's slot (entry op->e) copy-on-write: the new entry is
 * written beside the old one and swapped in with one slot store. Needs the pool's spare
 * entry at most, so it works on a full table. An overwrite counts as a use. */
static int locked_replace(shmkv_t *t, struct op *op, const char *key, uint32_t klen,
                          const char *value, uint32_t vlen, uint64_t expires)
{
    struct shmkv_header *h = t->hdr;
    struct shmkv_entry *old = op->e, *e;
    int rc = locked_alloc(t, &e);

    if (rc != SHMKV_OK)
        return rc;
    locked_note_deadline(t, expires);
    fill_entry(t, e, key, klen, value, vlen, expires,
               op->referenced == REF_PINNED ? REF_PINNED : REF_USED);
    STORE(h->intent_old, entry_number(t, old) + 1);
    STORE(h->intent_new, entry_number(t, e) + 1);
    STORE(e->link, LINK_USED);
    slot_store(t, op->slot, MAKE_SLOT(op->hash, entry_number(t, e)));
    locked_free(t, old);
    STORE(h->intent_new, (uint64_t)0);
    STORE(h->intent_old, (uint64_t)0);
    h->updates++;
    op->e = e;
    return SHMKV_OK;
}

void locked_rebuild(shmkv_t *t)
{
    struct shmkv_header *h = t->hdr;
    uint64_t hw = h->high_water, io = h->intent_old, in = h->intent_new, next = 0, n, i;

    /* Optimistic readers must see the rebuild as a write: seq odd throughout (a dead writer
     * may have left it so already), even again at the end. */
    if (!(h->seq & 1))
        locked_seq_bump(t);

    if (hw > t->nentries)
        hw = t->nentries;
    /* A replace that got as far as marking its new entry USED rolls forward. */
    if (io != 0 && in != 0 && io <= hw && in <= hw && io != in &&
        entry_at(t, in - 1)->link == LINK_USED && entry_at(t, io - 1)->link == LINK_USED)
        STORE(entry_at(t, io - 1)->link, LINK_BUSY);
    STORE(h->intent_new, (uint64_t)0);
    STORE(h->intent_old, (uint64_t)0);
    for (i = 0; i < t->nslots; i++)
        slot_store(t, i, 0);
    STORE(h->free_head, (uint64_t)0);
    STORE(h->count, (uint64_t)0);
    STORE(h->high_water, hw);
    /* Walk down, so the rebuilt free list hands out low entry numbers first. */
    for (n = hw; n-- > 0;) {
        struct shmkv_entry *e = entry_at(t, n);
        int keep = e->link == LINK_USED && e->key_len <= t->key_size &&
                   e->value_len <= t->value_size && h->count < t->capacity;

        if (keep) {
            const char *key = (const char *)entry_key(e);
            uint64_t hash = hash_key(t, key, e->key_len), slot;
            struct shmkv_entry *dup;

            /* A key stored twice can only come from corruption: keep one copy. */
            if (locked_find(t, hash, key, e->key_len, &slot, &dup) == SHMKV_ENOTFOUND) {
                slot_store(t, slot, MAKE_SLOT(hash, n));
                STORE(h->count, h->count + 1);
                /* A set_many that died left its pins: they become plain uses. */
                if (e->referenced > REF_USED)
                    e->referenced = REF_USED;
                if (e->expires != 0 && (next == 0 || e->expires < next))
                    next = e->expires;
            } else {
                keep = 0;
            }
        }
        if (!keep)
            locked_free(t, e);
    }
    STORE(h->next_expiry, next);
    h->purge_cursor = 0;
    h->turn_min = 0;
    if (h->clock_hand >= t->nentries)
        h->clock_hand = 0;
    locked_seq_bump(t);
}

/* Takes the lock (as a writer if write) and looks up op's key, already hashed: 0 or
 * SHMKV_ENOTFOUND with the lock held, any other code without it. */
static int lock_and_lookup(shmkv_t *t, struct op *op, const char *key, uint32_t klen,
                           int write)
{
    int rc = shmkv__lock(t, write == FOR_WRITE ? 0 : LOCK_READ_ONLY);

    if (rc != SHMKV_OK)
        return rc;
    rc = locked_lookup(t, op, key, klen, write);
    if (rc != SHMKV_OK && rc != SHMKV_ENOTFOUND)
        shmkv__unlock(t);
    return rc;
}

/* Returns 0 (key found) or SHMKV_ENOTFOUND with the lock held; any other code without it.
 * vlen is the length of the value the operation may store (0 if none); write says whether
 * the operation may change the table (see locked_lookup). */
static int begin_op(shmkv_t *t, const char *key, uint32_t klen, uint32_t vlen, int write,
                    struct op *op)
{

    if (t == NULL)
        return SHMKV_ECLOSED;
    if (klen > t->key_size)
        return SHMKV_EKEYSIZE;
    if (vlen > t->value_size)
        return SHMKV_EVALUESIZE;
    op_start(op, hash_key(t, key, klen));
    return lock_and_lookup(t, op, key, klen, write);
}

static int end_op(shmkv_t *t, int rc)
{
    DEBUG_CHECK(t);
    FAULT_POINT();
    shmkv__unlock(t);
    return rc;
}

/* Sets rc from begin_op() and returns it at once unless the lock is held. */
#define BEGIN_OP(t, key, klen, vlen, write, op)                                        \
    do {                                                                               \
        rc = begin_op((t), (key), (klen), (vlen), (write), (op));                      \
        if (rc != SHMKV_OK && rc != SHMKV_ENOTFOUND)                                   \
            return rc;                                                                 \
    } while (0)

/* Copies e's value into out (if any) and returns its length. The length is read once and
 * checked again, so that even a writer that ignores the lock cannot make it overrun. */
static int copy_value(const shmkv_t *t, struct shmkv_entry *e, char *out, uint32_t outcap)
{
    uint32_t vlen = __atomic_load_n(&e->value_len, __ATOMIC_RELAXED);

    if (vlen > t->value_size)
        return SHMKV_ECORRUPT;
    if (out != NULL) {
        if (vlen > outcap)
            return SHMKV_EBUFSIZE;
        if (vlen > 0)
            memcpy(out, entry_value(t, e), vlen);
    }
    return (int)vlen;
}

/* Optimistic tries of a read before it takes the lock: enough to ride out a few writers,
 * few enough that a writer that died mid-write (seq left odd) costs a reader microseconds
 * before it takes the lock, whose recovery mends the table and seq. */
#define OPTIMISTIC_TRIES 64

/* Counts a read of a value (out != NULL): a hit marks the entry used, for eviction. */
static void count_read(shmkv_t *t, int rc, struct shmkv_entry *e)
{
    uint64_t *pending;

    if (t->observer)
        return;
    forget_if_forked(t);
    if (rc >= 0) {
        pending = &t->pending_hits;
        mark_used(t, e);
    } else if (rc == SHMKV_ENOTFOUND) {
        pending = &t->pending_misses;
    } else {
        return;
    }
    if (__atomic_add_fetch(pending, 1, __ATOMIC_RELAXED) >= PENDING_FLUSH)
        flush_pending(t);
}

/* One optimistic read (LOCKING): looks key up and copies its value out without the lock,
 * then checks that no writer ran meanwhile. Returns 1 with the result in *rc if the read
 * stands, 0 if a writer ran or is running and it must be tried again. The lookup only
 * reads, bounds-checks everything it reads and walks at most nslots slots, so a writer
 * running meanwhile can make it see stale or mixed data, never make it read outside the
 * table or loop; the sequence check then throws such a read away. */
static int optimistic_get(shmkv_t *t, struct op *op, const char *key, uint32_t klen,
                          char *out, uint32_t outcap, int *rc)
{
    uint64_t seq = __atomic_load_n(&t->hdr->seq, __ATOMIC_ACQUIRE);
    int found;

    if (seq & 1)
        return 0;
    found = locked_lookup(t, op, key, klen, OPTIMISTIC);
    if (found == SHMKV_OK)
        found = copy_value(t, op->e, out, outcap);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (__atomic_load_n(&t->hdr->seq, __ATOMIC_RELAXED) != seq)
        return 0;
    *rc = found;
    return 1;
}

int shmkv_get(shmkv_t *t, const char *key, uint32_t klen, char *out, uint32_t outcap)
{
    ENTER(t);
    struct op op;
    int rc, tries;

    if (t == NULL)
        return SHMKV_ECLOSED;
    if (klen > t->key_size)
        return SHMKV_EKEYSIZE;
    op_start(&op, hash_key(t, key, klen));
    /* A broken table keeps seq odd (lock.c), so its reads end up at the lock, which says so. */
    for (tries = 0; tries < OPTIMISTIC_TRIES; tries++) {
        if (optimistic_get(t, &op, key, klen, out, outcap, &rc)) {
            if (out != NULL)
                count_read(t, rc, op.e);
            return rc;
        }
        op.now = 0;
    }
    /* Arguments checked and key hashed already: only the lock is left to take. */
    rc = lock_and_lookup(t, &op, key, klen, FOR_READ);
    if (rc != SHMKV_OK && rc != SHMKV_ENOTFOUND)
        return rc;
    if (rc == SHMKV_OK)
        rc = copy_value(t, op.e, out, outcap);
    if (out != NULL)
        count_read(t, rc, op.e);
    shmkv__unlock(t);
    return rc;
}

int shmkv_put(shmkv_t *t, const char *key, uint32_t klen, const char *value, uint32_t vlen,
              int flags, uint64_t ttl_ns)
{
    ENTER(t);
    struct op op;
    int rc;

    BEGIN_OP(t, key, klen, vlen, FOR_WRITE, &op);
    if (rc == SHMKV_ENOTFOUND) {
        rc = locked_insert(t, &op, key, klen, value, vlen, op_deadline(&op, ttl_ns));
        if (rc == SHMKV_OK)
            rc = op.evicted ? SHMKV_INSERTED | SHMKV_EVICTED : SHMKV_INSERTED;
    } else if (flags & SHMKV_PUT_IF_ABSENT) {
        rc = SHMKV_NOT_STORED;
    } else {
        rc = locked_replace(t, &op, key, klen, value, vlen,
                            flags & SHMKV_KEEP_TTL ? op.e->expires : op_deadline(&op, ttl_ns));
        if (rc == SHMKV_OK)
            rc = SHMKV_REPLACED;
    }
    return end_op(t, rc);
}

int shmkv_setdefault(shmkv_t *t, const char *key, uint32_t klen, const char *value,
                     uint32_t vlen, char *out, uint32_t outcap)
{
    ENTER(t);
    struct op op;
    int rc;

    BEGIN_OP(t, key, klen, vlen, FOR_WRITE, &op);
    if (rc == SHMKV_ENOTFOUND) {
        /* Refuse before inserting: on error the table stays as it was. */
        rc = out != NULL && vlen > outcap ? SHMKV_EBUFSIZE
                                          : locked_insert(t, &op, key, klen, value, vlen, 0);
    } else {
        mark_used(t, op.e);
    }
    if (rc == SHMKV_OK)
        rc = copy_value(t, op.e, out, outcap);
    return end_op(t, rc);
}

int shmkv_pop(shmkv_t *t, const char *key, uint32_t klen, char *out, uint32_t outcap)
{
    ENTER(t);
    struct op op;
    int rc, len;

    BEGIN_OP(t, key, klen, 0, FOR_WRITE, &op);
    if (rc == SHMKV_OK) {
        len = copy_value(t, op.e, out, outcap);
        rc = len < 0 ? len : locked_remove(t, op.slot, op.e);
        if (rc == SHMKV_OK) {
            t->hdr->deletes++;
            rc = len;
        }
    }
    return end_op(t, rc);
}

/* Counters are little-endian on every host, so a value means the same to every reader. */
static uint64_t counter_word(int64_t value)
{
    uint64_t v = (uint64_t)value;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static int64_t counter_value(uint64_t word)
{
    return (int64_t)counter_word((int64_t)word);
}

int shmkv_incr(shmkv_t *t, const char *key, uint32_t klen, int64_t delta, int64_t initial,
               uint64_t ttl_ns, int64_t *out)
{
    ENTER(t);
    struct op op;
    int64_t result = 0;
    uint64_t word, *counter;
    int rc;

    /* Counters are 8 bytes: a table whose values are shorter cannot hold one. */
    BEGIN_OP(t, key, klen, 8, FOR_WRITE, &op);
    if (rc == SHMKV_OK) {
        counter = (uint64_t *)(void *)entry_value(t, op.e);
        if (op.e->value_len != 8)
            rc = SHMKV_ENOTCOUNTER;
        else if (__builtin_add_overflow(
                     counter_value(__atomic_load_n(counter, __ATOMIC_RELAXED)), delta, &result))
            rc = SHMKV_EOVERFLOW;
        else {
            /* The value is 8-aligned: one store, so a crash leaves the old or the new count. */
            STORE(*counter, counter_word(result));
            t->hdr->updates++;
            mark_used(t, op.e);
        }
    } else if (__builtin_add_overflow(initial, delta, &result)) {
        rc = SHMKV_EOVERFLOW;
    } else {
        word = counter_word(result);
        rc = locked_insert(t, &op, key, klen, (const char *)&word, 8,
                           op_deadline(&op, ttl_ns));
    }
    if (rc == SHMKV_OK)
        *out = result;
    return end_op(t, rc);
}

int shmkv_compare_and_swap(shmkv_t *t, const char *key, uint32_t klen, const char *expected,
                           uint32_t elen, const char *value, uint32_t vlen, int flags,
                           uint64_t ttl_ns)
{
    ENTER(t);
    struct op op;
    int rc;

    BEGIN_OP(t, key, klen, vlen, FOR_WRITE, &op);
    if (rc == SHMKV_ENOTFOUND || op.e->value_len != elen ||
        (elen > 0 && memcmp(entry_value(t, op.e), expected, elen) != 0))
        rc = 0;
    else {
        rc = locked_replace(t, &op, key, klen, value, vlen,
                            flags & SHMKV_KEEP_TTL ? op.e->expires : op_deadline(&op, ttl_ns));
        if (rc == SHMKV_OK)
            rc = 1;
    }
    return end_op(t, rc);
}

int shmkv_expire(shmkv_t *t, const char *key, uint32_t klen, uint64_t ttl_ns, int flags)
{
    ENTER(t);
    struct op op;
    uint64_t d;
    int rc;

    BEGIN_OP(t, key, klen, 0, FOR_WRITE, &op);
    if (rc == SHMKV_OK) {
        d = op_deadline(&op, ttl_ns);
        locked_note_deadline(t, d);
        /* One aligned store: a crash leaves the old deadline or the new one. */
        STORE(op.e->expires, d);
        if (flags & SHMKV_TOUCH)
            mark_used(t, op.e);
        rc = 1;
    } else {
        rc = 0;
    }
    return end_op(t, rc);
}

int shmkv_ttl(shmkv_t *t, const char *key, uint32_t klen, uint64_t *left)
{
    ENTER(t);
    struct op op;
    uint64_t d;
    int rc;

    if (left == NULL)
        return SHMKV_EARG;
    BEGIN_OP(t, key, klen, 0, FOR_READ, &op);
    if (rc == SHMKV_OK) {
        /* Not expired, so a deadline lies ahead of op_now(), read by the lookup already. */
        d = __atomic_load_n(&op.e->expires, __ATOMIC_RELAXED);
        *left = d == 0 ? 0 : d - op_now(&op);
    }
    shmkv__unlock(t);
    return rc;
}

int64_t shmkv_purge_expired(shmkv_t *t)
{
    ENTER(t);
    int64_t purged = 0;
    struct op op;
    int rc = lock_table(t, 0);

    if (rc != SHMKV_OK)
        return rc;
    op_start(&op, 0);
    if (op_expiry_due(t, &op))
        purged = locked_purge(t, op.now);
    end_op(t, SHMKV_OK);
    return purged;
}

int shmkv_clear(shmkv_t *t)
{
    ENTER(t);
    struct shmkv_header *h;
    uint64_t i;
    int rc;

    rc = lock_table(t, 0);
    if (rc != SHMKV_OK)
        return rc;
    h = t->hdr;
    /* The commit point: with no entry below high_water, a rebuild yields an empty table. */
    STORE(h->high_water, (uint64_t)0);
    STORE(h->free_head, (uint64_t)0);
    for (i = 0; i < t->nslots; i++)
        slot_store(t, i, 0);
    STORE(h->count, (uint64_t)0);
    STORE(h->next_expiry, (uint64_t)0);
    h->clock_hand = 0;
    h->purge_cursor = 0;
    h->turn_min = 0;
    return end_op(t, SHMKV_OK);
}

int64_t shmkv_len(shmkv_t *t)
{
    ENTER(t);
    int64_t n = 0;
    struct op op;
    int rc;

    /* Expired entries are not counted: reclaim them first, if next_expiry says any exist.
     * Only then is len() a writer; otherwise it leaves seq, and so the readers, alone. */
    op_start(&op, 0);
    rc = lock_table(t, LOCK_READ_ONLY);
    if (rc == SHMKV_OK && op_expiry_due(t, &op)) {
        shmkv__unlock(t);
        rc = lock_table(t, 0);
        if (rc == SHMKV_OK && op_expiry_due(t, &op))
            n = locked_purge(t, op.now);
    }
    if (rc != SHMKV_OK)
        return rc;
    if (n >= 0)
        n = t->hdr->count > t->capacity ? SHMKV_ECORRUPT : (int64_t)t->hdr->count;
    end_op(t, SHMKV_OK);
    return n;
}

int shmkv_get_many(shmkv_t *t, uint32_t n, const char *keys, const uint32_t *klens,
                   char *out, uint64_t outcap, int64_t *vlens, uint64_t *needed)
{
    ENTER(t);
    uint64_t hits = 0, misses = 0, used = 0, off = 0;
    uint32_t i;
    struct op op;
    int rc;

    if (t == NULL)
        return SHMKV_ECLOSED;
    /* Hash before locking, parking each hash in vlens until its length replaces it, and ask
     * for each key's home slot ahead of time. */
    for (i = 0; i < n; i++) {
        if (klens[i] > t->key_size)
            return SHMKV_EKEYSIZE;
        vlens[i] = (int64_t)hash_key(t, keys + off, klens[i]);
        __builtin_prefetch(&t->index[(uint64_t)vlens[i] & t->mask]);
        off += klens[i];
    }
    rc = lock_table(t, LOCK_READ_ONLY);
    if (rc != SHMKV_OK)
        return rc;
    /* Then ask for the entry each home slot names: the batch's cache misses overlap instead
     * of coming one after another, which is most of what a batch saves. Hints only. */
    for (i = 0; i < n; i++) {
        uint64_t s = slot_load(t, (uint64_t)vlens[i] & t->mask);

        if (s != 0 && SLOT_ENTRY(s) - 1u < t->nentries)
            __builtin_prefetch(entry_at(t, SLOT_ENTRY(s) - 1));
    }
    op_start(&op, 0);
    for (i = 0, off = 0; i < n && rc == SHMKV_OK; off += klens[i], i++) {
        int found;

        op.hash = (uint64_t)vlens[i];
        found = locked_lookup(t, &op, keys + off, klens[i], FOR_READ);
        if (found == SHMKV_ENOTFOUND) {
            vlens[i] = -1;
            misses++;
        } else if (found != SHMKV_OK) {
            rc = found;
        } else {
            uint32_t vlen = __atomic_load_n(&op.e->value_len, __ATOMIC_RELAXED);

            if (vlen > t->value_size) {
                rc = SHMKV_ECORRUPT;
                break;
            }
            if (vlen > 0 && used + vlen <= outcap)
                memcpy(out + used, entry_value(t, op.e), vlen);
            vlens[i] = vlen;
            used += vlen;
            hits++;
            if (!t->observer)
                mark_used(t, op.e);
        }
    }
    if (rc == SHMKV_OK && used > outcap)
        rc = SHMKV_EBUFSIZE;
    if (rc == SHMKV_OK && !t->observer) {
        __atomic_fetch_add(&t->hdr->hits, hits, __ATOMIC_RELAXED);
        __atomic_fetch_add(&t->hdr->misses, misses, __ATOMIC_RELAXED);
    }
    shmkv__unlock(t);
    if (needed != NULL)
        *needed = used;
    return rc;
}

/* set_many pins every key of its batch while it runs (see locked_evict), so that the
 * evictions its inserts make never take a key of the batch, stored or still to be stored.
 * A pin record says which entry is pinned and the bit it gets back at the end: entry number
 * + 1 in the low 32 bits, the bit above them; 0 means no pin. */
static uint64_t locked_pin(struct shmkv_entry *e, uint64_t entry_no, uint32_t restore)
{
    __atomic_store_n(&e->referenced, REF_PINNED, __ATOMIC_RELAXED);
    return (entry_no + 1) | ((uint64_t)restore << 32);
}

static void locked_unpin(shmkv_t *t, const uint64_t *pins, uint32_t n)
{
    uint32_t i;

    for (i = 0; i < n; i++)
        if (pins[i] != 0)
            __atomic_store_n(&entry_at(t, (uint32_t)pins[i] - 1)->referenced,
                             (uint32_t)(pins[i] >> 32), __ATOMIC_RELAXED);
}

int shmkv_set_many(shmkv_t *t, uint32_t n, const char *keys, const uint32_t *klens,
                   const char *values, const uint32_t *vlens, uint64_t ttl_ns,
                   uint64_t *scratch)
{
    ENTER(t);
    uint64_t koff = 0, voff = 0, fresh = 0, expires;
    uint64_t *hashes = scratch, *pins = scratch + n;
    uint32_t i;
    struct op op;
    int rc;

    if (t == NULL)
        return SHMKV_ECLOSED;
    for (i = 0; i < n; koff += klens[i], i++) {
        if (klens[i] > t->key_size)
            return SHMKV_EKEYSIZE;
        if (vlens[i] > t->value_size)
            return SHMKV_EVALUESIZE;
        hashes[i] = hash_key(t, keys + koff, klens[i]);
        pins[i] = 0;
    }
    rc = lock_table(t, 0);
    if (rc != SHMKV_OK)
        return rc;
    op_start(&op, 0);
    expires = op_deadline(&op, ttl_ns);
    /* First pass: all or nothing, so count the keys that would be new before storing any.
     * Expired entries met on the way are reclaimed: they were invisible already. */
    for (i = 0, koff = 0; i < n && rc == SHMKV_OK; koff += klens[i], i++) {
        int found;

        op.hash = hashes[i];
        found = locked_lookup(t, &op, keys + koff, klens[i], FOR_WRITE);
        if (found == SHMKV_ENOTFOUND)
            fresh++;
        else if (found != SHMKV_OK)
            rc = found;
        else if (t->evict && op.e->referenced != REF_PINNED)  /* a key given twice: once */
            pins[i] = locked_pin(op.e, entry_number(t, op.e), op.e->referenced);
    }
    if (rc == SHMKV_OK)
        rc = locked_reclaim(t, &op, fresh);
    /* An evicting table makes room as it goes, never evicting a pinned key of the batch: so
     * the batch itself must fit. */
    if (rc == SHMKV_OK && t->hdr->count + fresh > t->capacity &&
        (!t->evict || n > t->capacity))
        rc = SHMKV_EFULL;
    /* Second pass: the stores. A stored key's new entry is pinned in its turn, to be left
     * used if the key was overwritten and cold if it is new, as single stores leave them. */
    op.referenced = t->evict ? REF_PINNED : REF_COLD;
    for (i = 0, koff = 0; i < n && rc == SHMKV_OK; koff += klens[i], voff += vlens[i], i++) {
        const char *key = keys + koff, *value = values + voff;

        op.hash = hashes[i];
        rc = locked_lookup(t, &op, key, klens[i], FOR_WRITE);
        if (rc == SHMKV_OK)
            rc = locked_replace(t, &op, key, klens[i], value, vlens[i], expires);
        else if (rc == SHMKV_ENOTFOUND)
            rc = locked_insert(t, &op, key, klens[i], value, vlens[i], expires);
        if (rc == SHMKV_OK && t->evict)
            pins[i] = (entry_number(t, op.e) + 1) |
                      ((uint64_t)(pins[i] != 0 ? REF_USED : REF_COLD) << 32);
    }
    locked_unpin(t, pins, n);
    return end_op(t, rc);
}

static void put_u32(char *p, uint32_t v)
{
    memcpy(p, &v, sizeof v);
}

int64_t shmkv_snapshot(shmkv_t *t, int with_values, char *out, uint64_t outcap,
                       uint64_t *needed)
{
    ENTER(t);
    uint64_t n, hw, used = 0;
    int64_t records = 0;
    struct op op;
    int rc;

    rc = lock_table(t, LOCK_READ_ONLY);
    if (rc != SHMKV_OK)
        return rc;
    op_start(&op, 0);
    hw = t->hdr->high_water;
    if (hw > t->nentries)
        rc = SHMKV_ECORRUPT;
    /* In pool order: roughly insertion order, and stable for keys not written meanwhile. */
    for (n = 0; n < hw && rc == SHMKV_OK; n++) {
        struct shmkv_entry *e = entry_at(t, n);
        uint32_t klen = __atomic_load_n(&e->key_len, __ATOMIC_RELAXED);
        uint32_t vlen = __atomic_load_n(&e->value_len, __ATOMIC_RELAXED);
        uint64_t size;

        if (e->link != LINK_USED || op_expired(&op, e))
            continue;
        if (klen > t->key_size || vlen > t->value_size) {
            rc = SHMKV_ECORRUPT;
            break;
        }
        size = 4 + (uint64_t)klen + (with_values ? 4 + (uint64_t)vlen : 0);
        if (out != NULL && used + size <= outcap) {
            put_u32(out + used, klen);
            memcpy(out + used + 4, entry_key(e), klen);
            if (with_values) {
                put_u32(out + used + 4 + klen, vlen);
                memcpy(out + used + 8 + klen, entry_value(t, e), vlen);
            }
        }
        used += size;
        records++;
    }
    shmkv__unlock(t);
    if (rc != SHMKV_OK)
        return rc;
    if (needed != NULL)
        *needed = used;
    return used > outcap ? SHMKV_EBUFSIZE : records;
}

static void read_stats(const shmkv_t *t, struct shmkv_stats *out)
{
    const struct shmkv_header *h = t->hdr;

    memset(out, 0, sizeof *out);
    /* From the handle's validated copy, not the segment: shmkv_layout() cannot fail here. */
    shmkv_layout(t->capacity, t->key_size, t->value_size, &out->geometry);
#define READ(field) __atomic_load_n(&h->field, __ATOMIC_RELAXED)
    out->version = READ(version);
    out->creator_pid = READ(creator_pid);
    out->count = READ(count);
    out->high_water = READ(high_water);
    out->hits = READ(hits);
    out->misses = READ(misses);
    out->inserts = READ(inserts);
    out->updates = READ(updates);
    out->deletes = READ(deletes);
    out->evictions = READ(evictions);
    out->expirations = READ(expirations);
    out->recoveries = READ(recoveries);
    out->lock_timeouts = READ(lock_timeouts);
    out->broken = READ(broken);
#undef READ
}

int shmkv_stats(shmkv_t *t, struct shmkv_stats *out)
{
    ENTER(t);
    int rc;

    if (out == NULL)
        return SHMKV_EARG;
    rc = lock_table(t, LOCK_EVEN_BROKEN | LOCK_READ_ONLY);
    if (rc != SHMKV_OK)
        return rc;
    flush_pending(t);
    read_stats(t, out);
    shmkv__unlock(t);
    return SHMKV_OK;
}

int shmkv_peek_stats(shmkv_t *t, struct shmkv_stats *out)
{
    ENTER(t);
    if (t == NULL)
        return SHMKV_ECLOSED;
    if (out == NULL)
        return SHMKV_EARG;
    flush_pending(t);
    read_stats(t, out);
    return SHMKV_OK;
}

int shmkv_table_flags(shmkv_t *t)
{
    ENTER(t);
    return t == NULL ? SHMKV_ECLOSED : t->evict ? SHMKV_EVICT : 0;
}

int shmkv_geometry(shmkv_t *t, struct shmkv_geometry *out)
{
    ENTER(t);
    if (t == NULL)
        return SHMKV_ECLOSED;
    if (out == NULL)
        return SHMKV_EARG;
    return shmkv_layout(t->capacity, t->key_size, t->value_size, out);
}

int shmkv_check(shmkv_t *t, int *invariant)
{
    ENTER(t);
    int rc, dummy;

    if (invariant == NULL)
        invariant = &dummy;
    *invariant = 0;
    rc = lock_table(t, LOCK_EVEN_BROKEN | LOCK_READ_ONLY);
    if (rc != SHMKV_OK)
        return rc;
    rc = locked_check(t, invariant);
    shmkv__unlock(t);
    return rc;
}

int shmkv_testing_hold_lock(shmkv_t *t, int hold)
{
    ENTER(t);
    if (t == NULL)
        return SHMKV_ECLOSED;
    if (hold)
        return shmkv__lock(t, LOCK_EVEN_BROKEN | (hold == 2 ? LOCK_READ_ONLY : 0));
    shmkv__unlock(t);
    return SHMKV_OK;
}

/* The robust-futex word's thread id (the kernel's ABI: the low 30 bits), -1 off glibc. */
static int64_t lock_owner_tid(const shmkv_t *t)
{
#ifdef __GLIBC__
    return (int64_t)(__atomic_load_n(&t->hdr->lock.__data.__lock, __ATOMIC_RELAXED) &
                     0x3fffffff);
#else
    (void)t;
    return -1;
#endif
}

int64_t shmkv_lock_owner(shmkv_t *t)
{
    ENTER(t);
    return lock_owner_tid(t);
}

int64_t shmkv_probe_lengths(shmkv_t *t, uint64_t *hist, uint32_t n)
{
    ENTER(t);
    uint64_t i, longest = 0;
    int rc;

    if (hist == NULL || n == 0)
        return SHMKV_EARG;
    rc = lock_table(t, LOCK_EVEN_BROKEN | LOCK_READ_ONLY);
    if (rc != SHMKV_OK)
        return rc;
    memset(hist, 0, n * sizeof *hist);
    for (i = 0; i < t->nslots; i++) {
        uint64_t s = slot_load(t, i), probes;

        if (s == 0)
            continue;
        probes = ((i - (SLOT_TAG(s) & t->mask)) & t->mask) + 1;
        hist[probes < n ? probes - 1 : n - 1]++;
        if (probes > longest)
            longest = probes;
    }
    shmkv__unlock(t);
    return (int64_t)longest;
}

int shmkv_lock_holder(shmkv_t *t, struct shmkv_lock_holder *out)
{
    ENTER(t);
    uint64_t ns;

    if (out == NULL)
        return SHMKV_EARG;
    out->tid = lock_owner_tid(t);
    ns = __atomic_load_n(&t->hdr->holder_pidns, __ATOMIC_RELAXED);
    out->pid = __atomic_load_n(&t->hdr->holder_pid, __ATOMIC_RELAXED);
    out->same_pidns = ns == 0 || shmkv__pidns() == 0 ? -1 : ns == shmkv__pidns();
    return SHMKV_OK;
}

int shmkv_testing_flip_seq(shmkv_t *t)
{
    ENTER(t);
    __atomic_fetch_xor(&t->hdr->seq, (uint64_t)1, __ATOMIC_SEQ_CST);
    return SHMKV_OK;
}
