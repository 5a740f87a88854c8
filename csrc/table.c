/* table.c -- the shmkv hash table: one shared-memory segment, mapped by several processes at
 * different addresses, and every operation on it, each complete in one call under the
 * table's process-shared robust mutex (lock.c) or, for a get, without it.
 *
 * SEGMENT LAYOUT
 *
 *   0                  index_offset             data_offset                        total_size
 *   +------------------+------------------------+-----------------------------------+
 *   | header           | index                  | data area                         |
 *   | identity,        | nslots x u64 slots,    | blocks of 16-byte units, each an  |
 *   | geometry, seed,  | nslots a power of two  | entry (header, key, value) or     |
 *   | state, counters, | > 1.5 x capacity       | free room; they tile the area     |
 *   | free lists, lock | (index.c)              | (alloc.c)                         |
 *   +------------------+------------------------+-----------------------------------+
 *   (each region starts on a 64-byte line; struct shmkv_header in layout.h lists the fields)
 *
 *   slot (u64):   | low 32 bits of hash(key) : 32 | unit of the entry's block + 1 : 32 |
 *   block:        | size u32 | prev_size u32 | state u32 | referenced u32 |
 *                 | key_len u32 | value_len u32 | expires u64 |   (32 bytes, struct shmkv_block)
 *                 | key bytes, padded to 8 | value bytes | padding to 16 |
 *
 * Offsets only, never pointers: each process maps the segment at its own address, and every
 * position is a slot number or a unit of the data area, turned into an address through the
 * handle. capacity bounds the keys (it sizes the index); key_size and value_size bound one
 * entry; the data area holds entries by their real size, so its size, not capacity, bounds
 * the bytes: `memory` caps the whole segment (handle.c says how the default is sized). A
 * get touches the slot's line and the entry's lines, as a fixed-size pool would: the key and
 * the value sit right after the block header.
 *
 * INVARIANTS (check.c and alloc.c verify each by number; shmkv_invariant_text() has the same
 * words)
 *   1. The header matches this build: magic, format version, layout signature, and a geometry
 *      that shmkv_layout() recomputes from capacity, key_size, value_size and memory.
 *   2. count <= capacity.
 *   3. Every used slot names a USED block whose lengths are within key_size and value_size
 *      and whose key and value lie inside it.
 *   4. A used slot's tag is the low 32 bits of the hash of its block's key.
 *   5. Every used slot is found by looking up its own key: no empty slot between its home and
 *      it, and no equal key earlier in the chain (no key is stored twice).
 *   6. No block is named by two slots.
 *   7. The used slots, the USED blocks and count are the same number, and every USED block
 *      is named by a slot.
 *   8. The blocks tile the data area (alloc.c): sizes chain from unit 0 to its end, prev_size
 *      matches, no block is BUSY and no two free blocks are adjacent while the lock is free;
 *      the purge cursor and the clock hand name block starts.
 *   9. No intent, move, clear or pin is recorded while the lock is free, and seq is odd
 *      exactly while a writer holds it.
 *  10. At least one slot is empty (nslots > capacity), so every probe terminates.
 *  11. next_expiry is at or below the deadline of every USED block that has one (and so is
 *      not 0 if any has one), and so is turn_min for those below purge_cursor: no expired
 *      entry escapes the purge that next_expiry starts, and a turn's end sets it right.
 *  12. The free lists hold every free block once, in its size's list, correctly linked, with
 *      the bitmap in step; free_units and stored_bytes are the sums of the blocks.
 *
 * LOCKING
 * Every write runs under the robust, process-shared pthread mutex in the header (lock.c);
 * shmkv__lock() below adds recovery (recover.c) and the sequence word. Hashing and argument
 * checks happen before taking it. Functions named locked_* expect the lock held, except that
 * optimistic readers run the lookup (index_find, copy_value), which only reads, bounds every
 * walk and checks every length and unit it reads.
 * A get reads optimistically, without the lock: it reads seq (even), looks the key up,
 * copies the value out, and reads seq again; if seq moved, a writer ran and the read starts
 * over. Every writer makes seq odd after taking the lock and even before releasing it
 * (locked_seq_bump), so readers neither block each other nor writers, and never return a
 * torn value, or one that compaction is moving (alloc.c evens seq between moves, so that a
 * long compaction holds readers up one move at a time). After OPTIMISTIC_TRIES failed tries
 * a reader takes the lock like a writer: a writer that died left seq odd, and the lock's
 * recovery evens it; a table found broken keeps seq odd for good, so that its readers meet
 * the lock and its error. Readers count hits and misses in their handle and add them to the
 * header now and then (PENDING_FLUSH), so that they write no shared line; a forked child
 * forgets the counts its parent had pending. Other reads (get_many, iteration, ttl, stats)
 * take the lock but leave seq alone (LOCK_READ_ONLY). Lock waits time out
 * (SHMKV_ELOCKTIMEOUT) instead of hanging behind a stopped process. Whoever takes the lock
 * and finds seq odd on a table that is not broken mends it (locked_mend_seq): only damage,
 * such as a flipped bit, makes it odd while the lock is free, and a writer that bumped it to
 * even would then write with readers trusting it.
 *
 * RECOVERY is recover.c's; each mutation below lists its stores in the order recover.c
 * relies on. EXPIRY is expiry.c's, EVICTION evict.c's.
 *
 * FORMAT
 * Version 5 (SHMKV_FORMAT_VERSION): entries are blocks of a data area sized by their
 * contents; version 4 kept a pool of fixed-size entries. Two builds of different versions
 * refuse each other's tables (SHMKV_EINCOMPATIBLE, "format version ..."). The header starts
 * with the magic "SHMKVTB1", the format version and a layout signature that folds in the
 * version and the sizes of the header, the block and pthread_mutex_t, so two builds that
 * would disagree about the layout refuse to share a table. The ready flag is written last (a
 * release store) and read first, so an attacher never sees half a header. Every length, unit
 * and link read from the segment is bounds-checked against the handle's copy of the geometry
 * before use: a corrupted segment yields SHMKV_ECORRUPT, not a crash.
 *
 * REJECTED ALTERNATIVES
 *   - Fixed-size entries (versions 1 to 4): every entry reserved key_size + value_size, so a
 *     table for the occasional 64 KiB value took 64 KiB per 300-byte session.
 *   - Size classes (memcached's slabs, nginx's power-of-two slab): room freed in one class
 *     serves no other, so a workload whose sizes drift runs out of room with most of it free
 *     (calcification), and rounding up wastes up to 25 % or 50 %.
 *   - Values split into chained fixed chunks: no fragmentation at all, but a get follows a
 *     chain of lines instead of reading one run of bytes.
 *   - A key's header in a fixed pool with its value elsewhere: one more cache miss per get.
 *   - Tombstones: a delete-heavy workload fills the index with them and every miss scans it.
 *   - Robin Hood insertion: moves many slots per insert, widening the crash window; linear
 *     probing at load <= 2/3 already keeps chains short.
 *   - Overwriting values in place: a crash halfway would leave a torn value.
 *   - An LRU list threaded through the entries: every read would write two neighbours'
 *     links, under the lock, and a crash could cut the list; CLOCK's bit is a hint that
 *     needs no repair. Sampling a few random keys, as Redis does, needs no hand but evicts
 *     worse at small sample sizes and is harder to test deterministically.
 *   - A heap or timer wheel of deadlines: exact and incremental, but more shared state to
 *     keep crash-safe. The purge's turns cost one walk of the blocks per turn, shared by the
 *     inserts of that turn, and purge_expired() lets a master take them off the request path.
 */
