/* shmkv_api.h -- THE C API of shmkv, read verbatim by cffi's cdef() and included by
 * every .c file (through shmkv.h), so a prototype that drifts from its definition fails to
 * compile instead of passing the wrong type at run time.
 *
 * cffi's cdef() reads no preprocessor conditionals and only `#define NAME <integer literal>`,
 * so this file holds only what both readers accept; the include guard lives in shmkv.h.
 *
 * Conventions: every fallible call returns an int. 0 (or, where documented, a non-negative
 * length or flag) means success; a negative value is one of the SHMKV_E* codes below. Codes
 * are only ever appended, never renumbered. On error, outputs and the table are unchanged.
 * A dead lock owner is repaired inside the call and never reaches the caller as an error. */

#define SHMKV_ABI 4

#define SHMKV_OK 0
#define SHMKV_ENOTFOUND -1
#define SHMKV_EKEYSIZE -2
#define SHMKV_EVALUESIZE -3
#define SHMKV_EFULL -4
#define SHMKV_EINCOMPATIBLE -5
#define SHMKV_ECORRUPT -6
#define SHMKV_ENOTCOUNTER -7
#define SHMKV_EOVERFLOW -8
#define SHMKV_ECLOSED -9
#define SHMKV_ELOCKTIMEOUT -10
#define SHMKV_EBROKEN -11
#define SHMKV_ELOCK -12
#define SHMKV_EARG -13
#define SHMKV_ENOTREADY -14
#define SHMKV_EBUFSIZE -15
#define SHMKV_ECHECK -16
#define SHMKV_ENOMEM -17
#define SHMKV_ENOLOCK -18
#define SHMKV_ENOROOM -19
/* One past the most negative code: tests walk SHMKV_OK > code > SHMKV_ELAST. */
#define SHMKV_ELAST -20

/* Results of shmkv_put(). SHMKV_EVICTED is or-ed into SHMKV_INSERTED when a live entry was
 * evicted to make room for the new key (only in tables created with SHMKV_EVICT). */
#define SHMKV_NOT_STORED 0
#define SHMKV_INSERTED 1
#define SHMKV_REPLACED 2
#define SHMKV_EVICTED 4

/* Flags of shmkv_put() and shmkv_compare_and_swap(). */
#define SHMKV_PUT_IF_ABSENT 1
#define SHMKV_KEEP_TTL 2       /* a replaced value keeps the old one's deadline */

/* Flags of shmkv_expire(). */
#define SHMKV_TOUCH 1          /* also counts as a use of the key, for eviction */

/* Table flags, fixed at creation (shmkv_init). */
#define SHMKV_EVICT 1          /* a full table evicts an expired or least recently used entry */

/* Largest accepted geometry (see SEGMENT LAYOUT in table.c for why). */
#define SHMKV_MAX_CAPACITY 2147483646
#define SHMKV_MAX_KEY_SIZE 1048576
#define SHMKV_MAX_VALUE_SIZE 1073741824
#define SHMKV_MAX_DATA_SIZE 68719476480

typedef struct shmkv shmkv_t;

/* Sizes and offsets of a table's segment, as computed by shmkv_layout(). */
struct shmkv_geometry {
    uint64_t capacity;        /* keys a user may store */
    uint64_t nslots;          /* index slots, a power of two, > 1.5 * capacity */
    uint64_t key_size;        /* largest key, bytes */
    uint64_t value_size;      /* largest value, bytes */
    uint64_t memory;          /* the cap asked for (0: sized so that capacity largest fit) */
    uint64_t max_entry;       /* bytes the largest entry takes in the data area */
    uint64_t header_size;     /* bytes of the table header */
    uint64_t index_offset;    /* offset of the index from the start of the segment */
    uint64_t data_offset;     /* offset of the data area */
    uint64_t data_size;       /* bytes of the data area, a multiple of 16 */
    uint64_t total_size;      /* bytes the segment must have */
    uint64_t min_memory;      /* the smallest `memory` accepted for this capacity and sizes */
};

