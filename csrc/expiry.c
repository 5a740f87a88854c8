/* expiry.c -- deadlines, the clock they are read on, and the purge that reclaims the room of
 * expired entries.
 *
 * A deadline is an absolute time in ns on CLOCK_BOOTTIME (shmkv__now), which every process
 * of the machine reads alike and wall-clock changes do not move; 0 means never. Lookups
 * compare it with the clock, read once per operation and only when a deadline is involved,
 * so tables without TTLs never read the clock. Reclaiming is lazy: a write that meets its
 * key expired removes it, and the purge reclaims the rest. The purge walks the data area's
 * blocks in turns (locked_purge_steps): len() and purge_expired() take a whole turn at once,
 * an insert into a full table only as many blocks as it needs to find room. Every purge waits
 * for next_expiry, a lower bound of all deadlines kept in the header, to say that something
 * may have expired; the end of a turn sets it to the earliest deadline the turn saw. So tables
 * without deadlines never walk, and a full table with a trickle of expiring keys walks its
 * data area about once per turn, not once per insert. Reads never reclaim (they are lock-free).
 * Every reclaim counts one expiration.
 *
 * next_expiry is lowered before an entry with an earlier deadline becomes live, so a crash
 * leaves it too low at worst, which costs one needless walk. A segment does not outlive a
 * reboot, so neither does any deadline; processes in different time namespaces (a container
 * may have its own) would disagree, and must not share a table. */
#include <time.h>

#include "layout.h"

static uint64_t fake_now;      /* shmkv_testing_set_clock(); 0 = the real clock */

void shmkv_testing_set_clock(uint64_t now_ns)
{
    __atomic_store_n(&fake_now, now_ns, __ATOMIC_RELAXED);
}

/* CLOCK_BOOTTIME is CLOCK_MONOTONIC plus the time the machine spent suspended, so that a
 * 30-minute session does not outlive a 2-hour suspend. */
uint64_t shmkv__now(void)
{
    uint64_t fake = __atomic_load_n(&fake_now, __ATOMIC_RELAXED);
    struct timespec ts;

    if (__builtin_expect(fake != 0, 0))
        return fake;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    return (uint64_t)ts.tv_sec * UINT64_C(1000000000) + (uint64_t)ts.tv_nsec;
}

uint64_t op_now(struct op *op)
{
    if (op->now == 0)
        op->now = shmkv__now();
    return op->now;
}

/* Whether next_expiry says that some entry may have expired: the clock is read only if some
 * entry has a deadline at all. */
int op_expiry_due(const shmkv_t *t, struct op *op)
{
    uint64_t next = t->hdr->next_expiry;

    return next != 0 && next <= op_now(op);
}

int op_expired(struct op *op, const struct shmkv_block *b)
{
    uint64_t d = __atomic_load_n(&b->u.expires, __ATOMIC_RELAXED);

    return d != 0 && d <= op_now(op);
}

/* Keeps next_expiry and turn_min at or below every live deadline (invariant 11). Called
 * before an entry with deadline d becomes live, so a crash can only leave them lower than
 * they need be, which costs a purge that finds nothing and sets them right. */
void locked_note_deadline(shmkv_t *t, uint64_t d)
{
    struct shmkv_header *h = t->hdr;

    if (d == 0)
        return;
    if (min_deadline(h->next_expiry, d) != h->next_expiry)
        STORE(h->next_expiry, d);
    h->turn_min = min_deadline(h->turn_min, d);
}

/* The purge walks the blocks in turns, from unit 0 to the end of the data area, reclaiming
 * every entry whose deadline is at or before now; a turn may be spread over many calls, each
 * taking up to `steps` blocks from purge_cursor on. turn_min gathers the deadlines the turn
 * passes (and those noted meanwhile), so that when the turn ends it is the earliest deadline
 * left and becomes next_expiry. An insert into a full table thus pays for the blocks it
 * walks, not for a whole data area per expired key. A reclaimed block merges with its free
 * neighbours, and the cursor follows the merge (alloc.c). Returns the number reclaimed, or a
 * negative code. */
int64_t locked_purge_steps(shmkv_t *t, uint64_t now, uint64_t steps)
{
    struct shmkv_header *h = t->hdr;
    uint64_t cursor = h->purge_cursor, turn_min = h->turn_min, size;
    int64_t purged = 0;

    if (cursor >= t->data_units) {  /* a hint out of range: start the turn again */
        cursor = 0;
        turn_min = 0;
    }
    for (; steps > 0 && cursor < t->data_units; steps--) {
        struct shmkv_block *b = block_at(t, cursor);
        uint64_t d;
        int rc = alloc_valid_block(t, cursor, &size);

        if (rc != SHMKV_OK)
            return rc;
        d = b->state == BLOCK_USED ? b->u.expires : 0;
        if (d == 0 || d > now) {
            turn_min = min_deadline(turn_min, d);
            cursor += size;
            continue;
        }
        h->purge_cursor = cursor;
        h->turn_min = turn_min;
        rc = locked_remove_block(t, b);
        if (rc != SHMKV_OK)
            return rc;
        cursor = h->purge_cursor;  /* the block the freed one merged into */
        h->expirations++;
        purged++;
    }
    h->turn_min = turn_min;
    h->purge_cursor = cursor;
    if (cursor >= t->data_units) {  /* the turn is complete */
        STORE(h->next_expiry, turn_min);
        h->purge_cursor = 0;
        h->turn_min = 0;
    }
    return purged;
}
