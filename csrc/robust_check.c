/* What the core needs of a C library beyond POSIX, checked against whichever one this program
 * is linked with: robust, process-shared mutexes that pass a dead holder's lock to the next
 * locker, so that recovery runs. The Python suite checks this with glibc. `make robust-check`
 * links this program statically with musl (zig cc), because no musl Python is at hand to run
 * the suite on; cibuildwheel's musllinux jobs then run the whole suite on the musl wheel.
 *
 * One table lives in a shared anonymous mapping. A child process:
 *   1. exits holding the lock: the parent's next write recovers the table;
 *   2. is killed with SIGKILL holding the lock: the same;
 *   3. holds the lock, alive: the parent's write times out, so the lock is shared at all,
 *      and the lock's owner word names the child (layout.h, MUTEX_OWNER_WORD);
 *   4. dies at each crash point of an overwrite: the parent reads the old or the new value,
 *      never anything else, and the invariant check passes.
 * And a thread that holds the lock and locks again is told so at once (SHMKV_ELOCK).
 * Prints "ok" and exits 0 when all of that holds; otherwise names what failed and exits 1. */

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "shmkv.h"

static int failures;

static void expect(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "robust_check: FAILED: %s\n", what);
        failures++;
    }
}

static shmkv_t *open_table(void *base, uint64_t size)
{
    shmkv_t *t = NULL;
    char why[256] = "";

    if (shmkv_open(base, size, &t, why, sizeof why) != SHMKV_OK) {
        fprintf(stderr, "robust_check: shmkv_open: %s\n", why);
        exit(1);
    }
    return t;
}

/* Forks a child that attaches, takes the lock as a writer, tells the parent through a pipe,
 * and then exits (how == 'x'), or waits to be killed ('k'), or waits for the pipe to close
 * ('w'); returns its pid once it holds the lock. */
static pid_t child_holding_lock(void *base, uint64_t size, char how, int *release)
{
    int ready[2], hold[2];
    char byte;

    if (pipe(ready) != 0 || pipe(hold) != 0)
        exit(1);
    pid_t pid = fork();
    if (pid == 0) {
        close(ready[0]);
        close(hold[1]);  /* or its own copy would keep the pipe open */
        shmkv_t *t = open_table(base, size);
        if (shmkv_testing_hold_lock(t, 1) != SHMKV_OK)
            _exit(2);
        if (write(ready[1], "r", 1) != 1)
            _exit(3);
        if (how == 'x')
            _exit(0);
        while (read(hold[0], &byte, 1) > 0) {
        }
        shmkv_testing_hold_lock(t, 0);
        _exit(0);
    }
    close(ready[1]);
    close(hold[0]);
    expect(read(ready[0], &byte, 1) == 1, "the child took the lock");
    close(ready[0]);
    *release = hold[1];
    return pid;
}

static int exit_code(pid_t pid)
{
    int status;

    if (waitpid(pid, &status, 0) != pid)
        return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static uint64_t recoveries(shmkv_t *t)
{
    struct shmkv_stats s;

    return shmkv_stats(t, &s) == SHMKV_OK ? s.recoveries : UINT64_MAX;
}

static int sound(shmkv_t *t)
{
    int invariant = 0;

    return shmkv_check(t, &invariant) == SHMKV_OK;
}

int main(void)
{
    struct shmkv_geometry g;
    char value[64];
    int release;

    if (shmkv_layout(16, 16, 64, 0, &g) != SHMKV_OK)
        return 1;
    void *base = mmap(NULL, g.total_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                      -1, 0);
    if (base == MAP_FAILED)
        return 1;
    unsigned char seed[16] = {0};
    if (shmkv_init(base, g.total_size, 16, 16, 64, 0, 0, seed, getpid()) != SHMKV_OK)
        return 1;
    shmkv_t *t = open_table(base, g.total_size);
    expect(shmkv_put(t, "k", 1, "old", 3, 0, 0) == SHMKV_INSERTED, "a first write");

    /* 1 and 2: a holder that exits, and one that is killed. */
    for (int round = 0; round < 2; round++) {
        pid_t pid = child_holding_lock(base, g.total_size, round == 0 ? 'x' : 'k', &release);
        if (round == 1)
            kill(pid, SIGKILL);
        expect(exit_code(pid) == (round == 0 ? 0 : 128 + SIGKILL), "the holder died");
        close(release);
        expect(shmkv_put(t, "k", 1, "old", 3, 0, 0) == SHMKV_REPLACED,
               round == 0 ? "a write after a holder exited" : "a write after a holder was killed");
        expect(recoveries(t) == (uint64_t)round + 1, "the dead holder's lock was recovered");
        expect(sound(t), "the table is sound after a recovery");
    }

    /* 3: a live holder makes the parent wait, and time out. */
    pid_t pid = child_holding_lock(base, g.total_size, 'w', &release);
    shmkv_set_lock_timeout(t, 50 * 1000 * 1000);
    expect(shmkv_put(t, "k", 1, "new", 3, 0, 0) == SHMKV_ELOCKTIMEOUT,
           "a write waits for a live holder in another process");
    expect(shmkv_lock_owner(t) == pid, "the lock's owner word names the holder");
    close(release);
    expect(exit_code(pid) == 0, "the live holder released the lock");
    shmkv_set_lock_timeout(t, 5LL * 1000 * 1000 * 1000);

    /* 4: a writer that dies at crash point n of an overwrite, for every n until one finishes. */
    int done = 0;
    for (int point = 1; !done && point < 100; point++) {
        pid = fork();
        if (pid == 0) {
            shmkv_t *w = open_table(base, g.total_size);
            shmkv_testing_crash_after(point);
            shmkv_put(w, "k", 1, "a longer, newer value", 21, 0, 0);
            _exit(0);
        }
        int code = exit_code(pid);
        done = code == 0;
        expect(code == 0 || code == SHMKV_FAULT_EXIT, "the writer died at its crash point");
        int n = shmkv_get(t, "k", 1, value, sizeof value);
        expect((n == 3 && memcmp(value, "old", 3) == 0) ||
               (n == 21 && memcmp(value, "a longer, newer value", 21) == 0),
               "a read after a crash gives the old value or the new one");
        expect(sound(t), "the table is sound after a crashed write");
        if (!done)
            expect(shmkv_put(t, "k", 1, "old", 3, 0, 0) == SHMKV_REPLACED, "a rewrite");
    }

    expect(done, "an overwrite ends within 100 crash points");

    expect(shmkv_testing_hold_lock(t, 1) == SHMKV_OK, "the parent takes the lock");
    expect(shmkv_put(t, "k", 1, "new", 3, 0, 0) == SHMKV_ELOCK,
           "a relock by the holding thread fails at once");
    expect(shmkv_testing_hold_lock(t, 0) == SHMKV_OK, "the parent releases the lock");
    shmkv_close(t);
    shmkv_free(t);
    if (failures)
        return 1;
    puts("ok");
    return 0;
}
