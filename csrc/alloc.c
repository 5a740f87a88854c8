/* alloc.c -- the data area's allocator: every entry takes room by its real size.
 *
 * BLOCKS
 * The data area is a sequence of blocks that tile it from unit 0 to data_units, each starting
 * with a 32-byte header (struct shmkv_block, layout.h) whose `size` says where the next one
 * starts. A block is FREE, BUSY (taken by the running writer, not yet published) or USED (it
 * holds an entry: key, then value at the next 8-byte boundary; the index names it). A USED
 * block is entry_units(key, value) units or up to MIN_BLOCK_UNITS - 1 more (a remainder too
 * small to be a block stays with it). prev_size, the size of the block before, lets a freed
 * block merge with a free neighbour on either side (boundary tags).
 *
 * FREE LISTS
 * Free blocks are kept in NBINS doubly-linked lists by size (bins): one list per size for
 * 2..63 units (32 B to 1008 B: most sessions), then eight per power of two. binmap has a bit
 * per non-empty list. An allocation of n units takes the first block of n's own list that is
 * large enough (looking at a few), else the first block of the next non-empty list above,
 * found with the bitmap: any block there is large enough. The rest of the block, if it can be
 * a block, goes back as a free block. A freed block merges at once with free neighbours, so
 * no two free blocks are ever adjacent: free room is never cut into pieces that one write
 * could use together. This is what keeps room freed by one size usable by every other size
 * (memcached's slab classes keep it for one class, which calcifies).
 *
 * COMPACTION
 * Free room can still be scattered between live entries. When a write needs n units, the
 * table has them free but no block that large, alloc_compact() slides live blocks towards
 * the start of the area, from the first free block on, merging the free room it pushes
 * ahead of it, until that free block is n units long. Each slide of a block B down over the
 * free block F before it is one resumable move, recorded in the header before it starts
 * (move_from, move_to, move_units, move_done): B is copied in chunks no longer than F, from
 * its start on, so that a chunk never overwrites the part of B still to be copied; each
 * chunk's end is stored in move_done. Then B's slot is re-pointed (one 8-byte store), F's
 * header is written after B, and the record is cleared. Lock-free readers see seq odd during
 * each move and retry; between moves seq is even again, so a long compaction stalls them one
 * move at a time, not for its whole length.
 *
 * CRASH ORDERING (a process killed at any store leaves a table that recovery makes whole)
 * Only the chain of block sizes and states, the blocks' contents and the index are the truth;
 * the free lists, binmap, prev_size, free_units and stored_bytes are derived from them, and
 * recovery (recover.c) rebuilds them by one walk over the blocks. So:
 *   take:    the remainder's header is written inside the free block first (the walk does not
 *            see it yet), then the block becomes BUSY, then its size shrinks: one store each;
 *   release: the block becomes FREE, then each merge grows the lower block's size, one store;
 *   compact: the move record is written before the first chunk; recovery finishes the copy
 *            from move_done (its source is intact from there on) before it walks the blocks;
 *   clear:   `clearing` is set first; recovery finishes a clear it finds begun.
 * A crash between stores leaves adjacent free blocks (merged by the walk) or a BUSY block
 * (freed by the walk), never a gap or an overlap.
 *
 * INVARIANTS (check.c numbers: 8 for the blocks, 12 for the derived state)
 *   - The blocks tile the data area exactly: every size is at least MIN_BLOCK_UNITS and the
 *     last block ends at data_units; prev_size is the size of the block before.
 *   - No block is BUSY while the lock is free, and no two free blocks are adjacent.
 *   - Every free block is in the list of its size's bin, once; the lists are doubly linked
 *     correctly; a bin's bit is set exactly when its list is non-empty.
 *   - free_units is the sum of the free blocks' sizes, stored_bytes the sum of the USED
 *     blocks' key and value lengths: used and free room add up to the whole, nothing leaks.
 *   - The purge cursor and the clock hand name block starts.
 *
 * Every size, link and unit read from the segment is checked before it is used: damage
 * yields SHMKV_ECORRUPT, never a write outside the data area. */
#include "layout.h"

