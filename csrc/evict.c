/* evict.c -- making room: reclaiming expired entries, and CLOCK eviction.
 *
 * A write may need room of two kinds: a key (count < capacity, which the index is sized for)
 * and units of the data area (alloc.c). locked_make_room() gets both, in this order:
 *   1. expired entries (expiry.c's purge): a table that must not evict walks until the room
 *      is there or nothing more has expired; an evicting table takes one bounded look
 *      (PURGE_ROUND_EVICTING blocks): a cache is full all the time, and each insert should
 *      cost it a few cache lines, not a walk of the data area;
 *   2. in a table created with SHMKV_EVICT, live entries chosen by CLOCK, one at a time, until
 *      both kinds of room are there: at most one eviction per live entry, so the work of one
 *      insert is bounded, and never an entry that the running writer has pinned;
 *   3. if the units are free but scattered, compaction (alloc.c) gathers them.
 * A table without SHMKV_EVICT fails instead: SHMKV_EFULL if keys ran out, SHMKV_ENOROOM if
 * bytes did, and nothing visible has changed but the reclaimed expired entries.
 *
 * EVICTION (CLOCK over the blocks): reads, overwrites, counter increments and touches set an
 * entry's referenced bit (a store only when it changes); a new key starts without it. The
 * hand (clock_hand) walks the blocks from where it stopped, clearing bits, and takes the
 * first entry that has expired or has no bit: expired and cold keys go first, keys used
 * since the hand's last visit get another turn. The walk is bounded by two turns. Entries
 * pinned (REF_PINNED) are passed over: set_many pins the keys of its batch until it ends, so
 * that a batch never evicts its own keys, and a replace pins the entry it replaces while it
 * makes room for the new value. An eviction is a delete, and as crash-safe. */
#include "layout.h"

#define PURGE_ROUND 4096
#define PURGE_ROUND_EVICTING 64

/* One CLOCK eviction (see above). SHMKV_ENOROOM if no entry may be evicted. */
static int locked_evict(shmkv_t *t, struct op *op)
{
    struct shmkv_header *h = t->hdr;
    uint64_t hand = h->clock_hand, steps, size;

    if (hand >= t->data_units)
        hand = 0;
    /* Blocks are at least MIN_BLOCK_UNITS long: two turns take at most data_units steps. */
    for (steps = 0; steps <= t->data_units; steps++) {
        struct shmkv_block *b = block_at(t, hand);
        uint32_t ref;
        int expired, rc = alloc_valid_block(t, hand, &size);

        if (rc != SHMKV_OK)
            return rc;
        hand = hand + size < t->data_units ? hand + size : 0;
        ref = __atomic_load_n(&b->referenced, __ATOMIC_RELAXED);
        if (b->state != BLOCK_USED || ref == REF_PINNED)
            continue;
        expired = op_expired(op, b);
        if (ref != REF_COLD && !expired) {
            __atomic_store_n(&b->referenced, REF_COLD, __ATOMIC_RELAXED);
            continue;
        }
        h->clock_hand = hand;
        rc = locked_remove_block(t, b);
        if (rc == SHMKV_OK && expired)
            h->expirations++;
        else if (rc == SHMKV_OK) {
            h->evictions++;
            op->evicted = 1;
        }
        return rc;
    }
    return SHMKV_ENOROOM;
}

static int short_of(const shmkv_t *t, uint64_t keys, uint64_t units)
{
    return t->hdr->count + keys > t->capacity || t->hdr->free_units < units;
}

/* Reclaims expired room until `keys` more keys and `units` more units are free, if
 * next_expiry says some entry may have expired (step 1 above). */
int locked_reclaim(shmkv_t *t, struct op *op, uint64_t keys, uint64_t units)
{
    uint64_t rounds;

    for (rounds = 0; short_of(t, keys, units) && op_expiry_due(t, op); rounds++) {
        int64_t purged;

        if (rounds > 2 * (t->data_units / PURGE_ROUND + 1))
            return SHMKV_ECORRUPT;
        purged = locked_purge_steps(t, op->now, t->evict ? PURGE_ROUND_EVICTING : PURGE_ROUND);
        if (purged < 0)
            return (int)purged;
        if (t->evict)
            break;
    }
    return SHMKV_OK;
}

/* Makes room for `keys` more keys and a block of `units` units (steps 1 to 3 above). On
 * success, a block of `units` can be taken at once; the index may have changed (removals
 * shift slots, compaction moves blocks), so the caller looks its key up again. */
int locked_make_room(shmkv_t *t, struct op *op, uint64_t keys, uint64_t units)
{
    uint64_t evictions;
    int rc = locked_reclaim(t, op, keys, units);

    for (evictions = 0; rc == SHMKV_OK && short_of(t, keys, units); evictions++) {
        if (!t->evict || evictions > t->capacity)
            rc = SHMKV_ENOROOM;
        else
            rc = locked_evict(t, op);
        if (rc == SHMKV_ENOROOM && t->hdr->count + keys > t->capacity)
            rc = SHMKV_EFULL;
    }
    if (rc == SHMKV_OK && units > 0)
        rc = alloc_compact(t, units);
    return rc;
}
