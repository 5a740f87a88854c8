/* check.c -- the full invariant check of a table, one CHECK per invariant, numbered as in the
 * INVARIANTS list at the top of table.c (8 and 12, the allocator's, are checked in alloc.c).
 * Used by the tests after every step, by debug builds after every mutation, and by
 * `shmkv-inspect --check`. */
#include <stdlib.h>

#include "layout.h"

#define CHECK(n, cond)                                                                 \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            *invariant = (n);                                                          \
            rc = SHMKV_ECHECK;                                                         \
            goto out;                                                                  \
        }                                                                              \
    } while (0)

#define BIT_TEST(bits, n) ((bits)[(n) >> 3] & (1u << ((n) & 7)))
#define BIT_SET(bits, n) ((bits)[(n) >> 3] |= (unsigned char)(1u << ((n) & 7)))

/* Returns 0, SHMKV_ECHECK with *invariant set, or SHMKV_ENOMEM. Reads only; lock held. */
int locked_check(shmkv_t *t, int *invariant)
{
    const struct shmkv_header *h = t->hdr;
    struct shmkv_geometry g;
    uint64_t count = h->count, used_slots = 0, empty = 0, used = 0, unit, size;
    uint64_t next_expiry = h->next_expiry, turn_min = h->turn_min, cursor = h->purge_cursor;
    uint64_t i;
    unsigned char *seen = calloc((size_t)(t->data_units + 7) / 8, 1);
    int rc = SHMKV_OK;

    if (seen == NULL)
        return SHMKV_ENOMEM;
    CHECK(1, memcmp(h->magic, SHMKV_MAGIC, sizeof h->magic) == 0 &&
                 h->version == SHMKV_FORMAT_VERSION && h->header_size == sizeof *h &&
                 shmkv_layout(h->capacity, h->key_size, h->value_size, h->memory, &g) ==
                     SHMKV_OK &&
                 g.capacity == t->capacity && g.key_size == t->key_size &&
                 g.value_size == t->value_size && g.nslots == h->nslots &&
                 g.index_offset == h->index_offset && g.data_offset == h->data_offset &&
                 g.data_size / UNIT == h->data_units && g.total_size == h->total_size);
    CHECK(2, count <= t->capacity);
    /* The blocks first: the walks below rely on their sizes. */
    rc = alloc_check(t, invariant);
    if (rc != SHMKV_OK)
        goto out;

    for (i = 0; i < t->nslots; i++) {
        uint64_t s = slot_load(t, i), hash, found_slot = 0;
        struct shmkv_block *b, *found = NULL;

        if (s == 0) {
            empty++;
            continue;
        }
        used_slots++;
        CHECK(3, index_entry(t, s, &b) == SHMKV_OK &&
                     alloc_valid_block(t, SLOT_UNIT(s) - 1, &size) == SHMKV_OK);
        hash = shmkv_siphash13(block_key(b), b->key_len, t->k0, t->k1);
        CHECK(4, SLOT_TAG(s) == (uint32_t)hash);
        CHECK(5, index_find(t, hash, (const char *)block_key(b), b->key_len, &found_slot,
                            &found) == SHMKV_OK && found_slot == i);
        CHECK(6, !BIT_TEST(seen, SLOT_UNIT(s) - 1));
        BIT_SET(seen, SLOT_UNIT(s) - 1);
    }
    CHECK(7, used_slots == count);
    for (unit = 0; unit < t->data_units; unit += size) {
        const struct shmkv_block *b = block_at(t, unit);

        alloc_valid_block(t, unit, &size);  /* alloc_check() has vouched for every size */
        if (b->state != BLOCK_USED)
            continue;
        used++;
        CHECK(7, BIT_TEST(seen, unit));    /* a block of the walk, not one a slot made up */
        CHECK(9, b->referenced != REF_PINNED);
        CHECK(11, b->u.expires == 0 || (next_expiry != 0 && next_expiry <= b->u.expires));
        CHECK(11, b->u.expires == 0 || unit >= cursor ||
                      (turn_min != 0 && turn_min <= b->u.expires));
    }
    CHECK(7, used == count);
    CHECK(9, h->intent_old == 0 && h->intent_new == 0 && h->move_from == 0 &&
                 h->clearing == 0);
    CHECK(9, (__atomic_load_n(&h->seq, __ATOMIC_RELAXED) & 1) == (uint64_t)t->writing);
    CHECK(10, empty > 0);
out:
    free(seen);
    return rc;
}