/* Blocks of its own list an allocation looks at before it takes one from a larger list. */
#define BIN_SCAN 8

static uint32_t bin_of(uint64_t units)
{
    unsigned fl;

    if (units < EXACT_BINS)
        return (uint32_t)units;
    fl = 63u - (unsigned)__builtin_clzll(units);              /* 6 .. 31 */
    return EXACT_BINS + (fl - 6u) * 8u + (uint32_t)((units >> (fl - 3u)) & 7u);
}

/* The first non-empty bin at or above `from`, or NBINS. */
static uint32_t next_bin(const struct shmkv_header *h, uint32_t from)
{
    uint32_t w = from / 64u;
    uint64_t bits;

    if (from >= NBINS)
        return NBINS;
    bits = h->binmap[w] & (~UINT64_C(0) << (from % 64u));
    for (;;) {
        if (bits != 0)
            return w * 64u + (uint32_t)__builtin_ctzll(bits);
        if (++w >= BINMAP_WORDS)
            return NBINS;
        bits = h->binmap[w];
    }
}

/* Whether the block at `unit` has a plausible header: a known state and a size that keeps
 * it inside the data area. Its size in *size_out. */
int alloc_valid_block(const shmkv_t *t, uint64_t unit, uint64_t *size_out)
{
    const struct shmkv_block *b;
    uint64_t size;

    if (unit >= t->data_units)
        return SHMKV_ECORRUPT;
    b = block_at(t, unit);
    size = b->size;
    if (size < MIN_BLOCK_UNITS || size > t->data_units - unit ||
        (b->state != BLOCK_FREE && b->state != BLOCK_BUSY && b->state != BLOCK_USED))
        return SHMKV_ECORRUPT;
    *size_out = size;
    return SHMKV_OK;
}

/* A free-list link read from the segment: 0 or a free block's unit + 1. */
static int free_link(const shmkv_t *t, uint64_t link, struct shmkv_block **out)
{
    uint64_t size;

    *out = NULL;
    if (link == 0)
        return SHMKV_OK;
    if (alloc_valid_block(t, link - 1, &size) != SHMKV_OK ||
        block_at(t, link - 1)->state != BLOCK_FREE)
        return SHMKV_ECORRUPT;
    *out = block_at(t, link - 1);
    return SHMKV_OK;
}

static void bin_push(shmkv_t *t, struct shmkv_block *b)
{
    struct shmkv_header *h = t->hdr;
    uint32_t bin = bin_of(b->size), head = h->bins[bin], self = (uint32_t)unit_of(t, b) + 1;
    struct shmkv_block *next;

    b->u.free.prev = 0;
    b->u.free.next = head;
    if (free_link(t, head, &next) == SHMKV_OK && next != NULL)
        next->u.free.prev = self;
    h->bins[bin] = self;
    h->binmap[bin / 64u] |= UINT64_C(1) << (bin % 64u);
}

static int bin_unlink(shmkv_t *t, struct shmkv_block *b)
{
    struct shmkv_header *h = t->hdr;
    uint32_t bin = bin_of(b->size), self = (uint32_t)unit_of(t, b) + 1;
    struct shmkv_block *prev, *next;

    if (free_link(t, b->u.free.prev, &prev) != SHMKV_OK ||
        free_link(t, b->u.free.next, &next) != SHMKV_OK)
        return SHMKV_ECORRUPT;
    if (prev != NULL) {
        if (prev->u.free.next != self)
            return SHMKV_ECORRUPT;
        prev->u.free.next = b->u.free.next;
    } else {
        if (h->bins[bin] != self)
            return SHMKV_ECORRUPT;
        h->bins[bin] = b->u.free.next;
        if (h->bins[bin] == 0)
            h->binmap[bin / 64u] &= ~(UINT64_C(1) << (bin % 64u));
    }
    if (next != NULL)
        next->u.free.prev = b->u.free.prev;
    b->u.free.next = b->u.free.prev = 0;
    return SHMKV_OK;
}

/* The block after the one at `unit` of `size` units learns its new neighbour's size. */
static void set_prev_size(shmkv_t *t, uint64_t unit, uint64_t size)
{
    if (unit + size < t->data_units)
        block_at(t, unit + size)->prev_size = (uint32_t)size;
}