#include <stdlib.h>

#include "layout.h"

#ifdef SHMKV_DEBUG
/* Debug builds verify every invariant after every mutation and abort if the mutation broke a
 * table that was sound when the lock was taken (noted in t->debug_sound). A table that was
 * damaged before, as the corruption tests make them, is not our code's doing. The check
 * walks the whole table, so tables of more than DEBUG_CHECK_MAX_SLOTS index slots are left
 * out: the suite's big tables would take minutes, and small ones cover every path. */
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
    case SHMKV_EFULL: return "table is full: it holds as many keys as its capacity";
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
    case SHMKV_ENOROOM: return "table is full: its memory holds no more bytes";
    default: return "unknown error";
    }
}

const char *shmkv_invariant_text(int invariant)
{
    static const char *const texts[] = {
        "no invariant",
        "header matches this build (magic, version, signature, geometry)",
        "count <= capacity",
        "every used slot names a USED block with lengths in range",
        "a slot's tag is the low 32 bits of its key's hash",
        "every used slot is found by looking up its own key (no hole, no duplicate key)",
        "no block is named by two slots",
        "used slots, USED blocks and count agree",
        "the blocks tile the data area (sizes, neighbours, no BUSY or adjacent free blocks)",
        "no intent, move, clear, pin or odd seq while no writer holds the lock",
        "at least one index slot is empty",
        "next_expiry (and turn_min, below the purge cursor) is at or below every live deadline",
        "free lists, bitmap, free and stored byte counts agree with the blocks",
    };
    if (invariant < 0 || invariant >= (int)(sizeof texts / sizeof texts[0]))
        return "unknown invariant";
    return texts[invariant];
}