/* A consistent copy of a table's header, taken under the lock. */
struct shmkv_stats {
    struct shmkv_geometry geometry;
    uint64_t version;         /* format version of the segment */
    int64_t creator_pid;
    uint64_t count;           /* live entries */
    uint64_t bytes_stored;    /* key and value bytes of the live entries */
    uint64_t bytes_free;      /* bytes of the data area in free blocks */
    uint64_t largest_free;    /* bytes of the largest free block */
    uint64_t free_blocks;     /* free blocks: 1 means no fragmentation */
    uint64_t hits;
    uint64_t misses;
    uint64_t inserts;
    uint64_t updates;
    uint64_t deletes;
    uint64_t evictions;
    uint64_t expirations;
    uint64_t recoveries;      /* times a dead lock owner was found and the table repaired */
    uint64_t lock_timeouts;
    uint64_t compactions;     /* times free room was gathered by moving values */
    uint64_t moved_bytes;     /* bytes those moves copied */
    uint64_t broken;          /* 1 if a recovery could not make the table sound */
};

int shmkv_abi(void);
const char *shmkv_strerror(int code);
const char *shmkv_invariant_text(int invariant);

/* Geometry of a table. memory == 0 sizes the data area so that capacity entries of the
 * largest size (and one more, for a replace) always fit; otherwise the whole segment takes
 * at most `memory` bytes. SHMKV_EARG if a parameter is out of range, the size overflows, or
 * memory is below out->min_memory (which is then set) or makes a data area above
 * SHMKV_MAX_DATA_SIZE. */
int shmkv_layout(uint64_t capacity, uint64_t key_size, uint64_t value_size, uint64_t memory,
                 struct shmkv_geometry *out);

/* Lays a fresh table into a zero-filled mapping of `size` bytes and sets the ready flag last.
 * The mapping must not yet be visible to other attachers as a table. flags: SHMKV_EVICT. */
int shmkv_init(void *base, uint64_t size, uint64_t capacity, uint64_t key_size,
               uint64_t value_size, uint64_t memory, uint32_t flags,
               const unsigned char *seed16, int64_t creator_pid);

/* Validates the header of a mapping and returns a per-process handle for it.
 * SHMKV_ENOTREADY: the header is not (yet) marked ready. SHMKV_EINCOMPATIBLE: not a shmkv
 * table, another format version or build, truncated, or an inconsistent header; then `why`
 * (if not NULL) receives a sentence saying which. */
int shmkv_open(void *base, uint64_t size, shmkv_t **out, char *why, uint32_t whycap);
/* Ends the handle's use of the mapping: from the moment it starts, every call on the handle
 * returns SHMKV_ECLOSED without touching the segment; it waits for the calls already inside
 * (other threads; each is bounded by the lock timeout) to leave, and adds the handle's
 * pending read counts to the table. After it returns, the caller may unmap the segment.
 * Idempotent, and safe to call from several threads at once. The handle's memory stays
 * valid, for threads that may still pass it, until shmkv_free(). */
void shmkv_close(shmkv_t *t);
/* Frees a handle, closed or not, without touching the segment (which may be unmapped):
 * call it once no thread can pass the handle any more (cffi's ffi.gc does). */
void shmkv_free(shmkv_t *t);
/* Makes the handle an observer: from now on its calls add nothing to the table's shared
 * counters (hits, misses, lock timeouts) and mark no key used for eviction, so that
 * inspecting a table changes nothing in it. Pending counts are dropped. */
int shmkv_observe(shmkv_t *t);
/* Forbids the handle the table's lock: every call that would take it fails with
 * SHMKV_ENOLOCK instead, and reads stay optimistic. For inspecting another user's table:
 * glibc links a robust mutex it locks into the locking thread's list through pointers kept
 * in the mutex itself, in memory that user can write, and writes through them at unlock;
 * and a locker may have to run recovery on that user's data. */
int shmkv_forbid_lock(shmkv_t *t);
/* Lock waits longer than this fail with SHMKV_ELOCKTIMEOUT; <= 0 means the default. */
void shmkv_set_lock_timeout(shmkv_t *t, int64_t nanoseconds);

/* Time to live: every ttl_ns is a duration in nanoseconds from the call, 0 meaning "never
 * expires". An entry whose deadline has passed is absent to every call; its room is reclaimed
 * by the next write that meets it, by an insert that needs room, by shmkv_len() and by
 * shmkv_purge_expired(), each reclaim counted in stats' expirations. */