/* Writes a free block's header (inside room the walk does not reach yet). */
static struct shmkv_block *lay_free(shmkv_t *t, uint64_t unit, uint64_t size, uint64_t prev)
{
    struct shmkv_block *b = block_at(t, unit);

    b->prev_size = (uint32_t)prev;
    b->state = BLOCK_FREE;
    b->referenced = REF_COLD;
    b->key_len = b->value_len = 0;
    b->u.free.next = b->u.free.prev = 0;
    __atomic_store_n(&b->size, (uint32_t)size, __ATOMIC_RELEASE);
    return b;
}

/* One free block covering the whole data area (creation, clear). */
void alloc_reset(shmkv_t *t)
{
    struct shmkv_header *h = t->hdr;

    memset(h->bins, 0, sizeof h->bins);
    memset(h->binmap, 0, sizeof h->binmap);
    bin_push(t, lay_free(t, 0, t->data_units, 0));
    h->free_units = t->data_units;
    h->stored_bytes = 0;
}

/* Cuts `units` off the front of free block f (off its list already) and marks them BUSY. */
static void carve(shmkv_t *t, struct shmkv_block *f, uint64_t units)
{
    uint64_t size = f->size, unit = unit_of(t, f);

    if (size - units >= MIN_BLOCK_UNITS) {
        struct shmkv_block *rest = lay_free(t, unit + units, size - units, units);

        set_prev_size(t, unit + units, size - units);
        STORE(f->state, BLOCK_BUSY);
        STORE(f->size, (uint32_t)units);
        bin_push(t, rest);
    } else {
        STORE(f->state, BLOCK_BUSY);
    }
    t->hdr->free_units -= f->size;
}

/* A free block of at least `units`, or NULL. With `thorough`, the whole of the request's own
 * list is searched; otherwise BIN_SCAN blocks of it. */
static int find_free(const shmkv_t *t, uint64_t units, int thorough, struct shmkv_block **out)
{
    const struct shmkv_header *h = t->hdr;
    uint32_t bin = bin_of(units), above;
    uint64_t steps, limit = thorough ? t->data_units : BIN_SCAN;
    struct shmkv_block *b;
    int rc = free_link(t, h->bins[bin], &b);

    for (steps = 0; rc == SHMKV_OK && b != NULL && steps < limit; steps++) {
        if (b->size >= units) {
            *out = b;
            return SHMKV_OK;
        }
        rc = free_link(t, b->u.free.next, &b);
    }
    if (rc != SHMKV_OK)
        return rc;
    above = next_bin(h, bin + 1);
    if (above < NBINS) {
        rc = free_link(t, h->bins[above], &b);
        if (rc != SHMKV_OK || b == NULL || b->size < units)
            return SHMKV_ECORRUPT;
        *out = b;
        return SHMKV_OK;
    }
    *out = NULL;
    return SHMKV_OK;
}

/* Takes a block of `units` units, BUSY, for the caller to fill and publish. SHMKV_ENOROOM if
 * no free block is that large (alloc_compact() may make one). */
int alloc_take(shmkv_t *t, uint64_t units, struct shmkv_block **out)
{
    struct shmkv_block *b = NULL;
    int rc;

    if (units > t->hdr->free_units)
        return SHMKV_ENOROOM;
    rc = find_free(t, units, 0, &b);
    if (rc != SHMKV_OK)
        return rc;
    if (b == NULL)
        return SHMKV_ENOROOM;
    rc = bin_unlink(t, b);
    if (rc != SHMKV_OK)
        return rc;
    carve(t, b, units);
    *out = b;
    return SHMKV_OK;
}

/* Whether a block of `units` can be taken now, without compaction. */
int alloc_fits(const shmkv_t *t, uint64_t units)
{
    struct shmkv_block *b = NULL;

    return units <= t->hdr->free_units && find_free(t, units, 1, &b) == SHMKV_OK && b != NULL;
}

/* Hints that name the start of a block that a merge just absorbed move to the merged block,
 * so that they keep naming block starts (invariant 8). */