/* ------------------------------------------------------------------------------------------
 * The table's lock: the mutex (lock.c), recovery (recover.c) and seq
 * ---------------------------------------------------------------------------------------- */

/* A dead owner's table is rebuilt from its blocks, then verified. If the rebuilt table still
 * fails its check, the damage is not a crash's: only corruption can do that, and no rebuild
 * will undo it. The table is then marked broken, once and for all, and every operation but
 * stats and check fails with SHMKV_EBROKEN instead of working on it. */
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

/* Just after the lock is taken, seq is even unless the table is broken (which keeps it odd
 * for good): a holder makes it odd and even again, and a holder that died is met as
 * EOWNERDEAD, whose rebuild evens it. An odd seq here is damage, such as one flipped bit; left
 * alone, every writer would bump it to even and write with it even, and optimistic readers
 * would accept torn values. So a writer that finds it odd keeps it odd (its unlock evens
 * it), and a reader-holder evens it at once (a reader still in its optimistic try sees seq
 * move and tries again). */
static void locked_mend_seq(shmkv_t *t, int broken)
{
    uint64_t seq = __atomic_load_n(&t->hdr->seq, __ATOMIC_RELAXED);

    if (broken) {              /* odd for good: not even a writer's unlock may even it */
        t->writing = 0;
        return;
    }
    if (t->writing) {
        if (!(seq & 1))
            locked_seq_bump(t);
    } else if (seq & 1) {
        __atomic_store_n(&t->hdr->seq, seq + 1, __ATOMIC_RELEASE);
    }
}

/* Takes the table's lock. 0: held, the table repaired if its last owner died. Otherwise the
 * codes of shmkv__mutex_lock(), and SHMKV_EBROKEN for a table marked broken (unless flags
 * has LOCK_EVEN_BROKEN). */