/* Copies the value of key into out and returns its length. With out == NULL, only tells
 * whether the key is present (the length) and counts neither a hit nor a miss. */
int shmkv_get(shmkv_t *t, const char *key, uint32_t klen, char *out, uint32_t outcap);
/* Returns SHMKV_INSERTED (maybe | SHMKV_EVICTED), SHMKV_REPLACED or (with
 * SHMKV_PUT_IF_ABSENT) SHMKV_NOT_STORED. A write that finds no room fails with SHMKV_EFULL
 * (keys: count is at capacity) or SHMKV_ENOROOM (bytes: the data area is full) unless the
 * table evicts. The value expires after ttl_ns, or with
 * SHMKV_KEEP_TTL when the value it replaces would have. */
int shmkv_put(shmkv_t *t, const char *key, uint32_t klen, const char *value, uint32_t vlen,
              int flags, uint64_t ttl_ns);
/* Stores value if key is absent; either way copies the value now stored into out and
 * returns its length. */
int shmkv_setdefault(shmkv_t *t, const char *key, uint32_t klen, const char *value,
                     uint32_t vlen, char *out, uint32_t outcap);
/* Removes key; with out != NULL, first copies its value there and returns its length. */
int shmkv_pop(shmkv_t *t, const char *key, uint32_t klen, char *out, uint32_t outcap);
/* Adds delta to the signed 64-bit little-endian counter under key (an absent key starts at
 * initial, and then expires after ttl_ns; an existing counter keeps its deadline) and stores
 * the result in *out. */
int shmkv_incr(shmkv_t *t, const char *key, uint32_t klen, int64_t delta, int64_t initial,
               uint64_t ttl_ns, int64_t *out);
/* Replaces the value of key by new if it currently equals expected: returns 1 if swapped,
 * 0 if the key is absent or holds another value. The new value expires as in shmkv_put(). */
int shmkv_compare_and_swap(shmkv_t *t, const char *key, uint32_t klen, const char *expected,
                           uint32_t elen, const char *value, uint32_t vlen, int flags,
                           uint64_t ttl_ns);
/* Gives key a new deadline, ttl_ns from now (0: never expires): 1 if key is present, 0 if
 * not. With SHMKV_TOUCH, it also counts as a use (sliding expiry of a session in use). */
int shmkv_expire(shmkv_t *t, const char *key, uint32_t klen, uint64_t ttl_ns, int flags);
/* Time left before key expires, in ns, in *left (0: it never expires). SHMKV_ENOTFOUND if
 * absent (or expired). */
int shmkv_ttl(shmkv_t *t, const char *key, uint32_t klen, uint64_t *left);
/* Reclaims the room of every expired entry now; returns how many, or a negative code. */
int64_t shmkv_purge_expired(shmkv_t *t);
int shmkv_clear(shmkv_t *t);
/* Number of live entries, or a negative code. */
int64_t shmkv_len(shmkv_t *t);

/* Batch calls, each under one lock acquisition. Keys (and values) are packed end to end,
 * their lengths in klens (vlens). get_many writes the values found end to end into out and
 * each one's length into vlens[i], or -1 for a missing key; it returns SHMKV_EBUFSIZE with
 * the bytes needed in *needed if out is too small. set_many stores all or nothing: if the new
 * keys do not fit, it returns SHMKV_EFULL and changes nothing; its keys must be distinct,
 * and `scratch` is 2n words of room, so that keys are hashed before the lock is taken. In a
 * table with SHMKV_EVICT, set_many evicts other keys as its inserts need room, and fails
 * with SHMKV_EFULL only if it has more keys than the table's capacity, or SHMKV_ENOROOM if
 * the batch alone needs more bytes than the data area has. */
int shmkv_get_many(shmkv_t *t, uint32_t n, const char *keys, const uint32_t *klens,
                   char *out, uint64_t outcap, int64_t *vlens, uint64_t *needed);
int shmkv_set_many(shmkv_t *t, uint32_t n, const char *keys, const uint32_t *klens,
                   const char *values, const uint32_t *vlens, uint64_t ttl_ns,
                   uint64_t *scratch);

/* A point-in-time snapshot of every live key (and value, if with_values), taken under the
 * lock: records of [u32 klen][key]([u32 vlen][value]), lengths in native byte order.
 * Returns the number of records and the bytes used in *needed, or SHMKV_EBUFSIZE with the
 * bytes needed in *needed. */
