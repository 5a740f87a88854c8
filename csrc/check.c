/* check.c -- the full invariant check of a table, one CHECK per invariant, numbered as in the
 * INVARIANTS list at the top of table.c. Used by the tests after every step, by debug builds
 * after every mutation, and by `shmkv-inspect --check`. */
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
    uint64_t count = h->count, hw = h->high_water, used_slots = 0, empty = 0, used = 0;
    uint64_t next_expiry = h->next_expiry, turn_min = h->turn_min, cursor = h->purge_cursor;
    uint64_t i, n, steps, head;
    unsigned char *seen = calloc((size_t)(t->nentries + 7) / 8, 1);
    int rc = SHMKV_OK;

    if (seen == NULL)
        return SHMKV_ENOMEM;
    CHECK(1, memcmp(h->magic, SHMKV_MAGIC, sizeof h->magic) == 0 &&
                 h->version == SHMKV_FORMAT_VERSION && h->header_size == sizeof *h &&
                 shmkv_layout(h->capacity, h->key_size, h->value_size, &g) == SHMKV_OK &&
                 g.capacity == t->capacity && g.key_size == t->key_size &&
                 g.value_size == t->value_size && g.nslots == h->nslots &&
                 g.nentries == h->nentries && g.entry_size == h->entry_size &&
                 g.index_offset == h->index_offset && g.entries_offset == h->entries_offset &&
                 g.total_size == h->total_size);
    CHECK(2, count <= t->capacity && hw <= t->nentries && h->clock_hand < t->nentries &&
                 cursor <= hw);

    for (i = 0; i < t->nslots; i++) {
        uint64_t s = slot_load(t, i), hash, found_slot = 0;
        struct shmkv_entry *e, *found = NULL;
        uint32_t n1;

        if (s == 0) {
            empty++;
            continue;
        }
        used_slots++;
        n1 = SLOT_ENTRY(s);
        CHECK(3, n1 >= 1 && n1 <= hw);
        e = entry_at(t, n1 - 1);
        CHECK(3, e->link == LINK_USED && e->key_len <= t->key_size &&
                     e->value_len <= t->value_size);
        hash = shmkv_siphash13(entry_key(e), e->key_len, t->k0, t->k1);
        CHECK(4, SLOT_TAG(s) == (uint32_t)hash);
        CHECK(5, locked_find(t, hash, (const char *)entry_key(e), e->key_len, &found_slot,
                             &found) == SHMKV_OK && found_slot == i);
        CHECK(6, !BIT_TEST(seen, n1 - 1));
        BIT_SET(seen, n1 - 1);
    }
    CHECK(7, used_slots == count);
    for (n = 0; n < hw; n++) {
        const struct shmkv_entry *e = entry_at(t, n);

        if (e->link != LINK_USED)
            continue;
        used++;
        CHECK(9, e->referenced != REF_PINNED);
        CHECK(11, e->expires == 0 || (next_expiry != 0 && next_expiry <= e->expires));
        CHECK(11, e->expires == 0 || n >= cursor || (turn_min != 0 && turn_min <= e->expires));
    }
    CHECK(7, used == count);

    /* Free entries are never USED, so none of them is marked in `seen` yet: a second visit
     * means a cycle or a list that crosses itself. */
    for (head = h->free_head, steps = 0; head != 0; steps++) {
        struct shmkv_entry *e;

        CHECK(8, head <= hw && steps < hw && !BIT_TEST(seen, head - 1));
        BIT_SET(seen, head - 1);
        e = entry_at(t, head - 1);
        CHECK(8, e->link <= t->nentries);
        head = e->link;
    }
    CHECK(8, steps + count == hw);
    CHECK(9, h->intent_old == 0 && h->intent_new == 0);
    CHECK(9, (__atomic_load_n(&h->seq, __ATOMIC_RELAXED) & 1) == (uint64_t)t->writing);
    CHECK(10, empty > 0);
out:
    free(seen);
    return rc;
}