static void absorbed(shmkv_t *t, uint64_t gone, uint64_t into)
{
    struct shmkv_header *h = t->hdr;

    if (h->purge_cursor == gone)
        h->purge_cursor = into;
    if (h->clock_hand == gone)
        h->clock_hand = into;
}

/* Frees block b (already out of the index, or never in it) and merges it with its free
 * neighbours. Returns the unit where the merged free block starts. A neighbour whose header
 * or links are damaged is left alone: the check reports the two free blocks side by side. */
uint64_t alloc_release(shmkv_t *t, struct shmkv_block *b)
{
    struct shmkv_header *h = t->hdr;
    uint64_t unit = unit_of(t, b), size = b->size, nsize;

    STORE(b->state, BLOCK_FREE);
    h->free_units += size;
    if (unit + size < t->data_units && alloc_valid_block(t, unit + size, &nsize) == SHMKV_OK &&
        block_at(t, unit + size)->state == BLOCK_FREE &&
        bin_unlink(t, block_at(t, unit + size)) == SHMKV_OK) {
        STORE(b->size, (uint32_t)(size + nsize));
        absorbed(t, unit + size, unit);
        size += nsize;
        set_prev_size(t, unit, size);
    }
    if (b->prev_size != 0 && b->prev_size <= unit) {
        uint64_t punit = unit - b->prev_size, psize;
        struct shmkv_block *p = block_at(t, punit);

        if (alloc_valid_block(t, punit, &psize) == SHMKV_OK && psize == b->prev_size &&
            p->state == BLOCK_FREE && bin_unlink(t, p) == SHMKV_OK) {
            STORE(p->size, (uint32_t)(psize + size));
            absorbed(t, unit, punit);
            unit = punit;
            size += psize;
            set_prev_size(t, unit, size);
            b = p;
        }
    }
    bin_push(t, b);
    return unit;
}

/* ENTRIES: removing a live entry empties its slot first (readers can no longer reach it),
 * then frees its block. Expiry, eviction and deletes all remove this way. */

/* Removes the key in `slot` (block b). The caller counts it: a delete, an expiration or an
 * eviction. */
int locked_remove(shmkv_t *t, uint64_t slot, struct shmkv_block *b)
{
    struct shmkv_header *h = t->hdr;
    int rc = index_unlink(t, slot);

    if (rc != SHMKV_OK)
        return rc;
    h->stored_bytes -= (uint64_t)b->key_len + b->value_len;
    alloc_release(t, b);
    STORE(h->count, h->count - 1);
    return SHMKV_OK;
}

/* Removes the live entry in block b, found in the index through its own key. */
int locked_remove_block(shmkv_t *t, struct shmkv_block *b)
{
    uint64_t slot;
    int rc = index_slot_of(t, b, &slot);

    return rc == SHMKV_OK ? locked_remove(t, slot, b) : rc;
}

/* Copies chunks of the recorded move from move_done on (see COMPACTION). */
static void move_chunks(shmkv_t *t, uint64_t from, uint64_t to, uint64_t units, uint64_t done)
{
    uint64_t gap = from - to;

    while (done < units) {
        uint64_t n = units - done < gap ? units - done : gap;

        FAULT_POINT();
        memcpy(t->data + (to + done) * UNIT, t->data + (from + done) * UNIT, n * UNIT);
        done += n;
        STORE(t->hdr->move_done, done);
    }
}

/* Recovery's part of a move a dead writer left recorded: the copy is finished and the free
 * block laid after the moved one, so that the walk over the blocks can go on. A record that
 * cannot be right is dropped (the check then reports the damage). */
void alloc_finish_move(shmkv_t *t)
{
    struct shmkv_header *h = t->hdr;
    uint64_t from = h->move_from, to = h->move_to, units = h->move_units, done = h->move_done;

    if (from == 0)
        return;
    from--;
    to--;
    if (to < from && from - to >= MIN_BLOCK_UNITS && units >= MIN_BLOCK_UNITS &&
        units <= t->data_units - from && done <= units) {
        move_chunks(t, from, to, units, done);
        lay_free(t, to + units, from - to, units);
    }
    STORE(h->move_from, (uint64_t)0);
}