int64_t shmkv_snapshot(shmkv_t *t, int with_values, char *out, uint64_t outcap,
                       uint64_t *needed);

int shmkv_stats(shmkv_t *t, struct shmkv_stats *out);
/* The same without taking the lock, for a look at a table whose lock is held (inspection):
 * each field is read once, but the fields may come from different moments. */
int shmkv_peek_stats(shmkv_t *t, struct shmkv_stats *out);
/* The table flags it was created with (SHMKV_EVICT), from the handle: no lock. */
int shmkv_table_flags(shmkv_t *t);
/* The table's geometry, from the handle's validated copy: no lock, cannot fail but closed. */
int shmkv_geometry(shmkv_t *t, struct shmkv_geometry *out);

/* Walks the whole table under the lock and verifies every invariant listed in table.c.
 * Returns 0, or SHMKV_ECHECK with the number of the first violated invariant in *invariant. */
int shmkv_check(shmkv_t *t, int *invariant);

/* Probe lengths of the live keys: hist[i] counts the keys a lookup finds at its (i+1)-th probe,
 * the last bucket also those found later. Returns the longest probe, or a negative code. */
int64_t shmkv_probe_lengths(shmkv_t *t, uint64_t *hist, uint32_t n);

/* The thread id of the lock's owner (as the kernel records it in the robust futex), 0 if the
 * lock is free, -1 where the C library does not say. Read without taking the lock. */
int64_t shmkv_lock_owner(shmkv_t *t);

/* Who holds the lock, read without taking it (lock.c, PID NAMESPACES). */
struct shmkv_lock_holder {
    int64_t tid;              /* as shmkv_lock_owner(): the holder's thread id in its PID
                               * namespace, 0 if free, -1 if the C library does not say */
    int64_t pid;              /* the holder's process id in its namespace; 0 if not recorded */
    int32_t same_pidns;       /* 1: the holder is in this process's PID namespace; 0: in
                               * another; -1: not recorded (free, just taken, or a holder
                               * that died before recording it) */
};
int shmkv_lock_holder(shmkv_t *t, struct shmkv_lock_holder *out);

/* For tests: the process ends with _exit(SHMKV_FAULT_EXIT) at the `points`-th crash point
 * from now (each ordered store of a mutation is one; see layout.h); 0 disarms. */
#define SHMKV_FAULT_EXIT 86
void shmkv_testing_crash_after(int64_t points);

/* For tests: deadlines are read from a clock that stands at now_ns (and moves only when this
 * is called again) in this process; 0 returns to the real clock (CLOCK_BOOTTIME). */
void shmkv_testing_set_clock(uint64_t now_ns);

/* For tests: with hold != 0, takes the table's lock and returns holding it, as a writer
 * (hold == 1) or as a reader that leaves optimistic readers be (hold == 2), so that a process
 * can die as its owner; with hold == 0, releases it again. A process must release the lock
 * before it unmaps the table: glibc links held robust mutexes into a per-thread list, and an
 * unmapped list element crashes the next robust lock. Never used by the library itself. */
int shmkv_testing_hold_lock(shmkv_t *t, int hold);
/* For tests: the clock lock waits are measured on, CLOCK_MONOTONIC where the running C
 * library has pthread_mutex_clocklock (lock.c), else CLOCK_REALTIME. */
int shmkv_testing_lock_clock(void);
/* For tests: flips the low bit of the table's sequence word, as damage would. */
int shmkv_testing_flip_seq(shmkv_t *t);
/* For tests: marks the block at `offset` bytes into the data area used, as a lock-free reader
 * does after its read, when a writer may have freed or moved the block it read meanwhile. */
int shmkv_testing_mark_used_at(shmkv_t *t, uint64_t offset);
/* For tests: the offset of a header field ("count", "lock", ...) from the segment's start,
 * or of a block field ("block.size", ..., "block.key") from the block's; SHMKV_EARG if
 * unknown. Block states: */
int64_t shmkv_testing_offset(const char *field);
#define SHMKV_BLOCK_FREE 1162170950
#define SHMKV_BLOCK_BUSY 1498633538
#define SHMKV_BLOCK_USED 1145394005