int shmkv__lock(shmkv_t *t, int flags)
{
    int broken, rc = shmkv__mutex_lock(t);

    if (rc < 0)
        return rc;
    if (rc == LOCK_OWNER_DIED) {
        /* The dead owner may have been a thread of this process, using this very handle
         * (a thread that ended holding it): its `writing` is not this holder's. */
        t->writing = 0;
        locked_recover(t);
        rc = shmkv__mutex_consistent(t);
        if (rc != SHMKV_OK)
            return rc;
    }
    broken = __atomic_load_n(&t->hdr->broken, __ATOMIC_ACQUIRE) != 0;
    if (broken && !(flags & LOCK_EVEN_BROKEN)) {
        shmkv__mutex_unlock(t);
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
    locked_mend_seq(t, broken);
    return SHMKV_OK;
}

void shmkv__unlock(shmkv_t *t)
{
    if (t->writing) {
        t->writing = 0;
        locked_seq_bump(t);
    }
    shmkv__mutex_unlock(t);
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

static void op_start(struct op *op, uint64_t hash)
{
    op->hash = hash;
    op->e = NULL;
    op->now = 0;
    op->evicted = 0;
    op->referenced = REF_COLD;
}

/* The deadline ttl_ns from now: 0 (never) for 0, saturating rather than wrapping around. */
static uint64_t op_deadline(struct op *op, uint64_t ttl_ns)
{
    uint64_t d;

    if (ttl_ns == 0)
        return 0;
    return __builtin_add_overflow(op_now(op), ttl_ns, &d) ? UINT64_MAX : d;
}

enum { FOR_READ, FOR_WRITE, OPTIMISTIC };  /* locked_lookup()'s and begin_op()'s `write` */

/* Looks key up as an operation sees it: an expired entry is absent. A writer (FOR_WRITE)
 * reclaims the expired entry it meets, so that op->slot is where the key would be inserted;
 * a reader leaves it be. Returns 0, SHMKV_ENOTFOUND or SHMKV_ECORRUPT, as index_find. */
static int locked_lookup(shmkv_t *t, struct op *op, const char *key, uint32_t klen, int write)
{
    int rc = index_find(t, op->hash, key, klen, &op->slot, &op->e);

    if (rc != SHMKV_OK || !op_expired(op, op->e))
        return rc;
    if (write != FOR_WRITE)
        return SHMKV_ENOTFOUND;
    rc = locked_remove(t, op->slot, op->e);
    if (rc != SHMKV_OK)
        return rc;
    t->hdr->expirations++;
    op->e = NULL;
    rc = index_find(t, op->hash, key, klen, &op->slot, &op->e);
    return rc == SHMKV_OK ? SHMKV_ECORRUPT : rc;  /* a key stored twice */
}

/* Finds op's key again after making room moved slots (removals shift them) or blocks
 * (compaction): `present` says whether it must be there. */
static int locked_refind(shmkv_t *t, struct op *op, const char *key, uint32_t klen,
                         int present)
{
    int rc = index_find(t, op->hash, key, klen, &op->slot, &op->e);

    if (rc == (present ? SHMKV_OK : SHMKV_ENOTFOUND))
        return SHMKV_OK;
    return rc == SHMKV_OK || rc == SHMKV_ENOTFOUND ? SHMKV_ECORRUPT : rc;
}

/* CLOCK's bit. Only evicting tables keep it, and it is written only when it changes, so a
 * key read over and over does not dirty its cache line each time. A lock-free reader marks
 * after its read stood, by when a writer may have freed, merged or moved the block: b may
 * then point into the middle of another entry's key or value. So the mark is one 8-byte
 * compare-and-swap of the state word and CLOCK's word together, from (USED, cold) to (USED,
 * used): it writes only where a USED block header stood, never into data, and never over a
 * pin. (Data that spells a USED header's eight bytes at a block boundary is the one thing it
 * could mistake, and would only be marked used.) */
static inline void mark_used(const shmkv_t *t, struct shmkv_block *b)
{
    typedef uint64_t __attribute__((may_alias)) word_t;
    const uint32_t cold_pair[2] = {BLOCK_USED, REF_COLD}, used_pair[2] = {BLOCK_USED, REF_USED};
    uint64_t cold, used;

    if (!t->evict || __atomic_load_n(&b->referenced, __ATOMIC_RELAXED) != REF_COLD)
        return;
    memcpy(&cold, cold_pair, sizeof cold);
    memcpy(&used, used_pair, sizeof used);
    __atomic_compare_exchange_n((word_t *)(void *)&b->state, &cold, used, 0, __ATOMIC_RELAXED,
                                __ATOMIC_RELAXED);
}

int shmkv_testing_mark_used_at(shmkv_t *t, uint64_t offset)
{
    ENTER(t);
    if (t == NULL)
        return SHMKV_ECLOSED;
    if (offset % UNIT != 0 || offset >= t->data_units * UNIT)
        return SHMKV_EARG;
    mark_used(t, (struct shmkv_block *)(t->data + offset));
    return SHMKV_OK;
}

static void fill_block(struct shmkv_block *b, const char *key, uint32_t klen,
                       const char *value, uint32_t vlen, uint64_t expires, uint32_t referenced)
{
    b->key_len = klen;
    b->value_len = vlen;
    b->u.expires = expires;
    b->referenced = referenced;
    if (klen > 0)
        memcpy(block_key(b), key, klen);
    FAULT_POINT();
    if (vlen > 0)
        memcpy((unsigned char *)b + value_offset(klen), value, vlen);
}

/* Takes a block for an entry of klen + vlen bytes, making room first if there is none
 * (evict.c). `keys` is 1 for a new key. For a replace, op->e is the entry being replaced: it
 * is pinned meanwhile, so that eviction spares it, and found again afterwards, since
 * compaction may have moved it. SHMKV_EFULL or SHMKV_ENOROOM if there is no room; nothing
 * visible has changed then but reclaimed expired entries. */
static int locked_take(shmkv_t *t, struct op *op, const char *key, uint32_t klen,
                       uint32_t vlen, uint64_t keys, struct shmkv_block **out)
{
    uint64_t units = entry_units(klen, vlen);
    uint32_t pin = REF_COLD;
    int rc = t->hdr->count + keys > t->capacity ? SHMKV_ENOROOM : alloc_take(t, units, out);

    if (rc != SHMKV_ENOROOM)
        return rc;
    if (!keys) {
        pin = op->e->referenced;
        op->e->referenced = REF_PINNED;
    }
    rc = locked_make_room(t, op, keys, units);
    int found = locked_refind(t, op, key, klen, !keys);

    if (!keys && found == SHMKV_OK)
        op->e->referenced = pin;
    if (rc == SHMKV_OK)
        rc = found;
    return rc == SHMKV_OK ? alloc_take(t, units, out) : rc;
}

/* Inserts an absent key into the empty slot that locked_lookup() returned for it. */
static int locked_insert(shmkv_t *t, struct op *op, const char *key, uint32_t klen,
                         const char *value, uint32_t vlen, uint64_t expires)
{
    struct shmkv_header *h = t->hdr;
    struct shmkv_block *b;
    int rc = locked_take(t, op, key, klen, vlen, 1, &b);

    if (rc != SHMKV_OK)
        return rc;
    locked_note_deadline(t, expires);
    fill_block(b, key, klen, value, vlen, expires, op->referenced);
    STORE(b->state, BLOCK_USED);
    slot_store(t, op->slot, MAKE_SLOT(op->hash, unit_of(t, b)));
    STORE(h->count, h->count + 1);
    h->stored_bytes += (uint64_t)klen + vlen;
    h->inserts++;
    op->e = b;
    return SHMKV_OK;
}

/* Replaces the value of the key in op's slot (block op->e) copy-on-write: the new block is
 * written beside the old one and swapped in with one slot store. An overwrite counts as a
 * use. */
static int locked_replace(shmkv_t *t, struct op *op, const char *key, uint32_t klen,
                          const char *value, uint32_t vlen, uint64_t expires)
{
    struct shmkv_header *h = t->hdr;
    struct shmkv_block *old, *b;
    int rc = locked_take(t, op, key, klen, vlen, 0, &b);

    if (rc != SHMKV_OK)
        return rc;
    old = op->e;
    locked_note_deadline(t, expires);
    fill_block(b, key, klen, value, vlen, expires,
               op->referenced == REF_PINNED ? REF_PINNED : REF_USED);
    STORE(h->intent_old, unit_of(t, old) + 1);
    STORE(h->intent_new, unit_of(t, b) + 1);
    STORE(b->state, BLOCK_USED);
    slot_store(t, op->slot, MAKE_SLOT(op->hash, unit_of(t, b)));
    h->stored_bytes += (uint64_t)vlen - old->value_len;
    alloc_release(t, old);
    STORE(h->intent_new, (uint64_t)0);
    STORE(h->intent_old, (uint64_t)0);
    h->updates++;
    op->e = b;
    return SHMKV_OK;
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

/* Copies b's value into out (if any) and returns its length. Both lengths are read once and
 * checked against the data area, so that even a writer that ignores the lock (or a block
 * freed under a lock-free reader) cannot make it overrun. */
static int copy_value(const shmkv_t *t, struct shmkv_block *b, char *out, uint32_t outcap)
{
    uint32_t klen = __atomic_load_n(&b->key_len, __ATOMIC_RELAXED);
    uint32_t vlen = __atomic_load_n(&b->value_len, __ATOMIC_RELAXED);

    if (klen > t->key_size || vlen > t->value_size || !block_fits(t, b, klen, vlen))
        return SHMKV_ECORRUPT;
    if (out != NULL) {
        if (vlen > outcap)
            return SHMKV_EBUFSIZE;
        if (vlen > 0)
            memcpy(out, (unsigned char *)b + value_offset(klen), vlen);
    }
    return (int)vlen;
}

/* Optimistic tries of a read before it takes the lock: enough to ride out a few writers,
 * few enough that a writer that died mid-write (seq left odd) costs a reader microseconds
 * before it takes the lock, whose recovery mends the table and seq. */
#define OPTIMISTIC_TRIES 64

/* Counts a read of a value (out != NULL): a hit marks the entry used, for eviction. */
static void count_read(shmkv_t *t, int rc, struct shmkv_block *b)
{
    uint64_t *pending;

    if (t->observer)
        return;
    handle_forget_if_forked(t);
    if (rc >= 0) {
        pending = &t->pending_hits;
        mark_used(t, b);
    } else if (rc == SHMKV_ENOTFOUND) {
        pending = &t->pending_misses;
    } else {
        return;
    }
    if (__atomic_add_fetch(pending, 1, __ATOMIC_RELAXED) >= PENDING_FLUSH)
        handle_flush_pending(t);
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
    /* A broken table keeps seq odd (above), so its reads end up at the lock, which says so. */
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
                            flags & SHMKV_KEEP_TTL ? op.e->u.expires : op_deadline(&op, ttl_ns));
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
        counter = (uint64_t *)(void *)block_value(op.e);
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
        (elen > 0 && memcmp(block_value(op.e), expected, elen) != 0))
        rc = 0;
    else {
        rc = locked_replace(t, &op, key, klen, value, vlen,
                            flags & SHMKV_KEEP_TTL ? op.e->u.expires : op_deadline(&op, ttl_ns));
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
        STORE(op.e->u.expires, d);
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
        d = __atomic_load_n(&op.e->u.expires, __ATOMIC_RELAXED);
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
    if (op_expiry_due(t, &op)) {
        t->hdr->purge_cursor = 0;
        t->hdr->turn_min = 0;
        purged = locked_purge_steps(t, op.now, UINT64_MAX);
    }
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
    /* The commit point: from here on, recovery finishes the clear (recover.c). */
    STORE(h->clearing, (uint64_t)1);
    for (i = 0; i < t->nslots; i++)
        slot_store(t, i, 0);
    STORE(h->count, (uint64_t)0);
    alloc_reset(t);
    STORE(h->next_expiry, (uint64_t)0);
    h->clock_hand = 0;
    h->purge_cursor = 0;
    h->turn_min = 0;
    STORE(h->clearing, (uint64_t)0);
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
        if (rc == SHMKV_OK && op_expiry_due(t, &op)) {
            t->hdr->purge_cursor = 0;
            t->hdr->turn_min = 0;
            n = locked_purge_steps(t, op.now, UINT64_MAX);
        }
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
    /* Then ask for the block each home slot names: the batch's cache misses overlap instead
     * of coming one after another, which is most of what a batch saves. Hints only. */
    for (i = 0; i < n; i++) {
        uint64_t s = slot_load(t, (uint64_t)vlens[i] & t->mask);

        if (s != 0 && SLOT_UNIT(s) - 1u < t->data_units)
            __builtin_prefetch(block_at(t, SLOT_UNIT(s) - 1));
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
            int vlen = copy_value(t, op.e, NULL, 0);

            if (vlen < 0) {
                rc = vlen;
                break;
            }
            if (vlen > 0 && used + (uint64_t)vlen <= outcap)
                memcpy(out + used, block_value(op.e), (size_t)vlen);
            vlens[i] = vlen;
            used += (uint64_t)vlen;
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

/* set_many pins every key of its batch while it runs (evict.c), so that the evictions its
 * inserts make never take a key of the batch, stored or still to be stored. A pin record
 * says that key i is pinned (bit 0) and the bit it gets back at the end (the bits above 32).
 * Blocks may move while the batch runs (compaction), so pins are undone by key. */
#define PIN(restore) (UINT64_C(1) | ((uint64_t)(restore) << 32))

static void locked_unpin(shmkv_t *t, uint32_t n, const char *keys, const uint32_t *klens,
                         const uint64_t *hashes, const uint64_t *pins)
{
    uint64_t koff = 0, slot;
    struct shmkv_block *b;
    uint32_t i;

    for (i = 0; i < n; koff += klens[i], i++)
        if (pins[i] != 0 &&
            index_find(t, hashes[i], keys + koff, klens[i], &slot, &b) == SHMKV_OK &&
            b->referenced == REF_PINNED)
            __atomic_store_n(&b->referenced, (uint32_t)(pins[i] >> 32), __ATOMIC_RELAXED);
}

int shmkv_set_many(shmkv_t *t, uint32_t n, const char *keys, const uint32_t *klens,
                   const char *values, const uint32_t *vlens, uint64_t ttl_ns,
                   uint64_t *scratch)
{
    ENTER(t);
    uint64_t koff = 0, voff = 0, fresh = 0, expires, peak = 0, pinned = 0;
    uint64_t *hashes = scratch, *pins = scratch + n;
    int64_t delta = 0;
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
    /* First pass: all or nothing, so count the keys that would be new, and the most units
     * the batch holds at once on top of what it replaces (each new block is taken before
     * its old one is freed), before storing any. Expired entries met on the way are
     * reclaimed: they were invisible already. */
    for (i = 0, koff = 0; i < n && rc == SHMKV_OK; koff += klens[i], i++) {
        int64_t units = (int64_t)entry_units(klens[i], vlens[i]), old = 0;
        int found;

        op.hash = hashes[i];
        found = locked_lookup(t, &op, keys + koff, klens[i], FOR_WRITE);
        if (found == SHMKV_ENOTFOUND) {
            fresh++;
        } else if (found != SHMKV_OK) {
            rc = found;
        } else {
            old = op.e->size;
            if (t->evict && op.e->referenced != REF_PINNED) {  /* a key given twice: once */
                pins[i] = PIN(op.e->referenced);
                op.e->referenced = REF_PINNED;
                pinned += (uint64_t)old;
            }
        }
        if ((int64_t)peak < delta + units)
            peak = (uint64_t)(delta + units);
        delta += units - old;
    }
    if (rc == SHMKV_OK)
        rc = locked_reclaim(t, &op, fresh, peak);
    /* A table that must not evict needs all the room now; an evicting one makes room as it
     * goes, never evicting a pinned key of the batch: so the batch itself must fit. */
    if (rc == SHMKV_OK && !t->evict)
        rc = t->hdr->count + fresh > t->capacity ? SHMKV_EFULL
             : t->hdr->free_units < peak        ? SHMKV_ENOROOM
                                                : SHMKV_OK;
    else if (rc == SHMKV_OK)
        rc = n > t->capacity ? SHMKV_EFULL : pinned + peak > t->data_units ? SHMKV_ENOROOM
                                                                            : SHMKV_OK;
    /* Second pass: the stores. A stored key's new block is pinned in its turn, to be left
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
            pins[i] = PIN(pins[i] != 0 ? REF_USED : REF_COLD);
    }
    locked_unpin(t, n, keys, klens, hashes, pins);
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
    uint64_t unit, size, used = 0;
    int64_t records = 0;
    struct op op;
    int rc;

    rc = lock_table(t, LOCK_READ_ONLY);
    if (rc != SHMKV_OK)
        return rc;
    op_start(&op, 0);
    /* In the order of the data area: roughly insertion order, and stable for keys not
     * written meanwhile. */
    for (unit = 0; unit < t->data_units && rc == SHMKV_OK; unit += size) {
        struct shmkv_block *b = block_at(t, unit);
        uint32_t klen, vlen;
        uint64_t bytes;

        rc = alloc_valid_block(t, unit, &size);
        if (rc != SHMKV_OK || b->state != BLOCK_USED || op_expired(&op, b))
            continue;
        klen = b->key_len;
        vlen = b->value_len;
        if (klen > t->key_size || vlen > t->value_size || entry_units(klen, vlen) > size) {
            rc = SHMKV_ECORRUPT;
            break;
        }
        bytes = 4 + (uint64_t)klen + (with_values ? 4 + (uint64_t)vlen : 0);
        if (out != NULL && used + bytes <= outcap) {
            put_u32(out + used, klen);
            memcpy(out + used + 4, block_key(b), klen);
            if (with_values) {
                put_u32(out + used + 4 + klen, vlen);
                memcpy(out + used + 8 + klen, block_value(b), vlen);
            }
        }
        used += bytes;
        records++;
    }
    shmkv__unlock(t);
    if (rc != SHMKV_OK)
        return rc;
    if (needed != NULL)
        *needed = used;
    return used > outcap ? SHMKV_EBUFSIZE : records;
}

/* The header's figures. The free lists are walked for the largest free block only with the
 * lock held (free_list_walk): without it they may be changing under the walk. */
static void read_stats(const shmkv_t *t, struct shmkv_stats *out, int free_list_walk)
{
    const struct shmkv_header *h = t->hdr;
    struct alloc_stats a = {0, 0};

    memset(out, 0, sizeof *out);
    /* From the handle's validated copy, not the segment: shmkv_layout() cannot fail here. */
    shmkv_layout(t->capacity, t->key_size, t->value_size, t->memory, &out->geometry);
    if (free_list_walk)
        alloc_stats(t, &a);
#define READ(field) __atomic_load_n(&h->field, __ATOMIC_RELAXED)
    out->version = READ(version);
    out->creator_pid = READ(creator_pid);
    out->count = READ(count);
    out->bytes_stored = READ(stored_bytes);
    out->bytes_free = READ(free_units) * UNIT;
    out->largest_free = a.largest_free * UNIT;
    out->free_blocks = a.free_blocks;
    out->hits = READ(hits);
    out->misses = READ(misses);
    out->inserts = READ(inserts);
    out->updates = READ(updates);
    out->deletes = READ(deletes);
    out->evictions = READ(evictions);
    out->expirations = READ(expirations);
    out->recoveries = READ(recoveries);
    out->lock_timeouts = READ(lock_timeouts);
    out->compactions = READ(compactions);
    out->moved_bytes = READ(moved_bytes);
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
    handle_flush_pending(t);
    read_stats(t, out, 1);
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
    handle_flush_pending(t);
    read_stats(t, out, 0);
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
    return shmkv_layout(t->capacity, t->key_size, t->value_size, t->memory, out);
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

/* The robust-futex word's thread id (layout.h, MUTEX_OWNER_WORD), -1 where it is unknown. */
static int64_t lock_owner_tid(const shmkv_t *t)
{
#ifdef MUTEX_OWNER_WORD
    return (int64_t)(__atomic_load_n(MUTEX_OWNER_WORD(&t->hdr->lock), __ATOMIC_RELAXED) &
                     MUTEX_TID_MASK);
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
