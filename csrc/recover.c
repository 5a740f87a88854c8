/* recover.c -- rebuilding a table whose lock holder died (kill -9, a segfault, the OOM
 * killer) from its blocks, which are the source of truth (alloc.c, CRASH ORDERING).
 *
 * Every mutation orders its stores (release stores, so the compiler keeps the order) so that
 * a process killed at any instruction leaves each key with its old or its new value:
 *   insert:  take a block (BUSY), write key and value, mark it USED, publish it in a slot;
 *   replace: take a block, write it, record intent (old, new), mark new USED, swap the slot
 *            in one aligned 8-byte store, free the old block, clear the intent;
 *   delete:  shift the chain back over the slot, then free the block;
 *   counter: one aligned 8-byte store into the value; a new deadline (touch) likewise;
 *   expiry reclaim and eviction: a delete;
 *   compaction: a recorded, resumable move per block (alloc.c);
 *   clear:   `clearing` first, then one free block over the data area and an empty index.
 * The next locker gets EOWNERDEAD and calls locked_rebuild(), which
 *   1. finishes a clear that was begun, and stops there;
 *   2. finishes a recorded move, so that the blocks tile the data area again;
 *   3. if an intent names two USED blocks, drops the old one (the replace rolls forward);
 *   4. walks the blocks: each USED block with sane lengths goes back into an emptied index
 *      (a key found twice can only come from corruption: one copy is kept), every other
 *      block becomes FREE; count and stored_bytes are recounted and pins left by a dead
 *      set_many or replace become plain referenced bits;
 *   5. merges adjacent free blocks and rebuilds the free lists (alloc_rebuild_free), and
 *      recomputes next_expiry; the purge's turn and the clock hand start again.
 * The rebuild is idempotent, so a recoverer killed mid-rebuild is recovered in turn. The
 * rebuilt table is then checked (table.c): a crash cannot leave damage that the rebuild does
 * not mend, so a failed check means corruption, and the table is marked broken for good.
 * The crash tests kill a process at every one of these stores in turn: each STORE and
 * slot_store is a crash point of the fault injection described in layout.h. */
#include "layout.h"

static void empty_index(shmkv_t *t)
{
    uint64_t i;

    for (i = 0; i < t->nslots; i++)
        slot_store(t, i, 0);
}

/* Step 3: a replace that got as far as marking its new block USED rolls forward. */
static void settle_replace(shmkv_t *t)
{
    struct shmkv_header *h = t->hdr;
    uint64_t io = h->intent_old, in = h->intent_new, size;

    if (io != 0 && in != 0 && io != in &&
        alloc_valid_block(t, io - 1, &size) == SHMKV_OK &&
        alloc_valid_block(t, in - 1, &size) == SHMKV_OK &&
        block_at(t, in - 1)->state == BLOCK_USED && block_at(t, io - 1)->state == BLOCK_USED)
        STORE(block_at(t, io - 1)->state, BLOCK_BUSY);
    STORE(h->intent_new, (uint64_t)0);
    STORE(h->intent_old, (uint64_t)0);
}

/* Step 4 for one USED block: whether it goes back into the index. */
static int reindex(shmkv_t *t, struct shmkv_block *b, uint64_t unit, uint64_t size,
                   uint64_t *next_expiry)
{
    struct shmkv_header *h = t->hdr;
    const char *key = (const char *)block_key(b);
    uint64_t hash, slot;
    struct shmkv_block *dup;

    if (b->key_len > t->key_size || b->value_len > t->value_size ||
        entry_units(b->key_len, b->value_len) > size || h->count >= t->capacity)
        return 0;
    hash = hash_key(t, key, b->key_len);
    if (index_find(t, hash, key, b->key_len, &slot, &dup) != SHMKV_ENOTFOUND)
        return 0;
    slot_store(t, slot, MAKE_SLOT(hash, unit));
    STORE(h->count, h->count + 1);
    h->stored_bytes += (uint64_t)b->key_len + b->value_len;
    if (b->referenced > REF_USED)
        b->referenced = REF_USED;
    *next_expiry = min_deadline(*next_expiry, b->u.expires);
    return 1;
}

void locked_rebuild(shmkv_t *t)
{
    struct shmkv_header *h = t->hdr;
    uint64_t unit, size, next = 0;

    /* Optimistic readers must see the rebuild as a write: seq odd throughout (a dead writer
     * may have left it so already), even again at the end. */
    if (!(h->seq & 1))
        locked_seq_bump(t);
    if (h->clearing) {
        empty_index(t);
        STORE(h->count, (uint64_t)0);
        alloc_reset(t);
        STORE(h->clearing, (uint64_t)0);
    }
    alloc_finish_move(t);
    settle_replace(t);
    empty_index(t);
    STORE(h->count, (uint64_t)0);
    h->stored_bytes = 0;
    for (unit = 0; unit < t->data_units && alloc_valid_block(t, unit, &size) == SHMKV_OK;
         unit += size) {
        struct shmkv_block *b = block_at(t, unit);

        if (b->state != BLOCK_USED || !reindex(t, b, unit, size, &next))
            if (b->state != BLOCK_FREE)
                STORE(b->state, BLOCK_FREE);
    }
    alloc_rebuild_free(t);
    STORE(h->next_expiry, next);
    h->purge_cursor = 0;
    h->turn_min = 0;
    h->clock_hand = 0;
    locked_seq_bump(t);
}
