/* index.c -- the hash index: nslots 8-byte slots, nslots a power of two > 1.5 x capacity.
 *
 *   slot (u64):   | low 32 bits of hash(key) : 32 | unit of the key's block + 1 : 32 |   0 = empty
 *
 * A key is probed linearly from its home slot (hash & (nslots - 1)) to the first empty slot.
 * Deletion shifts the rest of the probe chain back (backward-shift deletion) instead of
 * leaving tombstones, so chains stay as short after a million deletes as after none. The slot
 * carries 32 bits of the hash, so a probe compares keys only when those bits match. The hash
 * is SipHash-1-3 keyed with the table's random seed: colliding keys cannot be chosen from
 * outside. Since the low 32 bits of the hash pick the home slot, nslots is at most 2^32.
 *
 * SLOT STATES: empty (0) -> used (tag | unit + 1) -> empty, by deletion or clear. A used slot
 * may also move one or more places towards its home during a backward shift, and its unit
 * changes when compaction moves its block (alloc.c). Every slot changes with one aligned
 * 8-byte store, so a lock-free reader sees the old or the new slot, never half of each.
 *
 * Everything here bounds its walk by nslots and checks each block a slot names before use,
 * whatever the segment says, so a damaged index yields SHMKV_ECORRUPT, never a stray read. */
#include "layout.h"

/* The block a used slot names, after checking everything about it that a read relies on:
 * it is USED, its lengths are within the table's limits, and key and value lie inside the
 * block and the data area. Optimistic readers call it without the lock: a block freed or
 * moved under them can only make it fail or return data that their sequence check throws
 * away, never make them read outside the data area. */
int index_entry(const shmkv_t *t, uint64_t slot, struct shmkv_block **out)
{
    uint64_t unit1 = SLOT_UNIT(slot), need, size;
    struct shmkv_block *b;

    if (unit1 == 0 || unit1 > t->data_units)
        return SHMKV_ECORRUPT;
    b = block_at(t, unit1 - 1);
    if (__atomic_load_n(&b->state, __ATOMIC_RELAXED) != BLOCK_USED)
        return SHMKV_ECORRUPT;
    uint32_t klen = __atomic_load_n(&b->key_len, __ATOMIC_RELAXED);
    uint32_t vlen = __atomic_load_n(&b->value_len, __ATOMIC_RELAXED);

    size = __atomic_load_n(&b->size, __ATOMIC_RELAXED);
    if (klen > t->key_size || vlen > t->value_size)
        return SHMKV_ECORRUPT;
    need = entry_units(klen, vlen);
    if (need > size || size > t->data_units - (unit1 - 1))
        return SHMKV_ECORRUPT;
    *out = b;
    return SHMKV_OK;
}

/* Looks key up. 0: *slot_out and *block_out name it. SHMKV_ENOTFOUND: *slot_out is the empty
 * slot that ended the probe, where an insert of this key belongs. SHMKV_ECORRUPT: the index
 * or a block on the way is damaged. Expired entries are found like any other: deciding what
 * they mean is the caller's part. */
int index_find(const shmkv_t *t, uint64_t hash, const char *key, uint32_t klen,
               uint64_t *slot_out, struct shmkv_block **block_out)
{
    uint32_t tag = (uint32_t)hash;
    uint64_t i = hash & t->mask;
    uint64_t probes;

    for (probes = 0; probes < t->nslots; probes++, i = (i + 1) & t->mask) {
        uint64_t s = slot_load(t, i);
        struct shmkv_block *b;
        int rc;

        if (s == 0) {
            *slot_out = i;
            return SHMKV_ENOTFOUND;
        }
        if (SLOT_TAG(s) != tag)
            continue;
        rc = index_entry(t, s, &b);
        if (rc != SHMKV_OK)
            return rc;
        /* key_len is read again: a lock-free reader's block may have changed since it was
         * checked, so the key must fit in the data area by this very value. */
        if (__atomic_load_n(&b->key_len, __ATOMIC_RELAXED) == klen &&
            block_fits(t, b, klen, 0) &&
            (klen == 0 || memcmp(block_key(b), key, klen) == 0)) {
            *slot_out = i;
            *block_out = b;
            return SHMKV_OK;
        }
    }
    return SHMKV_ECORRUPT;
}

/* The slot that names block b, found through b's own key: walks over the data area (purge,
 * eviction, compaction) know blocks, not slots. SHMKV_ECORRUPT unless exactly b is found. */
int index_slot_of(const shmkv_t *t, const struct shmkv_block *b, uint64_t *slot_out)
{
    uint32_t klen = b->key_len;
    uint64_t size = b->size;
    struct shmkv_block *found = NULL;
    int rc;

    /* The key is hashed in place: it must lie inside the block and the data area. */
    if (klen > t->key_size || size > t->data_units - unit_of(t, b) ||
        entry_units(klen, 0) > size)
        return SHMKV_ECORRUPT;
    rc = index_find(t, hash_key(t, (const char *)(b + 1), klen), (const char *)(b + 1), klen,
                    slot_out, &found);
    if (rc != SHMKV_OK || found != b)
        return rc == SHMKV_OK || rc == SHMKV_ENOTFOUND ? SHMKV_ECORRUPT : rc;
    return SHMKV_OK;
}

/* Empties slot i by backward-shift deletion: each later slot of the chain whose home is not
 * between i and itself moves back into the hole, until an empty slot ends the chain. */
int index_unlink(shmkv_t *t, uint64_t i)
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