/* Slides used block b (at `from`) down to `to`, over the free block between them (gap
 * units, off its list), keeping lock-free readers out with seq. */
static int slide(shmkv_t *t, uint64_t from, uint64_t to, uint64_t gap, uint64_t prev)
{
    struct shmkv_header *h = t->hdr;
    struct shmkv_block *b = block_at(t, from);
    uint64_t units = b->size, slot, s;
    int rc = index_slot_of(t, b, &slot);

    if (rc != SHMKV_OK)
        return rc;
    s = slot_load(t, slot);
    STORE(h->move_to, to + 1);
    STORE(h->move_units, units);
    STORE(h->move_done, (uint64_t)0);
    STORE(h->move_from, from + 1);
    move_chunks(t, from, to, units, 0);
    block_at(t, to)->prev_size = (uint32_t)prev;
    slot_store(t, slot, MAKE_SLOT(SLOT_TAG(s), to));
    lay_free(t, to + units, gap, units);
    set_prev_size(t, to + units, gap);
    STORE(h->move_from, (uint64_t)0);
    h->moved_bytes += units * UNIT;
    /* Between moves the table is whole: let optimistic readers in (seq even, then odd). */
    if (t->writing) {
        locked_seq_bump(t);
        locked_seq_bump(t);
    }
    return SHMKV_OK;
}

/* Makes a free block of at least `units` by sliding used blocks down (see COMPACTION). The
 * caller has checked that free_units suffices. Resets the purge's turn and the clock hand,
 * whose block starts the slides move. */
int alloc_compact(shmkv_t *t, uint64_t units)
{
    struct shmkv_header *h = t->hdr;
    uint64_t unit = 0, size = 0, prev = 0, next, nsize;
    struct shmkv_block *f;
    int rc;

    if (alloc_fits(t, units))
        return SHMKV_OK;
    if (units > h->free_units)
        return SHMKV_ENOROOM;
    /* The first free block: everything below it stays where it is. */
    for (;;) {
        rc = alloc_valid_block(t, unit, &size);
        if (rc != SHMKV_OK)
            return rc;
        if (block_at(t, unit)->state == BLOCK_FREE)
            break;
        unit += size;
    }
    f = block_at(t, unit);
    prev = f->prev_size;
    rc = bin_unlink(t, f);
    while (rc == SHMKV_OK && size < units && unit + size < t->data_units) {
        struct shmkv_block *b;

        next = unit + size;
        rc = alloc_valid_block(t, next, &nsize);
        if (rc != SHMKV_OK)
            break;
        b = block_at(t, next);
        if (b->state == BLOCK_FREE) {
            rc = bin_unlink(t, b);
            if (rc != SHMKV_OK)
                break;
            STORE(block_at(t, unit)->size, (uint32_t)(size + nsize));
            size += nsize;
            set_prev_size(t, unit, size);
        } else if (b->state == BLOCK_USED) {
            rc = slide(t, next, unit, size, prev);
            prev = nsize;
            unit += nsize;
        } else {
            rc = SHMKV_ECORRUPT;  /* no block is BUSY while room is being made */
        }
    }
    bin_push(t, block_at(t, unit));
    h->purge_cursor = 0;
    h->turn_min = 0;
    h->clock_hand = 0;
    h->compactions++;
    if (rc == SHMKV_OK && size < units)
        rc = SHMKV_ECORRUPT;  /* free_units said the room was there */
    return rc;
}

/* Recovery's walk (recover.c has marked every block that is not a live entry FREE): merges
 * adjacent free blocks, sets prev_size, and rebuilds the lists and free_units. Stops at a
 * block that cannot be right: the check then reports the damage. */
void alloc_rebuild_free(shmkv_t *t)
{
    struct shmkv_header *h = t->hdr;
    uint64_t unit = 0, size, prev = 0, free_unit = UINT64_MAX;

    memset(h->bins, 0, sizeof h->bins);
    memset(h->binmap, 0, sizeof h->binmap);
    h->free_units = 0;
    while (unit < t->data_units && alloc_valid_block(t, unit, &size) == SHMKV_OK) {
        struct shmkv_block *b = block_at(t, unit);

        if (b->state != BLOCK_FREE) {
            b->prev_size = (uint32_t)prev;
            free_unit = UINT64_MAX;
            prev = size;
        } else if (free_unit != UINT64_MAX) {   /* merge into the free block before */
            struct shmkv_block *f = block_at(t, free_unit);

            STORE(f->size, f->size + (uint32_t)size);
            prev = f->size;
        } else {
            b->prev_size = (uint32_t)prev;
            free_unit = unit;
            prev = size;
        }
        unit += size;
    }
    /* Second pass: the lists, now that every free block has its final size. */
    for (unit = 0; unit < t->data_units && alloc_valid_block(t, unit, &size) == SHMKV_OK;
         unit += size) {
        struct shmkv_block *b = block_at(t, unit);

        if (b->state == BLOCK_FREE) {
            bin_push(t, b);
            h->free_units += size;
        }
    }
}

void alloc_stats(const shmkv_t *t, struct alloc_stats *out)
{
    const struct shmkv_header *h = t->hdr;
    uint32_t bin;

    memset(out, 0, sizeof *out);
    for (bin = next_bin(h, 0); bin < NBINS; bin = next_bin(h, bin + 1)) {
        struct shmkv_block *b;
        uint64_t steps = 0;

        for (free_link(t, h->bins[bin], &b); b != NULL && steps < t->data_units; steps++) {
            out->free_blocks++;
            if (b->size > out->largest_free)
                out->largest_free = b->size;
            if (free_link(t, b->u.free.next, &b) != SHMKV_OK)
                break;
        }
    }
}

#define CHECK(n, cond)                                                                 \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            *invariant = (n);                                                          \
            return SHMKV_ECHECK;                                                       \
        }                                                                              \
    } while (0)

/* The allocator's part of the check (INVARIANTS above). */
int alloc_check(const shmkv_t *t, int *invariant)
{
    const struct shmkv_header *h = t->hdr;
    uint64_t unit = 0, size, prev = 0, free_units = 0, free_blocks = 0, stored = 0;
    uint64_t listed = 0;
    int prev_free = 0, cursor_ok = h->purge_cursor == 0, hand_ok = h->clock_hand == 0;
    uint32_t bin;

    while (unit < t->data_units) {
        const struct shmkv_block *b = block_at(t, unit);

        CHECK(8, alloc_valid_block(t, unit, &size) == SHMKV_OK);
        CHECK(8, b->prev_size == prev && b->state != BLOCK_BUSY);
        CHECK(8, !(prev_free && b->state == BLOCK_FREE));
        cursor_ok |= h->purge_cursor == unit;
        hand_ok |= h->clock_hand == unit;
        if (b->state == BLOCK_FREE) {
            free_units += size;
            free_blocks++;
        } else {
            CHECK(8, b->key_len <= t->key_size && b->value_len <= t->value_size &&
                         entry_units(b->key_len, b->value_len) <= size);
            stored += (uint64_t)b->key_len + b->value_len;
        }
        prev_free = b->state == BLOCK_FREE;
        prev = size;
        unit += size;
    }
    CHECK(8, unit == t->data_units && cursor_ok && hand_ok);
    CHECK(12, free_units == h->free_units && stored == h->stored_bytes);
    for (bin = 0; bin < NBINS; bin++) {
        struct shmkv_block *b;
        uint32_t back = 0;

        CHECK(12, ((h->binmap[bin / 64u] >> (bin % 64u)) & 1u) == (h->bins[bin] != 0));
        CHECK(12, free_link(t, h->bins[bin], &b) == SHMKV_OK);
        while (b != NULL) {
            CHECK(12, ++listed <= free_blocks && bin_of(b->size) == bin &&
                          b->u.free.prev == back);
            back = (uint32_t)unit_of(t, b) + 1;
            CHECK(12, free_link(t, b->u.free.next, &b) == SHMKV_OK);
        }
    }
    CHECK(12, listed == free_blocks);
    return SHMKV_OK;
}
